"""Score backbones and baselines on one dataset with every protocol: the long-format table and the gate.

:func:`probe_backbones` embeds each split once per featurizer (cached by digest), runs kNN, the linear
probe, few-shot draws and the label-fraction curve on the embeddings, optionally fine-tunes each subject
and the random-init baseline with an adapter through :func:`tasks.finetune.fit_adapter`, and compares every
subject with the random-init baseline by a paired bootstrap on the test split (:func:`decide_probe_gate`).

Probes score tile classes. Datasets of other tasks are probed on a tile-level target derived from their
labels, named in the table: segmentation, the most frequent foreground class of the tile (background when
none); multilabel, whether the sample has any positive finding.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from tasks.adapters import AdapterParams
from tasks.dataset import Dataset, load_dataset
from tasks.probing import protocols
from tasks.probing.embeddings import (RANDOM_INIT, Featurizer, ProbeSubject, channel_stats_featurizer, embed_dataset,
                                      load_subject, random_conv_featurizer, random_init_featurizer)
from tasks.request_errors import RequestError
from tasks.training import TrainParams

log = logging.getLogger(__name__)

LINEAR, KNN, FEW_SHOT, LABEL_FRACTION = "linear", "knn", "few-shot", "label-fraction"
GATE_PROTOCOL = "gate-vs-random-init"
TABLE_COLUMNS = ("backbone", "kind", "protocol", "setting", "metric", "value", "ci95_low", "ci95_high", "n_train",
                 "n_test", "target", "adapted", "model_digest", "dataset_digest", "preprocessing_digest", "seed")


def _finetune_train() -> TrainParams:
    return TrainParams(epochs=8, batch_size=32, learning_rate=2e-3, warmup_epochs=0.5)


class ProbeFinetuneParams(BaseModel):
    """Fine-tune each backbone (and the random-init baseline) with an adapter, beside the frozen probes."""

    enabled: bool = Field(False, description="Also fine-tune every backbone and the random-init baseline with the "
                                             "adapter below on the training split (slower: a training run each)")
    adapter: AdapterParams = Field(default_factory=AdapterParams, description="Adapter method and its settings")
    train: TrainParams = Field(default_factory=_finetune_train, description="Training settings of the fine-tunes")


Count = Annotated[int, Field(ge=1, le=1000)]
Strength = Annotated[float, Field(gt=0, le=1e6)]
Share = Annotated[float, Field(gt=0, le=1)]


class ProbeSettings(BaseModel):
    """Which protocols run and how (defaults: the field's usual ones)."""

    knn_k: list[Count] = Field(default_factory=lambda: [5, 20], min_length=1, max_length=6,
                               description="Neighbour counts of the cosine kNN vote")
    c_grid: list[Strength] = Field(default_factory=lambda: list(protocols.DEFAULT_C_GRID), min_length=1,
                                   max_length=12, description="Inverse L2 strengths of the logistic regression, "
                                                              "chosen on validation")
    shots: list[Count] = Field(default_factory=lambda: [1, 5, 10], max_length=6,
                               description="Labelled samples per class of the few-shot probes (empty: none)")
    few_shot_draws: int = Field(5, ge=1, le=100, description="Random draws of each few-shot setting (averaged)")
    label_fractions: list[Share] = Field(default_factory=lambda: [0.01, 0.05, 0.1, 0.2, 0.5, 1.0], max_length=12,
                                         description="Shares of the training labels of the label-fraction curve")
    gate_metric: Literal["macro_f1", "accuracy"] = Field(
        "macro_f1", description="Score the gate compares (macro_f1 or accuracy) on the linear probe")
    bootstrap: int = Field(1000, ge=100, le=20000, description="Bootstrap resamples of every 95% interval")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the baselines' weights, draws and resamples")
    threads: int = Field(2, ge=1, le=256, description="CPU threads for embedding and fine-tuning")
    include_baselines: bool = Field(True, description="Score random init, random convolutions and channel "
                                                      "statistics beside the backbones (the gate needs random init)")
    finetune: ProbeFinetuneParams = Field(default_factory=ProbeFinetuneParams,
                                          description="Optional adapter fine-tuning of every backbone")


@dataclass
class ProbeOutcome:
    """The long-format table, the test predictions behind it and the gate's comparisons."""

    rows: list[dict]
    gate: dict[str, dict]
    target: str
    class_names: tuple[str, ...]
    dataset_digest: str
    cached: dict[str, bool] = field(default_factory=dict)
    predictions: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict, repr=False)

    def value(self, backbone: str, protocol: str, setting: str, metric: str) -> float:
        for row in self.rows:
            if (row["backbone"], row["protocol"], row["setting"], row["metric"]) == \
                    (backbone, protocol, setting, metric):
                return row["value"]
        raise KeyError((backbone, protocol, setting, metric))


# --- targets -------------------------------------------------------------------------------------------------


def tile_targets(dataset: Dataset, split: str) -> tuple[np.ndarray, str]:
    """Integer tile classes of a split and how they were derived from the task's labels."""
    info = dataset.info
    labels = dataset.splits[split].labels
    if info.task == "classification":
        return np.asarray(labels, dtype=np.int64), "class"
    if info.task == "multilabel":
        return (np.asarray(labels) == 1).any(axis=1).astype(np.int64), "any finding"
    if info.task == "segmentation":
        out = np.zeros(len(labels), dtype=np.int64)
        for start in range(0, len(labels), 256):
            block = np.asarray(labels[start:start + 256]).reshape(min(256, len(labels) - start), -1)
            counts = np.stack([(block == k).sum(axis=1) for k in range(info.num_classes)], axis=1)
            counts[:, 0] = 0
            out[start:start + len(block)] = np.where(counts.max(axis=1) > 0, counts.argmax(axis=1), 0)
        return out, "most frequent foreground class of the tile"
    raise RequestError(f"{dataset.path}: probing does not know task {info.task!r}")


def target_class_names(dataset: Dataset) -> tuple[str, ...]:
    info = dataset.info
    return ("no finding", "any finding") if info.task == "multilabel" else tuple(info.class_names)


# --- rows ------------------------------------------------------------------------------------------------------


def _rows(featurizer: Featurizer, protocol: str, setting: str, labels: np.ndarray, predictions: np.ndarray,
          n_train: int, target: str, dataset_digest: str, settings: ProbeSettings) -> list[dict]:
    rows = []
    for metric in protocols.METRICS:
        function = protocols.METRIC_FUNCTIONS[metric]
        draws = np.atleast_2d(predictions)
        value = float(np.mean([function(labels, d) for d in draws]))
        low, high = protocols.bootstrap_interval(labels, predictions, function, settings.bootstrap, settings.seed)
        rows.append({"backbone": featurizer.label, "kind": featurizer.kind, "protocol": protocol, "setting": setting,
                     "metric": metric, "value": value, "ci95_low": low, "ci95_high": high, "n_train": int(n_train),
                     "n_test": int(len(labels)), "target": target, "adapted": featurizer.adapted,
                     "model_digest": featurizer.model_digest, "dataset_digest": dataset_digest,
                     "preprocessing_digest": featurizer.preprocessing_digest, "seed": settings.seed})
    return rows


def fraction_setting(fraction: float) -> str:
    return f"labels={fraction * 100:g}%"


def score_featurizer(featurizer: Featurizer, embeddings: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                     num_classes: int, settings: ProbeSettings, target: str,
                     dataset_digest: str) -> tuple[list[dict], dict[tuple[str, str], np.ndarray]]:
    """Every frozen-embedding protocol for one featurizer: its rows and test predictions by (protocol, setting)."""
    train_x, train_y = embeddings["train"], labels["train"]
    val_x, val_y = embeddings.get("val", np.zeros((0, train_x.shape[1]))), labels.get("val", np.zeros(0, np.int64))
    test_x, test_y = embeddings["test"], labels["test"]
    rows, predictions = [], {}

    def add(protocol: str, setting: str, predicted: np.ndarray, n_train: int) -> None:
        predictions[(protocol, setting)] = predicted
        rows.extend(_rows(featurizer, protocol, setting, test_y, predicted, n_train, target, dataset_digest, settings))

    scaled_train, scaled_test = protocols.standardise(train_x, test_x)
    for k in settings.knn_k:
        add(KNN, f"k={k}", protocols.knn_predict(scaled_train, train_y, scaled_test, k, num_classes), len(train_y))
    probe = protocols.linear_probe(train_x, train_y, val_x, val_y, test_x, settings.c_grid, settings.seed,
                                   settings.gate_metric)
    add(LINEAR, "full", probe.predictions, len(train_y))
    for shots in settings.shots:
        add(FEW_SHOT, f"shots={shots}", protocols.few_shot(train_x, train_y, test_x, shots, settings.few_shot_draws,
                                                           probe.c, settings.seed), shots * len(np.unique(train_y)))
    for fraction in settings.label_fractions:
        index = protocols.stratified_subset(train_y, fraction, settings.seed)
        # Every label (fraction 1): the same fit as the full probe's, not repeated.
        part = probe if np.array_equal(index, np.arange(len(train_y))) else protocols.linear_probe(
            train_x[index], train_y[index], val_x, val_y, test_x, settings.c_grid, settings.seed,
            settings.gate_metric)
        add(LABEL_FRACTION, fraction_setting(fraction), part.predictions, len(index))
    for row in rows:
        if row["protocol"] == LINEAR:
            row["setting"] = f"C={probe.c:g}"
    predictions[(LINEAR, "gate")] = probe.predictions
    return rows, predictions


# --- the gate --------------------------------------------------------------------------------------------------


def decide_probe_gate(labels: np.ndarray, subject: np.ndarray, random_init: np.ndarray, metric: str,
                      resamples: int = protocols.BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Does the subject's linear probe beat random init's? Passed only when the paired 95% interval of the
    difference lies above zero (a higher point score inside the noise is not enough)."""
    difference, low, high = protocols.paired_difference(labels, subject, random_init,
                                                        protocols.METRIC_FUNCTIONS[metric], resamples, seed)
    passed = low > 0
    reason = (f"linear-probe {metric} {difference:+.3f} over random init (95% CI {low:+.3f} to {high:+.3f})"
              + ("" if passed else ": the interval reaches zero or below"))
    return {"metric": metric, "difference": difference, "ci95_low": low, "ci95_high": high, "passed": passed,
            "reason": reason}


# --- fine-tuning -----------------------------------------------------------------------------------------------


def _finetune_rows(featurizer: Featurizer, backbone, dataset_path: Path | str, dataset: Dataset,
                   settings: ProbeSettings, checkpoint_dir: Path, target: str) -> tuple[list[dict], np.ndarray]:
    from tasks.finetune import fit_adapter
    from tasks.model_inputs import load_dataset_for
    from tasks.training import predict_logits

    params = settings.finetune
    train = params.train.model_copy(update={"seed": settings.seed, "threads": settings.threads})
    outcome = fit_adapter(dataset_path, backbone, params.adapter, train, checkpoint_dir / featurizer.label)
    test = load_dataset_for(dataset_path, outcome.model).splits["test"]  # the fine-tune takes raw (stored) units
    predicted = predict_logits(outcome.model, test.images).argmax(axis=1).astype(np.int64)
    labels = np.asarray(test.labels, dtype=np.int64)
    return _rows(featurizer, f"finetune-{params.adapter.method}", "labels=100%", labels, predicted,
                 len(dataset.splits["train"]), target, dataset.info.digest, settings), predicted


# --- everything --------------------------------------------------------------------------------------------------


def probe_backbones(dataset_path: Path | str, subjects: list[ProbeSubject], settings: ProbeSettings,
                    cache_dir: Path | None, checkpoint_dir: Path | None = None) -> ProbeOutcome:
    """Score every subject and the baselines on the dataset; rows in long format plus the gate per subject.

    Raises:
        RequestError: no subject, duplicate labels, a dataset without train and test labels, or a subject
            whose bands or registry entry do not fit the dataset.
    """
    from tasks.reproducibility import pin_determinism

    if not subjects and not settings.include_baselines:
        raise RequestError("probe: nothing to score (no backbone and baselines turned off)")
    labels_seen = [s.label for s in subjects]
    reserved = {RANDOM_INIT, "random-conv", "channel-stats"} & set(labels_seen)
    if len(set(labels_seen)) != len(labels_seen) or reserved:
        raise RequestError(f"probe: backbone labels must be unique and not a baseline's name ({sorted(reserved)} "
                           f"taken); got {labels_seen}")
    pin_determinism(settings.seed, settings.threads)
    dataset = load_dataset(dataset_path)
    info = dataset.info
    for split in ("train", "test"):
        if split not in dataset.splits or len(dataset.splits[split]) == 0:
            raise RequestError(f"{dataset_path}: probing needs labelled train and test splits; {split} is empty")
    labels, target = {}, "class"
    for split in ("train", "val", "test"):
        if split in dataset.splits:
            labels[split], target = tile_targets(dataset, split)
    # Unlabelled training tiles (pretraining's extra data) are left out of the probes; the test split must be labelled.
    keep = {split: np.flatnonzero(values >= 0) for split, values in labels.items()}
    labels = {split: values[keep[split]] for split, values in labels.items()}
    if len(labels["train"]) == 0 or len(labels["test"]) != len(dataset.splits["test"]):
        raise RequestError(f"{dataset_path}: probing needs labelled train tiles and a fully labelled test split")
    class_names = target_class_names(dataset)

    # Registered encoders are downloaded into the cache (a fine-tune may read them), else into a scratch folder.
    with tempfile.TemporaryDirectory(prefix="vitrail-probe-") as scratch:
        downloads = Path(cache_dir) / "encoders" if cache_dir is not None else Path(scratch)
        rows, gate, cached, predictions = _score_all(dataset, dataset_path, subjects, settings, labels, keep, target,
                                                     class_names, downloads, cache_dir, checkpoint_dir)
    return ProbeOutcome(rows=rows, gate=gate, target=target, class_names=class_names, dataset_digest=info.digest,
                        cached=cached, predictions=predictions)


def _score_all(dataset: Dataset, dataset_path: Path | str, subjects: list[ProbeSubject], settings: ProbeSettings,
               labels: dict[str, np.ndarray], keep: dict[str, np.ndarray], target: str, class_names: tuple[str, ...],
               downloads: Path, cache_dir: Path | None, checkpoint_dir: Path | None):
    """Embed and score every subject and baseline; ``(rows, gate, cached, predictions)``."""
    info = dataset.info
    featurizers: list[tuple[Featurizer, object]] = []
    random_backbone = None
    for subject in subjects:
        featurizer, backbone = load_subject(subject, dataset, downloads)
        featurizers.append((featurizer, backbone))
        random_backbone = random_backbone or backbone
    if settings.include_baselines:
        from tasks.models import BackboneParams

        base = random_backbone or BackboneParams(name="vit_tiny_patch16_224", patch_size=4)
        random_init = (random_init_featurizer(base, dataset, featurizers[0][0], settings.seed) if featurizers
                       else _random_init_alone(base, dataset, settings.seed))
        featurizers += [(random_init, base.model_copy(update={"weights": "none", "weights_file": None})),
                        (random_conv_featurizer(dataset, settings.seed), None), (channel_stats_featurizer(), None)]

    rows, predictions, cached = [], {}, {}
    for featurizer, backbone in featurizers:
        embeddings, cached[featurizer.label] = embed_dataset(featurizer, dataset, cache_dir)
        embeddings = {split: values[keep[split]] for split, values in embeddings.items() if split in keep}
        got, predicted = score_featurizer(featurizer, embeddings, labels, len(class_names), settings, target,
                                          info.digest)
        rows += got
        predictions.update({(featurizer.label, *key): value for key, value in predicted.items()})
        # Fine-tuning applies to the subjects and to random init (its reference); not to the other baselines.
        if settings.finetune.enabled and backbone is not None:
            if info.task != "classification":
                log.info("probe: fine-tuning rows need a classification dataset (this one is %s); skipped", info.task)
            else:
                got, predicted = _finetune_rows(featurizer, backbone, dataset_path, dataset, settings,
                                                Path(checkpoint_dir or cache_dir or ".") / "probe-finetune", target)
                rows += got
                predictions[(featurizer.label, "finetune", "labels=100%")] = predicted

    gate = {}
    if settings.include_baselines:
        for featurizer, _ in featurizers:
            if featurizer.kind != "subject":
                continue
            gate[featurizer.label] = decide_probe_gate(labels["test"], predictions[(featurizer.label, LINEAR, "gate")],
                                                       predictions[(RANDOM_INIT, LINEAR, "gate")],
                                                       settings.gate_metric, settings.bootstrap, settings.seed)
            record = gate[featurizer.label]
            rows.append({**{c: "" for c in TABLE_COLUMNS}, "backbone": featurizer.label, "kind": "subject",
                         "protocol": GATE_PROTOCOL, "setting": "linear", "metric": settings.gate_metric,
                         "value": record["difference"], "ci95_low": record["ci95_low"],
                         "ci95_high": record["ci95_high"], "n_train": len(labels["train"]),
                         "n_test": len(labels["test"]), "target": target, "adapted": featurizer.adapted,
                         "model_digest": featurizer.model_digest, "dataset_digest": info.digest,
                         "preprocessing_digest": featurizer.preprocessing_digest, "seed": settings.seed})
    return rows, gate, cached, predictions


def _random_init_alone(backbone, dataset: Dataset, seed: int) -> Featurizer:
    """The random-init baseline when no subject is given: the default ViT with the dataset's statistics."""
    import torch

    from tasks.models import build_backbone
    from tasks.probing.embeddings import encoder_featurizer

    info = dataset.info
    torch.manual_seed(seed)
    encoder = build_backbone(backbone, info.channels, 0, info.tile_size)
    return encoder_featurizer(RANDOM_INIT, encoder, info.channel_mean, info.channel_std, "mean", kind="baseline")


probe_backbones_task = task(probe_backbones, name="probe-backbones", cache_policy=NONE)
