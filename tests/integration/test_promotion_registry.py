"""Promotion against a real Prefect server and one MLflow store: concurrent promotions are serialised by the
model's global concurrency limit, and a promotion killed between its two alias writes is refused by readers and
completed by the next promotion.

Each promotion runs the real ``promote-model`` flow in its own Python process, as two workers would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from integration_support import PrefectServer, mlflow_store, without_mlflow_uri

from domains import get_domain
from tasks.promotion import (
    CRASH_POINT_ENV,
    TWIN_NAME_TAG,
    TWIN_VERSION_TAG,
    HalfPromotionError,
    ensure_promotion_limit,
    pinned_model_uri,
    promotion_lock,
    promotion_lock_name,
    registered_model_names,
)

DOMAIN = "satellite"
REFERENCE, EDGE = registered_model_names(get_domain(DOMAIN))
GATE = {"metric": "macro_f1", "min_metric": 0.6, "max_drop_vs_fp32": 0.05, "latency_budget_ms": 50.0}
PROMOTE_TIMEOUT_S = 240
RUN_PROMOTE = ("import sys\n"
               "from flows.promote import PromoteParams, promote\n"
               "receipt = promote(PromoteParams.model_validate_json(sys.argv[1]))\n"
               "print('RECEIPT ' + receipt.model_dump_json(), flush=True)\n")


@dataclass(frozen=True)
class Candidate:
    """A candidate's compress and validate runs, as the promote flow reads them."""

    label: str
    edge_metric: float
    compress_run_id: str
    validate_run_id: str


@dataclass(frozen=True)
class Store:
    workdir: Path
    reference_uri: str
    edge_uri: str
    candidates: dict[str, Candidate]


def _write_tiny_onnx(path: Path) -> Path:
    """A real ONNX classifier of 3 bands x 8 px (the mean of each band is its logit) with Vitrail metadata."""
    import onnx
    from onnx import TensorProto, helper

    from tasks.onnx_runtime import write_metadata

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["logits"], axes=[2, 3], keepdims=0)], "tiny-mean",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    write_metadata(path, {"domain": DOMAIN, "task": "classification", "tile_size": 8,
                          "class_names": ["water", "vegetation", "bare"],
                          "channels": [{"name": band} for band in ("B04", "B03", "B02")]})
    return path


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    """A SQLite MLflow store with one logged reference/edge model and two passing candidates (edge 0.90, 0.80)."""
    import mlflow

    from tasks import tracking

    workdir = tmp_path / "work"
    with mlflow_store(workdir):
        experiment_id = tracking.ensure_experiment(DOMAIN, workdir)
        onnx_file = _write_tiny_onnx(tmp_path / "tiny.onnx")
        example = np.zeros((1, 3, 8, 8), dtype=np.float32)
        with mlflow.start_run(experiment_id=experiment_id, run_name="candidate-models"):
            reference_uri = tracking.log_edge_model(onnx_file, {"variant": "reference"}, example)
            edge_uri = tracking.log_edge_model(onnx_file, {"variant": "onnx-int8"}, example)
        candidates = {}
        for label, edge_metric in (("better", 0.90), ("worse", 0.80)):
            report = tmp_path / label / "compress_report.json"
            report.parent.mkdir()
            report.write_text(json.dumps({"variants": [{"name": "onnx-int8", "latency_ms_p50": 2.0}],
                                          "parity": {"onnx-fp32": {"max_abs_diff": 1e-6}}}))
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"{label}-compress") as compress:
                tracking.set_tags({"vitrail.edge_variant": "onnx-int8"})
                tracking.log_artifact(report)
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"{label}-validate",
                                  tags={"vitrail.task": "classification"}) as validate:
                tracking.log_metrics({"torch-fp32.test_macro_f1": edge_metric + 0.01,
                                      "onnx-int8.test_macro_f1": edge_metric})
            candidates[label] = Candidate(label, edge_metric, compress.info.run_id, validate.info.run_id)
    return Store(workdir, reference_uri, edge_uri, candidates)


def _start_promotion(server: PrefectServer, store: Store, label: str, spawned: list[subprocess.Popen],
                     crash_at: str | None = None) -> subprocess.Popen:
    candidate = store.candidates[label]
    params = {"domain": DOMAIN, "model_uri": store.reference_uri, "edge_model_uri": store.edge_uri,
              "compress_run_id": candidate.compress_run_id, "validate_run_id": candidate.validate_run_id,
              "workdir": str(store.workdir), "gate": GATE}
    env = without_mlflow_uri(server.env)
    env.pop(CRASH_POINT_ENV, None)
    if crash_at:
        env[CRASH_POINT_ENV] = crash_at
    process = subprocess.Popen([sys.executable, "-c", RUN_PROMOTE, json.dumps(params)], cwd=store.workdir, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    spawned.append(process)
    return process


def _finish(process: subprocess.Popen) -> tuple[int, dict | None, str]:
    """(return code, receipt or None, output) of a promotion process; killed with its group if it hangs."""
    try:
        out, err = process.communicate(timeout=PROMOTE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"promotion did not finish in {PROMOTE_TIMEOUT_S} s:\n{out[-3000:]}\n{err[-3000:]}")
    receipts = [line.removeprefix("RECEIPT ") for line in out.splitlines() if line.startswith("RECEIPT ")]
    return process.returncode, json.loads(receipts[-1]) if receipts else None, f"{out[-3000:]}\n{err[-3000:]}"


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _holder(name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _assert_twins(alias: str) -> tuple[str, str]:
    """Both registered models hold ``alias`` on versions that name each other as twins; return their versions."""
    reference, edge = _holder(REFERENCE, alias), _holder(EDGE, alias)
    assert reference is not None and edge is not None, f"{alias} is set on one model only"
    assert (reference.tags[TWIN_NAME_TAG], reference.tags[TWIN_VERSION_TAG]) == (EDGE, str(edge.version))
    assert (edge.tags[TWIN_NAME_TAG], edge.tags[TWIN_VERSION_TAG]) == (REFERENCE, str(reference.version))
    return str(reference.version), str(edge.version)


def _versions_of(name: str) -> list:
    return _client().search_model_versions(f"name='{name}'")


@pytest.mark.integration
@pytest.mark.slow
def test_two_concurrent_promotions_cannot_both_win_champion(prefect_api: PrefectServer, store: Store,
                                                            spawned: list[subprocess.Popen], monkeypatch) -> None:
    import tasks.promotion
    from tasks.prediction import load_model

    # The test's own hold lasts as long as two fresh processes take to import and reach the lock (a minute
    # or more on a loaded 2-core machine); a longer lease keeps a slow renewal from ending it early.
    # The promotions themselves keep the production lease.
    monkeypatch.setattr(tasks.promotion, "PROMOTION_LEASE_S", 300)

    with mlflow_store(store.workdir):
        # The test holds the model's promotion slot while both promotions start, so both reach the lock
        # together; neither may touch the registry until the slot is free.
        with promotion_lock(EDGE):
            processes = {label: _start_promotion(prefect_api, store, label, spawned) for label in ("better", "worse")}
            deadline = time.monotonic() + PROMOTE_TIMEOUT_S
            while len(_client().search_runs([_experiment_id()], "tags.`vitrail.stage` = 'promote'")) < 2:
                early = {label: p.poll() for label, p in processes.items() if p.poll() is not None}
                assert not early, f"promotion exited before the lock: {early}: {[_finish(processes[k]) for k in early]}"
                assert time.monotonic() < deadline, "promotions did not start"
                time.sleep(0.5)
            time.sleep(5)  # ample time to register and set aliases, were the lock not honoured
            assert not _versions_of(REFERENCE) and not _versions_of(EDGE), "a promotion ran without the lock"
        results = {label: _finish(process) for label, process in processes.items()}

        for label, (code, receipt, output) in results.items():
            assert code == 0 and receipt is not None, f"{label} promotion failed:\n{output}"
            assert receipt["passed"], receipt
        receipts = {label: receipt for label, (_, receipt, _) in results.items()}
        # Serialised: exactly one promotion found no champion; the other compared itself with it.
        first = [label for label, r in receipts.items() if r["reasons"][-1] == "no current champion"]
        assert len(first) == 1, receipts
        versions = {label: r["edge_model"].rsplit("/", 1)[1] for label, r in receipts.items()}
        assert sorted(versions.values()) == ["1", "2"]

        # The better candidate ends champion on both models, whichever ran first.
        assert _assert_twins("champion") == (versions["better"], versions["better"])
        assert receipts["better"]["alias"] == "champion"
        if first == ["better"]:
            assert receipts["worse"]["alias"] == "challenger"
            assert receipts["worse"]["reasons"][-1] == "worse than champion (0.8000 < 0.9000)"
            assert _assert_twins("challenger") == (versions["worse"], versions["worse"])
        else:
            assert receipts["worse"]["alias"] == "champion"  # champion until the better one replaced it
            assert receipts["better"]["reasons"][-1] == "not worse than champion (0.9000 >= 0.8000)"
            assert _holder(REFERENCE, "challenger") is None and _holder(EDGE, "challenger") is None
        champion = load_model(f"models:/{EDGE}@champion")
        assert champion.domain == DOMAIN and champion.uri == f"models:/{EDGE}@champion"
        logits = champion.predict_logits(np.ones((2, 3, 8, 8), dtype=np.float32))
        np.testing.assert_allclose(logits, np.ones((2, 3)), atol=1e-6)


def _experiment_id() -> str:
    return _client().get_experiment_by_name(DOMAIN).experiment_id


@pytest.mark.integration
@pytest.mark.slow
def test_a_promotion_killed_between_alias_writes_is_refused_then_completed(prefect_api: PrefectServer, store: Store,
                                                                           spawned: list[subprocess.Popen]) -> None:
    from tasks.prediction import load_model

    with mlflow_store(store.workdir):
        code, receipt, output = _finish(_start_promotion(prefect_api, store, "worse", spawned))
        assert code == 0 and receipt["alias"] == "champion", output
        assert _assert_twins("champion") == ("1", "1")

        # The better candidate's promotion dies (SIGKILL) right after moving the reference's champion alias.
        killed_at = time.monotonic()
        killed = _start_promotion(prefect_api, store, "better", spawned, crash_at="between-aliases")
        code, receipt, output = _finish(killed)
        assert code == -signal.SIGKILL and receipt is None, output
        assert str(_holder(REFERENCE, "champion").version) == "2" and str(_holder(EDGE, "champion").version) == "1"

        # Readers of either champion refuse the half-promotion, naming both sides.
        for name in (EDGE, REFERENCE):
            with pytest.raises(HalfPromotionError, match=r"half-applied promotion: .* holds 'champion' but its twin"):
                load_model(f"models:/{name}@champion")
        assert pinned_model_uri(f"models:/{EDGE}/1") == f"models:/{EDGE}/1"  # explicit versions are not aliases

        # The next promotion waits for the dead holder's lease to expire, completes the pair, then decides.
        code, receipt, output = _finish(_start_promotion(prefect_api, store, "better", spawned))
        recovered_s = time.monotonic() - killed_at
        assert code == 0, output
        assert receipt["repaired"] == [f"{EDGE}@champion: version 1 -> 2 (twin of {REFERENCE} version 2)"]
        assert receipt["reasons"][-1] == "not worse than champion (0.9000 >= 0.9000)" and receipt["alias"] == "champion"
        assert _assert_twins("champion") == ("3", "3")
        assert _holder(REFERENCE, "challenger") is None and _holder(EDGE, "challenger") is None
        assert pinned_model_uri(f"models:/{EDGE}@champion") == f"models:/{EDGE}/3"
        assert load_model(f"models:/{REFERENCE}@champion").domain == DOMAIN
        print(f"\nrecovered {recovered_s:.1f} s after the kill (includes the {60} s lease of the killed holder)")


@pytest.mark.integration
def test_the_promotion_limit_is_created_once_and_kept_at_one_active_slot(prefect_api: PrefectServer) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    name = promotion_lock_name("unit-limit-edge")
    assert name == "vitrail-promote-unit-limit-edge"
    with get_client(sync_client=True) as client:
        ensure_promotion_limit(name)
        created = client.read_global_concurrency_limit_by_name(name)
        ensure_promotion_limit(name)  # idempotent: the same limit, not a second one or an error
        again = client.read_global_concurrency_limit_by_name(name)
        assert (created.id, created.limit, created.active) == (again.id, 1, True)
        # Widened or switched off by hand, it would no longer exclude anything: it is set back.
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=5, active=False))
        ensure_promotion_limit(name)
        restored = client.read_global_concurrency_limit_by_name(name)
        assert (restored.id, restored.limit, restored.active) == (created.id, 1, True)
        with promotion_lock("unit-limit-edge"):
            assert client.read_global_concurrency_limit_by_name(name).active_slots == 1
            # A second holder times out instead of entering.
            with pytest.raises(TimeoutError):
                with promotion_lock("unit-limit-edge", timeout_s=2):
                    pass
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0
