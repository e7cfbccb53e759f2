"""Merging benchmark: K fine-tunes of one base on different tasks of the satellite demo scene, merged by every
method, each merged model scored on every task, side by side with the reference models.

``vitrail bench merging --workdir DIR [--set KEY=VALUE ...]`` writes ``DIR/bench/merging.json`` with a list
``rows``: ``method``, ``task_scores`` (test macro-F1 per task), ``avg_normalised_score`` (mean over tasks of the
score divided by that task's own fine-tune's), ``peak_rss_mb`` and ``seconds`` (the merge, validation scoring
of greedy soup and Frank-Wolfe included; not the test scoring). The OPCM row adds ``memory_per_arrival``: after
each arriving model, the process's resident memory and the bytes of the running state.

Tasks are different label rules on the same tiles of the bundled Sentinel-2 crop (each tile labelled by the
majority of its pixels): ``water`` (NDWI > 0), ``vegetation`` (NDVI > 0.4), ``bright`` (visible reflectance
above the scene median), ``moist`` (NDMI from B8A and B11 above the scene median), ``red-edge`` (B07 vs B05
normalised difference above the median). Every task is binary, so the multi-task reference is one multilabel
model trained on all labels through the same loop (task k's score reads its output k).

The base is a masked autoencoder pretrained on the scene's tiles (``base=pretrain``, what ``vitrail pretrain``
does), a fixed seeded ViT (``base=seeded``), or a checkpoint file (``base=PATH``). Reference rows: each
fine-tune on its own task (``individual:<task>``; together they define 1.0), the base with each task's head
(``base+heads``), and the multi-task model (``multitask``).

Every merge runs in a child process of its own, so its peak RSS (VmHWM) is its alone: batch methods load all K
models, OPCM loads one arriving model at a time and keeps only its state between arrivals.

Options: tasks (water,vegetation,bright,moist), tile (16), block (64), epochs (3), batch_size (32),
learning_rate (2e-3), threads (2), seed (0), backbone (vit_tiny_patch16_224), patch_size (8), depth (2),
base (pretrain | seeded | PATH), pretrain_epochs (3), adapter (lora), rank (8), targets (qkv,fc1,fc2),
train_patch_embed (0),
methods (all), scaling (0.3), ties_scaling (1.0), density (0.2), drop_rate (0.5), opcm_alpha (0.5),
fw_steps (3), fw_vertex_scale (1.0), multitask (1), head (frozen-lp | joint), lp_epochs (3),
lp_learning_rate (1e-2), scaling_grid (empty: the fixed scalings above; e.g. 0.3,0.5,0.7,1.0: task arithmetic's,
DARE's and TIES's scaling chosen per method by the validation score, never the test split).

Fine-tunes follow LP-FT with a frozen head by default (``head=frozen-lp``): each task's head is a linear probe of
the base's frozen features, then stays fixed while the adapter trains, so task vectors are relative to heads that
still hold under a merged backbone (the papers' setting: a fixed zero-shot head per task). The individual and
multi-task reference rows are trained the same way; ``base+heads`` is then the linear probes themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULTS = {"tasks": "water,vegetation,bright,moist", "tile": "16", "block": "64", "epochs": "3",
            "batch_size": "32", "learning_rate": "2e-3", "threads": "2", "seed": "0",
            "backbone": "vit_tiny_patch16_224", "patch_size": "8", "depth": "2", "base": "pretrain",
            "pretrain_epochs": "3", "adapter": "lora", "rank": "8", "targets": "qkv,fc1,fc2", "train_patch_embed": "0",
            "head": "frozen-lp", "lp_epochs": "3", "lp_learning_rate": "1e-2", "methods": "",
            "scaling": "0.3", "ties_scaling": "1.0", "scaling_grid": "", "density": "0.2", "drop_rate": "0.5", "opcm_alpha": "0.5",
            "fw_steps": "3", "fw_vertex_scale": "1.0", "multitask": "1"}
REPO = Path(__file__).resolve().parents[2]
METRIC = "macro_f1"


# --- the tasks ------------------------------------------------------------------------------------------------


def _difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    total = a + b
    out = np.zeros_like(total)
    np.divide(a - b, total, out=out, where=total > 0)
    return out


TASK_RULES = ("water", "vegetation", "bright", "moist", "red-edge")


def task_labels(scene, name: str) -> np.ndarray:
    """Pixel labels (1 where the rule holds, 0 elsewhere, -1 off the valid scene) of task ``name``."""
    if name not in TASK_RULES:
        from tasks.request_errors import RequestError

        raise RequestError(f"bench merging: unknown task {name!r}; known: {', '.join(TASK_RULES)}")
    band = {c.name: i for i, c in enumerate(scene.channels)}
    d = scene.data

    def above_median(values: np.ndarray) -> np.ndarray:
        return values > np.median(values[scene.valid])

    rules = {
        "water": lambda: _difference(d[band["B03"]], d[band["B08"]]) > 0.0,
        "vegetation": lambda: _difference(d[band["B08"]], d[band["B04"]]) > 0.4,
        "bright": lambda: above_median((d[band["B02"]] + d[band["B03"]] + d[band["B04"]]) / 3),
        "moist": lambda: above_median(_difference(d[band["B8A"]], d[band["B11"]])),
        "red-edge": lambda: above_median(_difference(d[band["B07"]], d[band["B05"]])),
    }
    labels = rules[name]().astype(np.int64)
    labels[~scene.valid] = -1
    return labels


def write_task_datasets(out_dir: Path, names: list[str], tile: int, block: int, seed: int) -> dict[str, Path]:
    """One dataset per task plus ``multitask`` (the same tiles, every task's label as one finding)."""
    from domains import SampleSet
    from domains.satellite.demo import demo_scene_dir
    from domains.satellite.scene import read_scene
    from domains.satellite.tiling import tile_scene
    from domains.spec import IngestRequest
    from tasks.dataset import SplitParams, write_dataset

    paths = {name: out_dir / name for name in [*names, "multitask"]}
    if all((p / "dataset.json").exists() for p in paths.values()):
        return paths
    scene = read_scene(demo_scene_dir())
    split = SplitParams(val_fraction=0.15, test_fraction=0.2, seed=seed)
    sets = {}
    for name in names:
        request = IngestRequest(source=demo_scene_dir(), tile_size=tile, stride=tile, block_size=block,
                                class_names=(f"not-{name}", name))
        sets[name] = tile_scene(scene, task_labels(scene, name), request)
        write_dataset(sets[name], "satellite", "classification", paths[name], split)
    first = sets[names[0]]
    if any(not np.array_equal(s.locations, first.locations) for s in sets.values()):
        raise RuntimeError("the tasks kept different tiles; the multi-task dataset needs the same tiles")
    multi = SampleSet(images=first.images, labels=np.stack([sets[n].labels for n in names], axis=1).astype(np.int8),
                      groups=first.groups, locations=first.locations, source=first.source, channels=first.channels,
                      class_names=tuple(names), task="multilabel", provenance=first.provenance)
    write_dataset(multi, "satellite", "multilabel", paths["multitask"], split)
    return paths


# --- the base and the fine-tunes -----------------------------------------------------------------------------


def backbone_params(options: dict[str, str], weights_file: Path):
    from tasks.models import BackboneParams

    return BackboneParams(name=options["backbone"], weights="file", weights_file=str(weights_file),
                          patch_size=int(options["patch_size"]), depth=int(options["depth"]))


def prepare_base(bench_dir: Path, dataset: Path, options: dict[str, str]) -> tuple[Path, dict]:
    """The base checkpoint: pretrained (MAE), seeded, or the file given; with how it was made."""
    import torch

    from tasks.models import BackboneParams
    from tasks.training import TrainParams

    kind = options["base"]
    if kind not in ("pretrain", "seeded"):
        return Path(kind), {"kind": "file", "path": kind}
    tag = f"{kind}-{options['backbone']}-p{options['patch_size']}-d{options['depth']}-t{options['tile']}-s{options['seed']}"
    if kind == "pretrain":
        tag += f"-e{options['pretrain_epochs']}"
    folder = bench_dir / "merging-base" / tag
    file = folder / ("encoder.safetensors" if kind == "pretrain" else "base.safetensors")
    started = time.perf_counter()
    if not file.exists():
        backbone = BackboneParams(name=options["backbone"], weights="none", patch_size=int(options["patch_size"]),
                                  depth=int(options["depth"]))
        if kind == "seeded":
            import timm
            from safetensors.torch import save_file

            torch.manual_seed(int(options["seed"]))
            model = timm.create_model(options["backbone"], img_size=int(options["tile"]),
                                      patch_size=int(options["patch_size"]), depth=int(options["depth"]),
                                      in_chans=13, num_classes=0)
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
        else:
            from tasks.pretraining import MaeParams, pretrain_encoder

            train = TrainParams(epochs=int(options["pretrain_epochs"]), batch_size=64, learning_rate=1e-3,
                                weight_decay=0.05, warmup_epochs=0.5, seed=int(options["seed"]),
                                threads=int(options["threads"]), resume=False)
            mae = MaeParams(decoder_dim=64, decoder_depth=1, decoder_heads=2, preview_samples=2)
            outcome = pretrain_encoder(dataset, backbone, mae, train, folder / "checkpoints", folder)
            outcome.encoder_file.replace(file) if outcome.encoder_file != file else None
    return file, {"kind": kind, "path": str(file), "seconds": round(time.perf_counter() - started, 2)}


def _train_params(options: dict[str, str], epochs: str, learning_rate: str):
    from tasks.training import TrainParams

    return TrainParams(epochs=int(options[epochs]), batch_size=int(options["batch_size"]),
                       learning_rate=float(options[learning_rate]), warmup_epochs=0.5, seed=int(options["seed"]),
                       threads=int(options["threads"]), resume=True)


def linear_probe_head(dataset: Path, options: dict[str, str], base_file: Path, out_dir: Path) -> dict:
    """The head of a linear probe on the base's frozen features (same loop, method ``linear-probe``)."""
    from tasks.adapters import AdapterParams
    from tasks.finetune import fit_adapter

    outcome = fit_adapter(dataset, backbone_params(options, base_file), AdapterParams(method="linear-probe"),
                          _train_params(options, "lp_epochs", "lp_learning_rate"), out_dir)
    prefix = "net.head."
    head = {k.removeprefix(prefix): v.detach().clone() for k, v in outcome.model.state_dict().items()
            if k.startswith(prefix)}
    if not head:
        raise RuntimeError("bench merging: the linear probe's model has no net.head tensors")
    return head


def fine_tune(dataset: Path, options: dict[str, str], base_file: Path, out_dir: Path):
    """One fine-tune through the project's fine-tune stage (the one training loop); returns its outcome.

    With ``head=frozen-lp`` (the default) the head is first fitted by a linear probe of the base and then kept
    fixed while the adapter trains (LP-FT, frozen head): the papers' setting (a fixed zero-shot head per
    task), in which every task vector is relative to a head that still holds under the merged backbone. With
    ``head=joint`` head and adapter train together (each head then fits only its own fine-tuned backbone).
    """
    from tasks.adapters import TARGETED_METHODS, AdapterParams
    from tasks.finetune import fit_adapter

    protocol = options["head"]
    if protocol not in ("frozen-lp", "joint"):
        from tasks.request_errors import RequestError

        raise RequestError(f"bench merging: head={protocol!r}; give frozen-lp or joint")
    method = options["adapter"]
    # The base already embeds all 13 bands: the patch embedding stays the base's unless asked (a per-task
    # embedding under a merged backbone is what merging handles worst).
    knobs = {"method": method, "train_patch_embed": options["train_patch_embed"] not in ("0", "false", "no")}
    if method in TARGETED_METHODS:
        knobs.update(rank=int(options["rank"]), targets=[t for t in options["targets"].split(",") if t])
    head = linear_probe_head(dataset, options, base_file, out_dir / "lp") if protocol == "frozen-lp" else None
    return fit_adapter(dataset, backbone_params(options, base_file), AdapterParams(**knobs),
                       _train_params(options, "epochs", "learning_rate"), out_dir / "ft", frozen_head=head)


# --- scoring -------------------------------------------------------------------------------------------------


def test_macro_f1(model, dataset: Path, column: int | None = None) -> float:
    """Test macro-F1 of a task model; with ``column``, of output ``column`` of a multilabel model (logit > 0)."""
    from tasks.evaluation import score_classification
    from tasks.model_inputs import load_dataset_for
    from tasks.training import predict_logits

    data = load_dataset_for(dataset, model)  # in the model's input units
    test = data.splits["test"]
    logits = predict_logits(model, test.images)
    if column is None:
        predictions, labels, names = logits.argmax(1), np.asarray(test.labels[:]), data.info.class_names
    else:
        predictions = (logits[:, column] > 0).astype(np.int64)
        labels = np.asarray(test.labels[:])[:, column].astype(np.int64)
        names = (f"not-{data.info.class_names[column]}", data.info.class_names[column])
    return float(score_classification(labels, predictions, names).macro_f1)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- one method in a child process ---------------------------------------------------------------------------


def _load_constituent(record: dict):
    from tasks.merging.registry import ModelRef
    from tasks.merging.stage import Constituent
    from tasks.models import load_reference_files

    folder = Path(record["folder"])
    model = load_reference_files(folder / "model.safetensors", folder / "architecture.json")
    return Constituent(ref=ModelRef(label=record["task"], uri=record["task"]), model=model,
                       metadata=record["metadata"], dataset=record["dataset"])


# The scaling each batch method's merged task vector takes (OPCM scales itself; the soups and FW have none).
SCALED_BY = {"task-arithmetic": "scaling", "dare": "scaling", "ties": "ties_scaling"}


def select_scaling(constituents: list, params, grid: list[float]) -> tuple:
    """(params with the best scaling of ``grid``, the validation score of each): as in the papers, lambda is
    chosen on held-out validation data (minus the mean validation loss over the tasks, each task with its own
    head; the merge stage's score for greedy soup and Frank-Wolfe), never on the test split."""
    from tasks.merging.stage import merge_constituents, validation_score

    score = validation_score(constituents, shared_head=False)
    field = SCALED_BY[params.method]
    trials = {}
    for value in grid:
        outcome = merge_constituents(constituents, params.model_copy(update={field: value}), heads="per-task")
        trials[value] = round(score(outcome.result.state), 5)
    best = max(trials, key=lambda v: (trials[v], -v))
    return params.model_copy(update={field: best}), trials


def measure_method(spec_file: Path, method: str) -> dict:
    """Merge the fine-tunes listed in ``spec_file`` with ``method`` in this process; its row."""
    import gc

    import torch

    from tasks.merging import MergeParams
    from tasks.merging.stage import constituents_of, fold_arriving, merge_constituents, save_running_state
    from tasks.merging.task_vectors import state_bytes
    from tasks.reproducibility import pin_determinism

    spec = json.loads(spec_file.read_text())
    options = spec["options"]
    pin_determinism(int(options["seed"]), int(options["threads"]))
    params = MergeParams(method=method, scaling=float(options["scaling"]), ties_scaling=float(options["ties_scaling"]),
                         density=float(options["density"]), drop_rate=float(options["drop_rate"]),
                         opcm_alpha=float(options["opcm_alpha"]), fw_steps=int(options["fw_steps"]),
                         fw_vertex_scale=float(options["fw_vertex_scale"]), seed=int(options["seed"]))
    records = spec["constituents"]
    arrivals, selection = [], {}
    started = time.perf_counter()
    if method == "opcm":
        # The sequential path of the merge stage: the state on disk, one arriving model in memory at a time.
        state_dir = Path(spec["scratch"]) / "opcm-state"
        previous, outcome = None, None
        for i, record in enumerate(records):
            outcome = None  # the previous arrival's models go before the next one is read
            gc.collect()
            outcome = fold_arriving(previous, _load_constituent(record), params.opcm_alpha, heads="per-task")
            previous = save_running_state(outcome, constituents_of(outcome), state_dir / f"after-{i + 1}")
            arrivals.append({"arrived": i + 1, "task": record["task"], "rss_mb": round(_rss_mb("VmRSS"), 1),
                             "state_vector_bytes": state_bytes(outcome.opcm_state.vector),
                             "heads_file_bytes": (previous / "heads.safetensors").stat().st_size})
        seconds = time.perf_counter() - started
        coefficients = outcome.result.coefficients
    else:
        constituents = [_load_constituent(r) for r in records]
        grid = [float(v) for v in options.get("scaling_grid", "").split(",") if v.strip()]
        if grid and method in SCALED_BY:
            params, trials = select_scaling(constituents, params, grid)
            selection = {"scaling_chosen_on_val": getattr(params, SCALED_BY[method]),
                         "val_score_by_scaling": {str(k): v for k, v in trials.items()}}
        outcome = merge_constituents(constituents, params, heads="per-task")
        seconds = time.perf_counter() - started
        coefficients = outcome.result.coefficients
    peak = _rss_mb("VmHWM")
    scores = {}
    with torch.inference_mode():
        for task_model in outcome.task_models:
            constituent = task_model.constituents[0]
            scores[constituent.ref.label] = test_macro_f1(task_model.model, Path(constituent.dataset))
    row = {"method": method, "task_scores": scores, "peak_rss_mb": round(peak, 1), "seconds": round(seconds, 3),
           "coefficients": [round(float(c), 4) for c in coefficients]}
    if arrivals:
        row["memory_per_arrival"] = arrivals
    return {**row, **selection}


def _run_child(spec_file: Path, method: str) -> dict:
    code = ("import json, sys; from pathlib import Path; from tasks.benchmarks.merging import measure_method; "
            "print(json.dumps(measure_method(Path(sys.argv[1]), sys.argv[2])))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(spec_file), method], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=7200)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"method": method, "error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the benchmark -------------------------------------------------------------------------------------------


def _normalise(rows: list[dict], own: dict[str, float]) -> None:
    for row in rows:
        if "task_scores" in row:
            shares = [row["task_scores"][t] / own[t] for t in row["task_scores"] if own.get(t)]
            row["avg_normalised_score"] = round(float(np.mean(shares)), 4) if shares else None


def run_benchmark(workdir: Path, options: dict[str, str]) -> dict:
    """Write the task datasets, make the base, fine-tune every task, merge by every method; return the rows."""
    import copy

    import torch

    from tasks.benchmarks._process_metrics import load_average
    from tasks.merging import METHODS
    from tasks.merging.stage import rebuild_base
    from tasks.merging.task_vectors import task_part
    from tasks.models import reference_architecture, save_reference_model
    from tasks.reproducibility import cpu_model
    from tasks.request_errors import RequestError

    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise RequestError(f"bench merging: unknown option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    options = {**DEFAULTS, **options}
    names = [t.strip() for t in options["tasks"].split(",") if t.strip()]
    if len(names) < 2:
        raise RequestError("bench merging: give at least two tasks")
    methods = [m.strip() for m in options["methods"].split(",") if m.strip()] or list(METHODS)
    bench_dir = Path(workdir) / "bench"
    data_dir = bench_dir / f"merging-data-t{options['tile']}-b{options['block']}-s{options['seed']}"
    timings = {}
    started = time.perf_counter()
    paths = write_task_datasets(data_dir, names, int(options["tile"]), int(options["block"]), int(options["seed"]))
    timings["datasets"] = round(time.perf_counter() - started, 2)
    base_file, base = prepare_base(bench_dir, paths["multitask"], options)
    timings["base"] = base.get("seconds", 0.0)

    runs = bench_dir / "merging-runs"
    models_dir = runs / "models"
    records, own, rows, constituents = [], {}, [], []
    for name in names:
        started = time.perf_counter()
        outcome = fine_tune(paths[name], options, base_file, runs / "checkpoints" / name)
        timings[f"finetune:{name}"] = round(time.perf_counter() - started, 2)
        from domains import Channel

        channels = tuple(Channel(**c) for c in outcome.metadata["channels"])
        save_reference_model(outcome.model, reference_architecture(outcome.model, channels, "classification"),
                             models_dir / name)
        own[name] = test_macro_f1(outcome.model, paths[name])
        rows.append({"method": f"individual:{name}", "task_scores": {name: own[name]},
                     "seconds": timings[f"finetune:{name}"], "peak_rss_mb": None})
        records.append({"task": name, "folder": str(models_dir / name), "metadata": outcome.metadata,
                        "dataset": str(paths[name])})
        constituents.append((name, outcome))
    rows.insert(0, {"method": "individual", "task_scores": dict(own), "seconds": None, "peak_rss_mb": None})

    # The base with each task's head: what the tasks get with no fine-tuned backbone at all.
    from tasks.merging.registry import ModelRef
    from tasks.merging.stage import Constituent

    first = constituents[0][1]
    base_state = rebuild_base(Constituent(ModelRef(names[0], names[0]), first.model, first.metadata, str(paths[names[0]])))
    base_scores = {}
    for name, outcome in constituents:
        model = copy.deepcopy(outcome.model)
        model.load_state_dict({**base_state, **task_part(outcome.model.state_dict())})
        base_scores[name] = test_macro_f1(model, paths[name])
    rows.append({"method": "base+heads", "task_scores": base_scores, "seconds": None, "peak_rss_mb": None})

    if options["multitask"] not in ("0", "false", "no"):
        started = time.perf_counter()
        multi = fine_tune(paths["multitask"], options, base_file, runs / "checkpoints" / "multitask")
        timings["finetune:multitask"] = round(time.perf_counter() - started, 2)
        with torch.inference_mode():
            rows.append({"method": "multitask", "task_scores": {n: test_macro_f1(multi.model, paths["multitask"], i)
                                                                 for i, n in enumerate(names)},
                         "seconds": timings["finetune:multitask"], "peak_rss_mb": None})

    spec_file = runs / "spec.json"
    spec_file.write_text(json.dumps({"options": options, "constituents": records,
                                     "scratch": str(runs / "scratch")}, indent=2))
    for method in methods:
        rows.append(_run_child(spec_file, method))
    _normalise(rows, own)
    return {"cpu": cpu_model(), "threads": int(options["threads"]), "load_average": load_average(),
            "options": options, "base": base, "tasks": names, "metric": f"test {METRIC}", "timings_s": timings,
            "rows": rows,
            "notes": {"avg_normalised_score": "mean over tasks of score / the task's own fine-tune's score",
                      "peak_rss_mb": "VmHWM of the merge's own child process (interpreter and libraries included; "
                                     "batch methods hold all K models, OPCM one arriving model and its state)",
                      "seconds": "the merge itself (greedy soup and Frank-Wolfe: their validation scoring included); "
                                 "reference rows: training time",
                      "memory_per_arrival": "OPCM: resident memory and running-state bytes after each arrival "
                                            "(task vector constant; one small head file entry per task)"}}


def format_table(result: dict) -> str:
    """One line per row: scores per task, average normalised score, memory, time; then OPCM's memory trail."""
    names = result["tasks"]
    head = f"{'method':<22}" + "".join(f"{n[:10]:>11}" for n in names) + f"{'avg norm':>10}{'RSS MB':>9}{'seconds':>9}"
    o = result["options"]
    lines = [f"merging benchmark on {result['cpu']}, {result['threads']} threads: {len(names)} tasks of the satellite "
             f"demo ({o['tile']} px tiles), base {result['base']['kind']}, {o['backbone']} depth {o['depth']}, "
             f"{o['adapter']} fine-tunes ({o['epochs']} epochs); scores: {result['metric']}", head, "-" * len(head)]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"{row['method']:<22} failed: {row['error']}")
            continue
        cells = "".join(f"{row['task_scores'][n]:>11.3f}" if n in row["task_scores"] else f"{'':>11}" for n in names)
        norm = row.get("avg_normalised_score")
        rss, seconds = row.get("peak_rss_mb"), row.get("seconds")
        lines.append(f"{row['method']:<22}{cells}{norm if norm is None else format(norm, '.3f'):>10}"
                     f"{'' if rss is None else format(rss, '.0f'):>9}{'' if seconds is None else format(seconds, '.2f'):>9}")
    for row in result["rows"]:
        for arrival in row.get("memory_per_arrival", []):
            lines.append(f"opcm after arrival {arrival['arrived']} ({arrival['task']}): RSS {arrival['rss_mb']:.0f} MB, "
                         f"state vector {arrival['state_vector_bytes'] / 1e6:.2f} MB, heads file "
                         f"{arrival['heads_file_bytes'] / 1e3:.1f} kB")
    lines.append("")
    lines.extend(f"{key}: {text}" for key, text in result["notes"].items())
    return "\n".join(lines)
