"""What a comparison leaves: leaderboard.csv, compare.json, report.html, and the lines it says.

The page and the lines say in words what the intervals say: "cannot tell" where the best
configuration is not distinguishable from chance, "indistinguishable" where a difference's interval
covers 0, and how many configurations were compared (the best of many is optimistic).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

NAMES = {"macro_f1": "macro-F1", "auroc": "AUROC", "accuracy": "accuracy", "weighted_f1": "weighted F1"}
COLUMNS = ("rank", "config", "image_model", "text_model", "fusion", "align", "status", "{m}", "{m}_low", "{m}_high",
           "{m}_std", "delta_vs_best", "delta_low", "delta_high", "verdict", "p_vs_best", "p_vs_best_holm",
           "vs_chance", "delta_vs_chance", "chance_low", "chance_high", "logistic_ref", "delta_vs_logistic",
           "logistic_low", "logistic_high", "verdict_vs_logistic", "macro_f1", "macro_f1_low", "macro_f1_high",
           "auroc", "auroc_low", "auroc_high", "accuracy", "accuracy_low", "accuracy_high", "n_test", "n_runs",
           "train_s", "predict_ms_per_case", "extract_s_per_item", "extract_peak_rss_mb", "peak_rss_mb", "peak_above_start_mb",
           "model_bytes", "stored_bytes", "reason")


def write_outputs(out: Path, result: dict):
    """leaderboard.csv, compare.json and report.html; returns the leaderboard DataFrame (summary in .attrs)."""
    import pandas as pd

    from embedkit.store import write_json_atomic

    metric = result["summary"]["metric"]
    order = list(dict.fromkeys(c.format(m=metric) for c in COLUMNS))
    df = pd.DataFrame(result["rows"])
    df = df[[c for c in order if c in df.columns] + [c for c in df.columns if c not in order]]
    for col in ("rank", "n_test", "n_runs", "model_bytes", "stored_bytes"):
        if col in df.columns:
            df[col] = df[col].round().astype("Int64")
    tmp = out / "leaderboard.csv.tmp"
    df.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(out / "leaderboard.csv")
    result["lines"] = summary_lines(result)
    write_json_atomic(out / "compare.json", _finite(result))
    page = out / "report.html.tmp"
    page.write_text(compare_html(result), encoding="utf-8")
    page.replace(out / "report.html")
    df.attrs["summary"] = result["summary"]
    df.attrs["lines"] = result["lines"]
    return df


def rewrite_report(folder: Path, out: Path | None = None) -> Path:
    """report.html of a finished comparison again, from its compare.json (`embedkit report CMP`)."""
    from embedkit.errors import EmbedkitError

    try:
        result = json.loads((Path(folder) / "compare.json").read_text())
    except (OSError, ValueError) as e:
        raise EmbedkitError(f"cannot read {Path(folder) / 'compare.json'} ({type(e).__name__})") from None
    out = Path(out) if out else Path(folder) / "report.html"
    out.write_text(compare_html(_nan(result)), encoding="utf-8")
    return out


def _nan(obj):
    """compare.json's nulls back to NaN where the page expects numbers."""
    if isinstance(obj, dict):
        return {k: (float("nan") if v is None and k.endswith(("_low", "_high")) else _nan(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan(v) for v in obj]
    return obj


def _finite(obj):
    """JSON has no NaN: undefined numbers are written as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def _iv(low, high) -> str:
    return f"[{low:.3f}, {high:.3f}]" if low is not None and np.isfinite(low) else "[n/a]"


def _signed_iv(d, low, high) -> str:
    return f"{d:+.3f} [{low:+.3f}, {high:+.3f}]" if low is not None and np.isfinite(low) else f"{d:+.3f} [n/a]"


def summary_lines(result: dict) -> list[str]:
    """The answer in words, one line each (the CLI prints them; the page shows them first)."""
    s, metric = result["summary"], result["summary"]["metric"]
    name = NAMES.get(metric, metric)
    runs = len(result["data"]["seeds"])
    unit = "groups" if "none" not in result["data"]["groups"] else "rows"
    lines = []
    best = s.get("best")
    if not best:
        return ["no configuration could be trained on this data (reasons in the leaderboard)"]
    lines.append(f"best: {best['config']}: {name} {best[metric]:.3f} {_iv(best[f'{metric}_low'], best[f'{metric}_high'])}"
                 f" (mean of {runs} run{'s' * (runs > 1)}; 95% paired bootstrap over test {unit})")
    if best.get("vs_chance") != "above chance":
        lines.append(f"CANNOT TELL whether anything works: the best configuration is not distinguishable from a "
                     f"predictor that ignores the input ({name} difference "
                     f"{_signed_iv(best['delta_vs_chance'], best['chance_low'], best['chance_high'])}); no "
                     f"configuration here can be shown to beat chance on these test rows")
    else:
        lines.append(f"the best configuration beats chance: {name} "
                     f"{_signed_iv(best['delta_vs_chance'], best['chance_low'], best['chance_high'])} over the "
                     f"stronger of the majority-class and stratified-chance predictors")
    if s["comparisons_with_best"]:
        same, worse = s["indistinguishable_from_best"], s["comparisons_with_best"] - s["indistinguishable_from_best"]
        lines.append(f"{same} of the {_n(s['comparisons_with_best'], 'other configuration')} "
                     f"{'is' if same == 1 else 'are'} indistinguishable from the best (paired interval covering 0); "
                     f"{worse} {'is' if worse == 1 else 'are'} worse")
    lines.append(f"{_n(s['configurations'], 'configuration')} compared: the best of many is optimistic (it was picked on "
                 f"these test rows); after Holm's correction over {_n(s['comparisons_with_best'], 'comparison')}, "
                 f"{s['distinguishable_after_holm']} {'differs' if s['distinguishable_after_holm'] == 1 else 'differ'} "
                 f"from the best")
    row = next(r for r in result["rows"] if r["config"] == best["config"])
    if row.get("verdict_vs_logistic") not in (None, "same"):
        lines.append(f"against the logistic baseline ({row['logistic_ref']}): {row['verdict_vs_logistic']}, "
                     f"{_signed_iv(row['delta_vs_logistic'], row['logistic_low'], row['logistic_high'])}")
    if s["not_run"]:
        lines.append(f"{_n(s['not_run'], 'configuration')} did not run (reasons in the leaderboard's reason column)")
    curve = result.get("curve") or {}
    if curve.get("verdict"):
        lines.append(f"label efficiency: {curve['verdict']}")
    lines += robustness_lines(result.get("robustness") or {}, metric)
    for r in (result.get("raw") or {}).get("rows", []):
        lines.append(f"{r['name']}: {name} {r[metric]:.3f} {_iv(r[f'{metric}_low'], r[f'{metric}_high'])}; against "
                     f"the embedding model {r['verdict']}, {_signed_iv(r['delta'], r['low'], r['high'])} (run 0); "
                     f"{r.get('vs_chance', 'not compared with chance')}")
    return lines


def robustness_lines(robustness: dict, metric: str) -> list[str]:
    """For the best configuration that sees both modalities: how it holds up with half its test rows missing each."""
    if not robustness:
        return []
    name, curves = next(iter(robustness.items()))
    said = []
    for modality, c in curves.items():
        half = min(c["points"], key=lambda p: abs(p["rate"] - 0.5))
        if "refused" in half:
            said.append(f"it refuses rows without {modality} (it never saw one missing: --modality-dropout 0.3 "
                        f"teaches it to cope)")
        else:
            iv = (half.get("intervals") or {}).get(metric if metric in half else "macro_f1") or {}
            score = half.get(metric, half["macro_f1"])
            said.append(f"with {modality} removed from {half['rate']:.0%} of its test rows: "
                        f"{NAMES.get(metric if metric in half else 'macro_f1')} {score:.3f} "
                        f"{_iv(iv.get('low'), iv.get('high'))}")
    return [f"robustness of {name} (run 0): " + "; ".join(said)]


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "s")


# ---------------------------------------------------------------------------------------------
# the page


def compare_html(result: dict) -> str:
    from embedkit.report import figure_png, html_page, html_table, png_img

    s, metric = result["summary"], result["summary"]["metric"]
    name = NAMES.get(metric, metric)
    rows = result["rows"]
    cannot_tell = (s.get("best") or {}).get("vs_chance") != "above chance"
    body = ["<h1>embedkit compare</h1>",
            f'<p class="note">{result["data"]["rows"]} rows shared by every configuration; groups: '
            f'{html.escape(result["data"]["groups"])}; {len(result["data"]["seeds"])} runs; test rows per run: '
            f'{", ".join(str(x["test"]) for x in result["data"]["splits"])}. Every configuration is scored on the '
            f"same test rows; every interval is a 95% paired bootstrap over the test groups.</p>"]
    if cannot_tell:
        body.append('<p style="background:#fde7e9;border-left:5px solid #b3261e;padding:8px;color:#222">'
                    "<b>Cannot tell.</b> The best configuration is not distinguishable from a predictor that ignores "
                    "the input. Nothing on this page shows that any configuration works on this data.</p>")
    body.append("<h2>The answer</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in result["lines"]) + "</ul>")
    table = [[r.get("rank"), r["config"], _cell(r.get(metric)), _iv(r.get(f"{metric}_low"), r.get(f"{metric}_high"))
              if r["status"] == "ok" else "", _delta(r), r.get("verdict", ""), r.get("vs_chance", ""),
              r.get("verdict_vs_logistic", ""), r.get("train_s"), r.get("extract_s_per_item"), r.get("peak_rss_mb"),
              r.get("reason", "")] for r in rows]
    body.append("<h2>Leaderboard</h2>" + html_table(
        ["rank", "configuration", name, "95% interval", "vs best (paired)", "verdict", "vs chance", "vs logistic",
         "train s", "extract s/item", "peak MB", "not run because"], table,
        f"{name}: mean over runs of the test score. 'vs best': the paired difference to the best configuration "
        f"and its 95% interval; indistinguishable = the interval covers 0."))
    figs = [("Paired differences", _forest(rows, metric, name)), ("Cost against score", _pareto(rows, metric, name))]
    curve = result.get("curve")
    if curve and curve.get("configs"):
        figs.append(("Label efficiency", _curve_figure(curve, name)))
    for title, fig in figs:
        if fig is not None:
            body.append(f"<h2>{title}</h2>" + png_img(figure_png(fig), title))
    if curve:
        body.append(_curve_table(curve, name, html_table))
    if result.get("robustness"):
        body.append("<h2>When a modality is missing</h2>" + _robustness_table(result["robustness"], html_table))
    if result.get("raw"):
        raw = result["raw"]
        body.append("<h2>Raw data through the encoders</h2>" + html_table(
            ["model", name, "95% interval", "vs embeddings (paired)", "vs chance", "s/epoch", "peak MB"],
            [[r["name"], _cell(r.get(metric)), _iv(r.get(f"{metric}_low"), r.get(f"{metric}_high")),
              _signed_iv(r["delta"], r["low"], r["high"]) if "delta" in r else "", r.get("vs_chance", ""),
              r.get("epoch_s"), r.get("peak_rss_mb")] for r in raw.get("rows", [])], raw.get("note", "")))
    ex = result.get("extraction") or {}
    if ex:
        body.append("<h2>Extraction</h2>" + html_table(
            ["encoder", "s/item", "peak MB", "stored MB", "note"],
            [[k, v.get("s_per_item"), v.get("peak_rss_mb"), round(v.get("stored_bytes", 0) / 2**20, 3),
              v.get("note", "")] for k, v in ex.items()]))
    return html_page("embedkit compare", "".join(body))


def _cell(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) and np.isfinite(v) else "-"


def _delta(r: dict) -> str:
    if r.get("verdict") == "best":
        return "(best)"
    if "delta_vs_best" not in r:
        return ""
    return _signed_iv(r["delta_vs_best"], r["delta_low"], r["delta_high"])


_COLOURS = {"best": "#1b5e20", "worse": "#b3261e", "indistinguishable": "#5f6368"}


def _forest(rows: list[dict], metric: str, name: str):
    ok = [r for r in rows if "delta_vs_best" in r]
    if not ok:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 0.35 * len(ok) + 1.4))
    ax = fig.add_subplot()
    for y, r in enumerate(reversed(ok)):
        colour = _COLOURS.get(r["verdict"], "#5f6368")
        lo, hi = r["delta_low"], r["delta_high"]
        if np.isfinite(lo):
            ax.plot([lo, hi], [y, y], color=colour, lw=2)
        ax.plot(r["delta_vs_best"], y, "o", color=colour)
    ax.axvline(0, color="#222", lw=1, ls=":")
    ax.set_yticks(range(len(ok)), [_short(r["config"]) for r in reversed(ok)], fontsize=8)
    ax.set_xlabel(f"{name} difference to the best configuration (paired 95% interval)")
    ax.set_title("red: worse than the best; grey: indistinguishable (interval covers 0)", fontsize=9)
    return fig


def _pareto(rows: list[dict], metric: str, name: str):
    pts = [r for r in rows if r["status"] == "ok" and r["fusion"] not in ("majority", "chance")
           and np.isfinite(r.get(metric, np.nan))]
    if not pts:
        return None
    from matplotlib.figure import Figure

    cost = [max((r.get("extract_s_per_item") or 0.0) + (r.get("predict_ms_per_case") or 0.0) / 1000, 1e-6)
            for r in pts]
    score = [r[metric] for r in pts]
    front = pareto_front(cost, score)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for i, r in enumerate(pts):
        ax.errorbar(cost[i], score[i], yerr=_yerr([score[i]], [r.get(f"{metric}_low")], [r.get(f"{metric}_high")]),
                    fmt="o",
                    color="#1b5e20" if i in front else "#5f6368", ms=6 if i in front else 4, capsize=2)
        if i in front:
            ax.annotate(_short(r["config"]), (cost[i], score[i]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    chain = sorted(front, key=lambda i: cost[i])
    ax.plot([cost[i] for i in chain], [score[i] for i in chain], color="#1b5e20", lw=1, ls="--", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per new case (extraction + prediction, this machine)")
    ax.set_ylabel(f"{name} (95% interval)")
    ax.legend(fontsize=8)
    return fig


def _yerr(points, lows, highs):
    """Error-bar lengths below and above each point; 0 where the interval is undefined or (a mean over runs
    against a percentile interval) does not straddle the point."""
    def gap(a, b):  # b - a, never negative
        ok = a is not None and b is not None and np.isfinite(a) and np.isfinite(b)
        return max(float(b) - float(a), 0.0) if ok else 0.0

    return [[gap(lo, p) for p, lo in zip(points, lows)], [gap(p, hi) for p, hi in zip(points, highs)]]


def pareto_front(cost: list[float], score: list[float]) -> set[int]:
    """Indices not dominated: no other point is at most as costly and at least as good, and better in one."""
    front = set()
    for i in range(len(cost)):
        if not any((cost[j] <= cost[i] and score[j] >= score[i]) and (cost[j] < cost[i] or score[j] > score[i])
                   for j in range(len(cost))):
            front.add(i)
    return front


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def _curve_figure(curve: dict, name: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    colours = ["#1b5e20", "#0d47a1", "#6a1b9a", "#e65100"]
    for k, c in enumerate(curve["configs"]):
        col = colours[k % len(colours)]
        n = [p["groups"] for p in c["points"]]
        m = [p["mean"] for p in c["points"]]
        err = _yerr(m, [p["low"] for p in c["points"]], [p["high"] for p in c["points"]])
        ax.errorbar(n, m, yerr=err, fmt="o-", color=col, capsize=3, label=_short(c["config"], 40))
        fit = c.get("fit") or {}
        if fit.get("ok"):
            xs = np.geomspace(min(n), max(max(n) * 4, fit.get("n_target") or 0, 1), 60)
            ax.plot(xs, 1 - (fit["a"] * xs ** (-fit["b"]) + fit["c"]), color=col, ls=":", lw=1)
    if curve.get("target") is not None:
        ax.axhline(curve["target"], color="#222", lw=0.8, ls="--", label=f"target {curve['target']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training groups (log scale); dotted: fitted power law, beyond the data an extrapolation")
    ax.set_ylabel(f"test {name} (95% interval)")
    ax.legend(fontsize=8)
    return fig


def _robustness_table(robustness: dict, html_table) -> str:
    rates = sorted({p["rate"] for curves in robustness.values() for c in curves.values() for p in c["points"]})
    rows = []
    for config, curves in robustness.items():
        for modality, c in curves.items():
            by_rate = {p["rate"]: p for p in c["points"]}
            rows.append([config, modality] + [_point(by_rate.get(r)) for r in rates])
    return html_table(["configuration", "removed"] + [f"{r:.0%} of rows" for r in rates], rows,
                      "Run 0's model as trained, its test rows with the modality removed from a growing share (nested); "
                      "macro-F1 with a 95% bootstrap interval over test groups, or 'refused' when the model never saw "
                      "that modality missing (compare --modality-dropout teaches it).")


def _point(p: dict | None) -> str:
    if p is None:
        return ""
    if "refused" in p:
        return "refused"
    iv = (p.get("intervals") or {}).get("macro_f1") or {}
    return f"{p['macro_f1']:.3f} {_iv(iv.get('low'), iv.get('high'))}"


def _curve_table(curve: dict, name: str, html_table) -> str:
    rows = []
    for c in curve.get("configs", []):
        for p in c["points"]:
            rows.append([c["config"], f"{p['fraction']:.0%}", p["groups"], _cell(p["mean"]), _iv(p["low"], p["high"]),
                         p.get("seeds")])
    text = "".join(f'<p class="note">{html.escape(c["config"])}: {html.escape(c.get("verdict", ""))}</p>'
                   for c in curve.get("configs", []))
    return html_table(["configuration", "share of training groups", "groups", name, "95% interval", "seeds"], rows,
                      curve.get("note", "")) + text
