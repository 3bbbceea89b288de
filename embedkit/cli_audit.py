"""`embedkit audit`: a typer command (cli.py registers it); the work is embedkit.audit's. No torch at import time."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from embedkit.cli_common import chosen_models, switch


def audit(
    emb: Path = typer.Argument(..., help="An `embedkit extract` output folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for audit.json (`embedkit report DIR` makes a page)."),
    label: List[str] = typer.Option([], help="Label column; repeat for multilabel (0/1 columns)."),
    group_col: Optional[str] = typer.Option(None, help="Group column (default: the group stored by extract)."),
    image_threshold: Optional[float] = typer.Option(None, help="Near-duplicate cosine for images (default: "
                                                               "calibrated per encoder)."),
    text_threshold: Optional[float] = typer.Option(None, help="Near-duplicate cosine for texts (default: "
                                                              "calibrated per encoder)."),
    max_listed: int = typer.Option(1000, min=1, help="Ids listed per finding in audit.json (counts stay exact)."),
    image_model: Optional[str] = typer.Option(None, help="Which image embeddings, if several were extracted."),
    text_model: Optional[str] = typer.Option(None, help="Which text embeddings, if several were extracted."),
    label_noise: bool = switch(True, "label-noise", "Look for label-noise candidates (out-of-fold predictions)."),
):
    """Check the data before training: near-duplicates across splits, leakage, balance, outliers, label noise."""
    from embedkit.audit import AuditConfig, summary_lines, write_audit
    from embedkit.audit import audit as run
    from embedkit.console import say

    thresholds = {m: t for m, t in (("image", image_threshold), ("text", text_threshold)) if t is not None}
    cfg = AuditConfig(labels=list(label), group_col=group_col, thresholds=thresholds,
                      models=chosen_models(image_model, text_model), max_listed=max_listed, label_noise=label_noise)
    result = run(emb, cfg)
    path = write_audit(result, out)
    for line in summary_lines(result):
        say(line)
    say(f"audit -> {path} (every id list; `embedkit report {out}` for a page)")
