"""Fuse each ViT self-attention subgraph of an ONNX export into one ONNX Runtime ``Attention`` op.

At edge sizes (a few dozen tokens, width 192, batch 1) a ViT's run time is per-operator overhead,
not arithmetic: timm's attention exports as ~25 small nodes per block (qkv bias add, reshape,
permute, three slice/squeeze pairs for ``unbind``, shape arithmetic, two scalings, two matmuls,
softmax, transpose, reshape). ONNX Runtime's transformer optimizer
(``onnxruntime.transformers.optimizer``) only recognises the patterns of Hugging Face exports with
separate q/k/v projections, so on timm graphs it fuses LayerNorm and GELU (which the session's
ORT_ENABLE_ALL level already does at load time) but no attention.

This pass finds, for every block, the region that starts at the packed qkv projection
``MatMul(x, W[Cin, 3A]) + b[3A]`` and ends at the input of the output projection, checks that the
region is plain scaled-dot-product attention (exactly one Softmax on the last axis, two activation
matmuls, only layout/shape/scale ops, nothing else reading its intermediate tensors, no outside
tensor such as a ToMe size bias entering it), and replaces it with
``com.microsoft.Attention(x, W, b, num_heads=H)``. That op runs the qkv GEMM, the per-head
attention and the head merge in one kernel, and ``quantize_dynamic`` maps it to ``QAttention``
(int8 qkv GEMM).

Blocks that do not match are left alone with the reason logged, and the fused file is checked
numerically against the unfused one before it is kept: fusion never changes what a model predicts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# Ops that may appear between the qkv projection and the output projection of plain attention.
_LAYOUT_OPS = {"Reshape", "Transpose", "Slice", "Squeeze", "Unsqueeze", "Split", "Gather", "Shape", "Concat",
               "Cast", "Identity", "Constant", "Mul", "Div", "Sqrt", "MatMul", "Softmax"}


@dataclass
class FusionReport:
    """What :func:`fuse_attention` did: blocks fused, blocks skipped and why, parity with the unfused graph."""

    fused: int = 0
    skipped: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    applied: bool = False
    reason: str = ""

    def as_dict(self) -> dict:
        return {"fused_attention": self.fused, "skipped": list(self.skipped), "max_abs_diff": self.max_abs_diff,
                "applied": self.applied, "reason": self.reason}


class _Graph:
    """Producer/consumer indexes of an ONNX graph."""

    def __init__(self, graph):
        import onnx.numpy_helper as nh

        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in graph.output}
        self.constants = set(self.initializers)
        for node in graph.node:
            if node.op_type == "Constant":
                self.constants.update(node.output)
        self._nh = nh

    def array(self, name: str) -> np.ndarray | None:
        init = self.initializers.get(name)
        return None if init is None else self._nh.to_array(init)

    def dims(self, name: str) -> list[int] | None:
        init = self.initializers.get(name)
        return None if init is None else list(init.dims)


def _static_dim(value_info: dict, name: str, axis: int) -> int | None:
    info = value_info.get(name)
    if info is None:
        return None
    dims = info.type.tensor_type.shape.dim
    if len(dims) <= axis or not dims[axis].HasField("dim_value"):
        return None
    return int(dims[axis].dim_value)


def _qkv_projections(g: _Graph) -> list[tuple]:
    """(matmul, add, W name, b name) of every ``MatMul(x, W[Cin, 3A]) + b[3A]`` in graph order."""
    found = []
    for node in g.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        weight = g.dims(node.input[1])
        if weight is None or len(weight) != 2 or weight[1] % 3:
            continue
        users = g.consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add" or node.output[0] in g.graph_outputs:
            continue
        add = users[0]
        bias = next((name for name in add.input if name != node.output[0]), None)
        if bias is None or g.dims(bias) != [weight[1]]:
            continue
        found.append((node, add, node.input[1], bias))
    return found


def _reaches_softmax(g: _Graph, tensor: str, limit: int = 64) -> bool:
    """Whether a Softmax follows ``tensor`` before any weight projection (i.e. it feeds an attention)."""
    frontier, seen = [tensor], set()
    while frontier and len(seen) < limit:
        for node in g.consumers.get(frontier.pop(), []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "Softmax":
                return True
            if node.op_type in ("MatMul", "Gemm") and g.dims(node.input[1]) is not None:
                continue
            frontier.extend(node.output)
    return False


def _attention_region(g: _Graph, qkv: str) -> tuple[list, str] | str:
    """Nodes from the qkv tensor to the output projection's input, or the reason it is not plain attention."""
    region: dict[str, object] = {}
    frontier = [qkv]
    exits: set[str] = set()
    while frontier:
        tensor = frontier.pop()
        if tensor in g.graph_outputs:
            return "an attention intermediate is a graph output"
        for node in g.consumers.get(tensor, []):
            if id(node) in region:
                continue
            if node.op_type == "MatMul" and g.dims(node.input[1]) is not None and len(g.dims(node.input[1])) == 2:
                exits.add(node.input[0])  # the output projection: the region ends at its input
                continue
            if node.op_type not in _LAYOUT_OPS:
                return f"unexpected {node.op_type} inside attention (not plain scaled-dot-product attention)"
            region[id(node)] = node
            frontier.extend(node.output)
            if len(region) > 200:
                return "attention region too large"
    if len(exits) != 1:
        return f"attention region ends at {len(exits)} projections instead of one"
    context = next(iter(exits))
    nodes = list(region.values())
    softmax = [n for n in nodes if n.op_type == "Softmax"]
    matmuls = [n for n in nodes if n.op_type == "MatMul"]
    if len(softmax) != 1 or len(matmuls) != 2:
        return f"{len(softmax)} Softmax and {len(matmuls)} activation MatMul (expected 1 and 2)"
    produced = {out for n in nodes for out in n.output}
    if context not in produced:
        return "output projection does not read the attention region"
    for n in nodes:
        for name in n.input:
            if name and name != qkv and name not in produced and name not in g.constants:
                return f"outside tensor {name!r} enters attention (e.g. a token-merging size bias)"
        for out in n.output:
            if out == context:
                continue
            if any(id(user) not in region for user in g.consumers.get(out, [])):
                return f"attention intermediate {out!r} is read outside attention"
    users = g.consumers.get(context, [])
    if len(users) != 1:
        return "attention output read by more than the output projection"
    return nodes, context


def _softmax_axis_is_last(node, value_info: dict) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    if axis == -1:
        return True
    info = value_info.get(node.input[0])
    rank = len(info.type.tensor_type.shape.dim) if info is not None else None
    return rank is not None and axis == rank - 1


def fuse_attention_model(model) -> FusionReport:
    """Fuse every plain-attention block of ``model`` (an ``onnx.ModelProto``) in place; return what happened."""
    import onnx
    from onnx import helper

    report = FusionReport()
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # noqa: BLE001 - shape inference gaps just mean fewer static shapes
        log.info("attention fusion: shape inference failed (%s); using the export's own shapes", exc)
        inferred = model
    value_info = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    g = _Graph(model.graph)
    removed: set[str] = set()
    replacements: dict[str, object] = {}
    for matmul, add, weight, bias in _qkv_projections(g):
        block = matmul.name or weight
        if not _reaches_softmax(g, add.output[0]):
            continue  # an MLP or head projection whose width happens to be a multiple of 3
        found = _attention_region(g, add.output[0])
        if isinstance(found, str):
            report.skipped.append(f"{block}: {found}")
            continue
        nodes, context = found
        softmax = next(n for n in nodes if n.op_type == "Softmax")
        heads = _static_dim(value_info, softmax.input[0], 1)
        hidden = g.dims(weight)[1] // 3
        if not _softmax_axis_is_last(softmax, value_info):
            report.skipped.append(f"{block}: softmax is not over the last axis")
            continue
        if heads is None or heads < 1 or hidden % heads:
            report.skipped.append(f"{block}: number of heads unknown (no static shape at the softmax)")
            continue
        fused = helper.make_node("Attention", [matmul.input[0], weight, bias], [context],
                                 name=f"{matmul.name or weight}_attention", domain=MS_DOMAIN, num_heads=heads)
        replacements[id(matmul)] = fused
        removed.update(id(n) for n in nodes)
        removed.add(id(add))
        report.fused += 1
    if not report.fused:
        report.reason = "no attention block matched: " + ("; ".join(report.skipped[:3]) or "no packed qkv projection")
        return report
    kept = []
    for node in model.graph.node:
        if id(node) in replacements:
            kept.append(replacements[id(node)])
        elif id(node) not in removed:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _drop_dead(model)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    report.applied = True
    return report


def _drop_dead(model) -> None:
    """Remove nodes whose outputs nothing reads, then initializers and value_info no node uses."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            live.append(node)
            needed.update(name for name in node.input if name)
    live.reverse()
    del graph.node[:]
    graph.node.extend(live)
    used = {name for node in live for name in node.input}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    produced = {out for node in live for out in node.output}
    info = [vi for vi in graph.value_info if vi.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(info)


def fuse_attention(source: Path, destination: Path, images: np.ndarray, tolerance: float = 1e-4,
                   threads: int = 2) -> FusionReport:
    """Write ``source`` with attention fused to ``destination`` when that changes nothing.

    The fused graph must reproduce the unfused one on ``images`` within ``tolerance`` (max |logit|
    difference); otherwise, or when no block matches, ``destination`` is a plain copy of ``source``
    and the report's ``reason`` says why (also logged).
    """
    import shutil

    import onnx

    from tasks.onnx_runtime import open_session, session_predictor

    model = onnx.load(str(source))
    report = fuse_attention_model(model)
    if report.applied:
        onnx.save(model, str(destination))
        sample = np.ascontiguousarray(images, dtype=np.float32)
        reference = session_predictor(open_session(source, threads))(sample)
        candidate = session_predictor(open_session(destination, threads))(sample)
        report.max_abs_diff = float(np.abs(reference.astype(np.float64) - candidate).max())
        if report.max_abs_diff > tolerance:
            report.applied = False
            report.reason = (f"fused graph differs from the unfused one by {report.max_abs_diff:.3g} > {tolerance:g}; "
                             "kept unfused")
    if report.applied:
        report.reason = f"fused {report.fused} attention block(s)"
        log.info("attention fusion %s: %s (max |diff| %.2e)%s", source.name, report.reason, report.max_abs_diff,
                 f"; skipped {report.skipped}" if report.skipped else "")
    else:
        if Path(source) != Path(destination):
            shutil.copyfile(source, destination)
        log.warning("attention fusion skipped for %s: %s", source.name, report.reason)
    return report


def fuse_transformer_ops(source: Path, destination: Path) -> dict[str, int]:
    """ONNX Runtime's transformer fusions other than attention: residual Add + LayerNorm (+ bias) ->
    SkipLayerNormalization, bias Add + Gelu -> BiasGelu. Writes ``destination``; returns the fused op counts.

    The session's ORT_ENABLE_ALL level applies these only where shapes are known at load time, which on
    dynamo exports leaves most residual Adds unfused; doing it offline also lets the quantizer see the
    fused graph.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = False  # done by fuse_attention_model, which understands timm's packed qkv
    options.enable_embed_layer_norm = False
    optimized = optimize_model(str(source), model_type="bert", num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=options, use_gpu=False)
    optimized.save_model_to_file(str(destination))
    return {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}


def optimize_for_cpu(source: Path, destination: Path, images: np.ndarray, tolerance: float = 1e-4,
                     threads: int = 2) -> dict:
    """Attention fusion, then ORT's LayerNorm/GELU fusions; each kept only if the graph still predicts
    what ``source`` predicts on ``images`` (max |logit| difference within ``tolerance``).

    Returns a record for the export step: what fused, what was skipped and why, and the final difference.
    ``destination`` always exists afterwards (a copy of ``source`` when nothing could be fused).
    """
    import shutil
    import tempfile

    from tasks.onnx_runtime import open_session, session_predictor

    sample = np.ascontiguousarray(images, dtype=np.float32)
    reference = session_predictor(open_session(source, threads))(sample)
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "attention.onnx"
        attention = fuse_attention(source, staged, sample, tolerance, threads)
        record = {"attention": attention.as_dict()}
        fused = Path(scratch) / "fused.onnx"
        try:
            record["ops"] = fuse_transformer_ops(staged, fused)
            diff = float(np.abs(session_predictor(open_session(fused, threads))(sample) - reference).max())
            if diff > tolerance:
                record["ops_skipped"] = f"ORT fusions changed logits by {diff:.3g} > {tolerance:g}"
                fused = staged
        except Exception as exc:  # noqa: BLE001 - the optimizer's pattern code can fail on unusual graphs
            record["ops_skipped"] = f"ORT transformer fusions failed: {type(exc).__name__}: {exc}"[:300]
            fused = staged
        if "ops_skipped" in record:
            log.warning("transformer op fusion skipped for %s: %s", source.name, record["ops_skipped"])
        final = session_predictor(open_session(fused, threads))(sample)
        record["max_abs_diff"] = float(np.abs(final - reference).max())
        shutil.copyfile(fused, destination)
    return record
