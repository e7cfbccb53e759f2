"""int8 quantization with ONNX Runtime, with the choices that keep ViTs accurate.

Naive static int8 (MinMax calibration of every op) destroys ViT accuracy: softmax, LayerNorm and
GELU outputs have long-tailed distributions (RepQ-ViT, Li et al. 2023; I-ViT, Li & Gu 2023). We
quantize only the matrix multiplications and convolutions (where the time goes), keep those
activation-outlier ops in float, use per-channel weight scales, and calibrate activation ranges by
percentile rather than min/max.

Every file is written under a temporary name and renamed into place when complete (see
:mod:`tasks.atomic_files`), so a compress run killed mid-quantization never leaves a truncated model.
ONNX Runtime's quantizers are deterministic for a given input file and calibration tiles (taken in
split order), so equal inputs give equal bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from tasks.atomic_files import atomic_path, partial_name
from tasks.evaluation import rows_per_batch
from tasks.onnx_runtime import read_metadata, write_metadata
from tasks.request_errors import RequestError


class CalibrationError(RequestError):
    """Calibration data is missing or unusable."""


class QuantizationParams(BaseModel):
    """Static int8 quantization settings."""

    calibration_samples: int = Field(128, ge=1, le=10000, description="Training tiles used to calibrate activation "
                                                                      "ranges (whole bags of tiles for a slide model)")
    calibration_method: Literal["percentile", "entropy", "minmax"] = Field(
        "percentile", description="How activation ranges are chosen; percentile resists ViT activation outliers")
    percentile: float = Field(99.99, ge=90.0, le=100.0, description="Percentile kept when calibration_method is percentile")
    per_channel: bool = Field(True, description="One weight scale per output channel (recommended for ViTs)")
    quantize_ops: list[Literal["MatMul", "Gemm", "Conv", "Add", "Mul"]] = Field(
        ["MatMul", "Gemm", "Conv"], min_length=1, description="Op types to quantize; softmax, LayerNorm and GELU stay in float")
    quantize_outputs: bool = Field(
        False, description="Also requantize the outputs of the quantized ops. Off: int8 inputs and weights, float "
                           "outputs, which ONNX Runtime runs as one MatMulIntegerToFloat per matmul; the ops that "
                           "follow (LayerNorm, GELU, residual adds) are float anyway, so output Q/DQ pairs only add "
                           "per-op overhead and rounding")


class _TileReader:
    """Feeds calibration tiles to ONNX Runtime one at a time."""

    def __init__(self, input_name: str, images: np.ndarray):
        self._items = iter([{input_name: images[i:i + 1]} for i in range(len(images))])

    def get_next(self):
        return next(self._items, None)

    def rewind(self):  # pragma: no cover - part of ORT's reader protocol, unused by static calibration
        pass


def _preprocess(source: Path, destination: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(destination), skip_symbolic_shape=False)
    except Exception:  # noqa: BLE001 - ORT's symbolic shape inference has gaps (e.g. ToMe's ScatterElements)
        # ONNX's own shape inference is enough for the quantizer; only the extra symbolic pass is skipped.
        quant_pre_process(str(source), str(destination), skip_symbolic_shape=True)
    return destination


def quantize_int8_static(source: Path, calibration_images: np.ndarray, destination: Path,
                         params: QuantizationParams) -> Path:
    """Static QDQ int8 model calibrated on ``calibration_images`` (in-domain training tiles)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calibration_images is None or len(calibration_images) == 0:
        raise CalibrationError(f"{source}: no calibration tiles; the training split is empty")
    metadata = read_metadata(source)
    prepared = _preprocess(source, partial_name(destination))
    method = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy,
              "minmax": CalibrationMethod.MinMax}[params.calibration_method]
    # calibration_samples counts tiles: a slide model calibrates on as many tiles, in whole bags.
    rows = rows_per_batch(calibration_images, params.calibration_samples)
    images = np.ascontiguousarray(calibration_images[:rows], dtype=np.float32)
    try:
        with atomic_path(destination) as partial:
            quantize_static(str(prepared), str(partial), _TileReader("image", images), quant_format=QuantFormat.QDQ,
                            per_channel=params.per_channel, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=list(params.quantize_ops),
                            calibrate_method=method,
                            extra_options={"CalibPercentile": params.percentile, "ActivationSymmetric": False,
                                           **({} if params.quantize_outputs else
                                              {"OpTypesToExcludeOutputQuantization": list(params.quantize_ops)})})
            write_metadata(partial, metadata)
    finally:
        prepared.unlink(missing_ok=True)
    return destination


def quantize_int8_dynamic(source: Path, destination: Path) -> Path:
    """Dynamic int8: weights quantized offline, activation ranges computed per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx

    metadata = read_metadata(source)
    prepared = _preprocess(source, partial_name(destination))
    try:
        with atomic_path(destination) as partial:
            try:
                quantize_dynamic(str(prepared), str(partial), weight_type=QuantType.QInt8, per_channel=True)
            except onnx.shape_inference.InferenceError:
                # Token-merged graphs can leave value_info that ONNX's re-inference contradicts (seen on ToMe
                # exports: "Inferred shape and existing shape differ"); dynamic quantization needs no stored
                # shapes, so drop them.
                model = onnx.load(str(prepared))
                del model.graph.value_info[:]
                onnx.save(model, str(prepared))
                # Without stored shapes some initialiser types are not re-derived; every weight here is float32.
                quantize_dynamic(str(prepared), str(partial), weight_type=QuantType.QInt8, per_channel=True,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            write_metadata(partial, metadata)
    finally:
        prepared.unlink(missing_ok=True)
    return destination


def convert_fp16(source: Path, destination: Path) -> Path:
    """Half-precision weights and activations, with float32 inputs and outputs (``keep_io_types``).

    LayerNormalization and Softmax accumulate in float32 inside ONNX Runtime's fp16 kernels.
    Useful on GPUs and ARMv8.2+ CPUs with fp16 arithmetic; x86 CPUs usually run it slower than fp32.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    metadata = read_metadata(source)
    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    _unique_node_names(model.graph)
    with atomic_path(destination) as partial:
        onnx.save(model, str(partial))
        write_metadata(partial, metadata)
    return destination


def _unique_node_names(graph) -> None:
    # The converter names each inserted Cast after the tensor it casts; a tensor feeding several
    # kept-in-fp32 nodes then yields duplicate node names, which ONNX Runtime rejects.
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if node.name in seen:
            node.name = f"{node.name}_{index}"
        seen.add(node.name)


QuantKind = Literal["int8", "int8-dynamic", "fp16"]


class QuantizeOnnx:
    """The quantize technique: an exported variant -> its int8 (static or dynamic) or fp16 ONNX file.

    Logit differences against the torch model are recorded, not enforced: a quantized model is
    judged by its accuracy, which the compress stage measures next.
    """

    stage = "quantize"

    def __init__(self, kind: QuantKind, params: QuantizationParams | None = None):
        self.kind = kind
        self.params = params or QuantizationParams()

    def apply(self, variant, context):
        from tasks.compression.export import compare_logits
        from tasks.compression.technique import derived_name, onnx_file_name
        from tasks.onnx_runtime import open_session, session_predictor
        from tasks.training import predict_logits

        if variant.onnx is None:
            raise ValueError(f"{variant.name}: quantize needs an exported ONNX file; export runs first")
        name = derived_name(variant.name, self.kind)
        destination = context.out_dir / onnx_file_name(name)
        if self.kind == "int8":
            train = context.dataset.splits.get("train")
            calibration = train.images if train is not None else None
            path = quantize_int8_static(variant.onnx, calibration, destination, self.params)
        elif self.kind == "int8-dynamic":
            path = quantize_int8_dynamic(variant.onnx, destination)
        else:
            path = convert_fp16(variant.onnx, destination)
        reference = predict_logits(variant.model, context.parity_images)
        candidate = session_predictor(open_session(path, context.threads))(context.parity_images)
        parity = compare_logits(reference, candidate, context.parity_tolerance)
        record = {"kind": self.kind, "parity": parity.as_dict()}
        if self.kind == "int8":
            record["quantization"] = self.params.model_dump()
        return variant.then("quantize", name, record, onnx=path, precision=self.kind)
