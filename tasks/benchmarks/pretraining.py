"""Pretraining benchmark: does in-domain MAE pretraining buy accuracy when labels are scarce?

``vitrail bench pretraining --workdir DIR [--set KEY=VALUE ...]`` writes ``DIR/bench/pretraining.json``.

The task (one with headroom: per-channel statistics cannot solve it). Tiles are cut from the real H&E slide
the histopathology demo bundles (OpenSlide's CMU-1-Small-Region, CC0, 0.499 um/px) at four magnifications
(crops of 36, 50, 70 and 98 px brought to 32 px: 0.56, 0.78, 1.09 and 1.53 um/px), randomly rotated and
mirrored; the class is the magnification. Each tile's colour is standardised per channel to the slide's
mean and std (the way stain and scanner differences are removed), so brightness and colour say nothing:
what tells the classes apart is the size of nuclei, fibres and cells, i.e. tissue texture. Crops lie wholly
inside 192 px spatial blocks of the slide, which are the leakage groups of the train/val/test split; the
test blocks are never seen in pretraining (:func:`tasks.pretraining.pretraining_view` excludes them and
records their digest).

Per seed (the seed draws the labelled subset and the initialisations of heads, adapters and random weights):

- ``mae+lora``: a small ViT pretrained as a masked autoencoder (:class:`tasks.pretraining.MaskedAutoencoder`
  through :func:`tasks.training.fit`, on :func:`tasks.pretraining.pretraining_view`: every training-split tile,
  labels unused), then LoRA-fine-tuned on ``label_fraction`` of the training labels;
- ``random+lora``: the same ViT from random weights, same LoRA, same labels;
- ``random+full``: the same ViT from random weights, every weight trained, same labels;
- ``random-conv`` and ``channel-stats``: the probe baselines (:mod:`tasks.probing`) with a logistic
  regression on the same labels (C chosen on the validation split);
- ``mae-linear``: the MAE encoder's frozen features with the same logistic regression (for reading only).

All training goes through :func:`tasks.training.fit`; the best epoch is chosen on the validation split, and
every entry is scored once on the test split (accuracy, in points). Gains are paired: the same test tiles
and seed for both entries. ``gain_ci95_low_points`` is the lower end of the 95% interval of the mean gain
over ``random+lora``, the more cautious of two bootstraps: over test tiles (predictions of every seed
resampled together) and over seeds.

Options: samples (3600), tile (32), seeds (5), label_fraction (0.1), width (64), depth (6), heads (2), patch_size (4)
(the ViT), mae_epochs (24), mae_max_tiles (empty: all training tiles), finetune_epochs (15),
lora_rank (8), lr_lora (3e-3), lr_full (1e-3), lr_mae (1.5e-3), batch_size (64), threads (1: a 64-wide ViT gains
little from intra-op threads, and on a shared machine OpenMP's spinning threads cost ten times the CPU),
val_tiles (256: validation tiles that pick the fine-tunes' best epoch; the MAE's reconstruction is scored on all),
mae_per_seed (0: one MAE pretraining, with the first seed, shared by every seed, as papers pretrain once and
vary the downstream seeds; 1: pretrain again for each seed, which also puts pretraining's variance in the
interval over seeds).

The dataset is small (44 MB as float32) and read into memory once, so the measured time is the models'.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

DEFAULTS = {"samples": "3600", "tile": "32", "seeds": "5", "label_fraction": "0.1", "width": "64",
            "depth": "6", "heads": "2", "patch_size": "4", "mae_epochs": "24", "mae_max_tiles": "",
            "finetune_epochs": "15", "lora_rank": "8", "lr_lora": "3e-3", "lr_full": "1e-3", "lr_mae": "1.5e-3",
            "batch_size": "64", "threads": "1", "val_tiles": "256", "mae_per_seed": "0"}
CROP_SIDES = (36, 50, 70, 98)
BLOCK = 192
TASK = ("magnification of H&E tissue tiles from the real CMU-1-Small-Region slide (4 classes: 0.56, 0.78, "
        "1.09, 1.53 um/px), colour standardised per tile, 192 px spatial blocks as groups")
ENTRIES = ("mae+lora", "random+lora", "random+full", "random-conv", "channel-stats", "mae-linear")
REFERENCE = "random+lora"
HEADLINE_OTHERS = ("random+lora", "random+full", "random-conv", "channel-stats")


def write_magnification_dataset(out_dir: Path, samples: int, tile: int, seed: int = 0) -> Path:
    """Cut the magnification task from the bundled real slide and write it with the real dataset writer."""
    from PIL import Image

    from domains import Channel, SampleSet
    from domains.histopathology.demo import read_demo_tissue, tissue_indicator
    from tasks.dataset import SplitParams, write_dataset

    image, _ = read_demo_tissue()
    tissue = tissue_indicator(image)
    rng = np.random.default_rng(seed)
    rows, cols = image.shape[0] // BLOCK, image.shape[1] // BLOCK
    blocks = [(r, c) for r in range(rows) for c in range(cols)
              if tissue[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK].mean() >= 0.3]
    pixels = image.reshape(-1, 3)[tissue.reshape(-1)].astype(np.float32) / 255.0
    slide_mean, slide_std = pixels.mean(axis=0), pixels.std(axis=0)
    images = np.empty((samples, 3, tile, tile), dtype=np.float32)
    labels = np.arange(samples) % len(CROP_SIDES)
    groups, locations = [], []
    for i, label in enumerate(labels):
        side = CROP_SIDES[label]
        for attempt in range(100):
            r, c = blocks[int(rng.integers(len(blocks)))]
            y = r * BLOCK + int(rng.integers(0, BLOCK - side + 1))
            x = c * BLOCK + int(rng.integers(0, BLOCK - side + 1))
            if tissue[y:y + side, x:x + side].mean() >= 0.6:
                break
        crop = np.rot90(image[y:y + side, x:x + side], int(rng.integers(4)))
        crop = crop[:, ::-1] if rng.random() < 0.5 else crop
        small = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((tile, tile),
                                                                              Image.Resampling.BILINEAR))
        values = small.astype(np.float32).transpose(2, 0, 1) / 255.0
        centred = (values - values.mean(axis=(1, 2), keepdims=True)) / (values.std(axis=(1, 2), keepdims=True) + 1e-3)
        images[i] = centred * slide_std[:, None, None] + slide_mean[:, None, None]
        groups.append(f"blk-{r:02d}-{c:02d}")
        locations.append((y, x))
    images += rng.normal(0.0, 0.01, images.shape).astype(np.float32)  # sensor noise, the same for every class
    sample_set = SampleSet(images=images, labels=labels.astype(np.int64), groups=np.array(groups),
                           locations=np.array(locations, dtype=np.int64), source="CMU-1-Small-Region.svs",
                           channels=(Channel("R"), Channel("G"), Channel("B")),
                           class_names=tuple(f"{0.499 * s / tile:.2f}um" for s in CROP_SIDES))
    write_dataset(sample_set, "histopathology", "classification", out_dir,
                  SplitParams(val_fraction=0.15, test_fraction=0.2, seed=seed))
    return out_dir


def _build_encoder(options: dict[str, str], channels, tile: int, num_classes: int, encoder_state: dict | None = None):
    """The benchmark's small ViT: timm's ViT at ``width`` x ``depth`` with small patches, MAE weights when given.

    Every entry reads the mean patch token (``global_pool='avg'``): MAE trains no class token (He et al. 2022
    probe the average too), and random-init entries get the same head so only the weights differ.
    """
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=tile,
                              patch_size=int(options["patch_size"]), in_chans=len(channels), num_classes=num_classes,
                              embed_dim=int(options["width"]), depth=int(options["depth"]),
                              num_heads=int(options["heads"]), global_pool="avg")
    if encoder_state is not None:
        missing, unexpected = model.load_state_dict(encoder_state, strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise RuntimeError(f"MAE encoder does not fit the classifier: missing {missing}, unexpected {unexpected}")
    return model


def labelled_view(dataset, fraction: float, seed: int):
    """The dataset with a stratified ``fraction`` of its training labels (the rest left out), val and test whole."""
    import dataclasses

    from tasks.dataset import Split
    from tasks.probing.protocols import stratified_subset

    train = dataset.splits["train"]
    keep = stratified_subset(np.asarray(train.labels), fraction, seed)
    subset = Split(images=np.asarray(train.images[keep], dtype=np.float32), labels=np.asarray(train.labels)[keep],
                   groups=train.groups[keep])
    return dataclasses.replace(dataset, splits={**dataset.splits, "train": subset}), keep


def _finetune(model, view, options, lr: float, seed: int, out_dir: Path, key: str):
    from tasks.models import NormalizedClassifier
    from tasks.training import TrainParams, fit, predict_logits

    info = view.info
    net = NormalizedClassifier(model, info.channel_mean, info.channel_std)
    params = TrainParams(epochs=int(options["finetune_epochs"]), batch_size=32, learning_rate=lr,
                         warmup_epochs=1.0, weight_decay=0.05, seed=seed, threads=int(options["threads"]),
                         resume=False)
    result = fit(net, view, params, out_dir / key, f"bench-pretraining|{key}|{seed}")
    return predict_logits(result.model, view.splits["test"].images).argmax(axis=1), result.best_epoch


def in_memory(dataset):
    """The dataset with every split read into arrays (the benchmark's data is small; training reads it many times)."""
    import dataclasses

    from tasks.dataset import Split

    def read(split):
        return Split(images=np.asarray(split.images[np.arange(len(split))], dtype=np.float32),
                     labels=np.asarray(split.labels), groups=np.asarray(split.groups))

    return dataclasses.replace(dataset, splits={name: read(split) for name, split in dataset.splits.items()})


def pretrain_mae(dataset, options: dict[str, str], seed: int, out_dir: Path) -> dict:
    """MAE on every training-split tile (labels unused; val scores the reconstruction, test never seen)."""
    from tasks.pretraining import MaskedAutoencoder, pretraining_view
    from tasks.reproducibility import pin_determinism
    from tasks.training import TrainParams, fit

    started = time.perf_counter()
    info = dataset.info
    pin_determinism(seed, int(options["threads"]))
    encoder = _build_encoder(options, info.channels, info.tile_size, 0)
    mae = MaskedAutoencoder(encoder, info.channel_mean, info.channel_std, 0.75, decoder_dim=64, decoder_depth=2,
                            decoder_heads=2)
    max_tiles = int(options["mae_max_tiles"]) if options["mae_max_tiles"] else None
    unlabelled, excluded = pretraining_view(dataset, max_tiles, seed)
    params = TrainParams(epochs=int(options["mae_epochs"]), batch_size=int(options["batch_size"]),
                         learning_rate=float(options["lr_mae"]), weight_decay=0.05, warmup_epochs=1.0,
                         objective="model-loss", seed=seed, threads=int(options["threads"]), resume=False)
    result = fit(mae, unlabelled, params, out_dir / "mae", f"bench-pretraining|mae|{seed}")
    return {"weights": {k: v.detach().clone() for k, v in result.model.encoder.state_dict().items()},
            "seed": seed, "seconds": time.perf_counter() - started, "best_epoch": result.best_epoch,
            "val_reconstruction_loss": float(result.best_metrics["val_loss"]),
            "pretraining_tiles": int(len(unlabelled.splits["train"])), "excluded_from_pretraining": excluded}


def measure_seed(dataset, options: dict[str, str], seed: int, out_dir: Path, mae: dict) -> dict:
    """Every entry for one seed on the in-memory dataset, given the MAE encoder: test predictions and timings."""
    import dataclasses

    from tasks.adapters import AdapterParams, attach_adapter
    from tasks.dataset import Split
    from tasks.probing.embeddings import (channel_stats_featurizer, embed_dataset, encoder_featurizer,
                                          random_conv_featurizer)
    from tasks.probing.protocols import linear_probe, stratified_subset
    from tasks.reproducibility import pin_determinism

    threads = int(options["threads"])
    info = dataset.info
    view, keep = labelled_view(dataset, float(options["label_fraction"]), seed)
    val = dataset.splits["val"]
    pick = stratified_subset(val.labels, min(1.0, int(options["val_tiles"]) / len(val)), 0)
    view = dataclasses.replace(view, splits={**view.splits, "val": Split(images=val.images[pick],
                                                                        labels=val.labels[pick],
                                                                        groups=val.groups[pick])})
    predictions, seconds, best_epochs = {}, {}, {}
    lora = AdapterParams(method="lora", rank=int(options["lora_rank"]), alpha=2.0 * int(options["lora_rank"]),
                         targets=["qkv"])
    for entry, start, adapter, lr in (("mae+lora", mae["weights"], lora, float(options["lr_lora"])),
                                      ("random+lora", None, lora, float(options["lr_lora"])),
                                      ("random+full", None, AdapterParams(method="full"), float(options["lr_full"]))):
        started = time.perf_counter()
        pin_determinism(seed, threads)
        model = attach_adapter(_build_encoder(options, info.channels, info.tile_size, info.num_classes, start),
                               adapter)
        predictions[entry], best_epochs[entry] = _finetune(model, view, options, lr, seed, out_dir, entry)
        seconds[entry] = time.perf_counter() - started

    # Frozen features with a logistic regression on the same labels (C chosen on the whole validation split).
    pin_determinism(seed, threads)
    frozen = _build_encoder(options, info.channels, info.tile_size, 0, mae["weights"])
    labels = {s: np.asarray(dataset.splits[s].labels) for s in ("train", "val")}
    for featurizer in (random_conv_featurizer(dataset, seed), channel_stats_featurizer(),
                       encoder_featurizer("mae-linear", frozen, info.channel_mean, info.channel_std, "mean")):
        started = time.perf_counter()
        emb, _ = embed_dataset(featurizer, dataset, None)
        probe = linear_probe(emb["train"][keep], labels["train"][keep], emb["val"], labels["val"], emb["test"],
                             seed=seed, select_by="accuracy")
        predictions[featurizer.label] = probe.predictions
        seconds[featurizer.label] = time.perf_counter() - started

    test_labels = np.asarray(dataset.splits["test"].labels)
    accuracy = {k: float(np.mean(v == test_labels)) for k, v in predictions.items()}
    return {"seed": seed, "labelled_train_tiles": int(len(keep)), "mae_seed": mae["seed"],
            "pretraining_tiles": mae["pretraining_tiles"],
            "excluded_from_pretraining": mae["excluded_from_pretraining"],
            "mae_val_reconstruction_loss": mae["val_reconstruction_loss"], "accuracy": accuracy,
            "best_epoch": {**best_epochs, "mae_pretraining": mae["best_epoch"]},
            "seconds": {**seconds, "mae_pretraining": mae["seconds"]},
            "predictions": {k: v.astype(int).tolist() for k, v in predictions.items()}}


def summarise(rows: list[dict], test_labels: np.ndarray) -> dict:
    """Gains in points with paired intervals: over test tiles (all seeds resampled together) and over seeds."""
    from tasks.probing.protocols import accuracy, mean_interval, paired_difference

    stacked = {entry: np.array([row["predictions"][entry] for row in rows]) for entry in ENTRIES}
    gains = {}
    for other in [e for e in ENTRIES if e != "mae+lora"]:
        point, low, high = paired_difference(test_labels, stacked["mae+lora"], stacked[other], accuracy, 2000, 0)
        per_seed = [row["accuracy"]["mae+lora"] - row["accuracy"][other] for row in rows]
        seed_low, seed_high = mean_interval(per_seed, 2000, 0) if len(per_seed) > 1 else (point, point)
        gains[other] = {"mean_points": 100 * point, "ci95_tiles_points": [100 * low, 100 * high],
                        "ci95_seeds_points": [100 * seed_low, 100 * seed_high],
                        "ci95_low_points": 100 * min(low, seed_low), "per_seed_points": [100 * g for g in per_seed]}
    mean_accuracy = {e: float(np.mean([row["accuracy"][e] for row in rows])) for e in ENTRIES}
    return {"gains": gains, "mean_accuracy_points": {e: 100 * v for e, v in mean_accuracy.items()}}


def run_benchmark(workdir: Path, options: dict[str, str]) -> dict:
    """Write (or reuse) the task's dataset, run every seed, return the payload with the headline numbers."""
    from tasks.dataset import load_dataset
    from tasks.reproducibility import cpu_model
    from tasks.request_errors import RequestError

    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise RequestError(f"bench pretraining: unknown option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    options = {**DEFAULTS, **options}
    bench_dir = Path(workdir) / "bench"
    data_dir = bench_dir / f"pretraining-data-n{options['samples']}-t{options['tile']}"
    if not (data_dir / "dataset.json").exists():
        write_magnification_dataset(data_dir, int(options["samples"]), int(options["tile"]))
    started = time.perf_counter()
    dataset = in_memory(load_dataset(data_dir))
    runs = bench_dir / "pretraining-runs"
    rows, mae = [], None
    for seed in range(int(options["seeds"])):
        if mae is None or options["mae_per_seed"] in ("1", "true", "yes"):
            mae = pretrain_mae(dataset, options, seed, runs / f"seed-{seed}")
        rows.append(measure_seed(dataset, options, seed, runs / f"seed-{seed}", mae))
    test_labels = np.asarray(dataset.splits["test"].labels)
    summary = summarise(rows, test_labels)
    gains = summary["gains"]
    headline = gains[REFERENCE]
    return {
        "task": TASK,
        "seeds": int(options["seeds"]),
        "label_fraction": float(options["label_fraction"]),
        "gain_vs_random_lora_points": headline["mean_points"],
        "gain_ci95_low_points": headline["ci95_low_points"],
        "min_gain_vs_others_points": min(gains[e]["mean_points"] for e in HEADLINE_OTHERS),
        "goal": {"gain_vs_random_lora_points": 5.0, "min_gain_vs_others_points": 2.0, "gain_ci95_low_points": 0.0},
        "goal_met": bool(headline["mean_points"] >= 5.0 and headline["ci95_low_points"] > 0
                         and min(gains[e]["mean_points"] for e in HEADLINE_OTHERS) >= 2.0),
        "mean_accuracy_points": summary["mean_accuracy_points"],
        "gains_points": gains,
        "chance_points": 100.0 / len(CROP_SIDES),
        "dataset": {"path": str(data_dir), "digest": dataset.info.digest, "splits": dict(dataset.info.split_counts),
                    "classes": list(dataset.info.class_names)},
        "cpu": cpu_model(), "threads": int(options["threads"]), "options": options,
        "seconds_total": time.perf_counter() - started,
        "rows": [{k: v for k, v in row.items() if k != "predictions"} for row in rows],
        "test_predictions": {str(row["seed"]): row["predictions"] for row in rows},
    }


def format_table(result: dict) -> str:
    """Mean test accuracy per entry, gains over the others, and the headline numbers against the goal."""
    lines = [f"pretraining benchmark on {result['cpu']}, {result['threads']} threads; {result['seeds']} seeds, "
             f"{result['label_fraction']:.0%} of training labels ({result['rows'][0]['labelled_train_tiles']} tiles); "
             f"task: {result['task']}; chance {result['chance_points']:.1f}",
             f"{'entry':<14} {'test acc':>8} {'mae+lora gain':>14} {'95% CI (tiles)':>17} {'95% CI (seeds)':>17}",
             "-" * 74]
    for entry in ENTRIES:
        acc = result["mean_accuracy_points"][entry]
        gain = result["gains_points"].get(entry)
        if gain is None:
            lines.append(f"{entry:<14} {acc:>8.1f}")
            continue
        t, s = gain["ci95_tiles_points"], gain["ci95_seeds_points"]
        lines.append(f"{entry:<14} {acc:>8.1f} {gain['mean_points']:>+14.1f} {t[0]:>+8.1f}..{t[1]:<+7.1f} "
                     f"{s[0]:>+8.1f}..{s[1]:<+7.1f}")
    lines += ["", f"gain_vs_random_lora_points {result['gain_vs_random_lora_points']:+.2f} (goal >= +5), "
                  f"gain_ci95_low_points {result['gain_ci95_low_points']:+.2f} (goal > 0), "
                  f"min_gain_vs_others_points {result['min_gain_vs_others_points']:+.2f} (goal >= +2): "
                  f"{'goal met' if result['goal_met'] else 'goal NOT met'}",
              f"total {result['seconds_total'] / 60:.1f} min"]
    return "\n".join(lines)


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2)
