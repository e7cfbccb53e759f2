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
draws resample the same test indices for every draw, so the interval is of the averaged score. The
resamples are scored together: one confusion matrix per resample from a single ``bincount`` over the
resampled (label, prediction) pairs, the same numbers the per-resample metric gives, without a Python
call per resample (98k of them made a quarter of a hyperspectral probe).

The logistic fits run with one BLAS thread: their products are small (thousands of rows, hundreds of
features), and OpenBLAS threads spinning on a shared, loaded CPU made each fit 50-90 times slower than
one thread (a 2,759 x 192 fit: 13 s against 0.15 s at load 6 on 2 cores).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

KNN_TEMPERATURE = 0.07
DEFAULT_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
BOOTSTRAP_RESAMPLES = 1000
# Resampled (label, prediction) pairs scored at once: bounds the bootstrap's memory on large test splits.
BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000
METRICS = ("accuracy", "macro_f1")
# lbfgs stopping tolerance of the logistic fits. scikit-learn's 1e-4 stops weakly regularised fits (C 10-100,
# near-separable data) far enough from their optimum that the validation choice of C and the test score
# depended on where lbfgs started; at 1e-6 a warm-started path, a cold fit and a 1e-8 fit agreed on the chosen
# C and the test macro-F1 in all 12 sweeps measured (histopathology and hyperspectral demo embeddings).
LOGISTIC_TOL = 1e-6
LOGISTIC_MAX_ITER = 1000

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


def resample_confusions(labels: np.ndarray, predictions: np.ndarray, index: np.ndarray,
                        num_classes: int) -> np.ndarray:
    """Confusion counts (R, K, K) [true, predicted] of one prediction vector on each resample ``index`` (R, N)."""
    pairs = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    cells = num_classes * num_classes
    flat = (np.arange(len(index), dtype=np.int64)[:, None] * cells + pairs[index]).ravel()
    return np.bincount(flat, minlength=len(index) * cells).reshape(len(index), num_classes, num_classes)


def accuracy_of_confusions(confusions: np.ndarray) -> np.ndarray:
    """Accuracy of each confusion matrix (R, K, K)."""
    return np.trace(confusions, axis1=1, axis2=2) / confusions.sum(axis=(1, 2))


def macro_f1_of_confusions(confusions: np.ndarray) -> np.ndarray:
    """Macro F1 of each confusion matrix (R, K, K), over the classes present in its labels or predictions
    (as :func:`macro_f1`)."""
    true_positives = np.diagonal(confusions, axis1=1, axis2=2)
    denominators = confusions.sum(axis=2) + confusions.sum(axis=1)
    present = denominators > 0
    f1 = np.divide(2 * true_positives, denominators, out=np.zeros(denominators.shape), where=present)
    return f1.sum(axis=1) / present.sum(axis=1)


# The metrics scored from confusion counts; any other metric is called once per resample.
CONFUSION_METRICS: dict[Metric, Callable[[np.ndarray], np.ndarray]] = {
    accuracy: accuracy_of_confusions, macro_f1: macro_f1_of_confusions}


def resample_indices(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The bootstrap's resample indices in chunks (rows, n): the rows ``rng.integers(0, n, n)`` drawn one
    resample after another would give (the same generator stream), at most ~4M indices at a time."""
    rng = np.random.default_rng(seed)
    rows = max(1, BOOTSTRAP_CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, resamples, rows):
        yield rng.integers(0, n, (min(rows, resamples - start), n))


def resampled_scores(metric: Metric, labels: np.ndarray, draws: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The metric averaged over draws (D, N) on every resample ``index`` (R, N): (R,)."""
    scorer = CONFUSION_METRICS.get(metric)
    if scorer is None:
        return np.array([_score_draws(metric, labels, draws, rows) for rows in index])
    num_classes = int(max(labels.max(initial=0), draws.max(initial=0))) + 1
    per_draw = [scorer(resample_confusions(labels, d, index, num_classes)) for d in draws]
    # Averaged draw by draw in order, as the per-resample mean over a list of draws adds them.
    return np.mean(np.stack(per_draw, axis=1), axis=1)


def bootstrap_interval(labels: np.ndarray, predictions: np.ndarray, metric: Metric,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of ``metric`` over test samples; ``predictions`` (N,) or (draws, N)."""
    draws = np.atleast_2d(predictions)
    values = np.concatenate([resampled_scores(metric, labels, draws, index)
                             for index in resample_indices(len(labels), resamples, seed)])
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def paired_difference(labels: np.ndarray, better: np.ndarray, worse: np.ndarray, metric: Metric,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """``metric(better) - metric(worse)`` on the same test samples, with its paired 95% bootstrap interval.

    Both prediction sets are resampled with the same indices, so what the two share (hard and easy samples)
    cancels: the interval is of the difference, far narrower than two separate intervals would suggest.
    """
    a, b = np.atleast_2d(better), np.atleast_2d(worse)
    point = _score_draws(metric, labels, a) - _score_draws(metric, labels, b)
    values = np.concatenate([resampled_scores(metric, labels, a, index) - resampled_scores(metric, labels, b, index)
                             for index in resample_indices(len(labels), resamples, seed)])
    low, high = np.percentile(values, [2.5, 97.5])
    return float(point), float(low), float(high)


def mean_interval(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the mean of a few values (e.g. per-seed paired differences)."""
    values = np.asarray(values, dtype=np.float64)
    means = np.concatenate([values[index].mean(axis=1) for index in resample_indices(len(values), resamples, seed)])
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
        with one_blas_thread():
            sims = unit(query_x[start:start + batch].astype(np.float32)) @ bank.T
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sims, nearest, axis=1) / temperature)
        votes = np.zeros((len(sims), num_classes))
        np.add.at(votes, (np.repeat(np.arange(len(sims)), k), train_y[nearest].ravel()), weights.ravel())
        out[start:start + batch] = votes.argmax(axis=1)
    return out


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS on one thread inside the block (see the module docstring for why the probes want it)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, seed: int = 0):
    """Multinomial logistic regression (L2, lbfgs, tolerance :data:`LOGISTIC_TOL`); a single class present gives
    a constant predictor."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        return _Constant(int(y[0]))
    return LogisticRegression(C=c, tol=LOGISTIC_TOL, max_iter=LOGISTIC_MAX_ITER, random_state=seed).fit(x, y)


def fit_logistic_path(x: np.ndarray, y: np.ndarray, c_values: Sequence[float], seed: int = 0) -> Iterator[tuple]:
    """``(c, model)`` along ``c_values`` in increasing C, each fit starting from the previous solution.

    A regularisation path: lbfgs continues from the stronger-regularised neighbour's weights
    (``warm_start``), which sit close to the next optimum, instead of from zero. The model object is reused,
    so read what you need from it before taking the next one.
    """
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        for c in sorted(c_values):
            yield c, _Constant(int(y[0]))
        return
    model = LogisticRegression(tol=LOGISTIC_TOL, max_iter=LOGISTIC_MAX_ITER, random_state=seed, warm_start=True)
    for c in sorted(c_values):
        yield c, model.set_params(C=c).fit(x, y)


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

    Features are standardised on the training rows. The grid is fitted as a regularisation path (increasing
    C, warm-started); ties on validation go to the C that comes first in ``c_grid``. Without validation labels
    the middle of the grid is used.
    """
    train_x, val_x, test_x = standardise(train_x, val_x, test_x)
    metric = METRIC_FUNCTIONS[select_by]
    grid = list(c_grid) if len(val_y) else [sorted(c_grid)[len(c_grid) // 2]]
    scores, tests = {}, {}
    with one_blas_thread():
        for c, model in fit_logistic_path(train_x, train_y, grid, seed):
            scores[c] = metric(val_y, model.predict(val_x)) if len(val_y) else float("nan")
            tests[c] = model.predict(test_x).astype(np.int64)
    best = None
    for c in grid:
        if best is None or scores[c] > scores[best]:
            best = c
    return LinearProbe(predictions=tests[best], c=float(best), val_score=float(scores[best]))


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
    with one_blas_thread():
        for draw in range(draws):
            index = shots_subset(train_y, shots, seed * 1000 + draw)
            x, t = standardise(train_x[index], test_x)
            out.append(fit_logistic(x, train_y[index], c, seed).predict(t))
    return np.stack(out).astype(np.int64)
