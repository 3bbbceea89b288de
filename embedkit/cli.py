"""The `embedkit` command: parse, call a library function, print. No torch at import time."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from embedkit.errors import EmbedkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Foundation-model embeddings and small fusion classifiers, on a laptop, offline.")


def _none(value: str | None) -> str | None:
    return None if value in (None, "", "none", "None") else value


@app.command()
def extract(
    data: Path = typer.Argument(..., help="Data folder (images + same-stem reports, class sub-folders, or the root "
                                          "that --metadata image paths are relative to)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for Parquet, errors and manifest.json."),
    image_model: str = typer.Option("efficientnet-lite0", help="Registry name, hf:ID, a local folder, "
                                                              "shared:PATH, or 'none'."),
    text_model: str = typer.Option("minilm", help="Registry name, hf:ID, a local folder, shared:PATH, or 'none'."),
    metadata: Optional[Path] = typer.Option(None, help="CSV/TSV/JSONL/JSON table describing the items."),
    manifest: Optional[str] = typer.Option(None, help="A data manifest (data_manifests/NAME.toml, or NAME)."),
    id_col: Optional[str] = typer.Option(None, help="Column with a stable id."),
    image_col: Optional[str] = typer.Option(None, help="Column with image paths relative to DATA."),
    text_col: Optional[str] = typer.Option(None, help="Column with report text."),
    text_file_col: Optional[str] = typer.Option(None, help="Column with report file paths relative to DATA."),
    text_template: Optional[str] = typer.Option(None, help="Sentence over columns, e.g. 'Patient aged {age}, {sex}.'"),
    label_col: List[str] = typer.Option([], help="Label column (repeatable)."),
    split_col: Optional[str] = typer.Option(None, help="Column with train/val/test."),
    allow_leakage: bool = typer.Option(False, help="Allow a text template that names a label column."),
    image_pooling: Optional[str] = typer.Option(None, help="dinov2: cls or mean."),
    text_pooling: Optional[str] = typer.Option(None, help="LLMs: mean or last; sentence: mean or cls."),
    max_length: Optional[int] = typer.Option(None, help="Text tokens before truncation."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 (float16 on GPU only)."),
    batch_size: int = typer.Option(32, min=1),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: all cores)."),
    trust_remote_code: bool = typer.Option(False, help="Run code shipped with a hub model. Only if you trust it."),
    overwrite: bool = typer.Option(False, help="Start over instead of resuming."),
    strict: bool = typer.Option(False, help="Fail on the first bad input instead of recording it."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Embed every image and report into Parquet (resumes; bad inputs go to errors.parquet)."""
    from embedkit.extract import ExtractConfig
    from embedkit.extract import extract as run
    from embedkit.items import SourceOptions

    source = SourceOptions(metadata=metadata, id_col=id_col, image_col=image_col, text_col=text_col,
                           text_file_col=text_file_col, text_template=text_template, label_cols=list(label_col),
                           split_col=split_col, allow_leakage=allow_leakage)
    rows = None
    if manifest:
        from embedkit.manifests import find_manifest

        m = find_manifest(manifest)
        rows, source = m.load_rows(data), m.source_options()
    config = ExtractConfig(image_model=_none(image_model), text_model=_none(text_model), image_pooling=image_pooling,
                           text_pooling=text_pooling, max_length=max_length, device=device, dtype=dtype,
                           batch_size=batch_size, threads=threads, trust_remote_code=trust_remote_code,
                           overwrite=overwrite, strict=strict, progress=progress)
    result = run(data, out, config=config, source=source, rows=rows)
    _print_extract_summary(result)


def _print_extract_summary(result) -> None:
    from rich.table import Table

    from embedkit.console import console

    table = Table(title=f"embedkit extract -> {result.out}")
    for col in ("modality · model", "rows", "new", "skipped", "truncated", "model s", "items/s", "peak MB", "MB"):
        table.add_column(col, justify="left" if col.startswith("modality") else "right")
    for m, r in result.modalities.items():
        st = r.costs.get("stage_seconds", {})
        table.add_row(f"{m} · {r.model}", str(r.rows_total), str(r.rows_embedded), str(r.skipped),
                      str(r.truncated_texts), f"{st.get('model', 0):.1f}", f"{r.costs.get('items_per_second', 0):.1f}",
                      f"{r.costs.get('peak_rss_mb', 0):.0f}", f"{r.bytes / 2**20:.2f}")
    console.print(table)
    if result.skipped:
        by = {}
        for s in result.skipped:
            by[(s.stage, s.reason)] = by.get((s.stage, s.reason), 0) + 1
        console.print(f"[yellow]{len(result.skipped)} inputs skipped[/] (details in {result.out}/errors.parquet):")
        for (stage, reason), n in sorted(by.items(), key=lambda kv: -kv[1])[:8]:
            console.print(f"  {n:>5} × {stage}: {reason}")


@app.command()
def models():
    """List the model registry and what is available offline on this machine."""
    from rich.table import Table

    from embedkit.console import console
    from embedkit.encoders.registry import list_models

    table = Table(title="embedkit models (any transformers id or local folder works too)")
    for col in ("name", "family", "modalities", "dim", "pooling", "available here"):
        table.add_column(col)
    for r in list_models():
        table.add_row(r["name"], r["family"], r["modalities"], str(r["dim"]), r["pooling"],
                      ("[green]yes[/] " if r["available"] else "[red]no[/] ") + r["where"])
    console.print(table)


def main() -> None:
    try:
        app()
    except EmbedkitError as e:
        from embedkit.console import console

        console.print(f"[red]error:[/] {e}", soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
