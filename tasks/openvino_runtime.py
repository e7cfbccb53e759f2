"""OpenVINO as an edge runtime: ONNX -> OpenVINO IR, NNCF post-training int8, bf16, and compiled predictors.

Measured on the 2-core machines of this project (see ``shared/ENVIRONMENT.md``), OpenVINO with NNCF
int8 was the fastest CPU runtime at every ViT size: about 1.5x ONNX Runtime's dynamic int8. A Vitrail
OpenVINO artifact is an IR pair (``<name>.xml`` + ``<name>.bin``) converted from a parity-checked ONNX
export; the Vitrail metadata (channels, classes, tile size...) and how to run the file (its inference
precision) are stored in the IR's ``rt_info``, so the pair alone is predictable offline, like an ONNX file.

NNCF quantizes with ``ModelType.TRANSFORMER``: it keeps softmax, LayerNorm and GELU in float and uses
SmoothQuant-style scaling of the matmul inputs (the activation outliers that break naive ViT int8).
"""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from tasks.atomic_files import partial_name
from tasks.request_errors import RequestError

RUNTIME = "openvino"
METADATA_KEY = "vitrail"
PRECISION_KEY = "vitrail_inference_precision"
OpenVinoKind = Literal["fp32", "bf16", "int8"]


class OpenVinoUnavailable(RequestError):
    """The openvino/nncf packages are not installed, or the CPU lacks what a variant needs."""


def _ov():
    try:
        import openvino as ov
    except ImportError as error:  # pragma: no cover - openvino is a project dependency
        raise OpenVinoUnavailable("OpenVINO is not installed: pip install openvino nncf") from error
    return ov


@lru_cache(maxsize=1)
def _core():
    return _ov().Core()


def available() -> bool:
    """Whether OpenVINO can be imported here."""
    try:
        _ov()
    except OpenVinoUnavailable:
        return False
    return True


def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's optimisation capabilities of this CPU (e.g. ``FP32``, ``INT8``, ``BF16``)."""
    return tuple(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def supports_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return "BF16" in cpu_capabilities()


def is_openvino_file(path: Path | str) -> bool:
    """Whether ``path`` is an OpenVINO IR (``.xml``, weights beside it in ``.bin``)."""
    return Path(path).suffix == ".xml"


def bin_file(xml: Path | str) -> Path:
    """The weights file of an IR."""
    return Path(xml).with_suffix(".bin")


def _save(model, destination: Path, metadata: dict, precision: str) -> Path:
    """Save an IR pair atomically (the .bin first, then the .xml that names it: a reader never sees half)."""
    ov = _ov()
    model.set_rt_info(json.dumps(metadata), METADATA_KEY)
    model.set_rt_info(precision, PRECISION_KEY)
    destination.parent.mkdir(parents=True, exist_ok=True)
    scratch = partial_name(destination.with_suffix(".ir"))
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        staged = scratch / destination.name
        # fp32 weights stay fp32 (compress_to_fp16 would make "fp32" a different model); int8 weights are int8.
        ov.save_model(model, str(staged), compress_to_fp16=False)
        staged.with_suffix(".bin").replace(bin_file(destination))
        staged.replace(destination)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return destination


def convert_onnx(source: Path, destination: Path, metadata: dict, precision: OpenVinoKind = "fp32") -> Path:
    """Convert a Vitrail ONNX file to an OpenVINO IR run at ``precision`` (fp32 or bf16 inference)."""
    if precision == "bf16" and not supports_bf16():
        raise OpenVinoUnavailable(f"this CPU has no native bf16 (OpenVINO capabilities: {cpu_capabilities()})")
    model = _ov().convert_model(str(source))
    return _save(model, destination, metadata, precision)


def quantize_nncf(source: Path, calibration_images: np.ndarray, destination: Path, metadata: dict,
                  samples: int = 300, plain: bool = False) -> Path:
    """NNCF post-training int8 of an ONNX (or IR) model, calibrated on in-domain training tiles.

    ``ModelType.TRANSFORMER`` keeps softmax/LayerNorm/GELU in float and applies SmoothQuant to the
    matmul inputs; the MIXED preset gives asymmetric activations (GELU outputs are one-sided). Vitrail
    also keeps the convolutions (the patch embedding, a segmentation head's convolutions) in float: the
    patch embedding sees raw bands whose range a rare strong signal sets (a methane plume's thousands of
    ppm·m), and int8 of its input erased every plume of the hyperspectral demo (foreground IoU 0.73 ->
    0.002; 0.73 with the convolutions in float). ``plain`` is NNCF's documented recipe for transformers
    as a user would call it (``model_type=TRANSFORMER``, defaults otherwise): the benchmark's peer.
    """
    import nncf

    if calibration_images is None or len(calibration_images) == 0:
        raise RequestError(f"{source}: no calibration tiles for NNCF int8; the training split is empty")
    ov = _ov()
    model = _core().read_model(str(source)) if is_openvino_file(source) else ov.convert_model(str(source))
    count = min(samples, len(calibration_images))
    tiles = [np.ascontiguousarray(calibration_images[i:i + 1], dtype=np.float32) for i in range(count)]
    if plain:
        quantized = nncf.quantize(model, nncf.Dataset(tiles), model_type=nncf.ModelType.TRANSFORMER, subset_size=count)
    else:
        quantized = nncf.quantize(model, nncf.Dataset(tiles), preset=nncf.QuantizationPreset.MIXED,
                                  model_type=nncf.ModelType.TRANSFORMER, subset_size=count,
                                  ignored_scope=nncf.IgnoredScope(types=["Convolution"], validate=False))
    return _save(quantized, destination, metadata, "int8")


def read_metadata(path: Path | str) -> dict:
    """The Vitrail metadata stored in an IR by :func:`convert_onnx` / :func:`quantize_nncf`."""
    model = _core().read_model(str(path))
    if not model.has_rt_info(METADATA_KEY):
        raise ValueError(f"{path}: OpenVINO IR has no Vitrail metadata (channels, classes); was it made by Vitrail?")
    return json.loads(model.get_rt_info(METADATA_KEY).astype(str))


def inference_precision(path: Path | str) -> str:
    """How the IR at ``path`` is meant to run: ``fp32``, ``bf16`` or ``int8``."""
    model = _core().read_model(str(path))
    return model.get_rt_info(PRECISION_KEY).astype(str) if model.has_rt_info(PRECISION_KEY) else "fp32"


def compile_model(path: Path | str, threads: int = 2):
    """Compile an IR for this CPU: ``threads`` threads, one stream, latency hint, at its stored precision.

    The inference precision is set explicitly: on CPUs with bf16 OpenVINO may otherwise pick bf16 for
    an fp32 model, and an "fp32" row would silently be a bf16 one.
    """
    core = _core()
    model = core.read_model(str(path))
    precision = model.get_rt_info(PRECISION_KEY).astype(str) if model.has_rt_info(PRECISION_KEY) else "fp32"
    hint = "bf16" if precision == "bf16" else "f32"
    if hint == "bf16" and not supports_bf16():
        raise OpenVinoUnavailable(f"{path} is a bf16 variant and this CPU has no native bf16")
    return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1,
                                             "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint})


def compiled_predictor(compiled):
    """A predictor (N, C, H, W) float32 -> logits (N, K) backed by one infer request of ``compiled``."""
    request = compiled.create_infer_request()

    def predict(images: np.ndarray) -> np.ndarray:
        request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
        return np.array(request.get_output_tensor(0).data, copy=True)

    return predict
