"""`embedkit compare`: parse, call embedkit.comparison.compare, print the leaderboard and the answer in words.
cli.py registers it (this module does not import cli.py). No torch at import time."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from embedkit.cli_common import (DICOM, GroupCol, IdCol, ImageCol, Manifest, MaxReportMb, Metadata, SplitCol, TextCol,
                                 TextFileCol, TextTemplate, dicom_source_fields, source_options, switch)

_GRID, _SCORE, _CURVE, _RUN = "What to compare", "Splits and scoring", "Label efficiency", "Extraction and time"


def _names(value: str | None) -> list[str] | None:
    """A comma list; None keeps the default, 'none' or '' means an empty list."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return [] if parts in ([], ["none"]) else parts


def compare(
    data: List[Path] = typer.Argument(..., help="A data folder (read as `extract` reads it), or one or more "
                                                "`embedkit extract` folders."),
    label: str = typer.Option(..., help="The label column (binary or multiclass)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for leaderboard.csv, compare.json, report.html "
                                                      "(a rerun resumes)."),
    metadata: Metadata = None,
    manifest: Manifest = None,
    id_col: IdCol = None,
    image_col: ImageCol = None,
    text_col: TextCol = None,
    text_file_col: TextFileCol = None,
    text_template: TextTemplate = None,
    split_col: SplitCol = None,
    group_col: GroupCol = None,
    max_report_mb: MaxReportMb = 5.0,
    dicom_window: str = DICOM["dicom_window"],
    dicom_frames: str = DICOM["dicom_frames"],
    dicom_per: Optional[str] = DICOM["dicom_per"],
    dicom_salt_file: Optional[Path] = DICOM["dicom_salt_file"],
    image_models: Optional[str] = typer.Option(None, rich_help_panel=_GRID, help="Comma list (default: every "
                                               "image encoder available offline here, or in the folders)."),
    text_models: Optional[str] = typer.Option(None, rich_help_panel=_GRID, help="Comma list (default: every "
                                              "text encoder available offline here, or in the folders)."),
    fusion: Optional[str] = typer.Option(None, rich_help_panel=_GRID, help="Comma list (default: every fusion "
                                         "`train` offers and the logistic baseline)."),
    align: str = typer.Option("none,center", rich_help_panel=_GRID, help="Comma list of none, center, shift "
                              "(lambda on validation), standardize: for fusions of both modalities."),
    metric: str = typer.Option("macro_f1", rich_help_panel=_SCORE, help="Ranks the leaderboard: macro_f1, auroc, "
                               "accuracy or weighted_f1."),
    seeds: int = typer.Option(3, min=1, max=100, rich_help_panel=_SCORE, help="Runs per configuration."),
    cv: Optional[int] = typer.Option(None, min=2, max=50, rich_help_panel=_SCORE, help="k-fold cross-validation "
                                     "instead of seeds."),
    seed: int = typer.Option(0, rich_help_panel=_SCORE),
    bootstrap: int = typer.Option(1000, min=100, max=100_000, rich_help_panel=_SCORE,
                                  help="Paired resamples of the test groups."),
    epochs: int = typer.Option(30, min=1, max=10_000, rich_help_panel=_SCORE, help="Epochs of each head."),
    modality_dropout: float = typer.Option(0.0, min=0.0, max=1.0, rich_help_panel=_SCORE, help="Heads of both "
                                           "modalities learn with one masked in this share of training rows."),
    curve_top: int = typer.Option(3, min=1, max=20, rich_help_panel=_CURVE, help="How many of the best "
                                  "configurations get a learning curve."),
    curve_seeds: int = typer.Option(3, min=1, max=20, rich_help_panel=_CURVE, help="Subsamples per size."),
    target: Optional[float] = typer.Option(None, min=0.0, max=1.0, rich_help_panel=_CURVE, help="Score to "
                                           "extrapolate to (default: the best + 0.05)."),
    raw_epochs: int = typer.Option(5, min=1, max=100, rich_help_panel=_CURVE, help="Epochs of the raw-data "
                                   "models (--raw)."),
    raw_rows: Optional[int] = typer.Option(None, min=2, rich_help_panel=_CURVE, help="Train the raw-data models "
                                           "on this many training rows, drawn at random (time; default all)."),
    budget_minutes: Optional[float] = typer.Option(None, min=0.1, rich_help_panel=_RUN, help="Drop the most "
                                                   "expensive configurations first to fit."),
    backend: str = typer.Option("torch", rich_help_panel=_RUN, help="Extraction backend: torch, onnxruntime, "
                                "openvino or auto."),
    batch_size: int = typer.Option(32, min=1, max=4096, rich_help_panel=_RUN, help="Extraction batch size."),
    threads: Optional[int] = typer.Option(None, min=1, rich_help_panel=_RUN, help="Model CPU threads."),
    curve: bool = switch(True, "curve", "Label efficiency of the best configurations."),
    raw: bool = switch(False, "raw", "Also train on raw data through the encoders (slow; estimate printed)."),
    groups: bool = switch(True, "groups", "Keep a group's rows on one side of every split."),
    data_split: bool = switch(True, "data-split", "Use the data's split column."),
    allow_leakage: bool = switch(False, "allow-leakage", "Allow a text template that names a label column or a "
                                                         "manifest's leakage field."),
    progress: bool = switch(True, "progress", "Show progress bars."),
):
    """Which encoder and fusion work on your data, at what cost, better than what: a leaderboard with paired
    intervals, baselines, label efficiency and costs, all on the same test rows."""
    from embedkit.comparison import CompareConfig
    from embedkit.comparison import compare as run
    from embedkit.extract import ExtractConfig
    from embedkit.store import find_datasets

    extracting = len(data) == 1 and not find_datasets(data[0])
    rows, source = None, None
    if extracting:
        rows, source = source_options(data[0], manifest, metadata, id_col, image_col, text_col, text_file_col,
                                      text_template, [label], split_col, group_col, allow_leakage,
                                      dicom_source_fields(dicom_window, dicom_frames, dicom_per, dicom_salt_file))
    cfg = CompareConfig(label=label, image_models=_names(image_models), text_models=_names(text_models),
                        fusions=_names(fusion), align=_names(align) or ["none"], seeds=seeds, cv=cv, seed=seed,
                        metric=metric, bootstrap=bootstrap, epochs=epochs, modality_dropout=modality_dropout,
                        curve=curve, curve_top=curve_top,
                        curve_seeds=curve_seeds, target=target, raw=raw, raw_epochs=raw_epochs, raw_rows=raw_rows,
                        budget_minutes=budget_minutes, group_col=None if extracting else group_col, groups=groups,
                        data_split=data_split, progress=progress)
    extract_config = ExtractConfig(backend=backend, batch_size=batch_size, threads=threads, progress=progress,
                                   max_report_bytes=int(max_report_mb * 2**20))
    board = run(data if len(data) > 1 else data[0], out, cfg, source=source, rows=rows,
                extract_config=extract_config if extracting else None)
    print_leaderboard(board, out)


def print_leaderboard(board, out: Path) -> None:
    from rich.table import Table

    from embedkit.comparison.report import NAMES
    from embedkit.console import console, show_table

    metric = board.attrs["summary"]["metric"]
    t = Table(title=f"embedkit compare · {NAMES.get(metric, metric)}, mean over runs [95% paired bootstrap]")
    for col in ("#", "configuration", "score [95%]", "vs best", "verdict", "vs chance"):
        t.add_column(col, justify="right" if col in ("#", "score [95%]") else "left")
    for _, r in board.iterrows():
        if r["status"] != "ok":
            t.add_row("-", r["config"], "not run", "", str(r.get("reason", "")), "")
            continue
        vs_best = "" if r["verdict"] == "best" else f"{r['delta_vs_best']:+.3f}"
        t.add_row(str(r["rank"]), r["config"], f"{r[metric]:.3f} [{r[f'{metric}_low']:.2f}, {r[f'{metric}_high']:.2f}]",
                  vs_best, r["verdict"], r.get("vs_chance") if isinstance(r.get("vs_chance"), str) else "")
    show_table(t)  # a table where it fits, one block per configuration where it does not (80 columns)
    for line in board.attrs["lines"]:
        console.print(line, markup=False, soft_wrap=False)
    console.print(f"files: {out / 'leaderboard.csv'}, {out / 'compare.json'}, {out / 'report.html'}", markup=False)
