"""The leaderboard: every configuration's score with its interval, and paired verdicts against the best
configuration, the logistic baseline and chance, all on the same test rows and the same resamples.

A configuration's score is the mean of its test metric over the runs (seeds or folds). Its interval
and every difference come from one paired bootstrap: for each run, the run's test groups are
resampled B times (fusion/paired.py), every configuration is scored on the same B resamples, and
replicate b of a configuration is the mean over runs of its score on resample b of each run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedkit.fusion.paired import holm, interval, paired_difference, paired_resamples, replicates, rows_key

SCORED = ("macro_f1", "auroc", "accuracy")  # metrics with intervals in the leaderboard


@dataclass
class Scored:
    """One configuration's result with what the paired statistics need."""

    result: dict
    probas: list[np.ndarray]  # per run, test probabilities in the run's test-row order

    @property
    def ok(self) -> bool:
        return self.result["status"] == "ok"


def shared_resamples(ref, groups, splits: list[dict], n_resamples: int, seed: int) -> list[np.ndarray]:
    """Per run, the (B, test rows) weights; runs whose test rows are the same share them."""
    by_key, out = {}, []
    for k, idx in enumerate(splits):
        key = rows_key(ref.ids[idx["test"]])
        if key not in by_key:
            g = None if groups is None else groups[idx["test"]]
            by_key[key] = paired_resamples(ref.y[idx["test"]], g, n_resamples, seed + 1009 * k)
        out.append(by_key[key])
    return out


def metric_replicates(scored: Scored, ref, splits: list[dict], weights: list[np.ndarray], metric: str) -> np.ndarray:
    """Replicate b = the mean over runs of the metric on resample b of that run's test rows."""
    per_run = [replicates(ref.y[idx["test"]], p, run["classes"], run["task"], run["threshold"], w, metric)
               for idx, p, run, w in zip(splits, scored.probas, scored.result["runs"], weights)]
    return np.mean(per_run, axis=0)


def point(scored: Scored, metric: str) -> float:
    values = [r["test"].get(metric, float("nan")) for r in scored.result["runs"]]
    return float(np.mean(values)) if values else float("nan")


def leaderboard(results: list[Scored], ref, splits: list[dict], weights: list[np.ndarray], metric: str,
                extract_costs: dict, level: float = 0.95) -> tuple[list[dict], dict]:
    """(rows best first, summary): scores with intervals, paired differences and verdicts, costs."""
    reps = {}
    for s in results:
        if s.ok:
            reps[id(s)] = {m: metric_replicates(s, ref, splits, weights, m) for m in dict.fromkeys((metric, *SCORED))}
    ok = [s for s in results if s.ok]
    models = [s for s in ok if s.result["fusion"] not in ("majority", "chance")]
    best = max(models, key=lambda s: point(s, metric), default=None)
    logistic = [s for s in models if s.result["fusion"] == "logistic"]
    chance = [s for s in ok if s.result["fusion"] in ("majority", "chance")]

    def diff(a: Scored, b: Scored) -> dict:
        return paired_difference(reps[id(a)][metric], reps[id(b)][metric], point(a, metric), point(b, metric), level)

    rows = []
    for s in results:
        r = s.result
        row = {"config": r["config"], "image_model": r["image_model"], "text_model": r["text_model"],
               "fusion": r["fusion"], "align": r["align"], "status": r["status"]}
        if s.ok:
            for m in dict.fromkeys((metric, *SCORED)):
                low, high, _ = interval(reps[id(s)][m], level)
                row.update({m: point(s, m), f"{m}_low": low, f"{m}_high": high})
            row[f"{metric}_std"] = float(np.std([x["test"].get(metric, np.nan) for x in r["runs"]], ddof=1)) \
                if len(r["runs"]) > 1 else float("nan")
            if best is not None:
                d = diff(s, best)
                row.update(delta_vs_best=d["delta"], delta_low=d["low"], delta_high=d["high"], p_vs_best=d["p"],
                           verdict="best" if s is best else d["verdict"])
            ref_logistic = _logistic_for(s, logistic, metric)
            if ref_logistic is not None and s.result["fusion"] not in ("majority", "chance"):
                d = diff(s, ref_logistic)
                row.update(logistic_ref=ref_logistic.result["config"], delta_vs_logistic=d["delta"],
                           logistic_low=d["low"], logistic_high=d["high"],
                           verdict_vs_logistic="same" if s is ref_logistic else d["verdict"])
            if s.result["fusion"] not in ("majority", "chance") and chance:
                row["vs_chance"] = chance_verdict([diff(s, c)["verdict"] for c in chance])
                strongest = max(chance, key=lambda c: point(c, metric))
                d = diff(s, strongest)
                row.update(delta_vs_chance=d["delta"], chance_low=d["low"], chance_high=d["high"])
            row.update(_cost_columns(r, extract_costs))
            row.update(n_test=int(np.mean([x["n_test"] for x in r["runs"]])), n_runs=len(r["runs"]))
        else:
            row["reason"] = r["status"].split(": ", 1)[-1]
        rows.append(row)
    _holm(rows)
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["status"] != "ok", -_finite(rows[i].get(metric))))
    rows = [rows[i] | {"rank": n + 1 if rows[i]["status"] == "ok" else None} for n, i in enumerate(order)]
    return rows, _summary(rows, best, metric, len(models), chance)


def chance_verdict(verdicts: list[str]) -> str:
    """Against every predictor that ignores the input (paired verdicts): above, below, or cannot tell."""
    return ("above chance" if all(v == "better" for v in verdicts) else
            "below chance" if all(v == "worse" for v in verdicts) else "cannot tell")


def _logistic_for(s: Scored, logistic: list[Scored], metric: str) -> Scored | None:
    """The logistic baseline on the same encoders, else the best logistic baseline."""
    same = [x for x in logistic if (x.result["image_model"], x.result["text_model"]) ==
            (s.result["image_model"], s.result["text_model"])]
    return (same or sorted(logistic, key=lambda x: -point(x, metric)) or [None])[0]


def _cost_columns(r: dict, extract_costs: dict) -> dict:
    enc = [extract_costs.get(k) or {} for k in (("image", r["image_model"]), ("text", r["text_model"])) if k[1]]
    c = r["costs"]
    return {"train_s": c.get("train_s"), "predict_ms_per_case": c.get("predict_ms_per_case"),
            "extract_s_per_item": _sum([e.get("s_per_item") for e in enc], 5) if enc else 0.0,
            "extract_peak_rss_mb": max((e.get("peak_rss_mb") or float("nan") for e in enc), default=0.0),
            "peak_rss_mb": c.get("peak_rss_mb"), "peak_above_start_mb": c.get("peak_above_start_mb"),
            "model_bytes": c.get("model_bytes"),
            "stored_bytes": int(sum(e.get("stored_bytes", 0) for e in enc))}


def _sum(values: list, digits: int) -> float:
    """A sum of measured figures; NaN when any was not measured (never a 0 that looks like a figure)."""
    return float("nan") if any(v is None for v in values) else round(float(sum(values)), digits)


def _holm(rows: list[dict]) -> None:
    """Holm-adjusted p-values of the comparisons with the best configuration (the best itself excluded)."""
    family = [i for i, r in enumerate(rows) if r.get("verdict") not in (None, "best") and
              r["fusion"] not in ("majority", "chance")]
    adjusted = holm([rows[i]["p_vs_best"] for i in family])
    for i, p in zip(family, adjusted):
        rows[i]["p_vs_best_holm"] = float(p)


def _finite(v) -> float:
    return float(v) if v is not None and np.isfinite(v) else -np.inf


def _summary(rows: list[dict], best, metric: str, n_models: int, chance: list) -> dict:
    top = next((r for r in rows if best is not None and r["config"] == best.result["config"]), None)
    compared = [r for r in rows if r.get("verdict") not in (None, "best") and r["fusion"] not in ("majority", "chance")]
    out = {"metric": metric, "configurations": n_models, "baselines": len(chance),
           "not_run": sum(r["status"] != "ok" for r in rows),
           "comparisons_with_best": len(compared),
           "indistinguishable_from_best": sum(r["verdict"] == "indistinguishable" for r in compared),
           "distinguishable_after_holm": sum(r.get("p_vs_best_holm", 1.0) < 0.05 for r in compared)}
    if top is not None:
        out["best"] = {k: top.get(k) for k in ("config", metric, f"{metric}_low", f"{metric}_high", "vs_chance",
                                               "delta_vs_chance", "chance_low", "chance_high")}
    return out
