"""Post-hoc choices: temperature scaling and the binary decision threshold, never fitted on test rows.

The threshold is chosen on the run's validation rows. Temperature scaling (Guo et al. 2017)
divides the logits by one number T fitted by log-loss: it changes how confident the
probabilities are, never their ranking (AUROC) nor the multiclass argmax. One number fitted on
a small validation split can hurt more than it helps (on X-rays with notes grouped by patient,
test ECE 0.048 -> 0.260 in one run), so choose_calibration_rows fits it where there are enough
rows: the validation rows when they are many, else pooled out-of-fold predictions over the
training folds (each training row predicted by a model fitted without its fold, as
scikit-learn's CalibratedClassifierCV(ensemble=False)), else no scaling, with a note.
Both are saved with the model and applied by predict.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, log_softmax, softmax

from embedkit.fusion.evaluate import InvalidInputError

_EPS = 1e-12
THRESHOLD_RULES = ("val-f1", "0.5")
CALIBRATION_SOURCES = ("auto", "val", "oof")  # auto: validation if it is large enough, else out-of-fold, else none
MIN_CALIBRATION_ROWS = 200  # rows a temperature is fitted on, at least
MIN_CALIBRATION_PER_CLASS = 20  # rows of each class (multilabel: positives and negatives of each label)
CALIBRATION_FOLDS = 3  # as CalibratedClassifierCV before scikit-learn 0.22: each extra fit costs a CPU


def logits_from_proba(proba, task: str) -> np.ndarray:
    """Logits equivalent to the probabilities: log-odds for binary (positive column) and
    multilabel, log-probabilities for multiclass (softmax is unchanged by a constant)."""
    p = np.clip(np.asarray(proba, dtype=np.float64), _EPS, 1 - _EPS)
    if task == "binary":
        p = p[:, 1] if p.ndim == 2 else p
        return np.log(p) - np.log1p(-p)
    if task == "multilabel":
        return np.log(p) - np.log1p(-p)
    return np.log(p)


def proba_from_logits(z, task: str) -> np.ndarray:
    if task == "binary":
        p = expit(z)
        return np.column_stack([1 - p, p])
    return expit(z) if task == "multilabel" else softmax(z, axis=1)


def _nll(z, targets, task: str) -> float:
    if task == "multiclass":
        return float(-log_softmax(z, axis=1)[np.arange(len(z)), targets].mean())
    # binary / multilabel: mean binary cross-entropy from logits, numerically stable
    return float(np.mean(np.logaddexp(0, z) - targets * z))


class TemperatureScaler:
    """Fit one temperature T on validation probabilities; transform divides the logits by T.

    fit(proba, targets, task): targets are class indices (binary: 0/1 for the positive class,
    multiclass: 0..k-1) or a 0/1 matrix (multilabel). Learned: `temperature_`.
    """

    def __init__(self, bounds=(0.05, 20.0)):
        self.bounds = bounds

    def fit(self, proba, targets, task: str) -> "TemperatureScaler":
        from scipy.optimize import minimize_scalar  # only fitting needs it; predict applies a saved temperature

        z = logits_from_proba(proba, task)
        targets = np.asarray(targets)
        if len(targets) < 2:
            raise InvalidInputError("temperature scaling needs at least 2 validation rows")
        lo, hi = np.log(self.bounds[0]), np.log(self.bounds[1])
        res = minimize_scalar(lambda log_t: _nll(z / np.exp(log_t), targets, task), bounds=(lo, hi),
                              method="bounded", options={"xatol": 1e-4})
        self.temperature_ = float(np.exp(res.x))
        self.task_ = task
        return self

    def transform(self, proba) -> np.ndarray:
        return proba_from_logits(logits_from_proba(proba, self.task_) / self.temperature_, self.task_)


def choose_threshold(p_positive, targets, rule: str) -> float:
    """The binary decision threshold: a number, "0.5", or "val-f1" = the cut that maximises
    macro-F1 on these (validation) rows; ties go to the cut nearest 0.5."""
    if rule not in THRESHOLD_RULES:
        try:
            t = float(rule)
        except ValueError:
            raise InvalidInputError(f"threshold must be val-f1, 0.5 or a number in (0, 1), got {rule!r}") from None
        if not 0 < t < 1:
            raise InvalidInputError(f"threshold must lie in (0, 1), got {t}")
        return t
    if rule == "0.5":
        return 0.5
    p, targets = np.asarray(p_positive, dtype=np.float64), np.asarray(targets).astype(int)
    cuts = np.unique(p)
    # midpoints between neighbouring scores, so the chosen cut does not sit on a validation row
    candidates = np.concatenate([[0.5], (cuts[1:] + cuts[:-1]) / 2])
    macro = _binary_macro_f1_at(p, targets, candidates)
    best = max(range(len(candidates)), key=lambda i: (round(macro[i], 12), -abs(candidates[i] - 0.5)))
    return float(candidates[best])


def _binary_macro_f1_at(p, targets, cuts) -> np.ndarray:
    """Macro-F1 over both classes (absent ones count 0, as f1_score(labels=[0, 1])) for each cut,
    from sorted scores: O(n log n) instead of one f1_score call per cut."""
    pos, neg = np.sort(p[targets == 1]), np.sort(p[targets == 0])
    tp = len(pos) - np.searchsorted(pos, cuts, side="left")  # positives with p >= cut
    fp = len(neg) - np.searchsorted(neg, cuts, side="left")
    fn, tn = len(pos) - tp, len(neg) - fp

    def f1(a, b, c):  # 2a / (2a + b + c), 0 where undefined
        d = 2 * a + b + c
        return np.divide(2 * a, d, out=np.zeros(len(cuts)), where=d > 0)

    return (f1(tp, fp, fn) + f1(tn, fn, fp)) / 2


def enough_rows(targets, task: str) -> str | None:
    """None when these rows can carry a temperature, else why not."""
    targets = np.asarray(targets)
    if len(targets) < MIN_CALIBRATION_ROWS:
        return f"{len(targets)} rows (fewer than {MIN_CALIBRATION_ROWS})"
    if task == "multilabel":
        fewest = int(min(targets.sum(0).min(), (1 - targets).sum(0).min()))
    else:
        fewest = int(np.bincount(targets.astype(int)).min()) if len(np.unique(targets)) > 1 else 0
    if fewest < MIN_CALIBRATION_PER_CLASS:
        return f"{fewest} rows of its smallest class (fewer than {MIN_CALIBRATION_PER_CLASS})"
    return None


def out_of_fold(y, rows, groups, fit_predict, seed: int = 0, k: int = CALIBRATION_FOLDS):
    """Pooled out-of-fold predictions of `rows`: k grouped, stratified folds (evaluate.kfold_indices), each
    fold predicted by fit_predict(fit_rows, held_rows) -> probabilities (None: unusable, e.g. a fold lacked a
    class). -> (proba, the rows in the order predicted, how) or None when the rows cannot be cut into folds."""
    from embedkit.fusion.evaluate import kfold_indices

    rows = np.asarray(rows)
    try:
        folds = kfold_indices(np.asarray(y)[rows], k, seed, groups=None if groups is None else groups[rows])
    except ValueError:  # fewer groups or rows of a class than folds
        return None
    parts, order = [], []
    for fit, held in folds:
        proba = fit_predict(rows[fit], rows[held])
        if proba is None:
            return None
        parts.append(proba)
        order.append(rows[held])
    return np.concatenate(parts), np.concatenate(order), f"{len(folds)} {'grouped ' if groups is not None else ''}folds"


def choose_calibration_rows(task: str, val_proba, val_targets, train_targets=None, out_of_fold=None,
                            rule: str = "auto") -> dict:
    """Fit the temperature on the rows `rule` allows and say which.

    rule "val": the validation rows (at least 2); "oof": the pooled out-of-fold predictions of the training
    rows (`train_targets`), made by `out_of_fold()` -> (proba, targets, how) or None when the training rows
    cannot be cut into folds; "auto": the validation rows when enough_rows accepts them, else the out-of-fold
    rows when it accepts the training rows (the folds are only fitted then), else no scaling.
    -> {"temperature", "fitted_on": "validation" | "out-of-fold" | None, "rows", "note"}.
    """
    if rule not in CALIBRATION_SOURCES:
        raise InvalidInputError(f"calibration rows must be one of {', '.join(CALIBRATION_SOURCES)}, got {rule!r}")
    notes = []
    if rule in ("auto", "val"):
        why = enough_rows(val_targets, task) if rule == "auto" else (None if len(val_targets) >= 2 else "< 2 rows")
        if why is None:
            t = TemperatureScaler().fit(val_proba, val_targets, task).temperature_
            return {"temperature": t, "fitted_on": "validation", "rows": int(len(val_targets)),
                    "note": f"fitted on {len(val_targets)} validation rows"}
        notes.append(f"validation has {why}")
    if rule in ("auto", "oof") and out_of_fold is not None and train_targets is not None:
        why = enough_rows(train_targets, task) if rule == "auto" else None
        made = out_of_fold() if why is None else None
        if made is not None:
            proba, targets, how = made
            scaler = TemperatureScaler().fit(proba, targets, task)
            t = scaler.temperature_
            return {"temperature": t, "fitted_on": "out-of-fold", "rows": int(len(targets)),
                    "note": f"fitted on pooled out-of-fold predictions of {len(targets)} training rows ({how})"
                    + (f"; at its upper bound {scaler.bounds[1]:g}: the folds' predictions carry almost no "
                       f"information, so the probabilities are flattened towards the class shares"
                       if t >= 0.99 * scaler.bounds[1] else "")}
        notes.append(f"training has {why}" if why else "the training rows could not be cut into folds")
    return {"temperature": 1.0, "fitted_on": None, "rows": 0,
            "note": "no temperature scaling: " + "; ".join(notes) + " (too few to fit one number that helps)"}
