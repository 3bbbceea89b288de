"""Splits, metrics, bootstrap intervals and their spread over seeds or folds.

Every metric is computed from probabilities where the metric allows it (AUROC, calibration),
never from hard labels, and model selection happens on a validation split, never on test:
the published code picked its best epoch on the test set, which overstates its results.

Rows that share a group (a patient, a lesion, an image) are never split across train,
validation and test, and the bootstrap resamples whole groups: near-duplicate rows of one
patient are one piece of evidence, not several.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from embedkit.errors import EmbedkitError

# scipy.stats, sklearn.metrics and sklearn.model_selection are imported inside the functions that use
# them: `predict` needs InvalidInputError and detect_task from here, and those imports cost seconds.

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
    from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, multilabel_confusion_matrix,
                                 precision_recall_fscore_support, roc_auc_score)

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

    # Macro-F1 averages over the classes present in y_true: a class with no test rows has no F1,
    # and counting it as 0 would report a worse model than the one measured. It is named instead.
    support = y.sum(0) if task == "multilabel" else np.bincount(y, minlength=len(classes))
    present = [j for j in labels if support[j] > 0]
    out["macro_f1"] = float(f1_score(y, pred, average="macro", labels=present, zero_division=0)) if present else 0.0
    if len(present) < len(labels):
        out["absent_classes"] = [classes[j] for j in labels if support[j] == 0]
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


# metrics whose values lie in [0, 1]: an interval of them is clipped to that range
UNIT_RANGE = ("accuracy", "macro_f1", "weighted_f1", "auroc", "ece", "sensitivity", "specificity", "ppv", "npv")


def summarize_runs(runs: list[dict]) -> dict:
    """Mean, sample std and a t-based 95 % confidence interval of every scalar metric over runs.

    Non-finite values (an undefined AUROC, say) are left out: each metric's `n_runs` counts the runs
    where it is defined, out of `of_runs`. Intervals of metrics in UNIT_RANGE are clipped to [0, 1]
    (`clipped` says when): a t interval over a few runs can otherwise reach past what the metric can be.
    """
    from scipy import stats

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
        low, high = mean - half, mean + half
        entry = {"mean": mean, "std": std, "ci95_low": low, "ci95_high": high, "n_runs": n, "of_runs": len(runs)}
        if k in UNIT_RANGE and n > 1:
            entry["ci95_low"], entry["ci95_high"] = max(low, 0.0), min(high, 1.0)
            entry["clipped"] = bool(low < 0 or high > 1)
        summary[k] = entry
    return summary


# ---------------------------------------------------------------------------------------------
# bootstrap intervals over test rows (or test groups)

BOOTSTRAP_METRICS = ("accuracy", "macro_f1", "weighted_f1", "auroc", "ece")


def group_strata(y_index, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """(group of each row as 0..G-1, stratum of each group): a group's stratum is its most frequent class
    (ties: the first); a 2-D y (multilabel) or no class gives one stratum."""
    y_index = np.asarray(y_index)
    n = len(y_index)
    group_of_row = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1].ravel() \
        if groups is not None else np.arange(n)
    n_groups = int(group_of_row.max()) + 1 if n else 0
    if y_index.ndim != 1 or n == 0:
        return group_of_row, np.zeros(n_groups, dtype=np.int64)
    counts = np.zeros((n_groups, int(y_index.max()) + 1))
    np.add.at(counts, (group_of_row, y_index), 1)
    return group_of_row, counts.argmax(1)


def resample_weights(y_index, groups=None, n_resamples: int = 1000, seed: int = 0, chunk_rows: int = 2_000_000):
    """Bootstrap resamples as weight matrices (resamples x rows: how often each row is drawn), chunk by chunk.

    Whole groups are drawn (a patient's rows stay together), stratified: each class keeps as many groups
    as the data has (a group counts for its most frequent class), so no resample loses a class whose
    groups are all of that class. Without stratification, a test set with 2-3 minority patients loses the
    minority class in about one resample in eight, and a metric averaged over the classes present then
    scores majority-only resamples (issue 25). Rows of a minority class inside another class's groups can
    still be absent; bootstrap_metrics counts those resamples.
    """
    group_of_row, stratum = group_strata(y_index, groups)
    n_groups = len(stratum)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(stratum == s) for s in np.unique(stratum)]
    for chunk in np.array_split(np.arange(n_resamples), max(1, n_resamples * len(group_of_row) // chunk_rows)):
        counts = np.zeros((len(chunk), n_groups), dtype=np.int64)
        for m in members:
            counts[:, m] = rng.multinomial(len(m), np.full(len(m), 1.0 / len(m)), size=len(chunk))
        yield counts[:, group_of_row].astype(np.float64)


def bootstrap_metrics(y_true, proba, classes, task: str, threshold: float = 0.5, groups=None,
                      n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals of accuracy, macro/weighted F1, AUROC and ECE over the given rows.

    With `groups`, whole groups are resampled (a patient's rows stay together), so the interval
    reflects how many independent patients the test set holds; resampling is stratified by class
    (resample_weights). Each resample is a vector of row weights, and every metric is computed for
    all resamples at once from weighted counts, with compute_metrics' definitions: macro-F1 averages
    the classes present in the rows given; a resample lacking one of them scores it 0 (as scikit-learn
    does) and `resamples_lacking_a_class` says how many did. Intervals lie within [0, 1]; a metric
    undefined in some resamples (AUROC without both classes) uses those where it is defined and says
    how many.
    """
    y, pred, scores = _indexed(y_true, proba, classes, task, threshold)
    n = len(y)
    if n == 0:
        raise InvalidInputError("bootstrap needs at least one row")
    support = y.sum(0) if task == "multilabel" else np.bincount(y, minlength=scores.shape[1])
    present = np.asarray(support) > 0
    values = {k: [] for k in BOOTSTRAP_METRICS}
    lacking = 0
    group_of_row, _ = group_strata(y, groups)
    for w in resample_weights(y, groups, n_resamples, seed):
        for k, v in _weighted_metrics(y, pred, scores, task, w, present).items():
            values[k].append(v)
        resampled = w @ (y.astype(np.float64) if task == "multilabel" else np.eye(scores.shape[1])[y])
        lacking += int(((resampled <= 0) & present).any(1).sum())
    alpha = (1 - level) / 2
    out = {"level": level, "n_resamples": n_resamples, "unit": "group" if groups is not None else "row",
           "n_units": int(group_of_row.max()) + 1, "seed": seed, "stratified": task != "multilabel",
           "resamples_lacking_a_class": lacking, "metrics": {}}
    for k, chunks in values.items():
        out["metrics"][k] = percentile_interval(np.concatenate(chunks), level, n_resamples)
    return out


def percentile_interval(values, level: float = 0.95, n_resamples: int | None = None) -> dict:
    """{low, high, n_valid}: the percentile interval of the finite values, clipped to [0, 1]; NaN when fewer
    than half of the resamples define the value."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    alpha = (1 - level) / 2
    if len(v) == 0 or len(v) < 0.5 * (n_resamples or len(values)):
        return {"low": float("nan"), "high": float("nan"), "n_valid": int(len(v))}
    low, high = np.quantile(v, [alpha, 1 - alpha])
    return {"low": float(np.clip(low, 0, 1)), "high": float(np.clip(high, 0, 1)), "n_valid": int(len(v))}


def _indexed(y_true, proba, classes, task, threshold):
    """(y as class indices or an indicator matrix, predictions alike, scores for AUROC)."""
    proba = np.asarray(proba, dtype=np.float64)
    if task == "multilabel":
        y = np.asarray(y_true).astype(int)
        return y, (proba >= threshold).astype(int), proba
    index = {c: i for i, c in enumerate(np.asarray(classes).tolist())}
    try:
        y = np.array([index[c] for c in np.asarray(y_true).ravel().tolist()], dtype=int)
    except KeyError as e:
        raise InvalidInputError(f"y_true holds label {e.args[0]!r} that is not in classes") from None
    if task == "binary":
        p = proba[:, 1] if proba.ndim == 2 else proba
        return y, (p >= threshold).astype(int), np.column_stack([1 - p, p])
    return y, proba.argmax(1), proba


def _weighted_metrics(y, pred, scores, task, w, present=None) -> dict:
    """Every bootstrap metric for each row of the weight matrix w (resamples x rows).

    present: the classes macro-F1 averages over (absent from a resample: F1 0); None: those present in
    each resample."""
    total = w.sum(1)
    if task == "multilabel":
        truth, hits = y.astype(np.float64), (pred == y).all(1)
        predicted = pred.astype(np.float64)
        auc_columns = range(y.shape[1])
        positive = lambda j: y[:, j] == 1  # noqa: E731
        conf = np.where(pred == 1, scores, 1 - scores)
        gap = ((pred == y) - conf)  # (rows, labels): every (row, label) pair is one prediction
    else:
        k = scores.shape[1]
        truth = np.eye(k)[y]
        predicted = np.eye(k)[pred]
        hits = pred == y
        auc_columns = [1] if task == "binary" else range(k)
        positive = lambda j: y == j  # noqa: E731
        conf = scores[np.arange(len(pred)), pred]
        gap = (hits - conf)[:, None]
    support, n_pred, tp = w @ truth, w @ predicted, w @ (truth * predicted)
    denom = support + n_pred
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    averaged = support > 0 if present is None else np.broadcast_to(np.asarray(present, dtype=bool), support.shape)
    macro = np.where(averaged.any(1), (f1 * averaged).sum(1) / np.maximum(averaged.sum(1), 1), np.nan)
    aucs = np.column_stack([_weighted_auc(scores[:, j], positive(j), w) for j in auc_columns])
    return {"accuracy": w @ hits / total, "macro_f1": macro,
            "weighted_f1": (f1 * support).sum(1) / np.maximum(support.sum(1), 1e-300),
            "auroc": aucs.mean(1),  # NaN when any class lacks positives or negatives, as compute_metrics
            "ece": _weighted_ece(conf, gap, w)}


def _weighted_ece(conf, gap, w, n_bins: int = 10) -> np.ndarray:
    """expected_calibration_error for each weight row: sum over bins of |sum w (correct - confidence)| / sum w.
    conf and gap are (rows, columns): one column, or one per label (each (row, label) pair is a prediction)."""
    conf = np.asarray(conf, dtype=np.float64).reshape(len(gap), -1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    per_bin = np.zeros((w.shape[0], n_bins))
    for j in range(gap.shape[1]):
        onehot = np.zeros((len(gap), n_bins))
        onehot[np.arange(len(gap)), bins[:, j]] = gap[:, j]
        per_bin += w @ onehot
    return np.abs(per_bin).sum(1) / np.maximum(w.sum(1) * gap.shape[1], 1e-300)


def _weighted_auc(score, positive, w) -> np.ndarray:
    """AUROC (ties count one half) for each weight row: the Mann-Whitney statistic with weights."""
    from scipy import sparse

    uniq, inv = np.unique(score, return_inverse=True)
    onehot = sparse.csr_matrix((np.ones(len(score)), (np.arange(len(score)), inv.ravel())),
                               shape=(len(score), len(uniq)))
    pos_w = (w * positive) @ onehot  # weight of positives at each distinct score, ascending
    neg_w = (w * ~positive) @ onehot
    below = np.cumsum(neg_w, axis=1) - neg_w
    n_pos, n_neg = pos_w.sum(1), neg_w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_w * (below + 0.5 * neg_w)).sum(1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def subgroup_metrics(y_true, proba, classes, task: str, values, threshold: float = 0.5, groups=None,
                     n_resamples: int = 1000, seed: int = 0, min_rows: int = 30) -> dict:
    """Metrics and bootstrap intervals per value of a subgroup column (e.g. sex), over test rows.

    Rows with a missing value form the subgroup "(missing)". A subgroup under `min_rows` rows is
    flagged `small`: its interval is wide and its point estimate unreliable.
    """
    values = np.array(["(missing)" if v is None or v != v else str(v) for v in values], dtype=object)
    y_true, proba = np.asarray(y_true), np.asarray(proba)
    out = {}
    for value in sorted(set(values.tolist())):
        rows = np.flatnonzero(values == value)
        g = None if groups is None else np.asarray(groups, dtype=object)[rows]
        m = compute_metrics(y_true[rows], proba[rows], classes, task, threshold)
        entry = {"n": int(len(rows)), "n_groups": int(len(set(g.tolist()))) if g is not None else int(len(rows)),
                 "metrics": {k: m[k] for k in ("accuracy", "macro_f1", "weighted_f1", "auroc", "ece")},
                 "small": bool(len(rows) < min_rows)}
        if "absent_classes" in m:
            entry["absent_classes"] = m["absent_classes"]
        entry["bootstrap"] = bootstrap_metrics(y_true[rows], proba[rows], classes, task, threshold, g,
                                               n_resamples=n_resamples, seed=seed)["metrics"]
        out[value] = entry
    return out


# ---------------------------------------------------------------------------------------------
# splits: stratified, and grouped when rows share a patient


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


def _group_ids(groups, n: int) -> np.ndarray:
    """Integer group per row; None (no grouping, or a row without a group) = a group of its own."""
    if groups is None:
        return np.arange(n)
    keys = [f"row:{i}" if g is None or g != g else f"g:{g}" for i, g in enumerate(groups)]
    return np.unique(np.array(keys, dtype=object), return_inverse=True)[1].ravel()


def _hold_out(strata: np.ndarray, group_ids: np.ndarray, fraction: float, seed: int, grouped: bool):
    """(kept, held-out) positions: a stratified share `fraction` held out, whole groups at a time.

    Ungrouped rows use scikit-learn's stratified shuffle split (exact sizes); grouped rows use
    StratifiedGroupKFold with about 1/fraction folds and hold out its first fold, so the share is
    approximate but no group is ever cut.
    """
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    positions = np.arange(len(strata))
    if fraction <= 0:
        return positions, positions[:0]
    if not grouped:
        n_out = int(round(fraction * len(strata)))
        if n_out == 0:
            return positions, positions[:0]
        try:
            keep, out = train_test_split(positions, test_size=n_out, stratify=strata, random_state=seed)
        except ValueError:  # fewer held-out rows than classes: stratification is impossible, draw at random
            keep, out = train_test_split(positions, test_size=n_out, random_state=seed)
        return np.sort(keep), np.sort(out)
    n_groups = len(np.unique(group_ids))
    k = int(min(max(2, round(1 / fraction)), n_groups))
    if k < 2:
        raise InvalidInputError(f"only {n_groups} group(s): cannot hold out a {fraction:.0%} split by group")
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": expected
        warnings.simplefilter("ignore", UserWarning)
        folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        keep, out = next(folds.split(positions, strata, group_ids))
    return np.sort(keep), np.sort(out)


def split_indices(y, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0, groups=None) -> dict:
    """Stratified train/val/test row indices (sorted int arrays), deterministic per seed.

    groups: one value per row (a patient id); rows of one group always land in one split. None:
    rows are independent. Each stratum keeps at least one row in train, so a class with a
    single row (or a single group) lives in train only (with a warning).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InvalidInputError("val_fraction and test_fraction must be >= 0 and sum to less than 1")
    strata = _strata(y)
    gid = _group_ids(groups, len(strata))
    groups_per_stratum = np.array([len(np.unique(gid[strata == s])) for s in range(strata.max() + 1)])
    lone = np.isin(strata, np.flatnonzero(groups_per_stratum < 2))
    if lone.any():
        warnings.warn(f"{int((groups_per_stratum < 2).sum())} class(es) or label set(s) have a single row "
                      f"{'or group ' if groups is not None else ''}; kept in train only", stacklevel=2)
    pool = np.flatnonzero(~lone)
    rest, test = _hold_out(strata[pool], gid[pool], test_fraction, seed, groups is not None)
    rest, test = pool[rest], pool[test]
    share = val_fraction / (1 - test_fraction) if test_fraction < 1 else 0
    train, val = _hold_out(strata[rest], gid[rest], share, seed + 1, groups is not None)
    idx = {"train": np.sort(np.concatenate([rest[train], np.flatnonzero(lone)])).astype(np.int64),
           "val": np.sort(rest[val]).astype(np.int64), "test": np.sort(test).astype(np.int64)}
    check_groups_disjoint(idx, groups)
    return idx


def kfold_indices(y, k: int = 5, seed: int = 0, groups=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified (and grouped) k-fold: a list of (train_idx, test_idx); every row is in one test fold."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    strata = _strata(y)
    if k < 2 or k > len(strata):
        raise InvalidInputError(f"k must be between 2 and the number of rows ({len(strata)}), got {k}")
    X = np.zeros((len(strata), 1))
    if groups is None:
        folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, strata)
    else:
        gid = _group_ids(groups, len(strata))
        if k > len(np.unique(gid)):
            raise InvalidInputError(f"--cv {k} needs at least {k} groups; the data has {len(np.unique(gid))}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            folds = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(X, strata, gid))
    out = [(np.sort(tr), np.sort(te)) for tr, te in folds]
    for tr, te in out:
        check_groups_disjoint({"train": tr, "test": te}, groups)
    return out


def check_groups_disjoint(idx: dict[str, np.ndarray], groups) -> None:
    """Raise if any group has rows in two of the given splits (the guarantee every split keeps)."""
    if groups is None:
        return
    groups = np.asarray(groups, dtype=object)
    seen: dict = {}
    for name, rows in idx.items():
        for g in set(groups[rows].tolist()) - {None}:
            if g in seen and seen[g] != name:
                raise AssertionError(f"a group has rows in both {seen[g]} and {name}")  # its id stays private
            seen[g] = name
