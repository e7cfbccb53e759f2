"""Evaluation protocols on frozen embeddings: kNN, linear probe, few-shot and label-fraction curves, with CIs.

Pure functions of arrays (features and integer labels); nothing here knows about models or MLflow. The
protocols follow the self-supervised literature's conventions:

- kNN: cosine similarity, the k nearest training embeddings vote with weight exp(similarity / 0.07) (the
  weighted vote of Wu et al. 2018 and DINO, Caron et al. 2021).
- Linear probe: multinomial logistic regression on standardised features; the inverse regularisation C is
  swept on the validation split and the chosen model is scored once on the test split.
- Few-shot: n labelled samples per class drawn several times; each draw fits a logistic regression with the
  C the full linear probe chose (a 1-shot draw has no validation of its own).
- Label fraction: a stratified share of the training labels (at least one per class), probed as above.

Every score carries a 95% percentile-bootstrap interval over the test samples; scores averaged over
draws resample the same test indices for every draw, so the interval is of the averaged score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

KNN_TEMPERATURE = 0.07
DEFAULT_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
BOOTSTRAP_RESAMPLES = 1000
METRICS = ("accuracy", "macro_f1")

Metric = Callable[[np.ndarray, np.ndarray], float]


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    return float(np.mean(labels == predictions)) if len(labels) else float("nan")


def macro_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean F1 over the classes present in the labels or the predictions."""
    classes = np.union1d(labels, predictions)
    scores = []
    for k in classes:
        tp = np.sum((labels == k) & (predictions == k))
        denom = np.sum(labels == k) + np.sum(predictions == k)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


METRIC_FUNCTIONS: dict[str, Metric] = {"accuracy": accuracy, "macro_f1": macro_f1}


def _score_draws(metric: Metric, labels: np.ndarray, draws: np.ndarray, index: np.ndarray | None = None) -> float:
    """Mean over draws (D, N) of the metric on the samples ``index`` (all when None)."""
    if index is None:
        return float(np.mean([metric(labels, d) for d in draws]))
    return float(np.mean([metric(labels[index], d[index]) for d in draws]))


def bootstrap_interval(labels: np.ndarray, predictions: np.ndarray, metric: Metric,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``metric`` over test samples; ``predictions`` (N,) or (draws, N)."""
    draws = np.atleast_2d(predictions)
    rng = np.random.default_rng(seed)
    n = len(labels)
    values = [_score_draws(metric, labels, draws, rng.integers(0, n, n)) for _ in range(resamples)]
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def paired_difference(labels: np.ndarray, better: np.ndarray, worse: np.ndarray, metric: Metric,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """``metric(better) - metric(worse)`` on the same test samples, with its paired 95% bootstrap interval.

    Both prediction sets are resampled with the same indices, so what the two share (hard and easy samples)
    cancels: the interval is of the difference, far narrower than two separate intervals would suggest.
    """
    a, b = np.atleast_2d(better), np.atleast_2d(worse)
    rng = np.random.default_rng(seed)
    n = len(labels)
    point = _score_draws(metric, labels, a) - _score_draws(metric, labels, b)
    values = []
    for _ in range(resamples):
        index = rng.integers(0, n, n)
        values.append(_score_draws(metric, labels, a, index) - _score_draws(metric, labels, b, index))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(point), float(low), float(high)


def mean_interval(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the mean of a few values (e.g. per-seed paired differences)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(resamples)]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


# --- the probes -------------------------------------------------------------------------------------------


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Centre and scale every feature by the training rows' mean and std (constant features left at zero)."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return [((x - mean) / std).astype(np.float32) for x in (train, *others)]


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray, k: int, num_classes: int,
                temperature: float = KNN_TEMPERATURE, batch: int = 1024) -> np.ndarray:
    """Weighted kNN vote with cosine similarity; k larger than the training set uses all of it."""
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    bank, k = unit(train_x.astype(np.float32)), min(k, len(train_x))
    out = np.empty(len(query_x), dtype=np.int64)
    for start in range(0, len(query_x), batch):
        sims = unit(query_x[start:start + batch].astype(np.float32)) @ bank.T
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sims, nearest, axis=1) / temperature)
        votes = np.zeros((len(sims), num_classes))
        np.add.at(votes, (np.repeat(np.arange(len(sims)), k), train_y[nearest].ravel()), weights.ravel())
        out[start:start + batch] = votes.argmax(axis=1)
    return out


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, seed: int = 0):
    """Multinomial logistic regression (L2, lbfgs); a single class present gives a constant predictor."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        return _Constant(int(y[0]))
    return LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x, y)


@dataclass(frozen=True)
class _Constant:
    label: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), self.label, dtype=np.int64)


@dataclass(frozen=True)
class LinearProbe:
    """The test predictions of the validation-chosen logistic regression."""

    predictions: np.ndarray
    c: float
    val_score: float


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 test_x: np.ndarray, c_grid: Sequence[float] = DEFAULT_C_GRID, seed: int = 0,
                 select_by: str = "macro_f1") -> LinearProbe:
    """Sweep C on the validation split (by ``select_by``), refit nothing: the chosen model predicts the test split.

    Features are standardised on the training rows. Without validation labels the middle of the grid is used.
    """
    train_x, val_x, test_x = standardise(train_x, val_x, test_x)
    metric = METRIC_FUNCTIONS[select_by]
    best = None
    grid = list(c_grid) if len(val_y) else [sorted(c_grid)[len(c_grid) // 2]]
    for c in grid:
        model = fit_logistic(train_x, train_y, c, seed)
        score = metric(val_y, model.predict(val_x)) if len(val_y) else float("nan")
        if best is None or score > best[0]:
            best = (score, c, model)
    score, c, model = best
    return LinearProbe(predictions=model.predict(test_x).astype(np.int64), c=float(c), val_score=float(score))


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded stratified share of ``labels``, at least one of every class present."""
    rng = np.random.default_rng(seed)
    chosen = []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        count = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def shots_subset(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Sorted indices of ``shots`` samples of every class present (all of a class that has fewer)."""
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == k), size=min(shots, int(np.sum(labels == k))), replace=False)
              for k in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def few_shot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, shots: int, draws: int, c: float,
             seed: int = 0) -> np.ndarray:
    """Test predictions (draws, N) of logistic regressions fitted on ``shots`` per class, one per draw."""
    out = []
    for draw in range(draws):
        index = shots_subset(train_y, shots, seed * 1000 + draw)
        x, t = standardise(train_x[index], test_x)
        out.append(fit_logistic(x, train_y[index], c, seed).predict(t))
    return np.stack(out).astype(np.int64)
