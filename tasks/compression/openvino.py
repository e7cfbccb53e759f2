"""The OpenVINO hop of the recipe: an exported, parity-checked ONNX variant -> OpenVINO fp32, bf16 or NNCF int8.

Like :class:`tasks.compression.quantize.QuantizeOnnx`, it branches from the last export. The fp32 IR
must reproduce the ONNX export within the parity tolerance (the conversion is checked per hop); bf16
and int8 logit differences are recorded and the variants are judged by their scores.
"""

from __future__ import annotations

from tasks.openvino_runtime import OpenVinoKind

OPENVINO_KINDS: tuple[str, ...] = ("fp32", "bf16", "int8")


def openvino_file_name(variant: str) -> str:
    """File name of an OpenVINO variant's IR (its weights are the ``.bin`` beside it)."""
    return f"{variant}.xml"


class ConvertOpenVino:
    """``stage = "quantize"``: ONNX fp32 export -> OpenVINO IR at ``kind`` (``int8`` via NNCF post-training)."""

    stage = "quantize"

    def __init__(self, kind: OpenVinoKind, calibration_samples: int = 300, name: str | None = None,
                 plain: bool = False):
        self.kind = kind
        self.plain = plain  # NNCF as a user would call it (the benchmark's peer), not Vitrail's settings
        self.calibration_samples = calibration_samples
        self.name = name

    def apply(self, variant, context):
        from tasks import openvino_runtime
        from tasks.compression.export import ParityError, compare_logits
        from tasks.compression.technique import REFERENCE_ROOT
        from tasks.evaluation import predict_in_batches
        from tasks.onnx_runtime import open_predictor

        if variant.onnx is None or variant.runtime != "onnxruntime":
            raise ValueError(f"{variant.name}: OpenVINO conversion starts from an exported ONNX file")
        # The reference export's OpenVINO variants are plain ``openvino-<kind>`` (the peers of ``onnx-<kind>``).
        suffix = f"openvino-{self.kind}"
        name = self.name or (suffix if variant.name in (REFERENCE_ROOT, "onnx-fp32") else f"{variant.name}-{suffix}")
        destination = context.out_dir / openvino_file_name(name)
        if self.kind == "int8":
            train = context.dataset.splits.get("train")
            calibration = train.images[:self.calibration_samples] if train is not None else None
            path = openvino_runtime.quantize_nncf(variant.onnx, calibration, destination, context.metadata,
                                                  self.calibration_samples, plain=self.plain)
        else:
            path = openvino_runtime.convert_onnx(variant.onnx, destination, context.metadata, self.kind)
        # Parity per hop: against the ONNX file this IR was made from.
        reference = predict_in_batches(open_predictor(variant.onnx, context.threads), context.parity_images)
        candidate = predict_in_batches(open_predictor(path, context.threads), context.parity_images)
        parity = compare_logits(reference, candidate, context.parity_tolerance)
        if self.kind == "fp32" and not parity.passed:
            raise ParityError(f"{path}: OpenVINO fp32 differs from {variant.onnx.name} by {parity.max_abs_diff:.3g} "
                              f"> tolerance {parity.tolerance:g}")
        record = {"kind": f"openvino-{self.kind}", "runtime": "openvino", "parity": parity.as_dict(), "plain": self.plain,
                  "parity_against": variant.onnx.name}
        return variant.then("quantize", name, record, onnx=path, precision=self.kind if self.kind != "fp32" else "fp32",
                            runtime="openvino")
