"""Compression benchmark: every technique on every edge runtime, on a model the pipeline trained, side by side.

``vitrail bench compression --workdir DIR [--set KEY=VALUE ...]`` loads the reference model and
dataset of the newest compress run in DIR's MLflow store (or ``--set model_uri=... --set dataset=...``)
and builds, on the runtimes of the ``cpu-2core`` profile (ONNX Runtime and OpenVINO):

* the reference model: ONNX fp32 (fused for ONNX Runtime), static and dynamic int8; OpenVINO fp32, bf16
  (where the CPU has it) and NNCF int8 with Vitrail's settings (``openvino-int8``); and the *peer*
  ``peer-openvino-nncf-int8``: NNCF's documented transformer recipe as a user who knows the runtimes would
  call it on the same fine-tuned model (``nncf.quantize(model, data, model_type=TRANSFORMER)``);
* ToMe r=8 and EViT token reduction, pruning 30 % / 50 % (after recovery), each quantized;
* the recipe: a distilled student, pruned, token-merged, quantized on both runtimes (and its shorter
  chains), every hop exported and parity-checked.

Every score is measured on a held-out split of at least ``min_samples`` (1000) tiles: the dataset's
held-out blocks re-tiled at a smaller stride (:mod:`tasks.compression.held_out`). Each variant's drop is
the larger of its accuracy drop and its drop in the gate's score (macro-F1 / macro AUROC / foreground
IoU) versus torch eager fp32, with a paired-bootstrap 95 % interval (:mod:`tasks.compression.scoring`).
Latency is timed at batch 1 in interleaved rounds (every variant once per round, so machine noise hits all
alike); throughput at batch ``throughput_batch``; ``memory_bytes`` is the resident-memory growth from
opening the variant and running one batch. The edge choice is the compress stage's own
(:func:`tasks.compression.recipe.select_edge_variant` on the dense validation split, 1-point budget).

Options: ``threads`` (2), ``repeats`` (batch-1 calls per variant, 200), ``student_depth`` (4),
``distill_epochs`` (8), ``recovery_epochs`` (4), ``throughput_batch`` (32), ``calibration_samples`` (static
ONNX int8's calibration tiles, 128), ``seed`` (0), ``min_samples``
(1000), ``max_drop`` (edge choice budget, 0.01), ``single_techniques`` (yes: also each technique alone on the
reference model; no: the reference's exports and the recipe only), ``preset`` (``demo`` or ``vit-s16-224``: picks the newest
compress run of a model trained with that pipeline preset, e.g. after ``vitrail demo --preset vit-s16-224``,
and uses its timing settings).
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

GOALS = {"int8": {"speedup": 4.0, "max_drop": 0.01}, "recipe": {"speedup": 8.0, "max_drop": 0.02},
         "peer": {"ratio": 1.0}}
# Full-model int8 variants (the int8 goal), and the peer a runtime-savvy user would build by hand.
PEER = "peer-openvino-nncf-int8"
INT8_VARIANTS = ("onnx-int8", "onnx-int8-dynamic", "openvino-int8", PEER)
# The ViT-S/16 preset's static int8 calibrates on 32 tiles, as its pipeline does: calibration holds every
# quantized op's inputs for every tile (about 40 MB a tile at 224 px).
PRESET_TIMING = {"vit-s16-224": {"repeats": 40, "throughput_batch": 8, "student_depth": 6, "calibration_samples": 32}}


def _locate(workdir: Path, options: dict[str, str]) -> tuple[str, Path]:
    import mlflow

    from tasks import tracking

    tracking.configure_tracking(workdir)
    if "model_uri" in options and "dataset" in options:
        return options["model_uri"], Path(options["dataset"])
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`vitrail.stage` = 'compress'",
                              order_by=["start_time DESC"], max_results=50)
    preset = options.get("preset")
    if preset and not runs.empty:
        # A preset is recognised by its model: the tile size and backbone it trained.
        from flows.presets import PRESETS

        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        wanted = PRESETS[preset].params
        tile = wanted.get("tiling", {}).get("tile_size", 32)
        backbone = wanted.get("backbone", {}).get("name")

        def matches(uri: str) -> bool:
            meta = tracking.logged_model_metadata(uri)
            return int(meta.get("tile_size", 0)) == tile and (backbone is None or meta.get("backbone") == backbone)

        runs = runs[[matches(uri) for uri in runs["params.model_uri"]]]
    if runs.empty:
        hint = f" --preset {preset}" if preset else ""
        raise FileNotFoundError(f"{workdir}: no compress run{f' of preset {preset}' if preset else ''} in its MLflow "
                                f"store; run `vitrail demo{hint} --workdir {workdir}` (or the pipeline) first, or "
                                "pass --set model_uri=... --set dataset=...")
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


def cpu_description() -> dict:
    """What the ratios were measured on: CPU model, the ISA flags that matter for int8/bf16, OpenVINO's view."""
    flags: set[str] = set()
    model = platform.processor()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    keys = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")
    described = {"model": model, "flags": [k for k in keys if k in flags]}
    try:
        from tasks import openvino_runtime

        described["openvino"] = list(openvino_runtime.cpu_capabilities())
    except Exception:  # noqa: BLE001 - without OpenVINO the description is still useful
        pass
    return described


def _build(model, context, options: dict, failures: dict[str, str]) -> list:
    """Every variant of the benchmark (see the module docstring), each exported and parity-checked per hop.

    A hop that fails its parity check is reported in ``failures`` and the benchmark goes on without it
    (token merging can flip a merge on a rounding difference: such an export is refused, not measured).
    """
    from tasks import openvino_runtime
    from tasks.compression.distill import DistillParams, DistillStudent
    from tasks.compression.export import ExportOnnx, ParityError
    from tasks.compression.openvino import ConvertOpenVino
    from tasks.compression.prune import PruneParams, PruneStructured
    from tasks.compression.quantize import QuantizationParams, QuantizeOnnx
    from tasks.compression.recipe import ReduceTokens
    from tasks.compression.technique import REFERENCE_ROOT, Variant, run_recipe
    from tasks.compression.tokens import TokenReductionParams

    def attempt(label: str, start, techniques) -> list:
        try:
            return run_recipe(start, techniques, context)
        except ParityError as error:
            failures[label] = str(error)
            log.warning("%s: %s", label, error)
            return []

    quant = QuantizationParams(calibration_samples=int(options.get("calibration_samples", 128)))
    recovery = int(options.get("recovery_epochs", 4))
    plain = ExportOnnx(fuse=False)  # OpenVINO reads standard ONNX ops only; fused graphs are ONNX Runtime's
    on_both = [QuantizeOnnx("int8-dynamic"), ConvertOpenVino("int8")]
    start = Variant(REFERENCE_ROOT, model)
    built = run_recipe(start, [ExportOnnx(fuse=True), QuantizeOnnx("int8", quant), QuantizeOnnx("int8-dynamic")],
                       context)
    reference_openvino = [plain, ConvertOpenVino("fp32", name="openvino-fp32"),
                          ConvertOpenVino("int8", name="openvino-int8"),
                          ConvertOpenVino("int8", name=PEER, plain=True)]
    if openvino_runtime.supports_bf16():
        reference_openvino.append(ConvertOpenVino("bf16", name="openvino-bf16"))
    built += run_recipe(Variant("unfused-onnx-fp32", model), reference_openvino, context)[1:]  # fp32 ONNX: built
    if options.get("single_techniques", "yes").lower() not in ("no", "false", "0"):
        for tokens in (TokenReductionParams(method="tome", merge_r=8),
                       TokenReductionParams(method="evit", keep_ratio=0.7)):
            built += attempt(tokens.method, start, [ReduceTokens(tokens), plain, *on_both])
        for ratio in (0.3, 0.5):
            built += attempt(f"prune{ratio}", start, [PruneStructured(PruneParams(enabled=True, ratio=ratio,
                                                                                  recovery_epochs=recovery)),
                                                      plain, *on_both])
    student_params = DistillParams(enabled=True, student_depth=int(options.get("student_depth", 4)),
                                   epochs=int(options.get("distill_epochs", 8)))
    # The recipe hop by hop (distil -> prune -> merge tokens), each hop quantized on both runtimes.
    student = run_recipe(start, [DistillStudent(student_params), plain], context)[0]
    built += [student, *run_recipe(student, [plain, QuantizeOnnx("int8", quant), *on_both], context)]
    pruned = run_recipe(student, [PruneStructured(PruneParams(enabled=True, ratio=0.3, recovery_epochs=recovery)),
                                  plain], context)[0]
    built += [pruned, *run_recipe(pruned, [plain, QuantizeOnnx("int8", quant), *on_both], context)]
    built += attempt("recipe-tome", pruned, [ReduceTokens(TokenReductionParams(method="tome", merge_r=8)), plain,
                                             QuantizeOnnx("int8", quant), *on_both])
    return built


def run_benchmark(workdir: Path, options: dict[str, str]) -> dict:
    """Build and measure every variant; return the JSON payload (``variants`` rows, edge choice, goals)."""
    from tasks import tracking
    from tasks.model_inputs import load_dataset_for

    model_uri, dataset_path = _locate(Path(workdir), options)
    model = tracking.load_reference_model(model_uri).eval()
    metadata = tracking.logged_model_metadata(model_uri)
    result = measure_all(model, metadata, load_dataset_for(dataset_path, model), Path(workdir) / "bench" / "compression",
                         options)
    return {"workdir": str(workdir), "model_uri": model_uri, "dataset": str(dataset_path), **result}


def measure_all(model, metadata: dict, dataset, out: Path, options: dict[str, str]) -> dict:
    """Build every variant of ``model`` into ``out`` and measure them on the dense held-out split.

    ``dataset`` is read in the model's input units (:func:`tasks.model_inputs.load_dataset_for`)."""
    import torch

    from domains.array_memory import release_free_memory
    from tasks.compression.held_out import dense_held_out
    from tasks.compression.measure import count_macs, plot_pareto, resident_bytes, time_throughput
    from tasks.compression.profiles import get_profile
    from tasks.compression.recipe import BASELINE, _domain_flips, _torch_size, model_file_bytes
    from tasks.compression.scoring import collect_outcomes, score_drop
    from tasks.compression.technique import PARITY_SAMPLES, CompressionContext
    from tasks.models import input_scaling_of
    from tasks.onnx_runtime import open_predictor
    from tasks.reproducibility import pin_determinism

    preset = options.get("preset")
    options = {**{k: str(v) for k, v in PRESET_TIMING.get(preset or "", {}).items()}, **options}
    threads = int(options.get("threads", 2))
    repeats = int(options.get("repeats", 200))
    batch = int(options.get("throughput_batch", 32))
    seed = int(options.get("seed", 0))
    max_drop = float(options.get("max_drop", 0.01))
    pin_determinism(seed, threads)
    info = dataset.info
    held_out = dense_held_out(dataset, min_samples=int(options.get("min_samples", 1000)),
                              units=input_scaling_of(model))
    test_images, test_labels = held_out.images["test"], held_out.labels["test"]
    log.info("dense held-out tiles %s (strides %s px); building the variants", held_out.counts, held_out.strides)
    out.mkdir(parents=True, exist_ok=True)
    # Parity is checked on the dataset's own test tiles, as in the compress stage.
    parity = dataset.splits["test"].images[:PARITY_SAMPLES]
    context = CompressionContext(dataset=dataset, metadata=metadata, out_dir=out,
                                 parity_images=parity, parity_tolerance=1e-3, threads=threads,
                                 teacher=model, flips=_domain_flips(info.domain), seed=seed)
    started = time.perf_counter()
    failures: dict[str, str] = {}
    built = _build(model, context, options, failures)
    build_seconds = time.perf_counter() - started

    def torch_predict(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(images))).numpy()

    fill = np.resize(test_images[:batch], (batch, *test_images.shape[1:])).astype(np.float32)
    rows: dict[str, dict] = {BASELINE: {"format": "torch", "runtime": "torch", "precision": "fp32",
                                        "size_bytes": _torch_size(model), "memory_bytes": None,
                                        "params": sum(p.numel() for p in model.parameters()),
                                        "macs": count_macs(model, test_images)}}
    outcomes = {BASELINE: collect_outcomes(torch_predict, test_images, test_labels, info.num_classes, info.task)}
    throughput = {BASELINE: time_throughput(torch_predict, fill, repeats=max(3, repeats // 40))}
    # One variant open at a time while it is scored: thirty sessions held open at once, each with its
    # batch-32 buffers, took over 20 GB for the ViT-S/16 preset. Its memory is what opening it and running
    # one batch added, the previous variant's freed memory handed back to the system first.
    for number, variant in enumerate(built, 1):
        log.info("scoring %s on %d held-out tiles (%d of %d)", variant.name, len(test_labels), number, len(built))
        release_free_memory()
        before = resident_bytes()
        predict = open_predictor(variant.onnx, threads)
        predict(fill)
        rows[variant.name] = {"format": "onnx" if variant.runtime == "onnxruntime" else "openvino-ir",
                              "runtime": variant.runtime, "precision": variant.precision,
                              "size_bytes": model_file_bytes(variant.onnx),
                              "memory_bytes": max(0, resident_bytes() - before),
                              "params": sum(p.numel() for p in variant.model.parameters()),
                              "macs": count_macs(variant.model, test_images),
                              "steps": list(variant.steps), "step": {k: v for k, v in variant.records[-1].items()
                                                                     if k != "parity"},
                              "parity_max_abs_diff": variant.records[-1].get("parity", {}).get("max_abs_diff")}
        outcomes[variant.name] = collect_outcomes(predict, test_images, test_labels, info.num_classes, info.task)
        throughput[variant.name] = time_throughput(predict, fill, repeats=max(3, repeats // 40))
        del predict
    release_free_memory()
    drops = {name: score_drop(outcomes[BASELINE], outcome, seed=seed) for name, outcome in outcomes.items()}
    # Batch-1 latency needs every variant open at once (interleaved rounds): opened afresh, they only ever
    # run batch 1, so their buffers stay small.
    log.info("timing %d variants at batch 1, interleaved", len(built) + 1)
    files = {variant.name: variant.onnx for variant in built}
    latency = _interleaved_latency({BASELINE: torch_predict, **{name: open_predictor(path, threads)
                                                               for name, path in files.items()}},
                                   test_images[:1], repeats)
    release_free_memory()
    base = latency[BASELINE][0]
    variants = []
    for name, row in rows.items():
        p50, p95 = latency[name]
        drop = drops[name]
        variants.append({"name": name, **row, "accuracy": drop.accuracy, "gate_score": drop.gate_score,
                         "gate_metric": drop.gate_metric, "accuracy_drop": drop.accuracy_drop,
                         "gate_drop": drop.gate_drop, "drop": drop.drop, "drop_interval": [drop.drop_low, drop.drop_high],
                         "latency_ms_p50": p50, "latency_ms_p95": p95, "throughput": throughput[name],
                         "speedup_vs_fp32": base / p50})
    edge, reasons = _edge_choice(variants, OnDemandPredictors(files, threads), torch_predict, held_out, info,
                                 max_drop)
    plot = plot_pareto(variants, f"compression benchmark ({threads} threads, batch 1, {len(test_labels)} held-out "
                                 f"tiles)", out / "pareto.png")
    result = {"threads": threads,
              "cpu": cpu_description(), "preset": preset or "demo", "test_samples": len(test_labels),
              "held_out": {"note": held_out.note, "stride": held_out.stride, "strides": held_out.strides,
                           "counts": held_out.counts,
                           "dataset_test_samples": len(dataset.splits["test"])},
              "repeats": repeats, "throughput_batch": batch, "build_seconds": build_seconds, "baseline": BASELINE,
              "failed_hops": failures,
              "profile": get_profile("cpu-2core").as_dict(), "variants": variants, "plot": str(plot),
              "edge": {"variant": edge, "max_drop": max_drop, "chosen_on": f"dense val split "
                                                                            f"({held_out.counts.get('val', 0)} tiles)",
                       "rejected": {k: v for k, v in reasons.items() if v}}}
    result["goals"] = judge(variants, edge, outcomes, seed)
    return result


class OnDemandPredictors(Mapping):
    """Predictors by variant name, each opened when looked up and left to its caller (the edge choice scores
    one variant at a time, so only one is open at once)."""

    def __init__(self, files: dict[str, Path], threads: int):
        self.files, self.threads = files, threads

    def __getitem__(self, name: str):
        from tasks.onnx_runtime import open_predictor

        return open_predictor(self.files[name], self.threads)

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _edge_choice(variants: list[dict], predictors: Mapping, torch_predict, held_out, info, max_drop: float):
    """The compress stage's own edge choice (runtime and variant together), on the dense validation split."""
    from tasks.compression.measure import VariantMeasurement
    from tasks.compression.profiles import get_profile
    from tasks.compression.recipe import select_edge_variant

    rows = [VariantMeasurement(name=v["name"], format=v["format"], accuracy=v["accuracy"], macro_f1=v["gate_score"],
                               latency_ms_p50=v["latency_ms_p50"], latency_ms_p95=v["latency_ms_p95"],
                               throughput=v["throughput"], size_bytes=v["size_bytes"], precision=v["precision"],
                               memory_bytes=v["memory_bytes"], runtime=v["runtime"])
            for v in variants if v["runtime"] != "torch"]
    split = "val" if "val" in held_out.images else "test"
    log.info("choosing the edge variant on %d dense %s tiles", len(held_out.labels[split]), split)
    reasons: dict[str, list[str]] = {}
    edge = select_edge_variant(rows, predictors, torch_predict,
                               held_out.images[split], held_out.labels[split], info.class_names, max_drop,
                               get_profile("cpu-2core"), reasons, task=info.task)
    return edge, reasons


def judge(variants: list[dict], edge: str, outcomes: dict, seed: int = 0) -> dict:
    """The goals, each on the held-out drop (max of accuracy and gate-score drops) with its interval."""
    from tasks.compression.scoring import score_drop

    by_name = {v["name"]: v for v in variants}

    def best(names: list[str], max_drop: float) -> dict | None:
        rows = [by_name[n] for n in names if n in by_name]
        within = [v for v in rows if v["drop"] <= max_drop + 1e-9]
        return (max(within, key=lambda v: v["speedup_vs_fp32"]) if within else
                min(rows, key=lambda v: v["drop"]) if rows else None)

    goals = {}
    int8 = best(list(INT8_VARIANTS), GOALS["int8"]["max_drop"])
    recipe = best([v["name"] for v in variants if "distill" in v.get("steps", [])
                   and v["precision"] in ("int8", "int8-dynamic")], GOALS["recipe"]["max_drop"])
    for key, row in (("int8", int8), ("recipe", recipe)):
        if row is None:
            continue
        goal = GOALS[key]
        goals[key] = {"variant": row["name"], "runtime": row["runtime"], "speedup": row["speedup_vs_fp32"],
                      "drop": row["drop"], "drop_interval": row["drop_interval"], "goal_speedup": goal["speedup"],
                      "goal_max_drop": goal["max_drop"],
                      "met": row["speedup_vs_fp32"] >= goal["speedup"] and row["drop"] <= goal["max_drop"] + 1e-9}
    if PEER in by_name and edge in by_name:
        mine, peer = by_name[edge], by_name[PEER]
        # The edge's drop relative to the peer on the same tiles: <= 0 means no worse a score.
        versus = score_drop(outcomes[PEER], outcomes[edge], seed=seed)
        goals["peer"] = {"edge_variant": edge, "edge_runtime": mine["runtime"], "peer_variant": PEER,
                         "ratio": peer["latency_ms_p50"] / mine["latency_ms_p50"],
                         "edge_drop": mine["drop"], "peer_drop": peer["drop"],
                         "edge_vs_peer_drop": versus.drop, "edge_vs_peer_interval": [versus.drop_low, versus.drop_high],
                         "goal_ratio": GOALS["peer"]["ratio"],
                         "met": mine["latency_ms_p50"] <= peer["latency_ms_p50"] and versus.drop <= 1e-9}
    return goals


def _pct(value) -> str:
    return "  n/a" if value is None or not np.isfinite(value) else f"{value * 100:+5.1f}"


def format_table(result: dict) -> str:
    """The variants as a text table (drops in points with their 95 % intervals), then the goals."""
    metric = result["variants"][0].get("gate_metric", "gate")
    head = (f"{'variant':<40} {'runtime':<11} {'acc':>6} {metric:>14} {'drop [95% CI] pts':>22} {'p50 ms':>7} "
            f"{'x fp32':>6} {'img/s@' + str(result.get('throughput_batch', 32)):>9} {'MB':>6} {'mem MB':>7}")
    cpu = result.get("cpu", {})
    lines = [f"compression benchmark: {result['test_samples']} held-out tiles ({result['held_out']['note']}), "
             f"{result['threads']} threads, batch-1 latency ({result['repeats']} interleaved calls per variant)",
             f"CPU: {cpu.get('model')} flags {', '.join(cpu.get('flags', []))}; OpenVINO sees "
             f"{', '.join(cpu.get('openvino', []))}", head, "-" * len(head)]
    for v in result["variants"]:
        low, high = v["drop_interval"]
        memory = "-" if v.get("memory_bytes") is None else f"{v['memory_bytes'] / 1e6:.0f}"
        lines.append(f"{v['name']:<40} {v['runtime']:<11} {v['accuracy']:6.3f} {v['gate_score']:14.3f} "
                     f"{_pct(v['drop'])} [{_pct(low)},{_pct(high)}] {v['latency_ms_p50']:7.2f} "
                     f"{v['speedup_vs_fp32']:6.2f} {v['throughput']:9.1f} {v['size_bytes'] / 1e6:6.2f} {memory:>7}")
    lines.append("")
    edge = result.get("edge", {})
    lines.append(f"edge choice: {edge.get('variant')} (fastest within {edge.get('max_drop', 0) * 100:g} point on the "
                 f"{edge.get('chosen_on')}, profile {result['profile']['name']}: {', '.join(result['profile']['runtimes'])})")
    goals = result.get("goals", {})
    for key in ("int8", "recipe"):
        if key in goals:
            g = goals[key]
            lines.append(f"goal {key}: {g['variant']} ({g['runtime']}) x{g['speedup']:.2f} (goal >= x{g['goal_speedup']:g}), "
                         f"drop {_pct(g['drop'])} pts [{_pct(g['drop_interval'][0])},{_pct(g['drop_interval'][1])}] "
                         f"(goal <= {g['goal_max_drop'] * 100:g}): {'met' if g['met'] else 'MISSED'}")
    if "peer" in goals:
        g = goals["peer"]
        lines.append(f"goal peer: edge {g['edge_variant']} is x{g['ratio']:.2f} the speed of {g['peer_variant']} "
                     f"(plain OpenVINO+NNCF int8 of the same model), drops {_pct(g['edge_drop'])} vs {_pct(g['peer_drop'])} pts; edge vs "
                     f"peer {_pct(g['edge_vs_peer_drop'])} pts [{_pct(g['edge_vs_peer_interval'][0])},"
                     f"{_pct(g['edge_vs_peer_interval'][1])}]: {'met' if g['met'] else 'MISSED'}")
    for label, reason in result.get("failed_hops", {}).items():
        lines.append(f"not measured: {label}: {reason}")
    lines.append("declared profiles without hardware here (arm-a76-4core, jetson-orin-nano): not measured")
    lines.append(f"plot: {result.get('plot')}")
    return "\n".join(lines)
