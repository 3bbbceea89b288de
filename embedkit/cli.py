"""The `embedkit` command: parse, call a library function, print. No torch at import time."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from embedkit import cli_audit, cli_compare, cli_train
from embedkit.cli_common import (DICOM, GroupCol, IdCol, ImageCol, Manifest, MaxReportMb, Metadata, PlainHelpGroup,
                                 SplitCol, TextCol, TextFileCol, TextTemplate, dicom_source_fields, none_word,
                                 plain_help, source_options, switch)
from embedkit.cli_models import models_app
from embedkit.errors import EmbedkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=PlainHelpGroup,
                  help="Foundation-model embeddings and small fusion classifiers, on a laptop, offline.")


# Option panels of `extract --help`: one table each, so each table's columns fit 80 columns of terminal.
_IN, _ENC, _RUN, _RAY = "Input", "Encoders", "Speed and backend", "Ray engine (--engine ray)"
_RECIPE, _SHORT = "Recipe (pretrain)", "Recipe shortcuts (each is one --set)"
_UNPAIRED = "Unpaired data (MoMo stages)"


@app.command()
def extract(
    data: Path = typer.Argument(..., help="Data folder (images + same-stem reports, class sub-folders, or the root "
                                          "that --metadata image paths are relative to)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for Parquet, errors and manifest.json."),
    metadata: Metadata = None,
    manifest: Manifest = None,
    id_col: IdCol = None,
    image_col: ImageCol = None,
    text_col: TextCol = None,
    text_file_col: TextFileCol = None,
    text_template: TextTemplate = None,
    label_col: List[str] = typer.Option([], rich_help_panel=_IN, help="Label column (repeatable)."),
    split_col: SplitCol = None,
    group_col: GroupCol = None,
    max_report_mb: MaxReportMb = 5.0,
    dicom_window: str = DICOM["dicom_window"],
    dicom_frames: str = DICOM["dicom_frames"],
    dicom_per: Optional[str] = DICOM["dicom_per"],
    dicom_salt_file: Optional[Path] = DICOM["dicom_salt_file"],
    image_model: str = typer.Option("efficientnet-lite0", rich_help_panel=_ENC,
                                    help="Registry name, hf:ID, a local folder, shared:PATH, or 'none'."),
    text_model: str = typer.Option("minilm", rich_help_panel=_ENC,
                                   help="Registry name, hf:ID, a local folder, shared:PATH, gguf:PATH (llama.cpp), "
                                        "or 'none'."),
    image_pooling: Optional[str] = typer.Option(None, rich_help_panel=_ENC, help="dinov2: cls or mean."),
    text_pooling: Optional[str] = typer.Option(None, rich_help_panel=_ENC,
                                               help="LLMs: mean or last; sentence: mean or cls."),
    max_length: Optional[int] = typer.Option(None, rich_help_panel=_ENC, help="Text tokens before truncation."),
    device: str = typer.Option("auto", rich_help_panel=_RUN, help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("float32", rich_help_panel=_RUN, help="float32, bfloat16 (float16 on GPU only)."),
    quantize: Optional[str] = typer.Option(None, rich_help_panel=_RUN,
                                           help="int8: dynamic int8 Linear layers on CPU (transformer encoders; "
                                                "faster, slightly different vectors)."),
    backend: str = typer.Option("torch", rich_help_panel=_RUN,
                                help="torch, onnxruntime, openvino, or auto: the fastest here that keeps parity "
                                     "with torch fp32 and repays its export on this run (else torch)."),
    precision: Optional[str] = typer.Option(None, rich_help_panel=_RUN,
                                            help="fp32, bf16, int8 or auto (default: --dtype/--quantize on torch, "
                                                 "fp32 elsewhere); refused below --parity-floor."),
    parity_floor: float = typer.Option(0.99, min=-1.0, max=1.0, rich_help_panel=_RUN,
                                       help="Lowest cosine to torch fp32 on the calibration batch a backend may "
                                            "reach."),
    batch_size: int = typer.Option(32, min=1, rich_help_panel=_RUN),
    threads: Optional[int] = typer.Option(None, rich_help_panel=_RUN,
                                          help="Model CPU threads: torch's, llama.cpp's or the backend's (default: "
                                               "all cores)."),
    decode_workers: Optional[int] = typer.Option(None, min=1, rich_help_panel=_RUN,
                                                 help="Image decode threads (default: 1 beside torch, one per core "
                                                      "beside other backends)."),
    engine: str = typer.Option("local", rich_help_panel=_RAY,
                               help="local (this process) or ray (Ray Data actors; pip install 'embedkit\\[ray]')."),
    address: Optional[str] = typer.Option(None, rich_help_panel=_RAY,
                                          help="A Ray cluster ('auto', ray://HOST:10001); default: start Ray on this "
                                               "machine."),
    actors: Optional[int] = typer.Option(None, min=1, rich_help_panel=_RAY,
                                         help="Encoder actors (default: as many as the cluster's CPUs or GPUs fit)."),
    cpus_per_actor: float = typer.Option(1.0, min=0.01, rich_help_panel=_RAY,
                                         help="CPUs (and torch threads) per actor."),
    gpus_per_actor: float = typer.Option(0.0, min=0.0, rich_help_panel=_RAY,
                                         help="GPUs per actor (e.g. 1, or 0.5 to share one)."),
    normalize: Optional[bool] = switch(None, "normalize", "L2-normalise text vectors (default: the model's own "
                                                          "choice)."),
    allow_leakage: bool = switch(False, "allow-leakage", "Allow a text template that names a label column or a "
                                                         "manifest's leakage field."),
    trust_remote_code: bool = switch(False, "trust-remote-code", "Run code shipped with a hub model. Only if you "
                                                                 "trust it."),
    overwrite: bool = switch(False, "overwrite", "Start over instead of resuming."),
    prune: bool = switch(False, "prune", "Let a resume delete the rows of inputs that are gone, even more than 10% "
                                         "of the table."),
    strict: bool = switch(False, "strict", "Fail on the first bad input instead of recording it."),
    progress: bool = switch(True, "progress", "Show a progress bar."),
    group_near_duplicates: bool = switch(False, "group-near-dups", "One group per near-duplicate cluster."),
):
    """Embed every image and report into Parquet (resumes; bad inputs go to errors.parquet)."""
    from embedkit.extract import ExtractConfig
    from embedkit.extract import extract as run

    rows, source = source_options(data, manifest, metadata, id_col, image_col, text_col, text_file_col, text_template,
                                  label_col, split_col, group_col, allow_leakage,
                                  dicom_source_fields(dicom_window, dicom_frames, dicom_per, dicom_salt_file))
    config = ExtractConfig(image_model=none_word(image_model), text_model=none_word(text_model),
                           image_pooling=image_pooling, text_pooling=text_pooling, max_length=max_length,
                           text_normalize=normalize, device=device, dtype=dtype,
                           quantize=none_word(quantize), batch_size=batch_size, threads=threads,
                           backend=backend, precision=none_word(precision), parity_floor=parity_floor,
                           decode_workers=decode_workers, trust_remote_code=trust_remote_code,
                           overwrite=overwrite, strict=strict, progress=progress, engine=engine,
                           ray_address=address, ray_actors=actors, ray_cpus_per_actor=cpus_per_actor,
                           ray_gpus_per_actor=gpus_per_actor, prune=prune,
                           max_report_bytes=int(max_report_mb * 2**20), group_near_duplicates=group_near_duplicates)
    result = run(data, out, config=config, source=source, rows=rows)
    _print_extract_summary(result)


def _print_extract_summary(result) -> None:
    from rich.markup import escape
    from rich.table import Table

    from embedkit.console import console, show_table

    table = Table(title=escape(f"embedkit extract -> {result.out}"))
    for col in ("modality · model", "rows", "new", "dropped", "skipped", "truncated", "model s", "items/s",
                "model MB", "peak MB", "MB"):
        table.add_column(col, justify="left" if col.startswith("modality") else "right")
    for m, r in result.modalities.items():
        st = r.costs.get("stage_seconds", {})
        table.add_row(escape(f"{m} · {r.model}"), str(r.rows_total), str(r.rows_embedded), str(r.rows_dropped),
                      str(r.skipped),
                      str(r.truncated_texts), f"{st.get('model', 0):.1f}", f"{r.costs.get('items_per_second', 0):.1f}",
                      _model_mb(r.provenance), f"{r.costs.get('peak_rss_mb', 0):.0f}", f"{r.bytes / 2**20:.2f}")
    show_table(table)
    for m, r in result.modalities.items():
        if r.rows_relabelled:
            console.print(f"{m}: {r.rows_relabelled} stored rows relabelled from the table (labels, split, group, "
                          f"metadata or path changed; embeddings kept)")
    if result.skipped:
        by = {}
        for s in result.skipped:
            by[(s.stage, s.reason)] = by.get((s.stage, s.reason), 0) + 1
        console.print(f"[yellow]{len(result.skipped)} inputs skipped[/] (details in "
                      f"{escape(str(result.out))}/errors.parquet):")
        for (stage, reason), n in sorted(by.items(), key=lambda kv: -kv[1])[:8]:
            console.print(f"  {n:>5} × {stage}: {reason}", markup=False)


def _model_mb(provenance: dict) -> str:
    """The weights' size as loaded (a GGUF file's tensors, or torch parameters); '-' when no model ran."""
    n = provenance.get("model_bytes")
    return ("-" if not n else f"{n / 2**20:.0f}" if n >= 10 * 2**20 else f"{n / 2**20:.2f}")


app.add_typer(models_app, name="models")


@app.command()
def datasets(folder: Optional[Path] = typer.Option(None, help="Another folder of manifests.")):
    """List the shipped data manifests: what each dataset is, its access and its tasks."""
    from rich.table import Table

    from embedkit.console import show_table, stdout_console
    from embedkit.manifests import list_manifests

    table = Table(title="data manifests (use with: embedkit extract ROOT --manifest NAME)")
    for col in ("name", "access", "license", "modalities", "tasks"):
        table.add_column(col)
    for m in list_manifests(folder):
        table.add_row(m.path.stem, m.access, m.license, "+".join(m.modalities), ", ".join(m.tasks))
    show_table(table, stdout_console)  # a listing is data: `embedkit datasets > datasets.txt` keeps it


# Fitting and scoring live in cli_train.py; registered here, in the order `embedkit --help` lists them.
for _command in (cli_audit.audit, cli_train.train, cli_train.predict, cli_train.evaluate, cli_compare.compare,
                 cli_train.gap, cli_train.zeroshot):
    app.command()(_command)


@app.command()
def demo(
    out: Path = typer.Option(Path("embedkit-demo"), "--out", "-o", help="Everything stays here: data, embeddings, "
                                                                        "models, the best model's report.html."),
    n: int = typer.Option(300, help="Synthetic cases."),
    seeds: int = typer.Option(3, min=1),
    backend: str = typer.Option("torch", help="Extraction backend: torch, or auto (a faster backend only where it "
                                              "repays its export on this run)."),
    progress: bool = switch(True, "progress", "Show progress bars."),
):
    """End to end on a generated SYNTHETIC clinic: extract, train every fusion, one table of results and costs
    (1-2 minutes on 2 cores: 61-97 s measured)."""
    from embedkit.demo import DemoConfig, print_summary, run_demo

    print_summary(run_demo(out, DemoConfig(n=n, seeds=seeds, backend=backend, progress=progress)))


@app.command()
def bench(
    out: Path = typer.Option(Path("bench"), "--out", "-o", help="Folder for bench.json, bench.md and plots."),
    quick: bool = switch(False, "quick", "Smaller N, no backends section: about 2.5 minutes on 2 idle cores "
                                         "(582 s measured on 2 cores at load 6)."),
    preset: Optional[str] = typer.Option(None, hidden=True, help="full, quick or tiny (tests)."),
    sections: Optional[str] = typer.Option(None, help="Comma-separated subset of: images, text, raw, scaling, "
                                                      "train, quantize, backends."),
    images: Optional[Path] = typer.Option(None, help="A folder of real images for the throughput section "
                                                     "(default: generated ones)."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (default: all cores)."),
    markdown: bool = switch(False, "markdown", "Measure nothing: render the README tables from committed "
                                               "results (all to stdout, or FILES' blocks)."),
    results: Path = typer.Option(Path("benchmarks/results"), help="With --markdown: the results folder."),
    update: bool = switch(False, "update", "With --markdown FILES: rewrite their bench blocks in place "
                                           "(without: list stale blocks, exit 1 if any)."),
    files: Optional[List[Path]] = typer.Argument(None, help="With --markdown: files with <!-- bench:NAME --> blocks."),
    progress: bool = switch(True, "progress", "Show a progress bar over the sections."),
):
    """Measure extraction, batching, training and memory side by side on this machine; write bench.json/.md + plots."""
    from embedkit.bench import BenchConfig, run_bench
    from embedkit.console import console, say
    from embedkit.report import fmt

    if markdown or update or files:
        _bench_markdown(results, files or [], update)
        return
    cfg = BenchConfig(preset=preset or ("quick" if quick else "full"), images=images, threads=threads,
                      sections=tuple(x.strip() for x in sections.split(",")) if sections else None)
    result = run_bench(out, cfg, log=say, progress=progress)
    for t in result["targets"]:
        verdict = {True: "[green]met[/]", False: "[red]missed[/]", None: "-"}[t["met"]]
        console.print(f"{verdict:>16}  {t['target']}: {fmt(t['measured'])} (goal {t['goal']}) {t['note']}")
    say(f"{result['total_seconds']} s; load average {result['machine']['load_average_end']} "
        f"on {result['machine']['cores']} cores -> {out / 'bench.md'}, {out / 'bench.json'}")


def _bench_markdown(results: Path, files: List[Path], update: bool) -> None:
    from embedkit.bench.tables import BLOCKS, refresh_files, render_block
    from embedkit.console import say

    if not files:
        if update:
            raise EmbedkitError("--update needs the files to rewrite, e.g. README.md benchmarks/README.md")
        for name in BLOCKS:  # data: the blocks themselves, markers included, ready to paste
            print(f"<!-- bench:{name} -->\n{render_block(name, results)}<!-- /bench -->\n")
        return
    stale = refresh_files(files, results, write=update)
    for path, names in stale.items():
        say(f"{path}: {'rewrote' if update else 'stale'} {', '.join(names)}" if names else f"{path}: up to date")
    if not update and any(stale.values()):
        raise typer.Exit(1)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A model (train), bench (bench) or comparison (compare) folder."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default: RUN_DIR/report.html)."),
    emb: Optional[Path] = typer.Option(None, help="Model folders: labelled embeddings for the reliability diagram "
                                                  "(rows the model was fitted or tuned on are left out and counted)."),
    card: Optional[Path] = typer.Option(None, "--card", help="Model folders: a card.toml (intended use, outcome, "
                                                             "licence, ...) over the one given to train."),
    class_names: Optional[str] = typer.Option(None, help="Model folders: what each class means, e.g. 0=no,1=yes."),
):
    """One self-contained HTML page (plots inline, no scripts) to read or attach to an email."""
    from embedkit.console import say

    if (run_dir / "compare.json").is_file():  # an `embedkit compare` folder
        from embedkit.comparison.report import rewrite_report

        say(f"report -> {rewrite_report(run_dir, out)}")
        return
    from embedkit.modelcard import parse_class_names
    from embedkit.report import build_report

    say(f"report -> {build_report(run_dir, out, emb, card, parse_class_names(class_names))}")


@app.command()
def pretrain(
    data: Path = typer.Argument(..., help="Paired images + reports (same inputs as extract)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder (resumes from its checkpoint)."),
    metadata: Metadata = None,
    manifest: Manifest = None,
    id_col: IdCol = None,
    image_col: ImageCol = None,
    text_col: TextCol = None,
    text_file_col: TextFileCol = None,
    text_template: TextTemplate = None,
    split_col: Optional[str] = typer.Option(None, rich_help_panel=_IN, help="Column with train/val/test: only "
                                            "'train' rows are pretrained on (see --only-split)."),
    group_col: Optional[str] = typer.Option(None, rich_help_panel=_IN, help="Column naming a group (e.g. "
                                            "patient): the held-out split keeps each group on one side."),
    only_split: Optional[str] = typer.Option(None, rich_help_panel=_IN, help="Train on rows of this split only "
                                             "(default: 'train' when the rows carry one), so test rows stay unseen."),
    preset: Optional[str] = typer.Option(None, rich_help_panel=_RECIPE, help="A recipe shipped with embedkit "
                                         "(default shared-encoder; `embedkit models presets` lists them)."),
    config: Optional[Path] = typer.Option(None, "--config", rich_help_panel=_RECIPE,
                                          help="A recipe JSON file, such as the pretrain_config.json of a run."),
    sets: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", rich_help_panel=_RECIPE,
                                             help="Override one recipe field, repeatable: width=128, "
                                                  "max_text_len=128, train.lr=1e-3."),
    extra_images: Optional[Path] = typer.Option(None, rich_help_panel=_UNPAIRED, help="A folder of images "
                                                "without texts (counted as training data)."),
    extra_texts: Optional[Path] = typer.Option(None, rich_help_panel=_UNPAIRED, help="Texts without images: a "
                                               "folder of .txt files or a CSV/JSONL table."),
    extra_text_col: str = typer.Option("text", rich_help_panel=_UNPAIRED,
                                       help="The text column of an --extra-texts table."),
    # Shortcuts for common fields: each becomes a --set (applied before the --set options).
    width: Optional[int] = typer.Option(None, rich_help_panel=_SHORT, help="--set width=..."),
    depth: Optional[int] = typer.Option(None, rich_help_panel=_SHORT, help="--set depth=..."),
    image_size: Optional[int] = typer.Option(None, rich_help_panel=_SHORT, help="--set image_size=..."),
    embed_dim: Optional[int] = typer.Option(None, rich_help_panel=_SHORT, help="--set embed_dim=..."),
    modality_mode: Optional[str] = typer.Option(None, rich_help_panel=_SHORT, help="--set modality_mode=... "
                                                "(concat, add or token)"),
    epochs: Optional[int] = typer.Option(None, rich_help_panel=_SHORT, help="--set epochs=..."),
    batch_size: Optional[int] = typer.Option(None, rich_help_panel=_SHORT, help="--set batch_size=..."),
    lr: Optional[float] = typer.Option(None, rich_help_panel=_SHORT, help="--set lr=..."),
    seed: Optional[int] = typer.Option(None, rich_help_panel=_SHORT, help="--set seed=..."),
    separate: bool = switch(False, "separate", "The separate-encoders baseline at the shared model's parameter "
                                               "budget (the separate preset's model fields)."),
    unpaired: bool = switch(True, "unpaired", "Use the input's images without a text and texts without an image "
                                              "(train split only) in stages that take them (MoMo)."),
    groups: bool = switch(True, "groups", "Hold out whole groups (--no-groups: by image only)."),
    progress: bool = switch(True, "progress", "Show a progress bar."),
):
    """Train embedkit's shared image+text encoder (contrastive) on paired data; use it as shared:OUT.

    What is trained is a recipe: a preset or --config file, then --set overrides. The resolved recipe is saved
    as OUT/pretrain_config.json and travels into the provenance of tables embedded with shared:OUT."""
    import json

    from embedkit.shared_encoder.pretrain_config import load_preset, resolve_pretrain_config
    from embedkit.shared_encoder.train import pretrain as run, select_pairs
    from embedkit.shared_encoder.unpaired import Unpaired, extra_items, select_unpaired
    from embedkit.sources import scan_source

    if group_col and not groups:
        raise EmbedkitError("--group-col and --no-groups contradict each other: pass one")
    # --epochs is the contrastive stage's: the last stage of a staged recipe (MoMo), else train.epochs
    staged = epochs is not None and resolve_pretrain_config(preset, config).stages
    shortcuts = {"model.width": width, "model.depth": depth, "model.image_size": image_size,
                 "model.embed_dim": embed_dim, "model.modality_mode": modality_mode,
                 f"stages.{len(staged)}.epochs" if staged else "train.epochs": epochs,
                 "train.batch_size": batch_size, "train.lr": lr, "train.seed": seed}
    overrides = [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
    if separate:  # the same fields the separate preset sets, so the two cannot drift apart
        baseline = load_preset("separate").model
        overrides += [f"model.shared={str(baseline.shared).lower()}", f"model.match_budget={baseline.match_budget}"]
    recipe = resolve_pretrain_config(preset, config, [*overrides, *(sets or [])])  # bad recipes fail before the data
    rows, source = source_options(data, manifest, metadata, id_col, image_col, text_col, text_file_col, text_template,
                                  [], split_col, group_col, False)
    if split_col:  # the flag wins over a data manifest's own split column
        source.split_col = split_col
    from embedkit.dicom import SALT_FILE

    # beside OUT (which is replaced whole on export): DICOM patient groups, and so the held-out split, stay the
    # same when the run resumes
    source.dicom_salt_file = out.with_name(f".{out.name}.{SALT_FILE}")
    scan = scan_source(data, source, rows=rows)
    pairs, note = select_pairs(scan.items, only_split)
    print(note, file=sys.stderr)
    if len(pairs) < 4:
        raise EmbedkitError(f"pretraining needs image + text pairs; found {len(pairs)} under '{data}'"
                            + (f" in split '{only_split or 'train'}'" if any(it.split for it in scan.items) else ""))
    # Rows of other splits are held back even without --unpaired: extra items may not repeat them either.
    lone, note = select_unpaired(scan.items, only_split)
    if unpaired and lone.items:
        print(note, file=sys.stderr)
    extra = extra_items(extra_images, extra_texts, extra_text_col)
    print(f"pretrain: recipe {recipe.preset or config} with {len(recipe.overrides)} override(s), saved as "
          f"{out / 'pretrain_config.json'}", file=sys.stderr)
    metrics = run(pairs, out, recipe, progress=progress, grouped=groups,
                  unpaired=Unpaired((lone.items if unpaired else []) + extra, lone.held_back))
    held_out = {k: v for k, v in metrics.get("held_out", {}).items() if k != "val_ids"}
    typer.echo(json.dumps({k: metrics.get(k) for k in ("val_retrieval", "parameters", "timings", "n_train", "n_val",
                                                       "stages", "unpaired") if k in metrics}
                          | {"held_out": held_out, "preset": recipe.preset, "overrides": recipe.overrides},
                          default=str))


@app.command()
def retrieval(
    emb: Path = typer.Argument(..., help="An extract folder with image and text embeddings in one space."),
    split: Optional[str] = typer.Option(None, help="Only rows of this split (e.g. test)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="JSON file (default: EMB/retrieval.json)."),
):
    """Image->text and text->image recall@1/5/10 and median rank; written as JSON, and printed on stdout as one
    line of JSON."""
    import json

    from embedkit.shared_encoder.retrieval import retrieval_report

    report = retrieval_report(emb, split=split)
    (out or emb / "retrieval.json").write_text(json.dumps(report, indent=2))
    typer.echo(json.dumps(report))  # a dozen numbers: one line a script can parse


@app.command()
def project(
    emb: Path = typer.Argument(..., help="An extract folder with image and text embeddings of any widths."),
    out: Path = typer.Option(..., "--out", "-o", help="A new extract folder with both in one space."),
    heads: Optional[Path] = typer.Option(None, help="Apply saved heads (OUT/projection of an earlier run)."),
    arch: str = typer.Option("linear", help="linear: one head per modality; up: OneEncoder's universal projection "
                             "(a light transformer with modality tokens)."),
    dim: int = typer.Option(256, help="Width of the common space."),
    epochs: int = typer.Option(100),
    seed: int = typer.Option(0),
    up_width: int = typer.Option(128, help="--arch up: token width."),
    up_tokens: int = typer.Option(4, help="--arch up: tokens per embedding."),
    up_depth: int = typer.Option(1, help="--arch up: shared transformer blocks."),
    add_modality: Optional[Tuple[str, Path]] = typer.Option(
        None, metavar="NAME EMB2", help="Keep --heads frozen and train only an alignment layer for a further "
        "modality NAME whose embeddings are in extract folder EMB2 (joined on id with EMB's rows)."),
    partner: Optional[str] = typer.Option(None, help="--add-modality: align to image or text (default: the one "
                                          "joining the most rows)."),
    add_source: Optional[str] = typer.Option(None, help="--add-modality: which table of EMB2 (image or text; "
                                             "default: its only one)."),
    progress: bool = switch(True, "progress", "Show a progress bar over the epochs."),
):
    """Learn a light contrastive projection of two unimodal encoders into one space (about 10 s for VQA-RAD's 2095
    pairs and 100 epochs on one thread; a loaded 2-core machine can take a minute).

    Metrics go to OUT/projection/metrics.json and OUT/manifest.json; a one-line summary to stderr."""
    from embedkit.console import console
    from embedkit.shared_encoder.project import AddModality, project_embeddings
    from embedkit.shared_encoder.universal import UniversalSettings

    add = None if add_modality is None else AddModality(add_modality[0], add_modality[1], partner, add_source)
    up = UniversalSettings(width=up_width, n_tokens=up_tokens, depth=up_depth) if arch == "up" else None
    r = project_embeddings(emb, out, heads_dir=heads, dim=dim, epochs=epochs, seed=seed, arch=arch, up=up, add=add,
                           progress=progress)
    fit = r["added"].get("fit", {}) if "added" in r else r["fit"]
    held = fit.get("val_retrieval_distinct", fit.get("val_retrieval"))
    scores = "" if not held else (f"; held-out R@1 both ways {held['i2t_R@1']:.3f} / {held['t2i_R@1']:.3f} "
                                  f"(chance {held['chance_R@1']:.3f}, n {held['n']})")
    what = (f"added '{r['added']['modality']}' ({r['added']['rows']} rows, partner {r['added'].get('partner', '-')})"
            if "added" in r else f"{r['rows']} rows")
    console.print(f"project: {what} -> {r['dim']}-d {r['arch']} space in {out}{scores}", markup=False, soft_wrap=True)
    if fit.get("fitted_on"):
        console.print(f"fitted on {fit['fitted_on']}", markup=False, soft_wrap=True)


_DEBUG = {"on": bool(__import__("os").environ.get("EMBEDKIT_DEBUG"))}


@app.callback()
def _global_options(debug: bool = typer.Option(False, "--debug/--no-debug",
                                                                help="Show the Python traceback of a failure.")):
    """Foundation-model embeddings and small fusion classifiers, on a laptop, offline."""
    _DEBUG["on"] = _DEBUG["on"] or debug


plain_help(app)  # every command registered above: no `<bool>` / `{data}` placeholders in --help


def main() -> None:
    """Run the app; every failure ends in one `error:` line and exit 2 (a traceback only with --debug)."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the one place that turns any failure into one line
        if _DEBUG["on"] or "--debug" in sys.argv:
            raise
        from embedkit.guards import one_line_error

        message, code = one_line_error(e)
        from embedkit.console import console

        console.print("[red]error:[/] ", end="")
        console.print(message, markup=False, soft_wrap=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
