"""`embedkit report RUN_DIR`: one self-contained HTML page a clinic can attach to an email.

RUN_DIR is a model folder from `embedkit train` (metrics.json) or a folder from `embedkit bench`
(bench.json). Everything is inline: CSS in the page, plots as base64 PNG data URIs; no scripts,
no external assets, so it opens the same offline, in a mail client or printed.

A model page: the model card (modelcard.py: banners when a test interval covers chance or
validation and test disagree, data, flow of rows, metrics with intervals, operating point,
calibration, limitations, TRIPOD+AI), then the plots and details, each saying which rows it was
computed on: per-class scores and the confusion matrix (test rows), the reliability diagram (the
model's test rows, or the rows of --emb it was neither fitted nor tuned on), the decision curve,
the alignment curve and gap plot when training wrote them, the learning curve, costs and the
configuration.
A bench page: the targets, every table and every plot of the run, the machine and its load.
An audit page (`embedkit audit --out DIR`): every finding of audit.json, the id lists capped at 50 rows.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path

import numpy as np

from embedkit.errors import EmbedkitError

_CSS = """
body{font:14px/1.45 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1000px;margin:24px auto;
padding:0 16px;color:#222}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:3px}
h3{font-size:14px;margin:16px 0 6px}table{border-collapse:collapse;margin:6px 0 4px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}.note{color:#555;font-size:12px;max-width:900px}
.banner{background:#fff4e5;border-left:5px solid #b35c00;padding:8px 12px;color:#222;max-width:900px}
.banner-chance{background:#fdecea;border-left-color:#b3261e}table.card td{text-align:left}
.met{color:#11772a;font-weight:600}.missed{color:#b3261e;font-weight:600}.muted{color:#777}
img{max-width:100%;height:auto;border:1px solid #eee;margin:6px 0}
table{display:block;max-width:100%;overflow-x:auto}td{overflow-wrap:break-word}
@media (max-width:600px){body{margin:12px auto;padding:0 10px;font-size:15px}h1{font-size:19px}
th,td{padding:3px 5px}table{font-size:13px}}
"""
# Phones: the viewport tag keeps a phone from laying the page out 980 px wide and shrinking it; a table
# wider than the screen scrolls inside itself (long values: paths, JSON), so the page never
# scrolls sideways.


def build_report(run_dir: str | Path, out: str | Path | None = None, emb: str | Path | None = None,
                 card: str | Path | None = None, class_names: dict | None = None) -> Path:
    """Write the report of a model or bench folder; returns the HTML file's path (default RUN_DIR/report.html).
    Model folders: `card` (a card.toml) and `class_names` ({"0": "no", ...}) override what train saved."""
    run_dir = Path(run_dir)
    if (run_dir / "bench.json").is_file():
        page = bench_html(json.loads((run_dir / "bench.json").read_text()), run_dir)
    elif (run_dir / "metrics.json").is_file():
        page = model_html(run_dir, Path(emb) if emb else None, card, class_names)
    elif (run_dir / "audit.json").is_file():
        page = audit_html(json.loads((run_dir / "audit.json").read_text()))
    else:
        raise EmbedkitError(f"'{run_dir}' is neither a model folder (metrics.json, from `embedkit train`), a "
                            f"bench folder (bench.json, from `embedkit bench`) nor an audit folder (audit.json, "
                            f"from `embedkit audit`)")
    out = Path(out) if out else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# HTML pieces


def fmt(v) -> str:
    """A number or value as a person reads it: 4 significant digits, '-' for missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _e(v) -> str:
    return html.escape(fmt(v))


def html_table(columns: list, rows: list[list], note: str = "") -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>" + (f'<p class="note">{html.escape(note)}</p>' if note else "")


def png_img(png: bytes | Path, alt: str) -> str:
    data = png.read_bytes() if isinstance(png, Path) else png
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _page(title: str, body: str) -> str:
    from embedkit import __version__

    footer = (f'<p class="muted">Written by embedkit {html.escape(__version__)} on '
              f'{time.strftime("%Y-%m-%d %H:%M")}. Self-contained: no scripts, no external files.</p>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{_CSS}</style></head><body>{body}{footer}</body></html>\n")


# ---------------------------------------------------------------------------------------------
# bench folders


def bench_markdown(r: dict) -> str:
    """bench.md: the same tables and plots as the HTML page, in Markdown."""
    m = r["machine"]
    lines = [f"# embedkit bench ({r['preset']})", "",
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
             f"fp32 matmul {m['matmul_gflops']} GFLOP/s; load average {m['load_average_start']} at the start, "
             f"{m['load_average_end']} at the end; {r['total_seconds']} s in all.", ""]
    if r["targets"]:
        lines += ["## Targets", "", "| target | measured | goal | met | note |", "|---|---|---|---|---|"]
        lines += [f"| {t['target']} | {fmt(t['measured'])} | {t['goal']} | {_met(t['met'])} | {t['note']} |"
                  for t in r["targets"]]
        lines.append("")
    section = None
    for t in r["tables"]:
        if t["section"] != section:
            section = t["section"]
            lines += [f"## {section}", ""]
        lines += [f"**{t['title']}**", "", "| " + " | ".join(map(str, t["columns"])) + " |",
                  "|" + "---|" * len(t["columns"])]
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in t["rows"]]
        lines += ["", t["note"], ""] if t["note"] else [""]
    lines += [f"![{p}]({p})" for p in r["plots"]]
    return "\n".join(lines) + "\n"


def _met(met) -> str:
    return "-" if met is None else ("met" if met else "missed")


def bench_html(r: dict, folder: Path) -> str:
    m = r["machine"]
    body = [f"<h1>embedkit bench ({html.escape(r['preset'])})</h1>",
            f'<p>{_e(m["cpu"])}, {_e(m["cores"])} cores, torch {_e(m["torch"])} ({_e(m["torch_threads"])} threads), '
            f'fp32 matmul {_e(m["matmul_gflops"])} GFLOP/s. Load average {_e(m["load_average_start"])} at the start, '
            f'{_e(m["load_average_end"])} at the end (more than {_e(m["cores"])} means other work shared the CPU). '
            f'Run {_e(r["created"])}, {_e(r["total_seconds"])} s.</p>']
    if r.get("targets"):
        rows = "".join(f"<tr><td>{_e(t['target'])}</td><td>{_e(t['measured'])}</td><td>{_e(t['goal'])}</td>"
                       f"<td class=\"{_met(t['met'])}\">{_met(t['met'])}</td><td>{_e(t['note'])}</td></tr>"
                       for t in r["targets"])
        body.append("<h2>Targets</h2><table><tr><th>target</th><th>measured</th><th>goal</th><th>met</th>"
                    f"<th>note</th></tr>{rows}</table>")
    section = None
    for t in r.get("tables", []):
        if t["section"] != section:
            section = t["section"]
            body.append(f"<h2>{html.escape(section)}</h2>")
        body.append(f"<h3>{html.escape(t['title'])}</h3>" + html_table(t["columns"], t["rows"], t["note"]))
    plots = [p for p in r.get("plots", []) if (folder / p).is_file()]
    if plots:
        body.append("<h2>Plots</h2>" + "".join(png_img(folder / p, p) for p in plots))
    return _page(f"embedkit bench {r['preset']}", "".join(body))


# ---------------------------------------------------------------------------------------------
# model folders


def model_html(folder: Path, emb: Path | None = None, card_path=None, class_names: dict | None = None) -> str:
    from embedkit.modelcard import Card, card_html, named

    card = Card.from_folder(folder, card_path, class_names)
    metrics, info = card.metrics, card.info
    spread = metrics["spread"]
    body = [card_html(card), "<h2>Plots and details</h2>"]
    body.append(_metrics_section(spread))
    body.append(_bootstrap_section(metrics))
    body.append(_subgroup_section(metrics.get("subgroups")))
    test = metrics["test"]
    classes = [named(c, card.names) for c in test.get("per_class", {})]
    n_test = test.get("n")
    if test.get("per_class"):
        body.append(f"<h2>Per class ({_e(n_test)} test rows of the saved model)</h2>" + html_table(
            ["class", "precision", "recall", "F1", "support"],
            [[named(c, card.names), s["precision"], s["recall"], s["f1"], s["support"]]
             for c, s in test["per_class"].items()]))
    body.append(_confusion_section(test.get("confusion_matrix"), classes, info.get("task"), n_test))
    body.append(_calibration_section(folder, metrics, info, emb))
    body.append(_decision_curve_section(metrics, card.names))
    if metrics.get("alignment"):
        a = metrics["alignment"]
        body.append("<h2>Modality-gap alignment</h2>"
                    f"<p>method {_e(a.get('method'))}, lambda = {_e(a.get('lambda'))}, input scale "
                    f"{_e(a.get('scale'))}"
                    + (f", chosen on {_e(a.get('selected_on'))}" if a.get("selected_on") else "") + ".</p>")
        if metrics.get("gap"):
            body.append(html_table(["statistic", "value"], [[k, v] for k, v in _flat(metrics["gap"]).items()],
                                   "Measured on the training rows of run 0."))
    for name, title in (("lambda_curve.png", "Alignment choice on validation rows"),
                        ("lambda_trajectory.png", "Learned lambda per epoch (training rows)"),
                        ("gap_pca.png", "Modality gap (PCA of the training rows)")):
        if (folder / name).is_file():
            body.append(f"<h3>{title}</h3>" + png_img(folder / name, name))
    curve = _learning_curve(folder)
    if curve:
        body.append("<h2>Learning curve (first run: training and validation rows)</h2>" + png_img(curve, "learning curve"))
    costs = _flat(metrics.get("costs", {}))
    body.append("<h2>Costs</h2>" + html_table(["cost", "value"], [[k, v] for k, v in costs.items()],
                                               "seconds, MB and bytes as measured by embedkit train"))
    cfg = metrics.get("config", {})
    body.append("<h2>Configuration</h2>" + html_table(["setting", "value"],
                                                       [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                                                        for k, v in cfg.items()]))
    return _page(f"embedkit model {folder.name}", "".join(body))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def _metrics_section(spread: dict) -> str:
    if spread["n_runs"] < 2:
        return ('<p class="note">One run: no spread over seeds or folds (train --seeds N or --cv K gives one).</p>')
    rows = []
    for k in ("accuracy", "macro_f1", "weighted_f1", "auroc", "ece"):
        s, v = spread["test"].get(k), spread["val"].get(k)
        if s is None:
            continue
        rows.append([k, f"{fmt(s['mean'])} ± {fmt(s['std'])}", f"[{fmt(s['ci95_low'])}, {fmt(s['ci95_high'])}]",
                     v["mean"] if v else None, f"{s['n_runs']} of {s.get('of_runs', spread['n_runs'])}"])
    return (f"<h2>Test metrics over {_e(spread['n_runs'])} {_e(spread['over'])}</h2>"
            + html_table(["metric", "test (mean ± std)", "95 % interval", "validation mean", "runs where defined"], rows,
                         "Model selection used the validation split only; the test split was scored once per run."))


def _bootstrap_section(metrics: dict) -> str:
    boot = metrics.get("bootstrap")
    if not boot:
        return ""
    rows = [[k, metrics["test"].get(k), f"[{fmt(b['low'])}, {fmt(b['high'])}]"] for k, b in boot["metrics"].items()]
    note = html.escape(boot.get("what", "")) + f" ({_e(boot.get('n_units'))} {_e(boot.get('unit'))}s, " \
        f"{_e(boot.get('n_resamples'))} resamples)."
    absent = metrics["test"].get("absent_classes")
    if absent:
        note += (" Classes absent from the test rows, not averaged into macro-F1: "
                 + html.escape(", ".join(map(str, absent))))
    return "<h2>Test metrics of the saved model, with bootstrap intervals</h2>" + html_table(
        ["metric", "test", "95 % bootstrap interval"], rows, note)


def _subgroup_section(subgroups: dict | None) -> str:
    if not subgroups:
        return ""
    rows = []
    for col, values in subgroups.items():
        for value, e in values.items():
            b = e["bootstrap"]["macro_f1"]
            rows.append([f"{col} = {value}", e["n"], e["metrics"]["accuracy"], e["metrics"]["macro_f1"],
                         f"[{fmt(b['low'])}, {fmt(b['high'])}]", "small: unreliable" if e["small"] else ""])
    return "<h2>Subgroups (test rows of the saved model)</h2>" + html_table(
        ["subgroup", "n", "accuracy", "macro-F1", "95 % bootstrap (macro-F1)", ""], rows,
        "Each subgroup's own test rows; a small subgroup's numbers can move a lot with a few patients.")


def text_color_on(rgb) -> str:
    """Black or white, whichever contrasts more with the background colour `rgb` (WCAG relative luminance):
    the contrast ratio is then at least 4.5 on any background."""
    def linear(c):
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgb[:3])
    lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def confusion_figure(cm, classes: list):
    """The confusion matrix as a heatmap; each count in black or white, whichever reads on its cell."""
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    fig = Figure(figsize=(1.6 + 0.7 * len(classes), 1.2 + 0.6 * len(classes)))
    ax = fig.add_subplot()
    image = ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):  # the text colour from the cell's own colour, not from its count
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color=text_color_on(image.cmap(image.norm(cm[i, j]))))
    names = [str(c).replace("$", r"\$") for c in classes]  # a label is text, never matplotlib math
    ax.set_xticks(range(len(classes)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return fig


def _confusion_section(cm, classes: list, task: str | None, n_test=None) -> str:
    if not cm:
        return ""
    if task == "multilabel":
        rows = [[c, *np.asarray(m).ravel().tolist()] for c, m in zip(classes, cm)]
        return (f"<h2>Confusion (per label, {_e(n_test)} test rows)</h2>"
                + html_table(["label", "TN", "FP", "FN", "TP"], rows))
    cm = np.asarray(cm)
    table = html_table(["true \\ predicted", *classes], [[c, *row] for c, row in zip(classes, cm.tolist())])
    fig = confusion_figure(cm, classes)
    ax = fig.axes[0]
    ax.set_title(f"{n_test} test rows of the saved model", fontsize=9)
    return (f"<h2>Confusion matrix ({_e(n_test)} test rows of the saved model)</h2>" + table
            + png_img(figure_png(fig), "confusion matrix"))


def _decision_curve_section(metrics: dict, names: dict) -> str:
    from embedkit.modelcard import named

    dc = (metrics.get("clinical") or {}).get("decision_curve")
    if not dc:
        return ""
    from matplotlib.figure import Figure

    pts = np.asarray(dc["thresholds"])
    figs = []
    for c, curve in dc["classes"].items():
        fig = Figure(figsize=(5.5, 3.6))
        ax = fig.add_subplot()
        ax.plot(pts, curve["model"], color="#1f4e9c", label="model")
        ax.plot(pts, curve["treat_all"], color="#b35c00", ls="--", label="treat all")
        ax.axhline(0, color="#444", ls=":", label="treat none")
        top = max(max(curve["model"]), curve["prevalence"], 0.05)
        ax.set_ylim(-0.1 * top - 0.02, top * 1.15)
        ax.set_xlabel("threshold probability")
        ax.set_ylabel("net benefit")
        ax.set_title(f"{named(c, names).replace('$', chr(92) + '$')}: {metrics['test'].get('n')} test rows", fontsize=9)
        ax.legend(fontsize=8)
        figs.append(png_img(figure_png(fig), f"decision curve {named(c, names)}"))
    return ("<h2>Decision curve (test rows)</h2><p class=\"note\">Net benefit = TP/N - FP/N x pt/(1 - pt) at "
            "threshold probability pt (Vickers and Elkin 2006), against treating every row and none; read it where "
            "the probabilities are calibrated.</p>" + "".join(figs))


def _calibration_section(folder: Path, metrics: dict, info: dict, emb: Path | None) -> str:
    ece = metrics["spread"]["test"].get("ece", {})
    cal = metrics.get("calibration") or {}
    spread = (f"{_e(ece.get('mean'))} ± {_e(ece.get('std'))} over {_e(ece.get('n_runs'))} runs"
              if (ece.get("n_runs") or 0) > 1 else f"{_e(metrics['test'].get('ece'))} on the test rows")
    head = (f"<h2>Calibration</h2><p>Expected calibration error (10 bins): {spread}; 0 means the predicted "
            f"confidence matches the accuracy.</p>")
    if cal:
        fitted = (cal.get("calibrated_on") or {}).get("note", "fitted on validation rows")
        head += (f"<p>Temperature {_e(cal.get('temperature'))} ({html.escape(fitted)}); decision threshold "
                 f"{_e(cal.get('threshold'))} ({html.escape(str(cal.get('threshold_rule')))}, chosen on validation "
                 f"rows); test ECE "
                 f"{_e(cal.get('ece_before', {}).get('test'))} before, {_e(cal.get('ece_after', {}).get('test'))} "
                 f"after temperature scaling.</p>")
    if emb is None and not (folder / "test_predictions.parquet").is_file():
        return head + ('<p class="note">For the reliability diagram, pass the labelled embeddings: '
                       "embedkit report MODEL --emb EMBEDDINGS.</p>")
    conf, correct, where = reliability_inputs(folder, emb, metrics)
    short = "the model's test rows (run 0)" if emb is None else f"unseen rows of {Path(emb).name}"
    return (head + f'<p class="note">Reliability diagram on {html.escape(where)}.</p>'
            + png_img(figure_png(reliability_figure(conf, correct, f"{short}, {len(conf)} predictions")),
                      "reliability diagram"))


def reliability_inputs(folder: Path, emb: Path | None, metrics: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """Confidence of each prediction and whether it was right: on the model's own test rows (written by
    train as test_predictions.parquet), or on the labelled rows of `emb` the model was neither fitted nor
    tuned on (rows of its training and validation splits are left out, and counted)."""
    import pyarrow.parquet as pq

    from embedkit.predict import evaluate, load_model

    _, info = load_model(folder)
    if emb is None:
        path, where = folder / "test_predictions.parquet", "the model's test rows (run 0)"
    else:
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="embedkit-report-")) / "rows.parquet"
        r = evaluate(folder, emb, exclude_fitted=True, rows_out=path)
        where = (f"rows of {Path(emb).name} the model was neither fitted nor tuned on "
                 f"({r['rows_left_out_as_fitted']} fitted or tuning rows left out)")
    t = pq.read_table(path).to_pydict()
    classes, threshold = info["classes"], (info.get("calibration") or {}).get("threshold", 0.5)
    if info["task"] == "multilabel":
        proba = np.column_stack([t[f"prob_{c}"] for c in classes])
        truth = np.column_stack([np.asarray(t[f"true_{c}"], dtype=float) for c in classes])
        keep = ~np.isnan(truth).any(1)
        pred = (proba >= threshold).astype(int)
        return (np.where(pred == 1, proba, 1 - proba)[keep].ravel(), (pred == truth)[keep].ravel(),
                f"{where}, {int(keep.sum())} labelled")
    proba = np.column_stack([t[f"prob_{c}"] for c in classes])
    truth_col = t.get(f"true_{info['labels'][0]}", [None] * len(proba))
    keep = np.array([v is not None for v in truth_col])
    pred = np.asarray([str(p) for p in t["predicted"]], dtype=object)
    conf = proba[np.arange(len(proba)), [list(map(str, classes)).index(p) for p in pred]]
    correct = pred == np.asarray([str(v) for v in truth_col], dtype=object)
    return conf[keep], correct[keep], f"{where}, {int(keep.sum())} labelled"


def reliability_figure(conf: np.ndarray, correct: np.ndarray, where: str, n_bins: int = 10):
    """Accuracy against mean confidence per equal-width bin (the bins ECE averages over)."""
    from matplotlib.figure import Figure

    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    mids, accs, counts = [], [], []
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            mids.append(conf[sel].mean())
            accs.append(correct[sel].mean())
            counts.append(int(sel.sum()))
    ax.bar(edges[:-1], [correct[bins == b].mean() if (bins == b).any() else 0 for b in range(n_bins)], width=1 / n_bins,
           align="edge", alpha=0.3, edgecolor="#1f77b4", label="accuracy per bin")
    ax.plot(mids, accs, "o-", color="#1f77b4")
    for x, a, c in zip(mids, accs, counts):
        ax.annotate(str(c), (x, a), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability on {where}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _learning_curve(folder: Path) -> bytes | None:
    meta = folder / "estimator.json"
    if not meta.is_file():
        return None
    history = json.loads(meta.read_text()).get("history") or []
    if len(history) < 2:
        return None
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    if history[0].get("val_loss") is not None:
        ax.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
        ax2 = ax.twinx()
        ax2.plot(epochs, [h["val_macro_f1"] for h in history], color="#2ca02c", label="validation macro-F1")
        ax2.set_ylabel("macro-F1")
        ax2.legend(fontsize=8, loc="center right")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8, loc="upper right")
    return figure_png(fig)


# ---------------------------------------------------------------------------------------------
# audit folders


def audit_html(r: dict, shown: int = 50) -> str:
    """The audit's findings: the summary, then one table per finding (the first `shown` ids of each list)."""
    from embedkit.audit import summary_lines

    body = [f"<h1>Data audit: {html.escape(str(r.get('embeddings', '')))}</h1>",
            '<pre style="white-space:pre-wrap">' + html.escape("\n".join(summary_lines(r))) + "</pre>"]
    for m, d in r["near_duplicates"].items():
        note = (f"cosine >= {fmt(d['threshold'])} ({d['threshold_source']}); {d['pairs']} pairs of distinct "
                f"contents, {d['across_splits']['pairs']} across splits and groups; the "
                f"{min(shown, len(d['listed']))} most similar (rows: how many rows hold that content)")
        if not d["listed"]:
            body.append(f"<h2>Near-duplicate {html.escape(m)}s</h2><p>None at cosine >= {_e(d['threshold'])} "
                        f"({html.escape(d['threshold_source'])}).</p>")
            continue
        body.append(f"<h2>Near-duplicate {html.escape(m)}s</h2>" + html_table(
            ["id a", "rows", "splits a", "id b", "rows", "splits b", "cosine", "across splits and groups"],
            [[p["a"], p["rows_a"], ", ".join(p["splits_a"]), p["b"], p["rows_b"], ", ".join(p["splits_b"]),
              p["cosine"], p["across_splits_and_groups"]] for p in d["listed"][:shown]], note))
    lk = r.get("leakage")
    if lk and (lk["rules"] or lk["label_words"]):
        body.append("<h2>Text leakage (training rows)</h2>" + html_table(
            ["token", "class", "precision / share", "rows"],
            [[x["token"], x["class"], x["precision"], x["rows"]] for x in lk["rules"]]
            + [[x["token"], x["class"], x["share"], x["rows"]] for x in lk["label_words"]]))
    for s, b in (r.get("balance") or {}).items():
        parts = b.get("classes") or b.get("positives") or {}
        body.append(f"<h3>Labels in split {html.escape(s)}</h3>" + html_table(
            ["class", "rows"], [[k, v] for k, v in parts.items()] + [["(unlabelled)", b["unlabelled"]]]))
    tiny = r["tiny"]
    if tiny["classes"] or tiny["subgroups"]:
        body.append("<h2>Tiny classes and subgroups</h2>" + html_table(
            ["where", "value", "rows"], [[f"split {t['split']}", t["class"], t["rows"]] for t in tiny["classes"]]
            + [[f"column {t['column']}", t["value"], t["rows"]] for t in tiny["subgroups"]][:shown]))
    for m, o in r["outliers"].items():
        if o["listed"]:
            body.append(f"<h2>Outlier {html.escape(m)}s</h2>" + html_table(
                ["ids", "splits", "distance"], [[", ".join(x["ids"][:3]) + (" ..." if len(x["ids"]) > 3 else ""),
                                                 ", ".join(x["splits"]), x["distance"]] for x in o["listed"][:shown]],
                o["rule"]))
    ln = r.get("label_noise")
    if ln and ln.get("listed"):
        body.append("<h2>Label-noise candidates</h2>" + html_table(
            ["id", "split", "label", "predicted", "P(label)"],
            [[x["id"], x["split"], x["label"], x["predicted"], x["self_confidence"]] for x in ln["listed"][:shown]],
            f"{ln['method']}. {ln['advice']}."))
    return _page("embedkit audit", "".join(body))
