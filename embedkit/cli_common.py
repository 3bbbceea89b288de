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
