"""`embedkit models ...`: the model registry and store (list, pack, install, check CPU backends).
cli.py adds this sub-app; this module does not import cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from embedkit.cli_common import PlainHelpGroup, none_word, switch
from embedkit.errors import EmbedkitError

models_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, cls=PlainHelpGroup,
                         help="The model registry and store: list, check CPU backends, pack and install bundles.")


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context):
    """List the model registry, what is available offline on this machine, and the installed bundles
    (`models check` measures the CPU backends)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.markup import escape
    from rich.table import Table

    from embedkit.console import show_table, stdout_console
    from embedkit.encoders.gguf_files import DEFAULT_GGUF_DIR
    from embedkit.encoders.registry import installed_models, list_models, model_store

    console = stdout_console  # a listing is data: `embedkit models > models.txt` keeps it
    table = Table(title="embedkit models (any transformers id, local folder or gguf:PATH works too)")
    for col in ("name", "family", "modalities", "dim", "pooling", "here"):
        table.add_column(col)
    rows = list_models()
    for r in rows:
        table.add_row(r["name"], r["family"], r["modalities"], str(r["dim"]), r["pooling"],
                      "[green]yes[/]" if r["available"] else "[red]no[/]")
    show_table(table, console)
    # where each one is, and the commands that bring the others here: whole lines, never squeezed into a cell
    here, missing = [r for r in rows if r["available"]], [r for r in rows if not r["available"]]
    width = max(len(r["name"]) for r in rows)
    if here:
        console.print("here:", markup=False)
        _name_and_value(console, [(r["name"], r["where"]) for r in here], width)
    if missing:
        console.print("not here: on a connected machine run the command beside each, then `embedkit models pack NAME "
                      "--out NAME.tar`; copy the file here and run `embedkit models install NAME.tar` (GGUF files: "
                      f"copy them into {escape(str(DEFAULT_GGUF_DIR))})", markup=False)
        _name_and_value(console, [(r["name"], r["download"]) for r in missing], width)
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
    if installed:
        show_table(store, console)
    else:
        console.print(f"no models installed from bundles in {escape(str(model_store()))} (embedkit models install "
                      f"BUNDLE)")


def _name_and_value(console, pairs: list[tuple[str, str]], width: int) -> None:
    """`  name  value` lines; a value (a command, a path) is never broken: too long beside its name, it gets a line
    of its own, left whole for the terminal to wrap."""
    for name, value in pairs:
        beside = f"  {name:<{width}}  {value}"
        for line in [beside] if len(beside) <= console.width else [f"  {name}", f"      {value}"]:
            console.print(line, markup=False, soft_wrap=True)


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


@models_app.command("presets")
def models_presets():
    """The shared-encoder recipes `embedkit pretrain --preset NAME` takes, with what each changes."""
    from dataclasses import fields

    from rich.markup import escape
    from rich.table import Table

    from embedkit.console import show_table, stdout_console
    from embedkit.shared_encoder.pretrain_config import PretrainConfig, load_preset, preset_names

    defaults = PretrainConfig()
    table = Table(title="embedkit pretrain presets (--preset NAME; change any field with --set key=value)")
    for col in ("name", "description", "differs from the defaults"):
        table.add_column(col)
    for name in preset_names():
        cfg = load_preset(name)
        changed = [f"{f.name}={getattr(section, f.name)}" for part in ("model", "train")
                   for section, default in [(getattr(cfg, part), getattr(defaults, part))]
                   for f in fields(section) if getattr(section, f.name) != getattr(default, f.name)]
        changed += [f"stages: {' -> '.join(s.name for s in cfg.stages)}"] if cfg.stages else []
        table.add_row(name, escape(cfg.description), escape(", ".join(changed) or "-"))
    show_table(table, stdout_console)


@models_app.command("check")
def models_check(
    model: str = typer.Argument(..., help="Registry name, hf:ID, a local folder or shared:PATH."),
    modality: Optional[str] = typer.Option(None, help="image or text (default: every modality the model has)."),
    backend: str = typer.Option("all", help="all, torch, onnxruntime or openvino."),
    precision: Optional[str] = typer.Option(None, help="fp32, bf16 or int8 (default: every one the backend runs)."),
    threads: Optional[int] = typer.Option(None, min=1, help="Model CPU threads (default: all cores)."),
    parity_floor: float = typer.Option(0.99, min=-1.0, max=1.0, help="Lowest cosine to torch fp32 that passes."),
    trust_remote_code: bool = switch(False, "trust-remote-code", "Run code shipped with a hub model. Only if you "
                                                                 "trust it."),
):
    """Export (once, cached), measure parity to torch fp32 and speed of every backend for MODEL on this machine.

    Exits 2 when a single --backend and --precision were asked for and fall below --parity-floor."""
    from rich.markup import escape
    from rich.table import Table

    from embedkit.console import console, show_table
    from embedkit.encoders.backend_choice import check_backends

    rows = check_backends(model, modality=modality, backend=backend, precision=none_word(precision), threads=threads,
                          floor=parity_floor, trust_remote_code=trust_remote_code)
    table = Table(title=f"embedkit models check {escape(model)} (parity floor {parity_floor:g}; calibration batch, "
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
    show_table(table)
    failed: dict[str, list[str]] = {}  # one line per distinct error, naming every row it stopped
    for r in rows:
        if r.get("error"):
            failed.setdefault(r["error"], []).append(f"{r['modality']} {r['backend']} {r['precision']}")
    for error, which in failed.items():
        console.print(f"  {', '.join(which)}: {error}", markup=False, soft_wrap=True)
    asked_one = backend != "all" and precision is not None
    if asked_one and any(r["verdict"] != "passes" for r in rows):
        bad = next(r for r in rows if r["verdict"] != "passes")
        raise EmbedkitError(bad.get("error") or f"{bad['backend']} {bad['precision']} is below the parity "
                                                f"floor {parity_floor:g} for {model}")
    if not any(r["verdict"] == "passes" for r in rows):  # every row an error: the check failed, whatever was asked
        raise EmbedkitError(f"no backend runs {model} on this machine"
                            + (": see the errors above" if failed else f" at parity >= {parity_floor:g}"))
