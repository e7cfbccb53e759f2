"""ONNX Runtime sessions and the metadata Vitrail stores inside its ONNX files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
ATTENTION_NAME = "attention"
"""Second output of a slide model: each tile's attention weight in its bag (B, T)."""
METADATA_KEY = "vitrail"


def open_session(path: Path | str, threads: int = 2):
    """An ONNX Runtime CPU session limited to ``threads`` threads (the target profile's cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def session_predictor(session):
    """A predictor function (N, C, H, W) float32 -> logits (N, K) backed by ``session``."""
    name = session.get_inputs()[0].name

    def predict(images: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(images, dtype=np.float32)})[0]

    return predict


def session_bag_predictor(session):
    """For a slide model's session: one bag of tiles (T, C, H, W) -> (logits (K,), attention weights (T,))."""
    name = session.get_inputs()[0].name

    def predict(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, attention = session.run(None, {name: np.ascontiguousarray(tiles[None], dtype=np.float32)})[:2]
        return logits[0], attention[0]

    return predict


def write_metadata(path: Path, metadata: dict) -> None:
    """Store ``metadata`` (channels, classes, tile size...) as a JSON property of the ONNX file."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = json.dumps(metadata)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def read_metadata(path: Path) -> dict:
    """Read what :func:`write_metadata` stored; raises if the file is not a Vitrail model."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise ValueError(f"{path}: ONNX file has no Vitrail metadata (channels, classes); was it exported by Vitrail?")


def runtime_of(path: Path | str) -> str:
    """The edge runtime a Vitrail model file runs on: ``openvino`` for an IR (.xml), else ``onnxruntime``."""
    return "openvino" if Path(path).suffix == ".xml" else "onnxruntime"


def open_predictor(path: Path | str, threads: int = 2):
    """A predictor (N, C, H, W) -> logits for any Vitrail edge file, on the runtime the file is for.

    ONNX files run on ONNX Runtime; OpenVINO IRs (.xml) are compiled by OpenVINO at the precision
    stored in them (see :mod:`tasks.openvino_runtime`).
    """
    if runtime_of(path) == "openvino":
        from tasks import openvino_runtime

        return openvino_runtime.compiled_predictor(openvino_runtime.compile_model(path, threads))
    return session_predictor(open_session(path, threads))


def read_any_metadata(path: Path | str) -> dict:
    """Vitrail metadata of an ONNX file or an OpenVINO IR."""
    if runtime_of(path) == "openvino":
        from tasks import openvino_runtime

        return openvino_runtime.read_metadata(path)
    return read_metadata(path)
