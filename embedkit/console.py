"""Messages and progress go to stderr; data goes to files (and stdout only when asked for)."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Logs and CI capture stderr without a terminal; rich would then assume 80 columns and squeeze tables.
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else int(os.environ.get("COLUMNS", 120)))


def progress_bar(enabled: bool = True) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled, transient=False)


def say(message: str) -> None:
    console.print(message)
