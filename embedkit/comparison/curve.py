"""Label efficiency: would more labelled cases help? The best few configurations on nested shares of the
training groups, the test rows unchanged, and a learning curve fitted to them.

Error against training size follows an inverse power law, err(n) = a n^-b + c (Figueroa et al.
2012), with n the number of labelled training groups (patients) and c the error more data of this
kind would not remove. The fit is refitted on bootstrap replicates (test groups resampled as
everywhere in a comparison, subsample seeds resampled within each size), which gives the interval of
"about N groups for a score of X". It is an extrapolation and says so; when the largest size scores
no better than the smallest (a paired interval covering 0), or the power law does not describe
the points, the answer is "cannot tell".
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from embedkit.fusion.paired import interval, paired_difference, replicates

FIT_BOOTSTRAP = 200  # refits for the interval of the extrapolation
MIN_R2 = 0.5  # below this the power law does not describe the points: no extrapolation


def nested_subsets(y, groups, train_rows: np.ndarray, fractions, seed: int) -> list[np.ndarray]:
    """Training rows at each fraction of the training groups, nested (each contains the smaller ones),
    drawn per class so every class keeps at least one group."""
    rows = np.asarray(train_rows)
    g = np.array([f"r{i}" for i in rows], dtype=object) if groups is None else np.asarray(groups, dtype=object)[rows]
    labels = np.asarray(y, dtype=object)[rows]
    first_label = {}
    for gi, lab in zip(g, labels):
        first_label.setdefault(gi, str(lab))
    rng = np.random.default_rng(seed)
    order_per_class = {}
    for gi, lab in first_label.items():
        order_per_class.setdefault(lab, []).append(gi)
    for lab in order_per_class:
        order_per_class[lab] = [order_per_class[lab][i] for i in rng.permutation(len(order_per_class[lab]))]
    out = []
    for f in sorted(fractions):
        chosen = set()
        for gs in order_per_class.values():
            chosen.update(gs[:max(1, math.ceil(f * len(gs)))])
        out.append(np.sort(rows[np.array([gi in chosen for gi in g], dtype=bool)]))
    return out


def power_law(n, a, b, c):
    return a * np.power(n, -b) + c


def fit_power_law(n: np.ndarray, err: np.ndarray, start: dict | None = None) -> dict | None:
    """Least-squares fit of err = a n^-b + c (a >= 0, 0 <= b <= 3, 0 <= c <= 1); None when it fails.
    `start`: a fit to start from (a refit on a bootstrap replicate starts at the point fit)."""
    import warnings

    from scipy.optimize import OptimizeWarning, curve_fit

    n, err = np.asarray(n, dtype=np.float64), np.asarray(err, dtype=np.float64)
    ok = np.isfinite(err)
    n, err = n[ok], err[ok]
    if len(np.unique(n)) < 3:
        return None
    lo, hi = err[n == n.min()].mean(), err[n == n.max()].mean()
    p0 = ((start["a"], min(max(start["b"], 1e-6), 3 - 1e-6), min(max(start["c"], 0.0), 1.0)) if start else
          (max(lo - hi, 1e-3) * n.min() ** 0.5, 0.5, max(min(hi * 0.8, 0.99), 0.0)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            (a, b, c), _ = curve_fit(power_law, n, err, p0=p0, bounds=([0, 0, 0], [np.inf, 3, 1]), maxfev=5000)
    except (RuntimeError, ValueError):
        return None
    means = {x: err[n == x].mean() for x in np.unique(n)}
    xs = np.array(sorted(means))
    ys = np.array([means[x] for x in xs])
    ss_tot = float(((ys - ys.mean()) ** 2).sum())
    ss_res = float(((ys - power_law(xs, a, b, c)) ** 2).sum())
    return {"a": float(a), "b": float(b), "c": float(c), "r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")}


def groups_for_error(fit: dict, err_target: float) -> float:
    """n where the fitted error reaches err_target; inf where the curve levels off above it."""
    if fit["a"] <= 0 or fit["b"] <= 0 or err_target <= fit["c"]:
        return math.inf
    return float(((err_target - fit["c"]) / fit["a"]) ** (-1.0 / fit["b"]))


def label_efficiency(cfg, rows: list[dict], grid, shared, splits: list[dict], seeds: list[int], weights, out: Path) -> dict:
    """The curve of the best `cfg.curve_top` configurations on run 0's split; their points, fits and verdicts."""
    from embedkit.comparison.data import dataset_for
    from embedkit.comparison.runner import train_config
    from embedkit.console import progress_bar

    metric = cfg.metric
    by_name = {c.name: c for c in grid}
    top = [r for r in rows if r["status"] == "ok" and r["fusion"] not in ("majority", "chance")][:cfg.curve_top]
    idx0, w0 = splits[0], weights[0]
    fractions = sorted(set(cfg.curve_fractions) | {1.0})
    subsets = [nested_subsets(shared.ref.y, shared.groups, idx0["train"], fractions, cfg.seed + 100 + k)
               for k in range(cfg.curve_seeds)]
    n_groups = [len(_groups(shared, s)) for s in subsets[0]]
    best_point = top[0][metric] if top else float("nan")
    target = cfg.target if cfg.target is not None else min(best_point + 0.05, 0.99)
    out_dir = out / "curve"
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = []
    with progress_bar(cfg.progress) as bar:
        task = bar.add_task("label efficiency", total=len(top) * len(fractions) * cfg.curve_seeds, rate="")
        for r in top:
            conf = by_name[r["config"]]
            ds = dataset_for(conf, shared, cfg.label)
            tcfg = train_config(cfg, conf.fusion, conf.align)
            cache = out_dir / f"{conf.slug}.json"
            key = hashlib.sha256(json.dumps([conf.name, fractions, cfg.curve_seeds, cfg.seed, repr(tcfg),
                                             [len(s) for s in subsets[0]], seeds[0], r.get("n_test")]).encode()).hexdigest()[:20]
            stored = _read(cache, key)
            reps, points = {}, stored or []
            if not stored:
                from embedkit.train import run_once

                for fi, f in enumerate(fractions):
                    for k in range(cfg.curve_seeds):
                        idx = {"train": subsets[k][fi], "val": idx0["val"], "test": idx0["test"]}
                        run = run_once(ds, tcfg, conf.modalities, idx, seeds[0] + k)
                        points.append({"fraction": f, "seed": k, "groups": n_groups[fi],
                                       "score": float(run.metrics["test"].get(metric, float("nan"))),
                                       "proba": np.asarray(run.test_proba).round(8).tolist(),
                                       "classes": [c.item() if hasattr(c, "item") else c for c in run.est.classes_],
                                       "task": run.est.task_, "threshold": float(run.calibration["threshold"])})
                        bar.update(task, advance=1, rate=conf.name)
                cache.write_text(json.dumps({"key": key, "points": points}))
            else:
                bar.update(task, advance=len(fractions) * cfg.curve_seeds)
            y_test = shared.ref.y[idx0["test"]]
            for p in points:
                reps[(p["fraction"], p["seed"])] = replicates(y_test, np.asarray(p["proba"]), p["classes"], p["task"],
                                                              p["threshold"], w0, metric)
            configs.append(summarise_curve(conf.name, points, reps, fractions, n_groups, cfg.curve_seeds, target, metric))
    verdicts = [c["verdict"] for c in configs]
    return {"target": target, "metric": metric, "fractions": fractions, "groups": n_groups,
            "seeds": cfg.curve_seeds, "configs": configs, "verdict": verdicts[0] if verdicts else None,
            "note": (f"run 0's split: its validation and test rows unchanged; training groups subsampled per class, "
                     f"nested, {cfg.curve_seeds} subsample seeds; intervals: paired bootstrap over the test groups")}


def _groups(shared, rows) -> set:
    if shared.groups is None:
        return set(np.asarray(rows).tolist())
    return set(shared.groups[rows].tolist())


def _read(path: Path, key: str) -> list | None:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored.get("points") if isinstance(stored, dict) and stored.get("key") == key else None


def summarise_curve(name: str, points: list[dict], reps: dict, fractions, n_groups, n_seeds: int, target: float,
               metric: str) -> dict:
    """Per size: mean over seeds with its interval; the fit, its bootstrap and the verdict in words."""
    from embedkit.comparison.report import NAMES

    label = NAMES.get(metric, metric)
    summary, mean_reps = [], {}
    for f, g in zip(fractions, n_groups):
        scores = [p["score"] for p in points if p["fraction"] == f]
        mean_reps[f] = np.mean([reps[(f, k)] for k in range(n_seeds)], axis=0)
        low, high, _ = interval(mean_reps[f])
        summary.append({"fraction": f, "groups": g, "mean": float(np.mean(scores)), "low": low, "high": high,
                        "seed_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else float("nan"),
                        "seeds": len(scores)})
    small, full = summary[0], summary[-1]
    gain = paired_difference(mean_reps[fractions[-1]], mean_reps[fractions[0]], full["mean"], small["mean"])
    n_all = np.array([p["groups"] for p in points], dtype=np.float64)
    err_all = np.array([1 - p["score"] for p in points])
    fit = fit_power_law(n_all, err_all)
    out = {"config": name, "points": summary, "gain_full_vs_smallest": gain, "fit": fit}
    if gain["verdict"] != "better":
        out["verdict"] = (f"cannot tell: {full['groups']} training groups scored no better than {small['groups']} "
                          f"({label} difference {gain['delta']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]); "
                          f"more labels of this kind may not help, or this test set is too small to show it")
        return out
    if fit is None or not (np.isfinite(fit["r2"]) and fit["r2"] >= MIN_R2):
        out["verdict"] = (f"cannot tell: a power law does not describe these points (R² "
                          f"{fit['r2'] if fit else float('nan'):.2f}); no extrapolation")
        return out
    fit["ok"] = True
    err_target = 1 - target
    n_point = groups_for_error(fit, err_target)
    boot = _bootstrap_fit(points, reps, err_target, n_seeds, fit)
    # no interpolation between order statistics: an unbounded refit (inf) must stay inf, never inf - inf
    lo, hi = (np.quantile(boot, [0.025, 0.975], method="inverted_cdf") if len(boot) else (math.nan, math.nan))
    fit.update(n_target=n_point if math.isfinite(n_point) else None, n_target_low=float(lo),
               n_target_high=float(hi) if math.isfinite(hi) else None, refits=len(boot),
               plateau=1 - fit["c"], at_double=float(1 - power_law(2 * full["groups"], fit["a"], fit["b"], fit["c"])))
    if not math.isfinite(n_point):
        out["verdict"] = (f"the fitted curve levels off at {label} {1 - fit['c']:.3f}: {target:.3f} is not reachable "
                          f"with more labels of this kind according to this fit (an extrapolation)")
    elif not math.isfinite(hi):
        out["verdict"] = (f"cannot tell how many: the point fit says about {n_point:.0f} labelled groups for {label} "
                          f"{target:.3f} (against {full['groups']} now), but its 95% interval runs from {lo:.0f} to "
                          f"unbounded (refits where the curve levels off below {target:.3f}); an extrapolation")
    else:
        out["verdict"] = (f"about {n_point:.0f} labelled groups (95% interval {lo:.0f} to {hi:.0f}) for {label} "
                          f"{target:.3f}, against {full['groups']} now: an extrapolation of a power law fitted to "
                          f"{len(fractions)} sizes (R² {fit['r2']:.2f}), not a promise")
    return out


def _bootstrap_fit(points: list[dict], reps: dict, err_target: float, n_seeds: int, start: dict) -> np.ndarray:
    """Groups needed for the target on each refit: one test resample and the seeds resampled per size."""
    rng = np.random.default_rng(0)
    n_resamples = len(next(iter(reps.values())))
    fractions = sorted({p["fraction"] for p in points})
    groups = {p["fraction"]: p["groups"] for p in points}
    out = []
    for _ in range(FIT_BOOTSTRAP):
        j = rng.integers(n_resamples)
        n, err = [], []
        for f in fractions:
            for k in rng.integers(n_seeds, size=n_seeds):
                n.append(groups[f])
                err.append(1 - reps[(f, int(k))][j])
        fit = fit_power_law(np.array(n), np.array(err), start)
        if fit is not None:
            out.append(groups_for_error(fit, err_target))
    return np.array(out, dtype=np.float64)
