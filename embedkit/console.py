"""Messages and progress go to stderr; data goes to files (and stdout only when asked for)."""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Logs and CI capture stderr without a terminal; rich would then assume 80 columns and squeeze tables.
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else int(os.environ.get("COLUMNS", 120)))


def progress_bar(enabled: bool = True) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled, transient=False)


# A message may open with one style tag ("[bold]layout[/]: ..."); everything after it is literal text,
# so a path or a column name holding "[left]" or "[/" is printed as it is, never read as markup.
_LEADING_STYLE = re.compile(r"^(\[(?:bold|yellow|red|green)\][^\[]*\[/\])(.*)$", re.S)


_RECORDERS: list[list[str]] = []


@contextmanager
def recording():
    """Collect the plain text of every say() inside the block: a run's notes and warnings, for its model card."""
    said: list[str] = []
    _RECORDERS.append(said)
    try:
        yield said
    finally:
        _RECORDERS.remove(said)


def say(message: str) -> None:
    from rich.text import Text

    m = _LEADING_STYLE.match(message)
    text = Text.from_markup(m.group(1)) + Text(m.group(2)) if m else Text(message)
    for said in _RECORDERS:
        said.append(text.plain)
    console.print(text)
