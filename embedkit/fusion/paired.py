"""Paired comparisons of classifiers scored on the same test rows.

Two models scored on one test set are not independent samples: a hard case is hard for both.
Their difference is judged by resampling the test groups once and scoring *both* models on each
resample (a paired bootstrap), not by comparing two separate intervals. With several runs (seeds
or folds) a metric is the mean over runs; each replicate averages the runs' resampled scores, runs
that share their test rows sharing their resamples too.

The best of many configurations is optimistically biased (it was chosen because it scored high on
these very rows): `holm` adjusts the p-values of a family of comparisons, and callers say how many
comparisons were made.
"""

from __future__ import annotations

import hashlib

import numpy as np

from embedkit.fusion.evaluate import InvalidInputError, resampled_metrics

VERDICTS = ("better", "worse", "indistinguishable")


def rows_key(test_ids) -> str:
    """One key per distinct set of test rows, so runs with the same test rows share their resamples."""
    return hashlib.sha256("\n".join(sorted(map(str, test_ids))).encode()).hexdigest()[:16]


def paired_resamples(y_true, groups, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, rows) weights of the bootstrap every model on these rows is scored on: whole groups
    drawn with replacement, stratified by class (evaluate.resample_weights, the bootstrap `train` uses)."""
    from embedkit.fusion.evaluate import resample_weights

    y = np.asarray(y_true)
    if len(y) == 0:
        raise InvalidInputError("a paired bootstrap needs at least one test row")
    if n_resamples < 1:
        raise InvalidInputError("a paired bootstrap needs at least one resample")
    y_index = y.astype(int) if y.ndim == 2 else np.unique(np.asarray(y, dtype=object).astype(str),
                                                           return_inverse=True)[1].ravel()
    return np.concatenate(list(resample_weights(y_index, groups, n_resamples, seed)))


def replicates(y_true, proba, classes, task: str, threshold: float, weights, metric: str) -> np.ndarray:
    """The metric on every resample (NaN where it is undefined, e.g. AUROC without both classes)."""
    values = resampled_metrics(y_true, proba, classes, task, threshold, weights)
    if metric not in values:
        raise InvalidInputError(f"no resampled metric '{metric}' (choose {', '.join(values)})")
    return values[metric]


def interval(reps: np.ndarray, level: float = 0.95, bounds=(0.0, 1.0)) -> tuple[float, float, int]:
    """Percentile interval over the defined replicates, clipped to the metric's range; (low, high, n_defined)."""
    v = np.asarray(reps, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < max(2, 0.5 * len(reps)):
        return float("nan"), float("nan"), int(len(v))
    alpha = (1 - level) / 2
    low, high = np.quantile(v, [alpha, 1 - alpha])
    return float(np.clip(low, *bounds)), float(np.clip(high, *bounds)), int(len(v))


def paired_difference(reps_a: np.ndarray, reps_b: np.ndarray, point_a: float, point_b: float,
                      level: float = 0.95) -> dict:
    """a - b: the point difference, its paired percentile interval, a two-sided bootstrap p-value and a verdict.

    reps_a and reps_b must come from the same resamples (same weights, same order)."""
    d = np.asarray(reps_a, dtype=np.float64) - np.asarray(reps_b, dtype=np.float64)
    if d.shape != np.shape(reps_b):
        raise InvalidInputError("paired replicates must have the same shape")
    low, high, n = interval(d, level, bounds=(-1.0, 1.0))
    defined = d[np.isfinite(d)]
    p = float(min(1.0, 2 * min((defined <= 0).mean(), (defined >= 0).mean()))) if len(defined) else float("nan")
    return {"delta": float(point_a - point_b), "low": low, "high": high, "p": p, "n_defined": n,
            "verdict": verdict(low, high)}


def verdict(low: float, high: float) -> str:
    """'better' / 'worse' when the interval of a - b excludes 0, 'indistinguishable' when it covers 0 (or is undefined)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "indistinguishable"
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "indistinguishable"


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN): controls the family-wise error."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out
