"""Splits, metrics and their spread over seeds or folds.

Every metric is computed from probabilities where the metric allows it (AUROC, calibration),
never from hard labels, and model selection happens on a validation split, never on test:
the published code picked its best epoch on the test set, which overstates its results.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.model_selection import StratifiedKFold

from embedkit.errors import EmbedkitError

TASKS = ("binary", "multiclass", "multilabel")


class InvalidInputError(EmbedkitError, ValueError):
    """Bad data or arguments: an EmbedkitError for the CLI, a ValueError for scikit-learn tools."""


def detect_task(y) -> str:
    """'multilabel' for a 2-D 0/1 indicator matrix, else 'binary' (<= 2 labels) or 'multiclass'."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        if not np.isin(y, (0, 1)).all():
            raise InvalidInputError("a 2-D y must be a 0/1 indicator matrix (one column per label)")
        return "multilabel"
    if y.ndim == 2:
        y = y.ravel()
    if y.ndim != 1:
        raise InvalidInputError(f"y must be 1-D labels or a 2-D 0/1 indicator matrix, got shape {y.shape}")
    try:
        n_classes = len(np.unique(y))
    except TypeError:  # labels of mixed types cannot be sorted
        raise InvalidInputError("labels in y must all be of one type (all strings or all numbers)") from None
    return "binary" if n_classes <= 2 else "multiclass"


# ---------------------------------------------------------------------------------------------
# metrics


def expected_calibration_error(confidence, correct, n_bins: int = 10) -> float:
    """ECE with equal-width bins (lo, hi]: sum over bins of |bin| / n * |accuracy - mean confidence|."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - confidence[m].mean())
    return float(ece)


def compute_metrics(y_true, proba, classes, task: str, threshold: float = 0.5) -> dict:
    """Accuracy, macro/weighted F1, AUROC, per-class scores, confusion matrix, ECE, n.

    y_true: original labels (binary/multiclass) or a 0/1 indicator matrix (multilabel).
    proba: predict_proba output; for binary either (n, 2) or the positive-class column (n,).
    classes: the estimator's classes_ (for binary, classes[1] is the positive class).
    ECE uses the confidence of the predicted class; for multilabel every (row, label) pair counts
    as one binary prediction.
    """
    if task not in TASKS:
        raise InvalidInputError(f"task must be one of {TASKS}, got {task!r}")
    classes = list(np.asarray(classes).tolist())
    proba = np.asarray(proba, dtype=np.float64)
    out: dict = {}

    if task == "multilabel":
        y = np.asarray(y_true).astype(int)
        pred = (proba >= threshold).astype(int)
        labels = list(range(len(classes)))
        out["accuracy"] = float(accuracy_score(y, pred))  # subset accuracy: every label right
        cm = multilabel_confusion_matrix(y, pred).tolist()
        present = (y.min(0) == 0) & (y.max(0) == 1)
        auc_ok, missing = bool(present.all()), [classes[j] for j in np.flatnonzero(~present)]
        auc = lambda: roc_auc_score(y, proba, average="macro")  # noqa: E731
        conf = np.where(pred == 1, proba, 1 - proba)
        correct = pred == y
    else:
        index = {c: i for i, c in enumerate(classes)}
        try:
            y = np.array([index[c] for c in np.asarray(y_true).ravel().tolist()], dtype=int)
        except KeyError as e:
            raise InvalidInputError(f"y_true holds label {e.args[0]!r} that is not in classes {classes}") from None
        labels = list(range(len(classes)))
        if task == "binary":
            p = proba[:, 1] if proba.ndim == 2 else proba
            pred = (p >= threshold).astype(int)
            auc = lambda: roc_auc_score(y, p)  # noqa: E731
            conf = np.where(pred == 1, p, 1 - p)
        else:
            pred = proba.argmax(1)
            auc = lambda: roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=labels)  # noqa: E731
            conf = proba.max(1)
        counts = np.bincount(y, minlength=len(classes))
        auc_ok, missing = bool((counts > 0).all()), [classes[j] for j in np.flatnonzero(counts == 0)]
        out["accuracy"] = float(accuracy_score(y, pred))
        cm = confusion_matrix(y, pred, labels=labels).tolist()
        correct = pred == y

    out["macro_f1"] = float(f1_score(y, pred, average="macro", labels=labels, zero_division=0))
    out["weighted_f1"] = float(f1_score(y, pred, average="weighted", labels=labels, zero_division=0))
    if auc_ok:
        out["auroc"] = float(auc())
    else:
        # AUROC is undefined for a class with no positive (or no negative) rows in y_true.
        out["auroc"] = float("nan")
        out["auroc_note"] = f"AUROC undefined: classes {missing} lack positive or negative rows in y_true"
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    out["per_class"] = {
        str(c): {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(sup[i])}
        for i, c in enumerate(classes)
    }
    out["confusion_matrix"] = cm
    out["ece"] = expected_calibration_error(conf, correct)
    out["n"] = int(len(y))
    return out


def summarize_runs(runs: list[dict]) -> dict:
    """Mean, sample std and a t-based 95 % confidence interval of every scalar metric over runs.

    Non-finite values (an undefined AUROC, say) are left out, so n_runs can differ per metric.
    """
    if not runs:
        raise InvalidInputError("summarize_runs needs at least one run")
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)]
    summary = {}
    for k in keys:
        v = np.array([r[k] for r in runs if k in r], dtype=np.float64)
        v = v[np.isfinite(v)]
        n = len(v)
        mean = float(v.mean()) if n else float("nan")
        std = float(v.std(ddof=1)) if n > 1 else float("nan")
        half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else float("nan")
        summary[k] = {"mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half, "n_runs": n}
    return summary


# ---------------------------------------------------------------------------------------------
# splits


def _strata(y) -> np.ndarray:
    """One stratum id per row: the label, or for multilabel the label set (label powerset), with
    label sets seen on a single row pooled into one stratum so that they do not end up alone."""
    y = np.asarray(y)
    if detect_task(y) == "multilabel":
        _, key, counts = np.unique(y.astype(np.int8), axis=0, return_inverse=True, return_counts=True)
        key = key.ravel()
        key = np.where(counts[key] < 2, -1, key)
        return np.unique(key, return_inverse=True)[1].ravel()
    return np.unique(y.ravel(), return_inverse=True)[1]


def _allocate(counts: np.ndarray, frac: float, cap: np.ndarray, rng) -> np.ndarray:
    """Rows per stratum for a split of size round(frac * n): floor of each share, the remainder to
    the largest fractional parts (ties at random), at most cap per stratum."""
    ideal = counts * frac
    take = np.floor(ideal).astype(int)
    extra = int(round(frac * counts.sum())) - int(take.sum())
    order = np.lexsort((rng.random(len(counts)), -(ideal - take)))
    take[order[:extra]] += 1
    return np.clip(np.minimum(take, cap), 0, None)


def split_indices(y, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> dict:
    """Stratified train/val/test row indices (sorted int arrays), deterministic per seed.

    Each stratum keeps at least one row in train, so a class with a single row lives in train
    only (with a warning) instead of turning the whole split unstratified.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InvalidInputError("val_fraction and test_fraction must be >= 0 and sum to less than 1")
    strata = _strata(y)
    counts = np.bincount(strata)
    if (counts < 2).any():
        warnings.warn(
            f"{int((counts < 2).sum())} class(es) or label set(s) have a single row; kept in train only", stacklevel=2
        )
    rng = np.random.default_rng(seed)
    n_test = _allocate(counts, test_fraction, counts - 1, rng)
    n_val = _allocate(counts, val_fraction, counts - n_test - 1, rng)
    parts = {"train": [], "val": [], "test": []}
    for s in range(len(counts)):
        rows = rng.permutation(np.flatnonzero(strata == s))
        parts["test"].append(rows[: n_test[s]])
        parts["val"].append(rows[n_test[s] : n_test[s] + n_val[s]])
        parts["train"].append(rows[n_test[s] + n_val[s] :])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}


def kfold_indices(y, k: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold: a list of (train_idx, test_idx); every row is in exactly one test fold."""
    strata = _strata(y)
    if k < 2 or k > len(strata):
        raise InvalidInputError(f"k must be between 2 and the number of rows ({len(strata)}), got {k}")
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in folds.split(np.zeros((len(strata), 1)), strata)]
