"""What a clinic decides with: the operating point, net benefit, prevalence, and when a score is chance.

operating_point   sensitivity, specificity, PPV and NPV at the model's decision rule (binary: the saved
                  threshold on the positive class; multiclass: argmax, one-vs-rest per class; multilabel:
                  the threshold per label), with counts and percentile bootstrap intervals over groups
                  (the same stratified resampling as evaluate.bootstrap_metrics)
decision_curve    net benefit against threshold probability (Vickers & Elkin 2006):
                  NB(pt) = TP/N - FP/N * pt / (1 - pt), beside treat-all and treat-none (0)
prevalence        each class's share of the rows of each split
chance_levels     what a model that learnt nothing scores on these rows: the majority baseline's
                  accuracy, the best macro/weighted F1 of an uninformed rule, AUROC 0.5
banners           plain sentences for a reader: a test interval that covers chance or the majority
                  baseline ("cannot tell"), validation and test intervals that do not overlap, and
                  intervals computed from resamples that lacked a class

Everything here reads labels and probabilities of rows already scored; nothing is fitted.
"""

from __future__ import annotations

import math

import numpy as np

from embedkit.fusion.evaluate import bootstrap_metrics, percentile_interval, resample_weights

RATES = ("sensitivity", "specificity", "ppv", "npv")
RATE_NAMES = {"sensitivity": "sensitivity (recall)", "specificity": "specificity", "ppv": "PPV (precision)",
              "npv": "NPV"}
CHANCE_METRICS = ("macro_f1", "auroc", "accuracy")


# ---------------------------------------------------------------- decisions per class


def _decisions(y_true, proba, classes, task: str, threshold: float) -> tuple[np.ndarray, np.ndarray, list]:
    """(truth, decision) as 0/1 matrices [rows, columns] and the column names: binary has one column (the
    positive class, classes[1]); multiclass one per class (one-vs-rest of the argmax); multilabel one per label."""
    proba = np.asarray(proba, dtype=np.float64)
    classes = list(np.asarray(classes).tolist())
    if task == "multilabel":
        return np.asarray(y_true).astype(int), (proba >= threshold).astype(int), classes
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in np.asarray(y_true).ravel().tolist()], dtype=int)
    if task == "binary":
        p = proba[:, 1] if proba.ndim == 2 else proba
        return y[:, None], (p >= threshold).astype(int)[:, None], [classes[1]]
    k = len(classes)
    return np.eye(k, dtype=int)[y], np.eye(k, dtype=int)[proba.argmax(1)], classes


def _rates(tp, fp, fn, tn) -> dict:
    def ratio(a, b):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        return np.divide(a, b, out=np.full(np.broadcast(a, b).shape, np.nan), where=b > 0)

    return {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp),
            "npv": ratio(tn, tn + fn)}


def operating_point(y_true, proba, classes, task: str, threshold: float = 0.5, groups=None,
                    n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Sensitivity, specificity, PPV and NPV at the model's decision rule, with bootstrap intervals.

    -> {"rule": ..., "unit": "group"|"row", "n_resamples", "classes": {name: {"tp", "fp", "fn", "tn",
    "prevalence", <rate>: value, "intervals": {<rate>: {low, high, n_valid}}}}}. A rate whose
    denominator is 0 (no positive rows for sensitivity, nothing predicted positive for PPV) is NaN.
    """
    truth, decided, names = _decisions(y_true, proba, classes, task, threshold)
    rule = {"binary": f"probability of '{names[0]}' >= {threshold:.4g}", "multiclass": "the most probable class",
            "multilabel": f"each label's probability >= {threshold:.4g}"}[task]
    tp, fp = (truth * decided).sum(0), ((1 - truth) * decided).sum(0)
    fn, tn = (truth * (1 - decided)).sum(0), ((1 - truth) * (1 - decided)).sum(0)
    point = _rates(tp, fp, fn, tn)
    boot = {r: [] for r in RATES}
    if n_resamples:
        y_index = truth[:, 0] if task == "binary" else (truth.argmax(1) if task == "multiclass" else truth)
        for w in resample_weights(y_index, groups, n_resamples, seed):
            btp, bfp = w @ (truth * decided), w @ ((1 - truth) * decided)
            bfn, btn = w @ (truth * (1 - decided)), w @ ((1 - truth) * (1 - decided))
            for r, v in _rates(btp, bfp, bfn, btn).items():
                boot[r].append(v)
    out = {"rule": rule, "threshold": float(threshold) if task != "multiclass" else None,
           "unit": "group" if groups is not None else "row", "n_resamples": int(n_resamples), "n": int(len(truth)),
           "classes": {}}
    for j, name in enumerate(names):
        entry = {"tp": int(tp[j]), "fp": int(fp[j]), "fn": int(fn[j]), "tn": int(tn[j]),
                 "prevalence": float(truth[:, j].mean()) if len(truth) else float("nan")}
        entry.update({r: float(point[r][j]) for r in RATES})
        if n_resamples:
            entry["intervals"] = {r: percentile_interval(np.concatenate(boot[r])[:, j], level, n_resamples)
                                  for r in RATES}
        out["classes"][str(name)] = entry
    return out


# ---------------------------------------------------------------- net benefit


def net_benefit(truth, p, thresholds) -> np.ndarray:
    """Net benefit of treating rows with p >= pt, for each threshold probability pt."""
    truth, p = np.asarray(truth, dtype=np.float64), np.asarray(p, dtype=np.float64)
    pt = np.asarray(thresholds, dtype=np.float64)
    n = max(len(truth), 1)
    treat = p[None, :] >= pt[:, None]
    tp, fp = (treat * truth).sum(1) / n, (treat * (1 - truth)).sum(1) / n
    return tp - fp * pt / (1 - pt)


def decision_curve(y_true, proba, classes, task: str, thresholds=None) -> dict:
    """Net benefit vs threshold probability for the model, treat-all and treat-none (0), per column of
    _decisions (binary: the positive class; multiclass: one-vs-rest per class; multilabel: per label).
    Probabilities are the calibrated ones the model outputs: a threshold probability only means
    something where they are calibrated."""
    pts = np.round(np.arange(0.01, 1.0, 0.01), 4) if thresholds is None else np.asarray(thresholds, dtype=float)
    proba = np.asarray(proba, dtype=np.float64)
    truth, _, names = _decisions(y_true, proba, classes, task, 0.5)
    scores = proba[:, 1:2] if task == "binary" and proba.ndim == 2 else (proba[:, None] if proba.ndim == 1
                                                                         else proba)
    curves = {}
    for j, name in enumerate(names):
        prev = float(truth[:, j].mean()) if len(truth) else float("nan")
        curves[str(name)] = {"model": net_benefit(truth[:, j], scores[:, j], pts).round(6).tolist(),
                             "treat_all": (prev - (1 - prev) * pts / (1 - pts)).round(6).tolist(),
                             "prevalence": prev}
    return {"thresholds": pts.tolist(), "treat_none": 0.0, "classes": curves}


def useful_range(curve: dict) -> list[float] | None:
    """[lowest, highest] threshold probability where the model's net benefit beats both treat-all and
    treat-none, or None where it never does."""
    pts = np.asarray(curve["thresholds"])
    out = None
    for c in curve["classes"].values():
        better = (np.asarray(c["model"]) > np.maximum(np.asarray(c["treat_all"]), 0) + 1e-9)
        if better.any():
            lo, hi = float(pts[better].min()), float(pts[better].max())
            out = [lo, hi] if out is None else [min(out[0], lo), max(out[1], hi)]
    return out


# ---------------------------------------------------------------- prevalence and chance


def prevalence(y, classes, task: str) -> dict:
    """{class: share of rows, "n": rows} (multilabel: share of rows with each label)."""
    y = np.asarray(y)
    n = int(len(y))
    if task == "multilabel":
        shares = (y.astype(float).mean(0) if n else np.full(len(classes), np.nan)).tolist()
        return {**{str(c): float(s) for c, s in zip(classes, shares)}, "n": n}
    values = [str(v) for v in y.tolist()]
    return {**{str(c): (values.count(str(c)) / n if n else float("nan")) for c in classes}, "n": n}


def chance_levels(y_true, classes, task: str) -> dict:
    """What a rule that ignores the inputs scores on these rows (the number a test score must beat):
    accuracy of always answering the majority class; macro- and weighted-F1 of the best of three
    uninformed rules (always the majority class, guessing at the class shares, guessing uniformly);
    AUROC 0.5. Multilabel: per-label majority for subset accuracy is left out (no single rule)."""
    share = prevalence(y_true, classes, task)
    p = np.array([share[str(c)] for c in classes], dtype=np.float64)
    if task == "multilabel":
        return {"auroc": 0.5, "note": "AUROC 0.5 is chance; F1 and accuracy depend on each label's share"}
    present = p[p > 0]
    k = len(present)
    top = present.max()
    f1_majority = np.array([2 * q / (1 + q) if q == top else 0.0 for q in present])
    f1_shares = present  # guessing each class at its own share: F1_c = p_c
    f1_uniform = 2 * present * (1 / k) / (present + 1 / k)
    macro = max(f1_majority.mean(), f1_shares.mean(), f1_uniform.mean())
    weighted = max((present * f1_majority).sum(), (present * f1_shares).sum(), (present * f1_uniform).sum())
    majority = str(classes[int(np.argmax(p))])
    return {"accuracy": float(top), "macro_f1": float(macro), "weighted_f1": float(weighted), "auroc": 0.5,
            "majority_class": majority,
            "note": f"accuracy: always '{majority}' (the majority baseline); F1: the best rule that ignores the "
                    f"inputs (always the majority class, or guessing at the class shares or uniformly); AUROC 0.5"}


def chance_verdict(interval: dict | None, chance: float | None) -> str | None:
    """'above' when the interval's low end is above chance, 'covers' when the interval includes it, 'below'
    when its high end is below it; None when either is unknown."""
    if not interval or chance is None:
        return None
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None or any(isinstance(v, float) and math.isnan(v) for v in (low, high)):
        return None
    return "above" if low > chance else ("below" if high < chance else "covers")


def intervals_disagree(a: dict | None, b: dict | None) -> bool:
    """True when two 95% intervals ({low, high}) of independent row sets (validation, test) say the two values
    differ: the 95% interval of their difference excludes 0. Each interval's width gives its standard error
    (width / 3.92, the normal approximation of a percentile interval); the centres stand for the values.
    Stricter than "the intervals do not overlap", which misses differences two overlapping intervals show."""
    if not a or not b:
        return False
    vals = [a.get("low"), a.get("high"), b.get("low"), b.get("high")]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
        return False
    se = math.hypot((a["high"] - a["low"]) / 3.92, (b["high"] - b["low"]) / 3.92)
    diff = (a["high"] + a["low"]) / 2 - (b["high"] + b["low"]) / 2
    return abs(diff) > 1.96 * se if se > 0 else diff != 0


def banners(metrics: dict) -> list[dict]:
    """Sentences a reader must see before any number, from a metrics.json (train's, or any dict with
    "test", "bootstrap" and optionally "bootstrap_val", "val", "clinical"):

    - kind "chance": a test interval that covers (or lies below) chance or the majority baseline:
      the honest reading is "cannot tell";
    - kind "disagree": validation and test differ beyond their intervals (intervals_disagree: the split,
      the choices made on validation, or a shift between the two);
    - kind "resamples": intervals from resamples that lacked a class.
    Each: {"kind", "title", "metric", "message"}. [] when none applies or there are no intervals.
    """
    out = []
    boot = (metrics.get("bootstrap") or {}).get("metrics") or {}
    chance = ((metrics.get("clinical") or {}).get("chance") or {}).get("test") or {}
    test = metrics.get("test") or {}
    unit = (metrics.get("bootstrap") or {}).get("unit", "row")
    at_chance = []
    for k in CHANCE_METRICS:
        verdict = chance_verdict(boot.get(k), chance.get(k))
        if verdict in ("covers", "below"):
            b = boot[k]
            at_chance.append(f"{k} {_f(test.get(k))} [{_f(b['low'])}, {_f(b['high'])}] "
                             f"{'includes' if verdict == 'covers' else 'is below'} {_f(chance[k])}")
    if at_chance:
        out.append({"kind": "chance", "title": "Cannot tell", "metric": ", ".join(a.split(" ")[0] for a in at_chance),
                    "message": "the test intervals include what a model that learnt nothing scores, so whether "
                               "this model beats chance is unknown: " + "; ".join(at_chance)
                               + " (" + chance.get("note", "chance level") + ")."})
    val_boot = (metrics.get("bootstrap_val") or {}).get("metrics") or {}
    val = metrics.get("val") or {}
    for k in ("macro_f1", "auroc"):
        if intervals_disagree(boot.get(k), val_boot.get(k)):
            out.append({"kind": "disagree", "title": "Validation and test disagree", "metric": k,
                        "message": f"the difference is beyond their intervals: {k} validation "
                                   f"{_f(val.get(k))} [{_f(val_boot[k]['low'])}, {_f(val_boot[k]['high'])}] vs test "
                                   f"{_f(test.get(k))} [{_f(boot[k]['low'])}, {_f(boot[k]['high'])}]. Choices made on "
                                   f"validation may not carry over, or the two splits differ (time, site, patients)."})
    lacking = (metrics.get("bootstrap") or {}).get("resamples_lacking_a_class")
    if lacking:
        n = (metrics.get("bootstrap") or {}).get("n_resamples")
        out.append({"kind": "resamples", "title": "Few cases", "metric": "macro_f1",
                    "message": f"{lacking} of {n} bootstrap resamples of the test {unit}s lacked a class "
                               f"(scored 0 for it): the test set holds very few of that class."})
    return out


def _f(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


# ---------------------------------------------------------------- one call from train


def clinical_summary(y_by_split: dict, test_proba, classes, task: str, threshold: float, test_groups=None,
                     n_resamples: int = 1000, seed: int = 0) -> dict:
    """metrics.json's "clinical": prevalence per split, chance levels of the test and validation rows, the
    operating point on the test rows with intervals, and the decision curve on them."""
    classes = list(np.asarray(classes).tolist())
    test_y = y_by_split["test"]
    return {
        "prevalence": {k: prevalence(v, classes, task) for k, v in y_by_split.items()},
        "chance": {k: chance_levels(y_by_split[k], classes, task) for k in ("val", "test") if k in y_by_split},
        "operating_point": operating_point(test_y, test_proba, classes, task, threshold, test_groups,
                                           n_resamples=n_resamples, seed=seed),
        "decision_curve": decision_curve(test_y, test_proba, classes, task),
        "rows": "test rows of the saved model (run 0), scored once",
    }


def add_clinical_metrics(metrics: dict, y_by_split: dict, val_proba, test_proba, raw_test_proba, classes, task: str,
                         threshold: float, groups_by_split: dict | None, n_resamples: int, seed: int) -> None:
    """Add to a train metrics.json: "clinical" (clinical_summary), "bootstrap_val" (the validation interval
    the disagreement banner compares with) and test ECE intervals before and after temperature scaling
    (calibration.ece_interval). Intervals only with n_resamples > 0."""
    g = groups_by_split or {}
    metrics["clinical"] = clinical_summary(y_by_split, test_proba, classes, task, threshold, g.get("test"),
                                           n_resamples=n_resamples, seed=seed)
    if not n_resamples:
        return
    metrics["bootstrap_val"] = bootstrap_metrics(y_by_split["val"], val_proba, classes, task, threshold, g.get("val"),
                                                 n_resamples, seed)
    before = bootstrap_metrics(y_by_split["test"], raw_test_proba, classes, task, threshold, g.get("test"),
                               n_resamples, seed)
    metrics["calibration"]["ece_interval"] = {"test_before": before["metrics"]["ece"],
                                              "test_after": metrics["bootstrap"]["metrics"]["ece"]}
