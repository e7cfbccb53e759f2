"""A real MLflow store with tiny ONNX candidates (compress + validate runs) that the promote flow reads.

Imported by the approval, rollback and lineage tests; named ``registry_support`` (not conftest) so modules of
other folders can import it too.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from mlflow_isolation import mlflow_store as registry_store  # noqa: F401  (the flow tests' name for it)

from domains import get_domain
from tasks.promotion import registered_model_names

if TYPE_CHECKING:
    from tasks.dataset import DatasetInfo

DOMAIN = "satellite"
REFERENCE, EDGE = registered_model_names(get_domain(DOMAIN))
GATE = {"metric": "macro_f1", "min_metric": 0.6, "max_drop_vs_fp32": 0.05, "latency_budget_ms": 50.0}


def write_tiny_onnx(path: Path, scale: float) -> Path:
    """A real ONNX classifier of 3 bands x 8 px (logit = ``scale`` x its band's mean) with Vitrail metadata."""
    import onnx
    from onnx import TensorProto, helper

    from tasks.onnx_runtime import write_metadata

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0),
         helper.make_node("Mul", ["mean", "scale"], ["logits"])], "tiny-mean",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [3], [scale, 1.0, -scale])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    write_metadata(path, {"domain": DOMAIN, "task": "classification", "tile_size": 8,
                          "class_names": ["water", "vegetation", "bare"],
                          "channels": [{"name": band} for band in ("B04", "B03", "B02")]})
    return path


@dataclass(frozen=True)
class CandidateRuns:
    """What the promote flow takes for one candidate: its models and its compress and validate runs."""

    reference_uri: str
    edge_uri: str
    compress_run_id: str
    validate_run_id: str

    def promote_params(self, workdir: Path, **extra: object) -> dict:
        return {"domain": DOMAIN, "model_uri": self.reference_uri, "edge_model_uri": self.edge_uri,
                "compress_run_id": self.compress_run_id, "validate_run_id": self.validate_run_id,
                "workdir": str(workdir), "gate": GATE, **extra}


FINETUNE_PARAMS = {"backbone": {"name": "vit_tiny_patch16_224", "weights": "file",
                                 "weights_file": "/weights/ssl4eo.pth", "patch_size": 4},
                   "adapter": {"method": "lora", "rank": 8}, "train": {"epochs": 3}}


def tiny_dataset(folder: Path) -> "DatasetInfo":
    """The facts of a dataset as ``dataset.json`` holds them (no arrays: the candidates are not trained here)."""
    from domains import Channel
    from tasks.dataset import DatasetInfo

    folder.mkdir(parents=True, exist_ok=True)
    return DatasetInfo(digest="d" * 64, domain=DOMAIN, task="classification",
                       channels=tuple(Channel(name=band) for band in ("B04", "B03", "B02")),
                       class_names=("water", "vegetation", "bare"), tile_size=8,
                       sources=("/data/satellite/scenes/S2A_T31UFU_20240612", "/data/satellite/labels/t31ufu.tif"),
                       split_counts={"train": 6, "val": 2, "test": 2}, class_counts={}, dropped={},
                       channel_mean=(0.0, 0.0, 0.0), channel_std=(1.0, 1.0, 1.0))


def log_candidate(workdir: Path, label: str, edge_metric: float, scale: float) -> CandidateRuns:
    """Log a reference model in a finetune stage run, an edge model, and compress/validate runs for them.

    Both models are the tiny ONNX of ``scale``. The finetune run is a real ``tasks.tracking.stage_run`` (the tags
    lineage reads: dataset digest and sources, git commit, Prefect flow run). The active MLflow store must be
    ``workdir``'s (``tasks.tracking.configure_tracking``).
    """
    from tasks import tracking

    folder = workdir / "candidates" / label
    folder.mkdir(parents=True)
    onnx_file = write_tiny_onnx(folder / "tiny.onnx", scale)
    example = np.zeros((1, 3, 8, 8), dtype=np.float32)
    report = folder / "compress_report.json"
    report.write_text(json.dumps({"variants": [{"name": "onnx-int8", "latency_ms_p50": 2.0}],
                                  "parity": {"onnx-fp32": {"max_abs_diff": 1e-6}}}))
    dataset = workdir / "dataset"
    with tracking.stage_run(DOMAIN, "finetune", workdir, FINETUNE_PARAMS, tiny_dataset(dataset), dataset,
                            {"vitrail.backbone": "vit_tiny_patch16_224", "vitrail.peft": "lora"}):
        reference_uri = tracking.log_edge_model(onnx_file, {"variant": "reference"}, example)
    with tracking.stage_run(DOMAIN, "compress", workdir, {"compression": {"edge_variant": "auto", "threads": 2}},
                            extra_tags={"vitrail.edge_variant": "onnx-int8"}) as compress:
        tracking.log_artifact(report)
        edge_uri = tracking.log_edge_model(onnx_file, {"variant": "onnx-int8"}, example)
    with tracking.stage_run(DOMAIN, "validate", workdir, extra_tags={"vitrail.task": "classification"}) as validate:
        tracking.log_metrics({"torch-fp32.test_macro_f1": edge_metric + 0.01, "onnx-int8.test_macro_f1": edge_metric})
    return CandidateRuns(reference_uri, edge_uri, compress.run_id, validate.run_id)


@dataclass
class FlowThread:
    """A flow called in a background thread (a paused flow blocks its caller), with its result or error."""

    target: object
    args: tuple
    result: object = None
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.target(*self.args)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            self.error = error

    def join(self, timeout: float = 120) -> object:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"flow did not finish in {timeout} s"
        if self.error is not None:
            raise self.error
        return self.result


def wait_for_paused_run(flow_name: str, timeout: float = 120, since: float | None = None):
    """The one flow run of ``flow_name`` that is Paused (waits for it)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            if runs:
                assert len(runs) == 1, f"several paused {flow_name} runs: {[r.name for r in runs]}"
                return runs[0]
            assert time.monotonic() < deadline, f"no paused {flow_name} run within {timeout} s"
            time.sleep(0.3)


def version_tags(name: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_model_version(name, version).tags)


def alias_version(name: str, alias: str) -> str | None:
    from tasks import tracking

    holder = tracking.alias_holder(name, alias)
    return holder[0] if holder else None
