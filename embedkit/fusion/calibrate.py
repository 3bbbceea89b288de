"""Post-hoc choices made on validation rows: temperature scaling and the binary decision threshold.

Both are fitted on the validation rows of the run they belong to, never on test rows, saved
with the model and applied by predict. Temperature scaling (Guo et al. 2017) divides the
logits by one number T fitted by validation log-loss: it changes how confident the
probabilities are, never their ranking (AUROC) nor the multiclass argmax.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, log_softmax, softmax

from embedkit.fusion.evaluate import InvalidInputError

_EPS = 1e-12
THRESHOLD_RULES = ("val-f1", "0.5")


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
