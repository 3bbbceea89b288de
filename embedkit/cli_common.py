"""Small helpers the CLI modules share (cli.py, cli_models.py, cli_train.py); no torch at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def none_word(value: str | None) -> str | None:
    """'none' (or an empty value) on the command line means None."""
    return None if value in (None, "", "none", "None") else value


def chosen_models(image_model: str | None, text_model: str | None) -> dict:
    """--image-model / --text-model picks, as the `models` argument of load_embeddings and friends."""
    return {m: name for m, name in (("image", image_model), ("text", text_model)) if name}


def switch(default: bool | None, name: str, help: str) -> typer.models.OptionInfo:
    """A boolean option spelled --NAME/--no-NAME, listed in the command's Switches panel. The panel has no value
    column (a switch takes none), which keeps every flag name whole in an 80-column terminal."""
    return typer.Option(default, f"--{name}/--no-{name}", help=help, metavar="", rich_help_panel="Switches")


# ---------------------------------------------------------------- input options, declared once
# `extract` and `compare` read a data folder the same way: the same options, the same panel, one builder.

INPUT_PANEL = "Input"
ID_COL_HELP = "Column with a stable id; @row: the row number (a table without an id column)."
Metadata = Annotated[Optional[Path], typer.Option(rich_help_panel=INPUT_PANEL,
                                                  help="CSV/TSV/JSONL/JSON table describing the items.")]
Manifest = Annotated[Optional[str], typer.Option(rich_help_panel=INPUT_PANEL,
                                                 help="A data manifest: NAME (see `embedkit datasets`) or a .toml "
                                                      "path.")]
IdCol = Annotated[Optional[str], typer.Option(rich_help_panel=INPUT_PANEL, help=ID_COL_HELP)]
ImageCol = Annotated[Optional[str], typer.Option(rich_help_panel=INPUT_PANEL,
                                                 help="Column with image paths relative to DATA.")]
TextCol = Annotated[Optional[str], typer.Option(rich_help_panel=INPUT_PANEL, help="Column with report text.")]
TextFileCol = Annotated[Optional[str], typer.Option(rich_help_panel=INPUT_PANEL,
                                                    help="Column with report file paths relative to DATA.")]
TextTemplate = Annotated[Optional[str], typer.Option(rich_help_panel=INPUT_PANEL,
                                                     help="Sentence over columns, e.g. 'Patient aged {age}, {sex}.'")]
SplitCol = Annotated[Optional[str], typer.Option(rich_help_panel=INPUT_PANEL, help="Column with train/val/test.")]
GroupCol = Annotated[Optional[str], typer.Option(rich_help_panel=INPUT_PANEL,
                                                 help="Column whose rows must stay on one side of a split (a patient "
                                                      "id); stored as `group`. Default with --manifest: its "
                                                      "\\[split].group_col ('none' turns it off).")]
MaxReportMb = Annotated[float, typer.Option(min=0.001, rich_help_panel=INPUT_PANEL,
                                            help="Skip (and record) report files larger than this.")]


def source_options(data: Path, manifest: str | None, metadata, id_col, image_col, text_col, text_file_col,
                   text_template, label_cols: list[str], split_col, group_col, allow_leakage: bool,
                   dicom: dict | None = None):
    """(rows, SourceOptions) from the input options: a data manifest's, refined by the flags that may refine
    one (another sentence, still checked against the manifest's leakage fields; another group column or none;
    leave to name leaking fields; how DICOM files are read), or the flags' own."""
    from dataclasses import replace

    from embedkit.items import SourceOptions

    dicom = dicom or {}
    source = SourceOptions(metadata=metadata, id_col=id_col, image_col=image_col, text_col=text_col,
                           text_file_col=text_file_col, text_template=text_template, label_cols=list(label_cols),
                           split_col=split_col, group_col=none_word(group_col), allow_leakage=allow_leakage, **dicom)
    if not manifest:
        return None, source
    from embedkit.manifests import find_manifest

    m = find_manifest(manifest)
    rows, source = m.load_rows(data), m.source_options()
    return rows, replace(source, text_template=text_template or source.text_template,
                         group_col=source.group_col if group_col is None else none_word(group_col),
                         allow_leakage=allow_leakage, **dicom)


# ---------------------------------------------------------------- input options shared by commands that read DATA

DICOM_PANEL = "DICOM"


def dicom_options() -> dict[str, typer.models.OptionInfo]:
    """The DICOM flags of every command that reads a data folder (extract, and any command taking its inputs):
    declare them as `dicom_window: str = DICOM["dicom_window"]` and pass `dicom_source_fields(...)` on."""
    return {
        "dicom_window": typer.Option("auto", rich_help_panel=DICOM_PANEL, metavar="WINDOW",
                                     help="auto (the file's first VOI LUT or window, else its full range), minmax, "
                                          "N (the file's N-th window) or C,W (e.g. 40,400)."),
        "dicom_frames": typer.Option("middle", rich_help_panel=DICOM_PANEL, metavar="middle|all",
                                     help="Multi-frame files: the middle frame, or every frame as its own row."),
        "dicom_per": typer.Option(None, rich_help_panel=DICOM_PANEL, metavar="study|series|image",
                                  help="Images embedded per study, per series or every file (default: series in "
                                       "a folder, every row of a table)."),
        "dicom_salt_file": typer.Option(None, rich_help_panel=DICOM_PANEL, metavar="PATH",
                                        help="Secret keying the patient/study/series pseudonyms (default: "
                                             "OUT/dicom_salt.key, created once; share it only to link folders)."),
    }


DICOM = dicom_options()


def dicom_source_fields(dicom_window: str, dicom_frames: str, dicom_per, dicom_salt_file) -> dict:
    """SourceOptions fields from the DICOM flags, checked (one error line on a bad value)."""
    from embedkit.dicom import FRAME_CHOICES, PER_CHOICES, check_choice, check_window

    return {"dicom_window": check_window(dicom_window),
            "dicom_frames": check_choice(dicom_frames, FRAME_CHOICES, "--dicom-frames"),
            "dicom_per": check_choice(dicom_per, PER_CHOICES, "--dicom-per"), "dicom_salt_file": dicom_salt_file}


# ---------------------------------------------------------------- help without placeholder noise
# Typer labels every option with its Python type, a flag too ("--help <bool>", "--label <list[str]>"), and
# writes a required argument as "{data}" in the usage line. A flag takes no value, a value is named as click
# names it (TEXT, INTEGER, FLOAT, PATH), and an argument reads best as DATA.


def _plain_metavars(params) -> None:
    from typer.core import TyperArgument

    for p in params:
        if p.metavar is not None or isinstance(p, TyperArgument):  # an argument's metavar names it in the usage
            continue
        # typer prints the metavar, when there is one, instead of the Python type
        if getattr(p, "is_flag", False):
            p.metavar = ""
            continue
        try:
            label = p.display_type(None).strip("<>")
        except Exception:  # noqa: BLE001 - a type typer cannot name without a context keeps typer's label
            continue
        label = label.removeprefix("list[").removesuffix("]").removesuffix(" range")
        p.metavar = _VALUE_NAMES.get(label, p.metavar)


_VALUE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "file": "PATH",
                "directory": "PATH"}


def _usage_pieces(command, ctx) -> list[str]:
    from typer.core import TyperArgument

    pieces = [command.options_metavar] if command.options_metavar else []
    for p in command.get_params(ctx):
        if isinstance(p, TyperArgument):
            name = (p.metavar or p.name or "").upper() + ("..." if p.nargs != 1 else "")
            pieces.append(name if p.required else f"[{name}]")
    return pieces


class _PlainHelp:
    """Shared by commands and groups: no `<bool>` beside flags, values named TEXT/INTEGER/PATH, arguments DATA."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _plain_metavars(self.params)

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        _plain_metavars([opt] if opt is not None else [])
        return opt


class PlainHelpCommand(_PlainHelp, typer.core.TyperCommand):
    """A command whose --help shows no `<bool>` beside flags and names its arguments DATA, [OUT]."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return _usage_pieces(self, ctx)


class PlainHelpGroup(_PlainHelp, typer.core.TyperGroup):
    """A group (the app, `models`) with the same plain help as PlainHelpCommand."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [*_usage_pieces(self, ctx), self.subcommand_metavar]


def plain_help(app: typer.Typer) -> typer.Typer:
    """Give every command registered on `app` and its sub-apps the plain help; call once all are registered."""
    for info in app.registered_commands:
        if info.cls in (None, typer.core.TyperCommand):
            info.cls = PlainHelpCommand
    for group in app.registered_groups:
        plain_help(group.typer_instance)
    return app
