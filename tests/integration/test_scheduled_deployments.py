"""deploy/prefect.yaml on a real Prefect server: every deployment registers, the scheduler creates the nightly
runs, and a process worker runs an ingest deployment to completion.

This is the check that caught SQLAlchemy 2.1 with prefect 3.8: the server's scheduler then fails every
cycle, so the scheduled deployments never get a run and the polling below times out.
"""

from __future__ import annotations

import time
from datetime import timezone
from pathlib import Path

import pytest
import yaml
from integration_support import REPO_ROOT, PrefectServer

SCHEDULE_WAIT_S = 90
RUN_WAIT_S = 300
TEST_QUEUE = "integration-test"


def _deployments() -> list[dict]:
    return yaml.safe_load((REPO_ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]


def _flow_name(entrypoint: str) -> str:
    """The flow's registered name (``@flow(name=...)``), read from the flow object itself."""
    import importlib

    path, attribute = entrypoint.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, attribute).name


def _scheduled_runs(client, deployment_ids: list) -> dict:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=deployment_ids)),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
        limit=200)
    by_deployment: dict = {}
    for run in runs:
        by_deployment.setdefault(run.deployment_id, []).append(run)
    return by_deployment


def _ingest_parameters(tmp_path: Path) -> tuple[dict, Path]:
    from domains import get_domain

    example = get_domain("satellite").write_example(tmp_path / "scene", size=48)
    out = tmp_path / "dataset"
    preset = next(d for d in _deployments() if d["entrypoint"] == "flows/ingest.py:ingest_dataset"
                  and d["name"] == "satellite-sentinel2")["parameters"]["params"]
    params = {**preset, "source": str(example["scene_dir"]), "labels": str(example["labels"]), "out": str(out),
              "tiling": {**preset["tiling"], "tile_size": 8, "stride": 8, "block_size": 16}}
    return {"params": params}, out


@pytest.mark.integration
@pytest.mark.slow
def test_deploy_schedules_runs_and_a_worker_completes_an_ingest(prefect_api: PrefectServer, tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.client.schemas.objects import StateType

    server = prefect_api
    started = time.monotonic()
    server.cli("work-pool", "create", "vitrail-cpu", "--type", "process", check=False)  # another test may have made it
    deployed = server.cli("deploy", "--all", "--prefect-file", "deploy/prefect.yaml",
                          extra_env={"VITRAIL_HOME": str(REPO_ROOT)})
    deploy_s = time.monotonic() - started

    expected = {f"{_flow_name(d['entrypoint'])}/{d['name']}": d for d in _deployments()}
    with get_client(sync_client=True) as client:
        registered = {f"{_flow_name(d['entrypoint'])}/{d['name']}": client.read_deployment_by_name(
            f"{_flow_name(d['entrypoint'])}/{d['name']}") for d in _deployments()}
        assert len(registered) == len(expected) == len(_deployments()), "deployment names must be unique per flow"
        scheduled = {name: registered[name] for name, d in expected.items() if d.get("schedules")}
        assert len(scheduled) == 3, deployed.stdout[-2000:]
        for name, deployment in registered.items():
            assert deployment.work_pool_name == "vitrail-cpu", name
            assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                              {"directory": str(REPO_ROOT)}}], name

        # The scheduler service creates the runs: wait for every scheduled deployment to have some.
        ids = [d.id for d in scheduled.values()]
        deadline = time.monotonic() + SCHEDULE_WAIT_S
        while True:
            runs = _scheduled_runs(client, ids)
            if all(runs.get(i) for i in ids) or time.monotonic() > deadline:
                break
            time.sleep(2)
        missing = [name for name, d in scheduled.items() if not runs.get(d.id)]
        assert not missing, (f"no scheduled runs after {SCHEDULE_WAIT_S} s for {missing}; server log:\n"
                             f"{server.log_tail()}")
        schedule_s = time.monotonic() - started - deploy_s
        for name, deployment in scheduled.items():
            cron = expected[name]["schedules"][0]["cron"].split()
            for run in runs[deployment.id]:
                assert run.auto_scheduled and run.parameters == expected[name]["parameters"], name
                when = run.expected_start_time.astimezone(timezone.utc)
                # Every run falls on the preset's cron minute (and hour, where the cron names one).
                assert when.minute == int(cron[0]) and (cron[1] == "*" or when.hour == int(cron[1])), (name, when)

        # One real deployment through a process worker, on a queue of its own so no nightly run is picked.
        parameters, out = _ingest_parameters(tmp_path)
        client.create_work_queue(name=TEST_QUEUE, work_pool_name="vitrail-cpu")
        ingest = registered["ingest-dataset/satellite-sentinel2"]
        flow_run = client.create_flow_run_from_deployment(ingest.id, parameters=parameters, work_queue_name=TEST_QUEUE)
        worker_started = time.monotonic()
        worker = server.cli("worker", "start", "--pool", "vitrail-cpu", "--work-queue", TEST_QUEUE, "--type",
                            "process", "--run-once", cwd=tmp_path, timeout=RUN_WAIT_S, check=False)
        worker_s = time.monotonic() - worker_started
        finished = client.read_flow_run(flow_run.id)
    assert finished.state is not None and finished.state.type == StateType.COMPLETED, (
        f"flow run ended {finished.state}; worker output:\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}")

    from tasks.dataset import load_dataset

    dataset = load_dataset(out)
    assert dataset.info.domain == "satellite" and sum(dataset.info.split_counts.values()) > 0
    assert (out / "manifest.parquet").is_file()
    print(f"\ntimings: deploy {deploy_s:.1f} s, first scheduled runs {schedule_s:.1f} s, "
          f"worker ingest {worker_s:.1f} s")
