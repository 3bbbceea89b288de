"""The fitting and scoring commands: train, predict, evaluate, gap, zeroshot. Plain functions with typer
options; cli.py registers them on the app (this module does not import cli.py). No torch at import time."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from embedkit.cli_common import chosen_models, switch


# Option panels of `train --help`: one table each, so each table's columns fit 80 columns of terminal.
_FIT, _ALIGN, _SCORE, _CHECK = "Classifier", "Modality alignment", "Splits and scoring", "Data checks"


def train(
    emb: Path = typer.Argument(..., help="An `embedkit extract` output folder."),
    label: List[str] = typer.Option(..., help="Label column; repeat for multilabel (0/1 columns)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write."),
    image_model: Optional[str] = typer.Option(None, help="Which image embeddings, if several were extracted."),
    text_model: Optional[str] = typer.Option(None, help="Which text embeddings, if several were extracted."),
    fusion: str = typer.Option("late", rich_help_panel=_FIT, help="early, late, gated, attention, lowrank, image, text "
                                                                  "or logistic."),
    hidden_dim: int = typer.Option(128, rich_help_panel=_FIT, help="Early fusion hidden width."),
    late_hidden_dim: int = typer.Option(64, rich_help_panel=_FIT, help="Late fusion per-modality width."),
    dropout: float = typer.Option(0.0, rich_help_panel=_FIT),
    epochs: int = typer.Option(30, rich_help_panel=_FIT),
    lr: float = typer.Option(1e-3, rich_help_panel=_FIT),
    batch_size: int = typer.Option(64, rich_help_panel=_FIT),
    weight_decay: float = typer.Option(0.01, rich_help_panel=_FIT),
    patience: Optional[int] = typer.Option(None, rich_help_panel=_FIT,
                                           help="Stop after this many epochs without validation gain."),
    align: Optional[str] = typer.Option(None, rich_help_panel=_ALIGN,
                                        help="Fitted on training rows: none (L2-normalise only), shift, center or "
                                             "standardize."),
    align_lambda: Optional[float] = typer.Option(None, rich_help_panel=_ALIGN,
                                                 help="Gap shift lambda (1 closes the gap between means); implies "
                                                      "--align shift."),
    align_sweep: Optional[str] = typer.Option(None, rich_help_panel=_ALIGN,
                                              help="Candidates chosen on validation in each run, e.g. "
                                                   "'shift:0:1:0.5, center, none' or '-1:1:0.5' (lambdas)."),
    scale: Optional[str] = typer.Option(None, rich_help_panel=_ALIGN,
                                        help="standard or none (default: none when aligning, else standard)."),
    noise_std: float = typer.Option(0.0, rich_help_panel=_ALIGN,
                                    help="Training-only Gaussian noise, in units of each feature's training std."),
    modality_dropout: float = typer.Option(0.0, min=0.0, max=1.0, rich_help_panel=_ALIGN,
                                           help="Share of training rows with image or text masked at random "
                                                "(with --align: replaced by its stand-in)."),
    threshold: str = typer.Option("val-f1", rich_help_panel=_SCORE,
                                  help="Binary decision threshold: val-f1 (chosen on validation), 0.5 or a number."),
    group_col: Optional[str] = typer.Option(None, rich_help_panel=_SCORE,
                                            help="Rows sharing this column's value stay on one side of every split "
                                                 "(default: the group stored by extract)."),
    subgroup_col: List[str] = typer.Option([], rich_help_panel=_SCORE,
                                           help="Report metrics per value of this column (repeatable)."),
    bootstrap: int = typer.Option(1000, min=0, rich_help_panel=_SCORE,
                                  help="Bootstrap resamples for test intervals (0: none)."),
    seeds: int = typer.Option(1, min=1, rich_help_panel=_SCORE, help="Repeat over seeds for mean, std and 95% "
                                                                     "interval."),
    cv: Optional[int] = typer.Option(None, min=2, rich_help_panel=_SCORE,
                                     help="k-fold cross-validation instead of one split."),
    seed: int = typer.Option(0, rich_help_panel=_SCORE),
    calibrate_on: str = typer.Option("auto", rich_help_panel=_SCORE,
                                     help="Rows the temperature is fitted on: auto (validation if >= 200 rows, else "
                                          "out-of-fold training rows, else none), val or oof."),
    class_names: Optional[str] = typer.Option(None, help="What each class means, e.g. 0=no,1=yes (model card, "
                                                         "report)."),
    card: Optional[Path] = typer.Option(None, "--card", help="card.toml: intended use, out-of-scope use, outcome, "
                                                             "setting, authors, licence, citation (model card)."),
    near_duplicate_threshold: Optional[float] = typer.Option(None, "--near-dup-threshold", rich_help_panel=_CHECK,
                                                             help="Cosine at which two rows are near-duplicates "
                                                                  "(default: calibrated per encoder)."),
    ood_guard: str = typer.Option("centroids", rich_help_panel=_CHECK,
                                  help="OOD guard prototypes: centroids (no training row stored), rows (every "
                                       "training row's embedding stored; more sensitive) or none."),
    ood_percentile: float = typer.Option(95.0, min=50.0, max=99.99, rich_help_panel=_CHECK,
                                         help="Validation percentile above which predict flags a row as OOD."),
    class_weights: bool = switch(True, "class-weights", "Re-weight classes (balanced)."),
    learned_lambda: bool = switch(False, "learned-lambda", "Learn the shift's lambda jointly with the classifier."),
    calibrate: bool = switch(True, "calibrate", "Temperature scaling where there are enough rows (--calibrate-on)."),
    groups: bool = switch(True, "groups", "Keep a group's rows on one side of every split (--no-groups: rows are "
                                          "independent)."),
    data_split: bool = switch(True, "data-split", "Use the data's split column."),
    group_near_duplicates: bool = switch(False, "group-near-dups", "One group per near-duplicate cluster."),
):
    """Train a fusion classifier; choose on validation, test once; intervals over test groups and seeds."""
    from embedkit.modelcard import parse_class_names
    from embedkit.train import TrainConfig
    from embedkit.train import train as run

    cfg = TrainConfig(labels=list(label), fusion=fusion, hidden_dim=hidden_dim, late_hidden_dim=late_hidden_dim,
                      dropout=dropout, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                      class_weight="balanced" if class_weights else None, patience=patience, noise_std=noise_std,
                      align=align or None, align_lambda=align_lambda,
                      align_sweep=align_sweep, learned_lambda=learned_lambda, scale=scale,
                      modality_dropout=modality_dropout, threshold=threshold, calibrate=calibrate,
                      group_col=group_col, groups=groups, data_split=data_split,
                      group_near_duplicates=group_near_duplicates, near_duplicate_threshold=near_duplicate_threshold,
                      ood_guard=ood_guard, ood_percentile=ood_percentile,
                      subgroups=list(subgroup_col), bootstrap=bootstrap, seeds=seeds, cv=cv, seed=seed,
                      models=chosen_models(image_model, text_model), calibrate_on=calibrate_on,
                      class_names=parse_class_names(class_names), card=str(card) if card else None)
    metrics = run(emb, out, cfg)
    _print_metrics(metrics, out)


def _print_metrics(metrics: dict, out: Path) -> None:
    from rich.table import Table
    from rich.text import Text

    from embedkit.console import console
    from embedkit.fusion.adequacy import MIN_TEST_ROWS, interval, number, why_undefined

    spread, boot = metrics["spread"], (metrics.get("bootstrap") or {}).get("metrics", {})
    unit = (metrics.get("bootstrap") or {}).get("unit", "row")
    n_test, groups = metrics["data"]["n"]["test"], metrics["data"]["groups"]
    few = f": too few to tell anything, under {MIN_TEST_ROWS}" if n_test < MIN_TEST_ROWS else ""
    t = Table(title=Text(f"{out} · test set ({n_test} rows{few}; groups: {groups})"))  # Text: a path is never markup
    t.add_column("metric")
    t.add_column("test (saved model)", justify="right")
    t.add_column(f"95% bootstrap over test {unit}s", justify="right")
    t.add_column(f"over {spread['n_runs']} {spread['over']}: mean ± std [95% t]", justify="right")
    t.add_column("validation", justify="right")
    for k in ("accuracy", "macro_f1", "weighted_f1", "auroc", "ece"):
        s, v, b = spread["test"].get(k), spread["val"].get(k), boot.get(k)
        if s is None:
            continue
        one = spread["n_runs"] == 1  # no spread from a single run: say so rather than print nan
        defined = "" if s["n_runs"] == spread["n_runs"] else f" ({s['n_runs']} of {spread['n_runs']} runs)"
        t.add_row(k, number(metrics["test"][k], why_undefined(k, metrics["test"])),
                  interval(b["low"], b["high"], n_test) if b else "-",
                  "use --seeds or --cv" if one else (f"defined in {s['n_runs']} of {spread['n_runs']} runs" if
                                                     s["n_runs"] < 2 else f"{s['mean']:.3f} ± {s['std']:.3f} "
                                                     f"[{s['ci95_low']:.3f}, {s['ci95_high']:.3f}]{defined}"),
                  number(v["mean"], why_undefined(k, metrics["val"])) if v else "-")
    console.print(t)
    from embedkit.fusion.clinical import banners

    for b in banners(metrics):  # said before any other line: a reader must not miss them
        console.print(f"[bold yellow]{b['title']}:[/] " + b["message"].replace("[", "\\["), soft_wrap=True)
    if metrics["test"].get("absent_classes"):
        console.print(f"note: classes absent from the test rows (not averaged into macro-F1): "
                      f"{', '.join(map(str, metrics['test']['absent_classes']))}", markup=False)
    cal = metrics.get("calibration") or {}
    if cal:
        iv = cal.get("ece_interval") or {}
        span = {k: f" {interval(v['low'], v['high'], n_test)}" if v and v.get("low") == v.get("low") else ""
                for k, v in (("before", iv.get("test_before")), ("after", iv.get("test_after")))}
        console.print(f"calibration: temperature {cal['temperature']:.3f} "
                      f"({(cal.get('calibrated_on') or {}).get('note', 'not fitted')}), "
                      + ("decision: the most probable class" if metrics["config"].get("labels") and len(
                          metrics["test"].get("per_class", {})) > 2 and len(metrics["config"]["labels"]) == 1 else
                         f"threshold {cal['threshold']:.3f} ({cal['threshold_rule']}, on validation)") + "; test ECE "
                      f"{cal['ece_before']['test']:.3f}{span['before']} -> {cal['ece_after']['test']:.3f}{span['after']}",
                      markup=False, soft_wrap=True)
    op = (metrics.get("clinical") or {}).get("operating_point") or {}
    for c, v in (op.get("classes") or {}).items() if len(op.get("classes") or {}) == 1 else ():
        iv = v.get("intervals") or {}
        console.print(f"operating point ({op['rule']}): " + ", ".join(
            f"{r} {number(v[r], 'no row predicted or observed in its denominator')}"
            + (f" {interval(iv[r]['low'], iv[r]['high'], n_test)}" if r in iv and _finite(v[r]) else "")
            for r in ("sensitivity", "specificity", "ppv", "npv")), markup=False, soft_wrap=True)
    from embedkit.fusion.combinations import COMBINATION_COLUMNS, combination_rows

    _print_rows("by modality combination (test rows; ECE before and after temperatures)", COMBINATION_COLUMNS,
                combination_rows(metrics.get("by_combination")))
    for col, values in (metrics.get("subgroups") or {}).items():
        for value, e in values.items():
            b = e["bootstrap"]["macro_f1"]
            console.print(f"subgroup {col}={value}: n {e['n']}, macro-F1 {e['metrics']['macro_f1']:.3f} "
                          f"[{b['low']:.3f}, {b['high']:.3f}]" + (" (small: unreliable)" if e["small"] else ""),
                          markup=False)
    c = metrics["costs"]
    console.print(f"train {c['train_seconds']:.2f} s · predict {c['predict_seconds']:.3f} s · "
                  f"peak RSS {c['peak_rss_mb']:.0f} MB · model {c['model_bytes'] / 1024:.0f} KiB")
    o = metrics.get("ood")
    if o:
        by = o["test_by_ood"]
        f1 = {k: (f"{v['metrics']['macro_f1']:.3f}" if "metrics" in v else "-") + (" (few rows)" if "note" in v else "")
              for k, v in by.items()}
        console.print(f"OOD guard ({o['prototypes']}, {o['threshold_rule']}): {o['test']['flagged']} of "
                      f"{o['test']['rows']} test rows flagged; macro-F1 in-distribution {f1['in_distribution']}, "
                      f"flagged {f1['flagged']}", markup=False)
    a = metrics.get("alignment")
    if a:
        lam = a["lambda"]
        what = a["method"] + (f" lambda {lam:.4g}" if isinstance(lam, (int, float)) else "")
        console.print(f"alignment: {what}, input scale {a['scale']}"
                      + (" (chosen on validation in each run: "
                         + ", ".join(f"{r['method']} {r['lambda'] if r['lambda'] is not None else ''}".strip()
                                     for r in a["chosen_per_run"]) + ")" if a.get("selected_on") else "")
                      + (f"; learned lambda {', '.join(f'{v:.4f}' for v in a['learned_lambda'])}"
                         if a.get("learned_lambda") else ""))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and v == v and abs(v) != float("inf")


def _print_rows(title: str, columns, rows: list[list[str]]) -> None:
    if not rows:
        return
    from rich.markup import escape
    from rich.table import Table

    from embedkit.console import console

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        t.add_row(*(escape(v) for v in r))
    console.print(t)


def predict(
    model: Path = typer.Argument(..., help="A model folder from `embedkit train`."),
    emb: Path = typer.Argument(..., help="Embeddings of new data, extracted with the same encoders."),
    out: Path = typer.Option(..., "--out", "-o", help="Parquet file: id, group, split, true label, modalities, "
                                                      "predicted, prob_<class>."),
    image_model: Optional[str] = typer.Option(None, help="Which image embeddings, when EMB holds several "
                                                         "(default: the model's own encoder)."),
    text_model: Optional[str] = typer.Option(None, help="Which text embeddings, when EMB holds several."),
):
    """Predict labels for new embeddings (the training-time alignment and calibration are applied)."""
    from embedkit.console import say
    from embedkit.predict import predict as run  # not via embedkit.train: predict needs none of training

    r = run(model, emb, out, models=chosen_models(image_model, text_model))
    had = ", ".join(f"{k or 'none'} {v}" for k, v in r["modalities"].items())
    say(f"{r['rows']} predictions ({had}) -> {r['out']} ({r['predict_seconds']:.3f} s)")
    if r["ood"] is not None:
        o = r["ood"]
        say(("[yellow]" if o["flagged"] else "[bold]") + f"ood[/]: {o['flagged']} of {o['rows']} rows ({o['share']:.0%}) "
            f"are unlike the training data (column ood): do not trust their predictions")
    else:
        say("ood: this model folder has no OOD guard (trained before it existed, or with --ood-guard none)")


def evaluate(
    model: Path = typer.Argument(..., help="A model folder from `embedkit train`."),
    emb: Path = typer.Argument(..., help="Labelled embeddings, e.g. a second clinic's."),
    label: List[str] = typer.Option([], help="Label column(s); default: those the model was trained on."),
    split: Optional[str] = typer.Option(None, help="Only rows of this split (e.g. test)."),
    allow_overlap: bool = switch(False, "allow-overlap", "Score rows the model was trained or selected on "
                                                         "(flagged)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the metrics as JSON here."),
    rows_out: Optional[Path] = typer.Option(None, help="Write per-row predictions (Parquet) here."),
    image_model: Optional[str] = typer.Option(None, help="Which image embeddings, when EMB holds several "
                                                         "(default: the model's own encoder)."),
    text_model: Optional[str] = typer.Option(None, help="Which text embeddings, when EMB holds several."),
    drop_modality: Optional[str] = typer.Option(None, metavar="image|text",
                                                help="Robustness curve: remove this modality from a share of rows."),
    rates: str = typer.Option("0,0.25,0.5,0.75,1", help="Shares of rows for --drop-modality."),
):
    """Compute the training metrics for a trained model on labelled rows it was not fitted on."""
    import json

    from embedkit.fusion.combinations import COMBINATION_COLUMNS, combination_rows, robustness_rows
    from embedkit.fusion.robustness import parse_rates
    from embedkit.predict import evaluate as run

    r = run(model, emb, list(label) or None, out, split=split, allow_overlap=allow_overlap, rows_out=rows_out,
            models=chosen_models(image_model, text_model), drop_modality=drop_modality,
            rates=parse_rates(rates) if drop_modality else None)
    m, b = r["eval"], r["bootstrap"]["metrics"]
    summary = {k: m[k] for k in ("n", "accuracy", "macro_f1", "weighted_f1", "auroc", "ece") if k in m}
    summary["bootstrap95"] = {k: [round(v["low"], 4), round(v["high"], 4)] for k, v in b.items()}
    summary["rows_seen_in_training"] = r["rows_seen_in_training"]
    if r["rows_left_out_missing_modality"]:
        summary["rows_left_out_missing_modality"] = r["rows_left_out_missing_modality"]
    if r["by_combination"] and len(r["by_combination"]) > 1:
        summary["by_combination"] = {c: {"n": e["n"], "macro_f1": e["metrics"]["macro_f1"], "ece": e["metrics"]["ece"],
                                         "macro_f1_95": [round(e["bootstrap"]["macro_f1"][k], 4) for k in ("low", "high")]}
                                     for c, e in r["by_combination"].items()}
    _print_rows("by modality combination (ECE before and after temperatures)", COMBINATION_COLUMNS,
                combination_rows(r["by_combination"]))
    if r["robustness"]:
        rc = r["robustness"]
        _print_rows(f"robustness: {rc['modality']} removed from a share of {rc['eligible_rows']} rows",
                    ("rate", "rows masked", "macro-F1 [95%]"), robustness_rows(rc))
        summary["robustness"] = {"modality": rc["modality"], "points": [
            {k: p[k] for k in ("rate", "rows_masked", "macro_f1", "refused") if k in p}
            | ({"macro_f1_95": [round(p["intervals"]["macro_f1"][k], 4) for k in ("low", "high")]}
               if "intervals" in p else {})
            for p in rc["points"]]}
    if r.get("ood"):
        by = r["ood"]["by_ood"]
        summary["ood"] = {"flagged": r["ood"]["flagged"],
                          **{k: {"n": by[k]["n"], "macro_f1": by[k].get("metrics", {}).get("macro_f1")} for k in by}}
    typer.echo(json.dumps(summary))


def gap(
    emb: Path = typer.Argument(..., help="An extract folder with image and text embeddings in one space."),
    align: str = typer.Option("none,shift,center,standardize", help="Comma-separated alignment methods to compare: "
                                                                    "none, shift, center, standardize."),
    lambda_: Optional[float] = typer.Option(None, "--lambda", help="The shift's lambda (default 1: closes the gap "
                                                                   "between the means)."),
    split: Optional[str] = typer.Option(None, help="Fit the aligners on rows of this split only (e.g. train); "
                                                   "default: all rows."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for gap.json and gap_pca.png (default: EMB)."),
    progress: bool = switch(True, "progress", "Show a progress bar over the methods."),
):
    """Modality-gap diagnostics per alignment method: centroid gap, cosines, cones, probe, MMD, PCA plot.

    About 8 s for VQA-RAD's 2095 pairs (256-d) with one thread; a loaded machine can take minutes."""
    from embedkit.fusion.gap import gap_report_for_folder

    methods = [m.strip() for m in align.split(",") if m.strip()]
    report, out = gap_report_for_folder(emb, methods, lambda_, split, out, progress=progress)
    _print_gap_report(report, out)


def _print_gap_report(report: dict, out: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    from embedkit.console import console, show_table

    columns = {"gap_norm": "gap norm", "centroid_distance": "centroid dist", "mean_pair_cosine": "pair cos",
               "mean_within_image_cosine": "image cone", "mean_within_text_cosine": "text cone",
               "probe_accuracy": "probe acc", "mmd2": "MMD²"}
    table = Table(title=f"modality gap · {report['n_rows']} rows, {report['width']}-d · aligners fitted on "
                        f"{report['fitted_on']}, measured on {report['evaluated_on']}")
    table.add_column("method")
    for label in columns.values():
        table.add_column(label, justify="right")
    for name, row in report["methods"].items():
        label = f"shift (λ {row['params']['lambda_']:g})" if name == "shift" else name
        table.add_row(label, *("n/a" if row[k] is None else f"{row[k]:.3f}" for k in columns))
    show_table(table)
    for key, label in columns.items():
        console.print(f"  [bold]{label}[/]: {escape(report['explain'][key])}")
    unmatched = {m: k for m, k in report.get("unmatched_rows", {}).items() if k}
    if unmatched:
        console.print("  left out (no partner in the other modality): "
                      + ", ".join(f"{k} {m} rows" for m, k in unmatched.items()))
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(w['message'])}", soft_wrap=True)
    console.print(f"full report -> {out / 'gap.json'} · plot -> {out / 'gap_pca.png'}", markup=False)


def zeroshot(
    emb: Path = typer.Argument(..., help="An extract folder with image and text embeddings in one space (CLIP, "
                                         "shared:PATH, or an `embedkit project` output)."),
    prompt: List[str] = typer.Option([], "--prompt", help="LABEL=text; repeat, several per label are averaged."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="A file of LABEL=text lines, or JSON "
                                                                   "{label: [texts]}."),
    text_model: Optional[str] = typer.Option(None, help="The text encoder that made EMB's text embeddings (default: "
                                                        "the one their provenance names)."),
    label: Optional[str] = typer.Option(None, help="Label column to score against (default: the folder's only one)."),
    align: str = typer.Option("center", help="Gap correction fitted on the training rows: center, shift, "
                                             "standardize or none."),
    lambda_: Optional[float] = typer.Option(None, "--lambda", help="The shift's lambda (--align shift)."),
    shots: Optional[int] = typer.Option(None, min=1, help="Train the linear probe on this many rows per class "
                                                          "(few-shot; default: every training row)."),
    temperature: float = typer.Option(0.01, min=1e-6, help="Softmax temperature over cosines (CLIP: 0.01)."),
    bootstrap: int = typer.Option(1000, min=0, help="Bootstrap resamples for the intervals (0: none)."),
    seed: int = typer.Option(0),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for zeroshot.json and the "
                                                                 "predictions' Parquet (default: EMB)."),
):
    """Classify images by similarity to text prompts (gap-corrected), scored beside a linear probe."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedkit.store import write_json_atomic
    from embedkit.zeroshot import ZeroShotConfig, parse_prompts, prediction_table
    from embedkit.zeroshot import zeroshot as run

    cfg = ZeroShotConfig(prompts=parse_prompts(list(prompt), prompts), label=label, text_model=text_model,
                         align=align, align_lambda=lambda_, temperature=temperature, shots=shots,
                         bootstrap=bootstrap, seed=seed)
    result = run(emb, cfg)
    out = Path(out or emb)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "zeroshot.json", result["report"])
    pq.write_table(pa.table(prediction_table(result["predictions"])), out / "zeroshot_predictions.parquet")
    _print_zeroshot(result["report"], out)


def _print_zeroshot(report: dict, out: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    from embedkit.console import console, show_table

    check = report["encoder_check"]
    console.print(f"prompts embedded with {escape(report['text_model'])}"
                  + (f" (reproduces the stored text embeddings: cosine >= {check['min_cosine']:.4f} on "
                     f"{check['rows']} rows)" if check.get("rows") else f" ({check.get('note')})")
                  + f"; gap correction fitted on {report['alignment']['fitted_on']}", soft_wrap=True)
    ev = report.get("evaluation")
    if ev:
        t = Table(title=f"zero-shot · column '{escape(report['label_column'])}' · {ev['rows']} rows "
                        f"({escape(ev['evaluated_on'])})")
        for col in ("method", "accuracy", "macro-F1", "95% interval", "AUROC"):
            t.add_column(col, justify="left" if col == "method" else "right")
        for name, m in ev["methods"].items():
            if "skipped" in m:
                t.add_row(escape(name), "-", "-", escape(m["skipped"]), "-")
                continue
            b = (m.get("bootstrap") or {}).get("metrics", {}).get("macro_f1")
            t.add_row(escape(name), f"{m['accuracy']:.3f}", f"{m['macro_f1']:.3f}",
                      f"[{b['low']:.3f}, {b['high']:.3f}]" if b else "-", f"{m['auroc']:.3f}")
        show_table(t)
    else:
        console.print("no label column to score against (--label): predictions only")
    console.print(f"{report['rows']} predictions ({escape(report['predicted_with'])}) -> "
                  f"{out / 'zeroshot_predictions.parquet'} · report -> {out / 'zeroshot.json'}")
