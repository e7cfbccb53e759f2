"""The ingest flow with several sources: mapped on Prefect's local runner or on Dask, and resumed after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.ingest import IngestParams, ingest_dataset
from tasks.dataset import load_dataset
from tasks.dataset_parts import PART_FILE

ROOT = Path(__file__).resolve().parents[2]
TILING = {"tile_size": 12, "stride": 12, "block_size": 12}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Path]]:
    from domains.satellite.examples import write_example

    root = tmp_path_factory.mktemp("scenes")
    return [write_example(root / name, seed=seed) for seed, name in enumerate(("first", "second"))]


def _params(scenes, out: Path, **extra) -> IngestParams:
    return IngestParams(domain="satellite", sources=[str(s["scene_dir"]) for s in scenes],
                        source_labels=[str(s["labels"]) for s in scenes], out=str(out), tiling=TILING, **extra)


def test_the_dask_runner_gives_the_dataset_of_the_local_runner(tmp_path: Path, scenes) -> None:
    from distributed import LocalCluster

    local = ingest_dataset(_params(scenes, tmp_path / "local"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        on_dask = ingest_dataset(_params(scenes, tmp_path / "dask",
                                         runner={"kind": "dask", "address": cluster.scheduler_address}))
        ran_on_dask = set(cluster.scheduler.task_prefixes)  # what the Dask scheduler was given to run
    assert on_dask.digest == local.digest and on_dask.sources == local.sources == 2
    assert "ingest_source" in ran_on_dask
    assert load_dataset(tmp_path / "dask").info.sources == tuple(str(s["scene_dir"]) for s in scenes)


def test_parameters_name_sources_one_way_and_align_their_labels() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="either 'source'"):
        IngestParams(source="a.tif", sources=["b.tif"], out="ds")
    with pytest.raises(ValidationError, match="either 'source'"):
        IngestParams(out="ds")
    with pytest.raises(ValidationError, match="one entry per source"):
        IngestParams(sources=["a.tif", "b.tif"], source_labels=["a-labels.tif"], out="ds")
    shared = IngestParams(sources=["a", "b"], labels="findings.csv", out="ds")
    assert shared.label_paths() == ["findings.csv", "findings.csv"]
    assert IngestParams(sources=["a", "b"], source_labels=["la", ""], out="ds").label_paths() == ["la", None]
    assert IngestParams(source="a", out="ds").source_paths() == ["a"]


_KILLABLE_INGEST = """
import sys, time
from dataclasses import replace
sys.path.insert(0, {root!r})
import domains.satellite

real_read = domains.satellite.SPEC.read_samples

def read_or_stall(request):
    # The test's stand-in for a long second scene: it never finishes, the process is killed meanwhile.
    if request.source.parent.parent.name == "second":
        print("second source started", flush=True)
        time.sleep(300)
    return real_read(request)

domains.satellite.SPEC = replace(domains.satellite.SPEC, read_samples=read_or_stall)
from flows.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.slow  # the killed ingest runs in its own process with its own Prefect server: 20-40 s on 2 cores
def test_a_two_scene_ingest_killed_after_the_first_scene_resumes_without_reading_it_again(tmp_path: Path,
                                                                                         scenes) -> None:
    out = tmp_path / "dataset"
    argv = ["ingest", "--domain", "satellite", "--out", str(out), "--tile-size", "12", "--block-size", "12",
            "--set", "keep_parts=true"]
    for scene in scenes:
        argv += ["--source", str(scene["scene_dir"]), "--labels", str(scene["labels"])]
    script = tmp_path / "ingest.py"
    script.write_text(_KILLABLE_INGEST.format(root=str(ROOT), argv=argv))
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}  # its own server
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    parts = tmp_path / ".dataset.parts"
    # Its own session: the kill takes the ingest and the Prefect server it started, as a crash would.
    ingest = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(parts.glob(f"*/{PART_FILE}")):
            assert ingest.poll() is None and time.monotonic() < deadline, ingest.stdout.read()[-3000:]
            time.sleep(0.2)
        os.killpg(ingest.pid, signal.SIGKILL)
    finally:
        ingest.wait(timeout=60)
    log = ingest.stdout.read()
    assert ingest.returncode == -signal.SIGKILL and "second source started" in log
    assert not out.exists()
    [finished] = list(parts.glob(f"*/{PART_FILE}"))
    before = finished.stat()

    receipt = ingest_dataset(_params(scenes, out, keep_parts=True))
    assert receipt.resumed == 1 and receipt.sources == 2
    after = finished.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # the first scene was not redone
    assert load_dataset(out).info.sources == tuple(str(s["scene_dir"]) for s in scenes)


def test_the_command_line_names_one_or_several_sources_with_shared_or_per_source_labels() -> None:
    from flows.cli import _ingest_sources_payload, build_parser

    def payload(*argv: str) -> dict:
        return _ingest_sources_payload(build_parser().parse_args(["ingest", "--out", "ds", *argv]))

    assert payload("--source", "a", "--labels", "l") == {"source": "a", "labels": "l"}
    assert payload("--sources", "a", "b", "--labels", "findings.csv") == {"sources": ["a", "b"],
                                                                          "labels": "findings.csv"}
    assert payload("--source", "a", "--labels", "la", "--source", "b", "--labels", "lb") == {
        "sources": ["a", "b"], "source_labels": ["la", "lb"]}
    with pytest.raises(SystemExit, match="2 --labels for 3 sources"):
        payload("--sources", "a", "b", "c", "--labels", "la", "--labels", "lb")
    with pytest.raises(SystemExit, match="needs --source"):
        payload()


@pytest.mark.slow  # a CLI process with its own Prefect server and two Dask worker processes: about 40-90 s
def test_a_temporary_dask_cluster_reports_to_the_ephemeral_prefect_server_of_its_flow(tmp_path: Path, scenes) -> None:
    import json
    import re

    local = ingest_dataset(_params(scenes, tmp_path / "local"))
    argv = [sys.executable, "-m", "flows.cli", "ingest", "--domain", "satellite", "--out", str(tmp_path / "dask"),
            "--tile-size", "12", "--block-size", "12", "--task-runner", "dask", "--set", "runner.workers=2"]
    for scene in scenes:
        argv += ["--source", str(scene["scene_dir"]), "--labels", str(scene["labels"])]
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}  # ephemeral mode
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    receipt = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    assert receipt["digest"] == local.digest and receipt["sources"] == 2
    # One temporary server, the flow's: a worker process without its URL would start one of its own.
    servers = set(re.findall(r"Starting temporary server on (\S+)", done.stdout + done.stderr))
    assert len(servers) == 1, servers
