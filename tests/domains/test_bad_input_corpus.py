"""The bad-input corpus through the real ``vitrail ingest`` and ``vitrail predict`` (drop-folder mode), every domain.

Each case of ``tests/fixtures/write_bad_inputs.py`` must end as the corpus promises: a clear error naming
the file and the problem with nothing written, or a quarantine entry while the rest is kept (ingested,
or predicted), or a normal result for names that are merely unusual. Never a half-written dataset, and
never a traceback for an input error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

from domains import domain_names
from domains.spec import printable_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from write_bad_inputs import CASES, write_case  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# About 3.5 minutes on 2 busy cores (a Prefect test server, 78 flow runs, one tiny ONNX model per domain).
pytestmark = pytest.mark.slow

TINY_TILING = ["--tile-size", "8", "--block-size", "16"]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
PARAMS = [pytest.param(domain, case, id=f"{domain}-{case}") for domain in domain_names() for case in CASES]


@pytest.fixture(scope="module", autouse=True)
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _console_to_current_stderr() -> None:
    """Point Prefect's console handlers at this test's captured stderr.

    They keep the stream they were created with (an earlier test's capture, closed since), and writing to
    it makes logging print errors of its own instead of Prefect's lines.
    """
    loggers = [logging.getLogger()] + [logger for logger in logging.root.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if getattr(handler, "console", None) is not None:
                handler.console.file = sys.stderr
            elif isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the old, closed stream first


@pytest.fixture(autouse=True)
def _log_streams_follow_capture(capfd):
    _console_to_current_stderr()
    yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny random-weight ONNX model per domain, logged to a temporary MLflow store (built on first use)."""
    built: dict[str, tuple[str, Path]] = {}

    def model_for(domain: str) -> tuple[str, Path]:
        if domain not in built:
            built[domain] = _log_tiny_model(domain, tmp_path_factory.mktemp(f"model-{domain}"))
        return built[domain]

    return model_for


def _log_tiny_model(domain: str, folder: Path) -> tuple[str, Path]:
    """Ingest the domain's example, build a one-block ViT for its channels and log it as an edge model."""
    from domains import IngestRequest, get_domain
    from tasks import tracking
    from tasks.compression.export import export_onnx
    from tasks.dataset import SplitParams, build_dataset, load_dataset
    from tasks.finetune import model_metadata
    from tasks.models import BackboneParams, NormalizedClassifier, build_backbone

    spec = get_domain(domain)
    source = spec.write_example(folder / "example", **({"size": 36} if domain == "satellite" else {}))["source"]
    request = IngestRequest(source=Path(source), tile_size=8, stride=8, block_size=16)
    info = build_dataset(domain, request, folder / "dataset", SplitParams())
    images = next(iter(load_dataset(folder / "dataset").splits.values())).images[:2]
    backbone = BackboneParams(patch_size=4, depth=1)
    net = build_backbone(backbone, info.channels, info.num_classes, info.tile_size, task=info.task)
    model = NormalizedClassifier(net, info.channel_mean, info.channel_std).eval()
    metadata = model_metadata(info, backbone)
    onnx_path = export_onnx(model, images, folder / "model.onnx", metadata)
    workdir = folder / "work"
    with tracking.stage_run(domain, "corpus-model", workdir):
        uri = tracking.log_edge_model(onnx_path, metadata, images)
    return uri, workdir


def _run_cli(argv: list[str], capfd, caplog) -> tuple[int, str, str]:
    from flows.cli import main

    caplog.clear()
    _console_to_current_stderr()
    with caplog.at_level(logging.INFO):
        code = main(argv)
    out, err = capfd.readouterr()
    return code, out, err


def _receipt(stdout: str) -> dict:
    start = stdout.index("{\n")
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


def _input_errors_quieted() -> bool:
    """Whether Prefect's run loggers drop tracebacks of input errors (issue 9, defect 3: a log filter from flows/).

    Until that filter is installed Prefect prints two tracebacks for any error raised in a flow, which only
    the filter can stop; then only the output this stage controls (the CLI's line, our loggers) is checked.
    """
    return any("input" in type(f).__name__.lower() for f in logging.getLogger("prefect.task_runs").filters)


def _assert_no_traceback(out: str, err: str, caplog, strict: bool) -> None:
    """No traceback from our own code; none at all once expected errors are logged without one."""
    own = [r for r in caplog.records if r.name.split(".")[0] in ("domains", "tasks", "flows") and r.exc_info]
    assert not own, f"our loggers printed a traceback: {own[0].name}: {own[0].getMessage()[:300]}"
    cli_lines = [line for line in err.splitlines() if line.startswith("vitrail ")]
    assert all("Traceback" not in line for line in cli_lines)
    if strict:
        assert "Traceback (most recent call last)" not in out + err
        assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.INFO]


def _skip_if_meaningless(item) -> None:
    if item.skip:
        pytest.skip(item.skip)
    if item.needs_non_root and AS_ROOT:
        pytest.skip("running as root: chmod 000 does not stop root from reading, so this case cannot fail")


def _quarantine_names_file(entries: list[dict], item) -> bool:
    """Whether a quarantine entry stands for the bad file (radiology names files by pseudonymous key)."""
    if item.domain == "radiology":
        from domains.radiology.lookup import resolve_file_keys

        keys = [e["item"] for e in entries if e["item"].startswith("f-")]
        found = set(resolve_file_keys(item.ingest_source, keys).values())
        # Of two identical files either may be the one read; the other is the duplicate.
        original = item.bad_file.with_name(item.bad_file.name.removeprefix("COPY_"))
        if item.case == "duplicate":
            return bool(found & {item.bad_file, original}) and all(e["reason"] == "duplicate_file" for e in entries)
        # A series-level entry (slices of mixed shapes) names the series, not a file.
        return item.bad_file in found or (item.case == "mismatched_grid"
                                          and any(e["reason"] == "inconsistent_series" for e in entries))
    if item.domain == "histopathology":  # slides are named by keyed pseudonym of their path in the source
        from domains.histopathology.manifest import slide_key
        from domains.histopathology.reader import slide_pseudonym

        names = {e["item"] for e in entries}
        original = item.bad_file.with_name(item.bad_file.name.removeprefix("COPY_"))
        candidates = {item.bad_file, original} if item.case == "duplicate" else {item.bad_file}
        return bool(names & {slide_pseudonym(slide_key(p, item.ingest_source)) for p in candidates})
    return any(item.bad_file.name in e["item"] for e in entries)


@pytest.mark.parametrize("domain, case", PARAMS)
def test_ingest_of_a_bad_input(domain, case, tmp_path, capfd, caplog):
    item = write_case(domain, case, tmp_path / "corpus")
    _skip_if_meaningless(item)
    out = tmp_path / "dataset"
    argv = ["ingest", "--domain", domain, "--source", str(item.ingest_source), "--out", str(out), *TINY_TILING]
    if item.ingest_labels is not None:
        argv += ["--labels", str(item.ingest_labels)]
    code, stdout, stderr = _run_cli(argv, capfd, caplog)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".dataset.")]
    assert not leftovers, f"a temporary dataset folder was left behind: {leftovers}"

    if item.ingest_outcome == "error":
        assert code == 2, stdout + stderr
        [line] = [line for line in stderr.splitlines() if line.startswith("vitrail ingest: error: ")]
        # The bad file, or the one-file source it belongs to (a cube is named by its header).
        assert printable_path(item.bad_file.name) in line or printable_path(item.ingest_source.name) in line, line
        assert len(line.split(": ", 2)[-1]) > 20  # the problem, in words, after the file
        assert not out.exists(), "a failed ingest must not leave a dataset behind"
        _assert_no_traceback(stdout, stderr, caplog, strict=_input_errors_quieted())
        return

    from tasks.dataset import QUARANTINE_FILE, load_dataset

    assert code == 0, stdout + stderr
    receipt = _receipt(stdout)
    entries = json.loads((out / QUARANTINE_FILE).read_text())
    assert receipt["quarantined"] == len(entries)
    dataset = load_dataset(out)
    assert sum(len(split) for split in dataset.splits.values()) > 0
    if item.ingest_outcome == "quarantined":
        assert entries and all(e["reason"] and e["problem"] for e in entries)
        assert _quarantine_names_file(entries, item), entries
    else:
        assert entries == []
    _assert_no_traceback(stdout, stderr, caplog, strict=True)


@pytest.mark.parametrize("domain, case", PARAMS)
def test_predict_on_a_drop_folder_with_a_bad_input(domain, case, models, tmp_path, capfd, caplog):
    item = write_case(domain, case, tmp_path / "corpus")
    _skip_if_meaningless(item)
    uri, workdir = models(domain)
    output = tmp_path / "predictions"
    code, stdout, stderr = _run_cli(["predict", "--domain", domain, "--model", uri, "--input", str(item.drop),
                                     "--output", str(output), "--workdir", str(workdir)], capfd, caplog)
    receipt = _receipt(stdout)
    written = [Path(p) for p in receipt["outputs"]]
    for path in written:  # every output inside the output folder, under a name the file system takes
        assert path.resolve().parent == output.resolve() and path.is_file() and len(os.fsencode(path.name)) <= 255
    assert len(written) >= len(item.good_inputs), receipt

    if item.predict_outcome == "error":
        assert code == 1
        assert list(receipt["failed"]) == [printable_path(item.drop_bad)], receipt["failed"]
        message = receipt["failed"][printable_path(item.drop_bad)]
        assert len(message.split(": ")[-1]) > 10, message
        if item.domain != "radiology":  # radiology names files by pseudonymous key only
            assert printable_path(item.drop_bad_file.name) in message or printable_path(item.drop_bad) in message
    elif item.predict_outcome == "quarantined":
        assert code == 0 and receipt["failed"] == {}
        reports = [json.loads(p.read_text()) for p in written if p.suffix == ".json"]
        assert any(r.get("quarantine") for r in reports), "the bad file is listed in its input's report"
    else:
        assert code == 0 and receipt["failed"] == {}
        assert len(written) == len(item.good_inputs) + 1
    _assert_no_traceback(stdout, stderr, caplog, strict=True)
