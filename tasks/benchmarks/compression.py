"""Compression benchmark: every technique on a model the pipeline trained, measured side by side.

``vitrail bench compression --workdir DIR [--set KEY=VALUE ...]`` loads the reference model and
dataset of the newest compress run in DIR's MLflow store (or ``--set model_uri=... --set dataset=...``),
builds fp32/int8/fp16 ONNX, ToMe r=8/16, EViT, pruning 30%/50% (after recovery), a distilled student
and combined recipes, and measures them all in one process on ``threads`` threads. Latency is timed in
interleaved rounds (every variant once per round) so machine noise hits all variants alike; ratios are
against fp32 torch eager at batch 1. Options: ``threads`` (2), ``repeats`` (batch-1 calls per variant,
200), ``student_depth`` (6), ``distill_epochs`` (8), ``recovery_epochs`` (4), ``throughput_batch`` (32),
``seed`` (0: student initialisation and recovery training), ``unfused`` (1: also build the reference
exports without graph fusion -- ``unfused-onnx-fp32``, ``unfused-onnx-fp32-int8``,
``unfused-onnx-fp32-int8-dynamic`` -- so the fusion's effect is measured in the same rounds).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

GOALS = {"int8": {"speedup": 3.0, "max_drop": 0.01}, "combined": {"speedup": 5.0, "max_drop": 0.02}}


def _locate(workdir: Path, options: dict[str, str]) -> tuple[str, Path]:
    import mlflow

    from tasks import tracking

    tracking.configure_tracking(workdir)
    if "model_uri" in options and "dataset" in options:
        return options["model_uri"], Path(options["dataset"])
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`vitrail.stage` = 'compress'",
                              order_by=["start_time DESC"], max_results=1)
    if runs.empty:
        raise FileNotFoundError(f"{workdir}: no compress run in its MLflow store; run `vitrail demo --workdir "
                                f"{workdir}` (or the pipeline) first, or pass --set model_uri=... --set dataset=...")
    row = runs.iloc[0]
    return options.get("model_uri", row["params.model_uri"]), Path(options.get("dataset", row["params.dataset"]))


def _interleaved_latency(predictors: dict, sample: np.ndarray, repeats: int, rounds: int = 10) -> dict[str, tuple]:
    """(p50, p95) ms per predictor, timed in ``rounds`` interleaved rounds of ``repeats / rounds`` calls."""
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for predict in predictors.values():
        for _ in range(5):
            predict(sample)
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for name, predict in predictors.items():
            for _ in range(per_round):
                start = time.perf_counter()
                predict(sample)
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: (float(np.percentile(t, 50)), float(np.percentile(t, 95))) for name, t in times.items()}


def run_benchmark(workdir: Path, options: dict[str, str]) -> dict:
    """Build and measure every variant; return the JSON payload (``variants`` rows + goals)."""
    import torch

    from tasks import tracking
    from tasks.compression.distill import DistillParams, DistillStudent
    from tasks.compression.export import ExportOnnx
    from tasks.compression.measure import count_macs, measure_variant, plot_pareto, resident_bytes
    from tasks.compression.prune import PruneParams, PruneStructured
    from tasks.compression.quantize import QuantizationParams, QuantizeOnnx
    from tasks.compression.recipe import BASELINE, ReduceTokens, _domain_flips, _torch_size
    from tasks.compression.technique import PARITY_SAMPLES, REFERENCE_ROOT, CompressionContext, Variant, run_recipe
    from tasks.compression.tokens import TokenReductionParams
    from tasks.dataset import load_dataset
    from tasks.onnx_runtime import open_session, session_predictor
    from tasks.reproducibility import pin_determinism

    threads = int(options.get("threads", 2))
    repeats = int(options.get("repeats", 200))
    batch = int(options.get("throughput_batch", 32))
    depth = int(options.get("student_depth", 6))
    recovery = int(options.get("recovery_epochs", 4))
    seed = int(options.get("seed", 0))
    pin_determinism(seed, threads)
    model_uri, dataset_path = _locate(Path(workdir), options)
    model = tracking.load_reference_model(model_uri).eval()
    metadata = tracking.logged_model_metadata(model_uri)
    dataset = load_dataset(dataset_path)
    test = dataset.splits["test"]
    out = Path(workdir) / "bench" / "compression"
    out.mkdir(parents=True, exist_ok=True)
    context = CompressionContext(dataset=dataset, metadata=metadata, out_dir=out, parity_images=test.images[:PARITY_SAMPLES],
                                 parity_tolerance=1e-3, threads=threads, teacher=model,
                                 flips=_domain_flips(dataset.info.domain), seed=seed)
    started = time.perf_counter()
    quant = QuantizationParams()
    start = Variant(REFERENCE_ROOT, model)
    built = run_recipe(start, [ExportOnnx(), QuantizeOnnx("int8", quant), QuantizeOnnx("int8-dynamic"),
                               QuantizeOnnx("fp16")], context)
    if options.get("unfused", "1") not in ("0", "false", "no"):
        built += _unfused_reference(model, context, quant)
    for tokens in (TokenReductionParams(method="tome", merge_r=8), TokenReductionParams(method="tome", merge_r=16),
                   TokenReductionParams(method="evit", keep_ratio=0.7)):
        built += run_recipe(start, [ReduceTokens(tokens)], context)
    for ratio in (0.3, 0.5):
        built += run_recipe(start, [PruneStructured(PruneParams(enabled=True, ratio=ratio, recovery_epochs=recovery))],
                            context)
    student_params = DistillParams(enabled=True, student_depth=depth, epochs=int(options.get("distill_epochs", 8)))
    chain = run_recipe(start, [DistillStudent(student_params), PruneStructured(
        PruneParams(enabled=True, ratio=0.3, recovery_epochs=recovery)),
        ReduceTokens(TokenReductionParams(method="tome", merge_r=8)), QuantizeOnnx("int8", quant)], context)
    student = chain[0]
    built += chain
    # The pruned student without token merging: ToMe's attention (size bias, keys read) cannot use the
    # fused Attention op, so at this size merging can cost more than the tokens it removes.
    built += run_recipe(chain[1], [QuantizeOnnx("int8", quant), QuantizeOnnx("int8-dynamic")], context)
    built += run_recipe(student, [ReduceTokens(TokenReductionParams(method="tome", merge_r=8)),
                                  QuantizeOnnx("int8", quant)], context)
    built += run_recipe(student, [QuantizeOnnx("int8", quant)], context)  # student is exported: only its int8
    build_seconds = time.perf_counter() - started

    def torch_predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images)).numpy()

    common = dict(test_images=test.images, test_labels=test.labels, class_names=dataset.info.class_names,
                  task=dataset.info.task,
                  latency_repeats=20, throughput_batch=batch)
    rows = {BASELINE: replace(measure_variant(BASELINE, "torch", torch_predict, _torch_size(model), **common),
                              params=sum(p.numel() for p in model.parameters()), macs=count_macs(model, test.images))}
    predictors = {BASELINE: torch_predict}
    for variant in built:
        before = resident_bytes()
        predict = session_predictor(open_session(variant.onnx, threads))
        predict(np.resize(test.images[:batch], (batch, *test.images.shape[1:])))
        memory = max(0, resident_bytes() - before)
        predictors[variant.name] = predict
        row = measure_variant(variant.name, "onnx", predict, variant.onnx.stat().st_size, **common)
        rows[variant.name] = replace(row, memory_bytes=memory, precision=variant.precision,
                                     params=sum(p.numel() for p in variant.model.parameters()),
                                     macs=count_macs(variant.model, test.images))
    latency = _interleaved_latency(predictors, test.images[:1], repeats)
    base = latency[BASELINE][0]
    records = {v.name: v.records[-1] for v in built}
    variants = []
    for name, row in rows.items():
        p50, p95 = latency[name]
        entry = {**row.as_dict(), "latency_ms_p50": p50, "latency_ms_p95": p95, "speedup_vs_fp32": base / p50,
                 "accuracy_drop": rows[BASELINE].accuracy - row.accuracy}
        if name in records:
            entry["step"] = {k: v for k, v in records[name].items() if k not in ("parity",)}
            entry["parity_max_abs_diff"] = records[name].get("parity", {}).get("max_abs_diff")
        variants.append(entry)
    plot = plot_pareto(variants, f"compression benchmark ({threads} threads, batch 1)", out / "pareto.png")
    result = {"workdir": str(workdir), "model_uri": model_uri, "dataset": str(dataset_path), "threads": threads,
              "test_samples": len(test), "repeats": repeats, "build_seconds": build_seconds,
              "baseline": BASELINE, "variants": variants, "plot": str(plot)}
    result["goals"] = _judge(variants)
    return result


def _unfused_reference(model, context, quant) -> list:
    """fp32, static and dynamic int8 of the reference model exported without graph fusion (the "before")."""
    from tasks.compression.export import ExportOnnx
    from tasks.compression.quantize import QuantizeOnnx
    from tasks.compression.technique import Variant, run_recipe

    return run_recipe(Variant("unfused-onnx-fp32", model),
                      [ExportOnnx(fuse=False), QuantizeOnnx("int8", quant), QuantizeOnnx("int8-dynamic")], context)


def _judge(variants: list[dict]) -> dict:
    by_name = {v["name"]: v for v in variants}
    # The int8 goal is about the full model quantized to int8 (static QDQ or dynamic): the fastest of the two
    # within the accuracy budget, else the more accurate one.
    int8s = [by_name[n] for n in ("onnx-int8", "onnx-int8-dynamic") if n in by_name]
    int8_within = [v for v in int8s if v["accuracy_drop"] <= GOALS["int8"]["max_drop"] + 1e-9]
    int8 = (max(int8_within, key=lambda v: v["speedup_vs_fp32"]) if int8_within else
            max(int8s, key=lambda v: v["accuracy"]) if int8s else None)
    combined = [v for v in variants if v["name"].startswith("student")
                and v["name"].endswith(("int8", "int8-dynamic"))]
    within = [v for v in combined if v["accuracy_drop"] <= GOALS["combined"]["max_drop"] + 1e-9]
    best = max(within, key=lambda v: v["speedup_vs_fp32"]) if within else (
        max(combined, key=lambda v: v["accuracy"]) if combined else None)
    goals = {}
    for key, row in (("int8", int8), ("combined", best)):
        if row is None:
            continue
        goal = GOALS[key]
        goals[key] = {"variant": row["name"], "speedup": row["speedup_vs_fp32"], "accuracy_drop": row["accuracy_drop"],
                      "goal_speedup": goal["speedup"], "goal_max_drop": goal["max_drop"],
                      "met": row["speedup_vs_fp32"] >= goal["speedup"] and row["accuracy_drop"] <= goal["max_drop"] + 1e-9}
    return goals


def format_table(result: dict) -> str:
    """The variants as a text table, then the goals."""
    head = (f"{'variant':<34} {'acc':>6} {'drop':>6} {'F1':>6} {'p50 ms':>8} {'p95 ms':>8} {'img/s':>8} "
            f"{'MB':>7} {'params':>9} {'MMACs':>8} {'x fp32':>7}")
    lines = [f"compression benchmark: {result['test_samples']} test tiles, {result['threads']} threads, batch 1 "
             f"latency ({result['repeats']} interleaved calls per variant), throughput at batch 32", head,
             "-" * len(head)]
    for v in result["variants"]:
        macs = f"{v['macs'] / 1e6:8.1f}" if v.get("macs") else f"{'-':>8}"
        lines.append(f"{v['name']:<34} {v['accuracy']:6.3f} {v['accuracy_drop'] * 100:+6.1f} {v['macro_f1']:6.3f} "
                     f"{v['latency_ms_p50']:8.2f} {v['latency_ms_p95']:8.2f} {v['throughput']:8.1f} "
                     f"{v['size_bytes'] / 1e6:7.2f} {v.get('params') or 0:9d} {macs} {v['speedup_vs_fp32']:7.2f}")
    lines.append("")
    for key, goal in result.get("goals", {}).items():
        lines.append(f"goal {key}: {goal['variant']} x{goal['speedup']:.2f} (goal >= x{goal['goal_speedup']:g}), "
                     f"drop {goal['accuracy_drop'] * 100:.1f} points (goal <= {goal['goal_max_drop'] * 100:g}): "
                     f"{'met' if goal['met'] else 'missed'}")
    lines.append(f"plot: {result.get('plot')}")
    return "\n".join(lines)
