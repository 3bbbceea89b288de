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
    text_model: str = typer.Option("minilm", help="Registry name, hf:ID, a local folder, shared:PATH, gguf:PATH "
                                                  "(llama.cpp), or 'none'."),
    metadata: Optional[Path] = typer.Option(None, help="CSV/TSV/JSONL/JSON table describing the items."),
    manifest: Optional[str] = typer.Option(None, help="A data manifest (data_manifests/NAME.toml, or NAME)."),
    id_col: Optional[str] = typer.Option(None, help="Column with a stable id."),
    image_col: Optional[str] = typer.Option(None, help="Column with image paths relative to DATA."),
    text_col: Optional[str] = typer.Option(None, help="Column with report text."),
    text_file_col: Optional[str] = typer.Option(None, help="Column with report file paths relative to DATA."),
    text_template: Optional[str] = typer.Option(None, help="Sentence over columns, e.g. 'Patient aged {age}, {sex}.'"),
    label_col: List[str] = typer.Option([], help="Label column (repeatable)."),
    split_col: Optional[str] = typer.Option(None, help="Column with train/val/test."),
    group_col: Optional[str] = typer.Option(None, help="Column whose rows must stay on one side of a split (a "
                                                       "patient id); stored as `group`. Default with --manifest: "
                                                       "its [split].group_col ('none' turns it off)."),
    allow_leakage: bool = typer.Option(False, help="Allow a text template that names a label column or a "
                                                   "manifest's leakage field."),
    image_pooling: Optional[str] = typer.Option(None, help="dinov2: cls or mean."),
    text_pooling: Optional[str] = typer.Option(None, help="LLMs: mean or last; sentence: mean or cls."),
    max_length: Optional[int] = typer.Option(None, help="Text tokens before truncation."),
    normalize: Optional[bool] = typer.Option(None, "--normalize/--no-normalize",
                                             help="L2-normalise text vectors (default: the model's own choice)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 (float16 on GPU only)."),
    quantize: Optional[str] = typer.Option(None, help="int8: dynamic int8 Linear layers on CPU (transformer "
                                                      "encoders; faster, slightly different vectors)."),
    backend: str = typer.Option("torch", help="torch, onnxruntime, openvino, or auto: the fastest on this machine "
                                              "that keeps parity with torch fp32 (measured once, cached)."),
    precision: Optional[str] = typer.Option(None, help="fp32, bf16, int8 or auto (default: --dtype/--quantize on "
                                                       "torch, fp32 elsewhere); refused below --parity-floor."),
    parity_floor: float = typer.Option(0.99, min=-1.0, max=1.0, help="Lowest cosine to torch fp32 on the "
                                                                     "calibration batch a backend may reach."),
    batch_size: int = typer.Option(32, min=1),
    threads: Optional[int] = typer.Option(None, help="Model CPU threads: torch's, llama.cpp's or the backend's "
                                                     "(default: all cores)."),
    decode_workers: Optional[int] = typer.Option(None, min=1, help="Image decode threads (default: 1 beside "
                                                                   "torch, one per core beside other backends)."),
    trust_remote_code: bool = typer.Option(False, help="Run code shipped with a hub model. Only if you trust it."),
    overwrite: bool = typer.Option(False, help="Start over instead of resuming."),
    prune: bool = typer.Option(False, help="Let a resume delete the rows of inputs that are gone, even more than "
                                           "10% of the table."),
    strict: bool = typer.Option(False, help="Fail on the first bad input instead of recording it."),
    max_report_mb: float = typer.Option(5.0, min=0.001, help="Skip (and record) report files larger than this."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    engine: str = typer.Option("local", help="local (this process) or ray (Ray Data actors; "
                                             "pip install 'embedkit\\[ray]')."),
    address: Optional[str] = typer.Option(None, help="--engine ray: a Ray cluster ('auto', ray://HOST:10001); "
                                                     "default: start Ray on this machine."),
    actors: Optional[int] = typer.Option(None, min=1, help="--engine ray: encoder actors (default: as many as "
                                                           "the cluster's CPUs or GPUs fit)."),
    cpus_per_actor: float = typer.Option(1.0, min=0.01, help="--engine ray: CPUs (and torch threads) per actor."),
    gpus_per_actor: float = typer.Option(0.0, min=0.0, help="--engine ray: GPUs per actor (e.g. 1, or 0.5 to "
                                                            "share one)."),
):
    """Embed every image and report into Parquet (resumes; bad inputs go to errors.parquet)."""
    from embedkit.extract import ExtractConfig
    from embedkit.extract import extract as run
    from embedkit.items import SourceOptions

    source = SourceOptions(metadata=metadata, id_col=id_col, image_col=image_col, text_col=text_col,
                           text_file_col=text_file_col, text_template=text_template, label_cols=list(label_col),
                           split_col=split_col, group_col=_none(group_col), allow_leakage=allow_leakage)
    rows, source = _manifest_or(manifest, data, source)
    if manifest:
        source = _extract_flags_over_manifest(source, text_template, group_col, allow_leakage)
    config = ExtractConfig(image_model=_none(image_model), text_model=_none(text_model), image_pooling=image_pooling,
                           text_pooling=text_pooling, max_length=max_length, text_normalize=normalize,
                           device=device, dtype=dtype,
                           quantize=_none(quantize), batch_size=batch_size, threads=threads,
                           backend=backend, precision=_none(precision), parity_floor=parity_floor,
                           decode_workers=decode_workers, trust_remote_code=trust_remote_code,
                           overwrite=overwrite, strict=strict, progress=progress, engine=engine,
                           ray_address=address, ray_actors=actors, ray_cpus_per_actor=cpus_per_actor,
                           ray_gpus_per_actor=gpus_per_actor, prune=prune,
                           max_report_bytes=int(max_report_mb * 2**20))
    result = run(data, out, config=config, source=source, rows=rows)
    _print_extract_summary(result)


def _manifest_or(manifest: str | None, data: Path, source):
    """(rows, source options) from a data manifest if one is named, else (None, the flags' options)."""
    if not manifest:
        return None, source
    from embedkit.manifests import find_manifest

    m = find_manifest(manifest)
    return m.load_rows(data), m.source_options()


def _extract_flags_over_manifest(source, text_template: str | None, group_col: str | None, allow_leakage: bool):
    """The extract flags that refine a data manifest: another sentence (still checked against the manifest's
    leakage fields), another group column or none, and leave to name leaking fields."""
    from dataclasses import replace

    return replace(source, text_template=text_template or source.text_template,
                   group_col=source.group_col if group_col is None else _none(group_col),
                   allow_leakage=allow_leakage)


def _print_extract_summary(result) -> None:
    from rich.markup import escape
    from rich.table import Table

    from embedkit.console import console

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
    console.print(table)
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


models_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                         help="The model registry and store: list, check CPU backends, pack and install bundles.")
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context):
    """List the model registry, what is available offline on this machine, and the installed bundles
    (`models check` measures the CPU backends)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.markup import escape
    from rich.table import Table

    from embedkit.console import console
    from embedkit.encoders.registry import installed_models, list_models, model_store

    table = Table(title="embedkit models (any transformers id, local folder or gguf:PATH works too)")
    for col in ("name", "family", "modalities", "dim", "pooling", "available here"):
        table.add_column(col)
    for r in list_models():
        table.add_row(r["name"], r["family"], r["modalities"], str(r["dim"]), r["pooling"],
                      ("[green]yes[/] " if r["available"] else "[red]no[/] ") + escape(r["where"]))
    console.print(table)
    installed = installed_models()
    store = Table(title=f"installed from bundles · model store {escape(str(model_store()))}")
    for col in ("name", "source", "revision", "licence", "files", "MB", "installed"):
        store.add_column(col, justify="right" if col in ("files", "MB") else "left")
    for m in installed:
        files = m.get("files") or {}
        store.add_row(*(escape(str(v)) for v in (m.get("name"), m.get("source"), (m.get("revision") or "-")[:12],
                                                m.get("license"), len(files),
                                                f"{sum(f['bytes'] for f in files.values()) / 2**20:.1f}",
                                                m.get("installed"))))
    console.print(store if installed else f"no models installed from bundles in {escape(str(model_store()))} "
                                          f"(embedkit models install BUNDLE)")


@models_app.command("pack")
def models_pack(
    names: List[str] = typer.Argument(..., help="Registry names, hub ids in this machine's cache, or model folders."),
    out: Path = typer.Option(..., "--out", "-o", help="The bundle to write (a .tar file)."),
):
    """Bundle models for a machine without internet: files, spec, licence and the sha256 of every file."""
    import json

    from embedkit.bundles import pack
    from embedkit.console import console

    r = pack(list(names), out)
    for m in r["models"]:
        note = f"; left out: {', '.join(m['left_out'])}" if m["left_out"] else ""
        console.print(f"{m['name']}: {m['files']} files, {m['bytes'] / 2**20:.1f} MB, licence {m['license']}"
                      + (" [yellow](check it before you redistribute)[/]" if m["license"] == "unknown" else "") + note,
                      markup=m["license"] == "unknown", soft_wrap=True)
    console.print(f"bundle -> {r['bundle']} ({r['bytes'] / 2**20:.1f} MB)", markup=False)
    console.print(f"sha256 {r['sha256']}: check it on the offline machine with "
                  f"`embedkit models install {Path(r['bundle']).name} --sha256 {r['sha256']}`", markup=False)
    typer.echo(json.dumps({"sha256": r["sha256"], "models": [m["name"] for m in r["models"]]}))


@models_app.command("install")
def models_install(
    bundle: Path = typer.Argument(..., help="A bundle from `embedkit models pack`."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="The bundle's sha256 as `pack` printed it."),
):
    """Verify every file of a bundle (checksums, no pickles, no paths outside it) and install it into the store."""
    from embedkit.bundles import install
    from embedkit.console import console

    r = install(bundle, sha256)
    for m in r["models"]:
        console.print(f"installed {m['name']} ({m['files']} files, {m['bytes'] / 2**20:.1f} MB, licence "
                      f"{m['license']}) -> {m['folder']}", markup=False)
    console.print(f"every file matched its sha256; bundle sha256 {r['sha256']}", markup=False)


@models_app.command("check")
def models_check(
    model: str = typer.Argument(..., help="Registry name, hf:ID, a local folder or shared:PATH."),
    modality: Optional[str] = typer.Option(None, help="image or text (default: every modality the model has)."),
    backend: str = typer.Option("all", help="all, torch, onnxruntime or openvino."),
    precision: Optional[str] = typer.Option(None, help="fp32, bf16 or int8 (default: every one the backend runs)."),
    threads: Optional[int] = typer.Option(None, min=1, help="Model CPU threads (default: all cores)."),
    parity_floor: float = typer.Option(0.99, min=-1.0, max=1.0, help="Lowest cosine to torch fp32 that passes."),
    trust_remote_code: bool = typer.Option(False, help="Run code shipped with a hub model. Only if you trust it."),
):
    """Export (once, cached), measure parity to torch fp32 and speed of every backend for MODEL on this machine.

    Exits 2 when a single --backend and --precision were asked for and fall below --parity-floor."""
    from rich.table import Table

    from embedkit.console import console
    from embedkit.encoders.backend_choice import check_backends

    rows = check_backends(model, modality=modality, backend=backend, precision=_none(precision), threads=threads,
                          floor=parity_floor, trust_remote_code=trust_remote_code)
    table = Table(title=f"embedkit models check {model} (parity floor {parity_floor:g}; calibration batch, "
                        f"{threads or 'default'} threads)")
    for col in ("modality", "backend", "precision", "cosine min", "cosine mean", "items/s", "x torch fp32",
                "export s", "verdict"):
        table.add_column(col, justify="left" if col in ("modality", "backend", "precision", "verdict") else "right")
    for r in rows:
        p = r.get("parity")
        table.add_row(r["modality"], r["backend"], r["precision"], "reference" if p is None else f"{p['min_cosine']:.4f}",
                      "" if p is None else f"{p['mean_cosine']:.4f}", f"{r.get('items_per_second') or 0:.1f}",
                      f"{r.get('speedup') or 0:.2f}", "" if r.get("export_seconds") is None else
                      f"{r['export_seconds']:.1f}", r["verdict"])
    console.print(table)
    for r in rows:
        if r.get("error"):
            console.print(f"  {r['modality']} {r['backend']} {r['precision']}: {r['error']}", soft_wrap=True)
    asked_one = backend != "all" and precision is not None
    if asked_one and any(r["verdict"] != "passes" for r in rows):
        failed = next(r for r in rows if r["verdict"] != "passes")
        raise EmbedkitError(failed.get("error") or f"{failed['backend']} {failed['precision']} is below the parity "
                                                   f"floor {parity_floor:g} for {model}")


@app.command()
def datasets(folder: Optional[Path] = typer.Option(None, help="Another folder of manifests.")):
    """List the shipped data manifests: what each dataset is, its access and its tasks."""
    from rich.table import Table

    from embedkit.console import console
    from embedkit.manifests import list_manifests

    table = Table(title="data manifests (use with: embedkit extract ROOT --manifest NAME)")
    for col in ("name", "access", "license", "modalities", "tasks"):
        table.add_column(col)
    for m in list_manifests(folder):
        table.add_row(m.path.stem, m.access, m.license, "+".join(m.modalities), ", ".join(m.tasks))
    console.print(table)


@app.command()
def train(
    emb: Path = typer.Argument(..., help="An `embedkit extract` output folder."),
    label: List[str] = typer.Option(..., help="Label column; repeat for multilabel (0/1 columns)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write."),
    fusion: str = typer.Option("late", help="early, late, image, text or logistic."),
    hidden_dim: int = typer.Option(128, help="Early fusion hidden width."),
    late_hidden_dim: int = typer.Option(64, help="Late fusion per-modality width."),
    dropout: float = typer.Option(0.0),
    epochs: int = typer.Option(30),
    lr: float = typer.Option(1e-3),
    batch_size: int = typer.Option(64),
    weight_decay: float = typer.Option(0.01),
    patience: Optional[int] = typer.Option(None, help="Stop after this many epochs without validation gain."),
    class_weights: bool = typer.Option(True, "--class-weights/--no-class-weights", help="Re-weight classes."),
    align: Optional[str] = typer.Option(None, help="Modality alignment fitted on training rows: none (L2-normalise "
                                                   "only), shift, center or standardize."),
    align_lambda: Optional[float] = typer.Option(None, help="Gap shift lambda (1 closes the gap between means); "
                                                            "implies --align shift."),
    align_sweep: Optional[str] = typer.Option(None, help="Candidates chosen on validation in each run, e.g. "
                                                         "'shift:0:1:0.5,center,none' or '-1:1:0.5' (lambdas)."),
    learned_lambda: bool = typer.Option(False, help="Learn the shift's lambda jointly with the classifier."),
    scale: Optional[str] = typer.Option(None, help="standard or none (default: none when aligning, else "
                                                   "standard)."),
    noise_std: float = typer.Option(0.0, help="Training-only Gaussian noise, in units of each feature's "
                                              "training std."),
    modality_dropout: float = typer.Option(0.0, min=0.0, max=1.0, help="Share of training rows whose image or "
                                                                      "text is replaced by its stand-in "
                                                                      "(needs --align)."),
    threshold: str = typer.Option("val-f1", help="Binary decision threshold: val-f1 (chosen on validation), 0.5 "
                                                 "or a number."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="Temperature scaling on "
                                                                           "validation rows."),
    group_col: Optional[str] = typer.Option(None, help="Rows sharing this column's value stay on one side of "
                                                       "every split (default: the group stored by extract)."),
    no_groups: bool = typer.Option(False, "--no-groups", help="Treat rows as independent."),
    data_split: bool = typer.Option(True, "--data-split/--no-data-split", help="Use the data's split column."),
    subgroup_col: List[str] = typer.Option([], help="Report metrics per value of this column (repeatable)."),
    bootstrap: int = typer.Option(1000, min=0, help="Bootstrap resamples for test intervals (0: none)."),
    seeds: int = typer.Option(1, min=1, help="Repeat over seeds for mean, std and 95% interval."),
    cv: Optional[int] = typer.Option(None, min=2, help="k-fold cross-validation instead of one split."),
    seed: int = typer.Option(0),
    image_model: Optional[str] = typer.Option(None, help="Which image embeddings, if several were extracted."),
    text_model: Optional[str] = typer.Option(None, help="Which text embeddings, if several were extracted."),
):
    """Train a fusion classifier; choose on validation, test once; intervals over test groups and seeds."""
    from embedkit.train import TrainConfig
    from embedkit.train import train as run

    models = {k: v for k, v in (("image", image_model), ("text", text_model)) if v}
    cfg = TrainConfig(labels=list(label), fusion=fusion, hidden_dim=hidden_dim, late_hidden_dim=late_hidden_dim,
                      dropout=dropout, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                      class_weight="balanced" if class_weights else None, patience=patience, noise_std=noise_std,
                      align=align or None, align_lambda=align_lambda,
                      align_sweep=align_sweep, learned_lambda=learned_lambda, scale=scale,
                      modality_dropout=modality_dropout, threshold=threshold, calibrate=calibrate,
                      group_col=group_col, groups=not no_groups, data_split=data_split,
                      subgroups=list(subgroup_col), bootstrap=bootstrap, seeds=seeds, cv=cv, seed=seed,
                      models=models)
    metrics = run(emb, out, cfg)
    _print_metrics(metrics, out)


def _print_metrics(metrics: dict, out: Path) -> None:
    from rich.table import Table

    from embedkit.console import console

    spread, boot = metrics["spread"], (metrics.get("bootstrap") or {}).get("metrics", {})
    unit = (metrics.get("bootstrap") or {}).get("unit", "row")
    t = Table(title=f"{out} · test set ({metrics['data']['n']['test']} rows; groups: {metrics['data']['groups']})")
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
        t.add_row(k, f"{metrics['test'][k]:.3f}", f"[{b['low']:.3f}, {b['high']:.3f}]" if b else "-",
                  "use --seeds or --cv" if one else f"{s['mean']:.3f} ± {s['std']:.3f} "
                                                    f"[{s['ci95_low']:.3f}, {s['ci95_high']:.3f}]",
                  f"{v['mean']:.3f}" if v else "-")
    console.print(t)
    if metrics["test"].get("absent_classes"):
        console.print(f"note: classes absent from the test rows (not averaged into macro-F1): "
                      f"{', '.join(map(str, metrics['test']['absent_classes']))}", markup=False)
    cal = metrics.get("calibration") or {}
    if cal:
        console.print(f"calibration on validation: temperature {cal['temperature']:.3f}, threshold "
                      f"{cal['threshold']:.3f} ({cal['threshold_rule']}); test ECE {cal['ece_before']['test']:.3f} "
                      f"-> {cal['ece_after']['test']:.3f}")
    for col, values in (metrics.get("subgroups") or {}).items():
        for value, e in values.items():
            b = e["bootstrap"]["macro_f1"]
            console.print(f"subgroup {col}={value}: n {e['n']}, macro-F1 {e['metrics']['macro_f1']:.3f} "
                          f"[{b['low']:.3f}, {b['high']:.3f}]" + (" (small: unreliable)" if e["small"] else ""),
                          markup=False)
    c = metrics["costs"]
    console.print(f"train {c['train_seconds']:.2f} s · predict {c['predict_seconds']:.3f} s · "
                  f"peak RSS {c['peak_rss_mb']:.0f} MB · model {c['model_bytes'] / 1024:.0f} KiB")
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


@app.command()
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

    r = run(model, emb, out, models=_chosen_models(image_model, text_model))
    had = ", ".join(f"{k or 'none'} {v}" for k, v in r["modalities"].items())
    say(f"{r['rows']} predictions ({had}) -> {r['out']} ({r['predict_seconds']:.3f} s)")


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="A model folder from `embedkit train`."),
    emb: Path = typer.Argument(..., help="Labelled embeddings, e.g. a second clinic's."),
    label: List[str] = typer.Option([], help="Label column(s); default: those the model was trained on."),
    split: Optional[str] = typer.Option(None, help="Only rows of this split (e.g. test)."),
    allow_overlap: bool = typer.Option(False, help="Score rows the model was trained or selected on (flagged)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the metrics as JSON here."),
    rows_out: Optional[Path] = typer.Option(None, help="Write per-row predictions (Parquet) here."),
    image_model: Optional[str] = typer.Option(None, help="Which image embeddings, when EMB holds several "
                                                         "(default: the model's own encoder)."),
    text_model: Optional[str] = typer.Option(None, help="Which text embeddings, when EMB holds several."),
):
    """Compute the training metrics for a trained model on labelled rows it was not fitted on."""
    import json

    from embedkit.predict import evaluate as run

    r = run(model, emb, list(label) or None, out, split=split, allow_overlap=allow_overlap, rows_out=rows_out,
            models=_chosen_models(image_model, text_model))
    m, b = r["eval"], r["bootstrap"]["metrics"]
    summary = {k: m[k] for k in ("n", "accuracy", "macro_f1", "weighted_f1", "auroc", "ece") if k in m}
    summary["bootstrap95"] = {k: [round(v["low"], 4), round(v["high"], 4)] for k, v in b.items()}
    summary["rows_seen_in_training"] = r["rows_seen_in_training"]
    typer.echo(json.dumps(summary))


def _chosen_models(image_model: str | None, text_model: str | None) -> dict:
    return {m: name for m, name in (("image", image_model), ("text", text_model)) if name}


@app.command()
def gap(
    emb: Path = typer.Argument(..., help="An extract folder with image and text embeddings in one space."),
    align: str = typer.Option("none,shift,center,standardize", help="Comma-separated alignment methods to compare: "
                                                                    "none, shift, center, standardize."),
    lambda_: Optional[float] = typer.Option(None, "--lambda", help="The shift's lambda (default 1: closes the gap "
                                                                   "between the means)."),
    split: Optional[str] = typer.Option(None, help="Fit the aligners on rows of this split only (e.g. train); "
                                                   "default: all rows."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for gap.json and gap_pca.png (default: EMB)."),
):
    """Modality-gap diagnostics per alignment method: centroid gap, cosines, cones, probe, MMD, PCA plot."""
    from embedkit.fusion.gap import gap_report_for_folder

    methods = [m.strip() for m in align.split(",") if m.strip()]
    report, out = gap_report_for_folder(emb, methods, lambda_, split, out)
    _print_gap_report(report, out)


def _print_gap_report(report: dict, out: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    from embedkit.console import console

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
    console.print(table)
    for key, label in columns.items():
        console.print(f"  [bold]{label}[/]: {escape(report['explain'][key])}")
    unmatched = {m: k for m, k in report.get("unmatched_rows", {}).items() if k}
    if unmatched:
        console.print("  left out (no partner in the other modality): "
                      + ", ".join(f"{k} {m} rows" for m, k in unmatched.items()))
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(w['message'])}", soft_wrap=True)
    console.print(f"full report -> {out / 'gap.json'} · plot -> {out / 'gap_pca.png'}", markup=False)


@app.command()
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
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for zeroshot.json and "
                                                                 "zeroshot_predictions.parquet (default: EMB)."),
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

    from embedkit.console import console

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
        console.print(t)
    else:
        console.print("no label column to score against (--label): predictions only")
    console.print(f"{report['rows']} predictions ({escape(report['predicted_with'])}) -> "
                  f"{out / 'zeroshot_predictions.parquet'} · report -> {out / 'zeroshot.json'}")


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Keep everything here (default: a temp folder)."),
    n: int = typer.Option(300, help="Synthetic cases."),
    seeds: int = typer.Option(3, min=1),
    backend: str = typer.Option("auto", help="Extraction backend (default: the fastest that keeps parity with "
                                             "torch fp32 on this machine)."),
):
    """End to end on a generated SYNTHETIC clinic: extract, train every fusion, one table of results and costs."""
    import tempfile

    from embedkit.console import console
    from embedkit.demo import DemoConfig, format_summary, run_demo

    with tempfile.TemporaryDirectory(prefix="embedkit-demo-") as tmp:
        folder = out or Path(tmp)
        summary = run_demo(folder, DemoConfig(n=n, seeds=seeds, backend=backend))
        console.print(format_summary(summary))
        console.print(summary["gap_shift"] if summary["gap_shift"] != "run" else "")
        console.print(f"total {summary['total_seconds']:.0f} s" + (f"; everything kept in {out}" if out else ""))


@app.command()
def bench(
    out: Path = typer.Option(Path("bench"), "--out", "-o", help="Folder for bench.json, bench.md and plots."),
    quick: bool = typer.Option(False, help="Smaller N: about 2 minutes instead of 10."),
    preset: Optional[str] = typer.Option(None, hidden=True, help="full, quick or tiny (tests)."),
    sections: Optional[str] = typer.Option(None, help="Comma-separated subset of: images, text, raw, scaling, "
                                                      "train, quantize, backends."),
    images: Optional[Path] = typer.Option(None, help="A folder of real images for the throughput section "
                                                     "(default: generated ones)."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (default: all cores)."),
):
    """Measure extraction, batching, training and memory side by side on this machine; write bench.json/.md + plots."""
    from embedkit.bench import SECTIONS, BenchConfig, run_bench
    from embedkit.console import console, say
    from embedkit.report import fmt

    cfg = BenchConfig(preset=preset or ("quick" if quick else "full"), images=images, threads=threads,
                      sections=tuple(x.strip() for x in sections.split(",")) if sections else SECTIONS)
    result = run_bench(out, cfg, log=say)
    for t in result["targets"]:
        verdict = {True: "[green]met[/]", False: "[red]missed[/]", None: "-"}[t["met"]]
        console.print(f"{verdict:>16}  {t['target']}: {fmt(t['measured'])} (goal {t['goal']}) {t['note']}")
    say(f"{result['total_seconds']} s; load average {result['machine']['load_average_end']} "
        f"on {result['machine']['cores']} cores -> {out / 'bench.md'}, {out / 'bench.json'}")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A model folder (embedkit train) or a bench folder (embedkit bench)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default: RUN_DIR/report.html)."),
    emb: Optional[Path] = typer.Option(None, help="Model folders: the labelled embeddings, for the reliability "
                                                  "diagram (the model's test rows if they are its training data)."),
):
    """One self-contained HTML page (plots inline, no scripts) to read or attach to an email."""
    from embedkit.console import say
    from embedkit.report import build_report

    say(f"report -> {build_report(run_dir, out, emb)}")


@app.command()
def pretrain(
    data: Path = typer.Argument(..., help="Paired images + reports (same inputs as extract)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model folder (resumes if it holds a checkpoint)."),
    metadata: Optional[Path] = typer.Option(None, help="CSV/TSV/JSONL/JSON table describing the pairs."),
    manifest: Optional[str] = typer.Option(None, help="A data manifest (NAME or path)."),
    id_col: Optional[str] = typer.Option(None),
    image_col: Optional[str] = typer.Option(None),
    text_col: Optional[str] = typer.Option(None),
    text_file_col: Optional[str] = typer.Option(None),
    text_template: Optional[str] = typer.Option(None),
    split_col: Optional[str] = typer.Option(None, help="Column with train/val/test: only 'train' rows are "
                                                       "pretrained on (see --only-split)."),
    group_col: Optional[str] = typer.Option(None, help="Column naming a group (e.g. patient): the held-out "
                                                       "split keeps each group on one side."),
    no_groups: bool = typer.Option(False, "--no-groups", help="Hold out by image only, ignoring groups."),
    preset: Optional[str] = typer.Option(None, help="A recipe from the package: shared-encoder (default), "
                                                    "shared-encoder-token, ms-clip, momo, separate."),
    config: Optional[Path] = typer.Option(None, help="A recipe JSON file of the same shape as the presets."),
    set_: list[str] = typer.Option([], "--set", help="key=value override of any recipe field (repeatable)."),
    extra_images: Optional[Path] = typer.Option(None, help="A folder of images without texts (MoMo's unpaired "
                                                           "stages; counted as training data)."),
    extra_texts: Optional[Path] = typer.Option(None, help="Texts without images: a folder of .txt files or a "
                                                          "CSV/JSONL table (column --extra-text-col)."),
    extra_text_col: str = typer.Option("text", help="The text column of an --extra-texts table."),
    unpaired: bool = typer.Option(True, help="Use the input's images without a text and texts without an image "
                                             "(training split only) in stages that take them."),
    width: Optional[int] = typer.Option(None, help="Transformer width (default: the recipe's)."),
    depth: Optional[int] = typer.Option(None, help="Shared transformer blocks."),
    image_size: Optional[int] = typer.Option(None, help="Image side in pixels."),
    embed_dim: Optional[int] = typer.Option(None, help="Common embedding width."),
    modality_mode: Optional[str] = typer.Option(None, help="concat, add or token: how blocks know the modality."),
    only_split: Optional[str] = typer.Option(None, help="Train on rows of this split only (default: 'train' "
                                                        "when the rows carry a split), so test rows stay unseen."),
    separate: bool = typer.Option(False, help="The separate-encoders baseline with a matched parameter budget."),
    epochs: Optional[int] = typer.Option(None, help="Epochs of the contrastive stage (default: the recipe's)."),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    progress: bool = typer.Option(True),
):
    """Train embedkit's shared image+text encoder (contrastive) on paired data; use it as shared:OUT."""
    import json

    from embedkit.items import SourceOptions
    from dataclasses import replace

    from embedkit.shared_encoder import matched_separate_config, pretrain as run
    from embedkit.shared_encoder.pretrain_config import resolve_pretrain_config
    from embedkit.shared_encoder.train import select_pairs
    from embedkit.shared_encoder.unpaired import Unpaired, extra_items, select_unpaired
    from embedkit.sources import scan_source

    if group_col and no_groups:
        raise EmbedkitError("--group-col and --no-groups contradict each other: pass one")
    source = SourceOptions(metadata=metadata, id_col=id_col, image_col=image_col, text_col=text_col,
                           text_file_col=text_file_col, text_template=text_template, split_col=split_col,
                           group_col=group_col)
    rows, source = _manifest_or(manifest, data, source)
    for name, value in (("split_col", split_col), ("group_col", group_col)):
        if value:  # the flags win over a data manifest's own columns
            setattr(source, name, value)
    scan = scan_source(data, source, rows=rows)
    pairs, note = select_pairs(scan.items, only_split)
    print(note, file=sys.stderr)
    if len(pairs) < 4:
        raise EmbedkitError(f"pretraining needs image + text pairs; found {len(pairs)} under '{data}'"
                            + (f" in split '{only_split or 'train'}'" if any(it.split for it in scan.items) else ""))
    shortcuts = {"width": width, "depth": depth, "image_size": image_size, "embed_dim": embed_dim,
                 "modality_mode": modality_mode, "batch_size": batch_size, "lr": lr, "seed": seed}
    sets = [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
    recipe = resolve_pretrain_config(preset, config, sets + list(set_))
    if epochs is not None:  # the contrastive stage: the last one of a staged recipe
        key = f"stages.{len(recipe.stages)}.epochs" if recipe.stages else "epochs"
        recipe = resolve_pretrain_config(preset, config, sets + list(set_) + [f"{key}={epochs}"])
    if separate:
        recipe = replace(recipe, model=matched_separate_config(recipe.model))
    # Rows of other splits are held back even without --unpaired: extra items may not repeat them either.
    lone, note = select_unpaired(scan.items, only_split)
    if unpaired and lone.items:
        print(note, file=sys.stderr)
    extra = extra_items(extra_images, extra_texts, extra_text_col)
    metrics = run(pairs, out, recipe, progress=progress, grouped=not no_groups,
                  unpaired=Unpaired((lone.items if unpaired else []) + extra, lone.held_back))
    held_out = {k: v for k, v in metrics.get("held_out", {}).items() if k != "val_ids"}
    typer.echo(json.dumps({k: metrics.get(k) for k in ("val_retrieval", "parameters", "timings", "n_train", "n_val",
                                                       "stages", "unpaired") if k in metrics}
                          | {"held_out": held_out}, default=str))


@app.command()
def retrieval(
    emb: Path = typer.Argument(..., help="An extract folder with image and text embeddings in one space."),
    split: Optional[str] = typer.Option(None, help="Only rows of this split (e.g. test)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="JSON file (default: EMB/retrieval.json)."),
):
    """Image->text and text->image recall@1/5/10 and median rank; printed on stdout and written as JSON."""
    import json

    from embedkit.shared_encoder.retrieval import retrieval_report

    report = retrieval_report(emb, split=split)
    (out or emb / "retrieval.json").write_text(json.dumps(report, indent=2))
    typer.echo(json.dumps(report, indent=2))


@app.command()
def project(
    emb: Path = typer.Argument(..., help="An extract folder with image and text embeddings of any widths."),
    out: Path = typer.Option(..., "--out", "-o", help="A new extract folder with both in one space."),
    heads: Optional[Path] = typer.Option(None, help="Apply saved heads (OUT/projection of an earlier run)."),
    dim: int = typer.Option(256, help="Width of the common space."),
    epochs: int = typer.Option(100),
    seed: int = typer.Option(0),
):
    """Learn a light contrastive projection of two unimodal encoders into one space (seconds on CPU)."""
    import json

    from embedkit.shared_encoder.project import project_embeddings

    r = project_embeddings(emb, out, heads_dir=heads, dim=dim, epochs=epochs, seed=seed)
    typer.echo(json.dumps(r, indent=2, default=str))


_DEBUG = {"on": bool(__import__("os").environ.get("EMBEDKIT_DEBUG"))}


@app.callback()
def _global_options(debug: bool = typer.Option(False, "--debug", help="Show the Python traceback of a failure.")):
    """Foundation-model embeddings and small fusion classifiers, on a laptop, offline."""
    _DEBUG["on"] = _DEBUG["on"] or debug


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
