"""Per-combination honesty: a model scored over all test rows together can be well calibrated on
complete rows and badly off on text-only rows, and nobody sees it. Here the test rows are split by
the modalities each really has (missing.combinations: "image+text", "image", "text"):

- combination_temperatures: one temperature per combination, fitted on that combination's own
  calibration rows by issue 25's rule (calibrate.choose_calibration_rows: validation rows when
  there are >= 200 with >= 20 per class, else pooled out-of-fold training rows, else none); a
  combination without enough rows keeps the shared temperature, with a warning that says so.
- combination_metrics: metrics with bootstrap intervals (whole groups resampled), ECE before any
  temperature, with the shared one and with the per-combination one, and the reliability data.

Nothing here sees a test row before the temperatures are fixed: they are fitted in train's run
on validation and out-of-fold training rows only.
"""

from __future__ import annotations

import numpy as np

from embedkit.fusion.calibrate import apply_temperature, choose_calibration_rows
from embedkit.fusion.evaluate import compute_metrics, reliability_bins, subgroup_metrics

SMALL_COMBINATION_ROWS = 30  # fewer test rows: the combination's point estimate is flagged unreliable


def combination_temperatures(task: str, val_proba, val_targets, val_combinations, train_targets=None,
                             train_combinations=None, out_of_fold=None, rule: str = "auto") -> dict:
    """{"by_combination": {combination: temperature}, "by_combination_fit": {combination: how}} for the
    combinations of the validation and training rows, or {} when they have one combination only.

    out_of_fold() -> (proba, targets, how, each row's combination) or None: the pooled out-of-fold
    predictions of the training rows, computed once (cached by the caller) and split by combination. A combination whose rows cannot
    carry a temperature keeps the shared one and is listed in `shared_for`, with a warning."""
    from embedkit.console import say

    val_combinations = np.asarray(val_combinations, dtype=object)
    train_combinations = np.asarray(train_combinations if train_combinations is not None else [], dtype=object)
    found = sorted(set(val_combinations.tolist()) | set(train_combinations.tolist()), key=_order)
    if len(found) < 2:
        return {}
    val_targets, by, fit, shared = np.asarray(val_targets), {}, {}, []
    for c in found:
        v = val_combinations == c

        def oof(c=c):
            made = out_of_fold() if out_of_fold is not None else None
            if made is None:
                return None
            proba, targets, how, combos = made
            keep = np.asarray(combos) == c
            return (proba[keep], targets[keep], how) if keep.any() else None

        fitted = choose_calibration_rows(task, np.asarray(val_proba)[v], val_targets[v],
                                         None if train_targets is None else np.asarray(train_targets)[
                                             train_combinations == c], oof, rule)
        if fitted["fitted_on"] is None:
            shared.append(c)
            why = fitted["note"].removeprefix("no temperature scaling: ").removesuffix(
                " (too few to fit one number that helps)")
            fit[c] = {"fitted_on": "shared", "rows": 0, "note": f"the shared temperature: {why}"}
        else:
            by[c] = float(fitted["temperature"])
            fit[c] = {k: fitted[k] for k in ("fitted_on", "rows", "note")}
    if shared:
        say("[yellow]warning:[/] " + "; ".join(f"{label(c)} rows are calibrated with the shared temperature ("
                                              f"{fit[c]['note'].removeprefix('the shared temperature: ')})"
                                              for c in shared)
            + ": too few rows of their own to fit one, and the shared one was fitted on every combination together")
    return {"by_combination": by, "by_combination_fit": fit, "shared_for": shared}


def combination_metrics(y_true, raw_proba, calibration: dict, classes, task: str, combinations, groups=None,
                        n_resamples: int = 1000, seed: int = 0) -> dict:
    """Per combination of the given (test) rows: n, n_groups, metrics with bootstrap intervals (as
    subgroup_metrics), `small` under SMALL_COMBINATION_ROWS, and calibration: ECE of the raw probabilities,
    with the shared temperature and as the model applies them (its per-combination temperature if any),
    and the reliability data of the latter."""
    combinations = np.asarray(combinations, dtype=object)
    threshold = calibration.get("threshold", 0.5)
    applied = apply_temperature(raw_proba, calibration, task, combinations)
    shared = apply_temperature(raw_proba, {"temperature": calibration.get("temperature", 1.0)}, task)
    out = subgroup_metrics(y_true, applied, classes, task, combinations, threshold, groups, n_resamples=n_resamples,
                           seed=seed, min_rows=SMALL_COMBINATION_ROWS)
    y_true = np.asarray(y_true)
    by = calibration.get("by_combination") or {}
    for c, entry in out.items():
        rows = combinations == c
        ece = lambda p: compute_metrics(y_true[rows], p[rows], classes, task, threshold)["ece"]  # noqa: E731
        entry["calibration"] = {"temperature": by.get(c, calibration.get("temperature", 1.0)),
                                "temperature_source": "this combination" if c in by else "shared",
                                "ece_uncalibrated": ece(raw_proba), "ece_shared_temperature": ece(shared),
                                "ece_applied": entry["metrics"]["ece"],
                                "reliability": reliability_bins(y_true[rows], applied[rows], classes, task, threshold)}
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def label(combination: str) -> str:
    """'image+text' -> 'both', 'text' -> 'text-only': how the tables name a combination."""
    return "both" if "+" in combination else f"{combination}-only" if combination else "none"


def _order(combination: str) -> tuple:
    return (-combination.count("+"), combination)


COMBINATION_COLUMNS = ("rows", "n", "macro-F1 [95%]", "ECE raw", "ECE shared T", "ECE applied", "temperature")


def combination_rows(by_combination: dict | None) -> list[list[str]]:
    """The per-combination table (COMBINATION_COLUMNS) as text cells, for the CLI, the report and the card;
    [] when the rows hold one combination only (the overall metrics say it all)."""
    if not by_combination or len(by_combination) < 2:
        return []
    out = []
    for c, e in by_combination.items():
        b, cal = e["bootstrap"]["macro_f1"], e["calibration"]
        span = f" [{b['low']:.3f}, {b['high']:.3f}]" if b["low"] == b["low"] else ""
        out.append([label(c) + (" (small: unreliable)" if e["small"] else ""), str(e["n"]),
                    f"{e['metrics']['macro_f1']:.3f}{span}", f"{cal['ece_uncalibrated']:.3f}",
                    f"{cal['ece_shared_temperature']:.3f}", f"{cal['ece_applied']:.3f}",
                    f"{cal['temperature']:.3f} ({'own' if cal['temperature_source'] != 'shared' else 'shared'})"])
    return out


def robustness_rows(curve: dict | None) -> list[list[str]]:
    """The robustness curve as text cells: rate, rows masked, macro-F1 [95%] (or the refusal)."""
    out = []
    for p in (curve or {}).get("points", []):
        if "refused" in p:
            out.append([f"{p['rate']:g}", str(p["rows_masked"]), "refused: " + p["refused"]])
            continue
        iv = (p.get("intervals") or {}).get("macro_f1")
        out.append([f"{p['rate']:g}", str(p["rows_masked"]),
                    f"{p['macro_f1']:.3f}" + (f" [{iv['low']:.3f}, {iv['high']:.3f}]" if iv else "")])
    return out
