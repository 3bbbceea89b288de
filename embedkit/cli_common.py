"""Small helpers the CLI modules share (cli.py, cli_models.py, cli_train.py); no torch at import time."""

from __future__ import annotations

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


# ---------------------------------------------------------------- input options shared by commands that read DATA

DICOM_PANEL = "DICOM"
ID_COL_HELP = "Column with a stable id; @row: the row number (a table without an id column)."


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
