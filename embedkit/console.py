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
# Listings a user may redirect (`embedkit datasets > list.txt`) are data: stdout, same width rule.
stdout_console = Console(highlight=False, width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 120)))


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


_HELD: list[bool] = []


@contextmanager
def held():
    """Inside the block say() prints nothing (recording() still collects): for a caller that runs a step many
    times and says each distinct message once (the demo trains nine models on the same data)."""
    _HELD.append(True)
    try:
        yield
    finally:
        _HELD.pop()


def say(message: str) -> None:
    from rich.text import Text

    m = _LEADING_STYLE.match(message)
    text = Text.from_markup(m.group(1)) + Text(m.group(2)) if m else Text(message)
    for said in _RECORDERS:
        said.append(text.plain)
    if not _HELD:
        console.print(text)


def show_table(table, out: Console | None = None) -> None:
    """Print a rich Table if its widest cells fit the terminal; otherwise one block per row (the first column's
    value, then `column: value` pairs packed into lines). Rich would squeeze a table that does not fit into
    columns a few letters wide, wrapping or cutting each cell; a block keeps every value whole: a pair longer
    than a line gets lines of its own, broken only between words, never cut."""
    from rich.padding import Padding
    from rich.text import Text

    out = out or console
    if table_width(table, out) <= out.width:
        out.print(table)
        return
    if table.title:
        out.print(_as_text(table.title), style="bold")
    names = [_as_text(c.header).plain for c in table.columns]
    columns = [[_as_text(cell) for cell in c.cells] for c in table.columns]
    for row in zip(*columns):
        out.print(row[0], style="bold")
        line, room = Text("  "), out.width
        for name, value in zip(names[1:], row[1:]):
            if not value.plain.strip():
                continue
            pair = Text(f"{name}: ", style="dim") + value
            if len(line) > 2 and len(line) + 3 + len(pair) > room:
                out.print(line)
                line = Text("  ")
            if 2 + len(pair) > room:  # too long for any line: its own, wrapped between words
                out.print(Padding(pair, (0, 0, 0, 2), expand=False))
                continue
            line += Text("   ") + pair if len(line) > 2 else pair
        if len(line) > 2:
            out.print(line)


def table_width(table, out: Console | None = None) -> int:
    """The columns a table needs with no cell wrapped (rich's own measure stops at the terminal's width)."""
    from rich.measure import Measurement

    out = out or console
    return Measurement.get(out, out.options.update_width(10**6), table).maximum


def _as_text(cell):
    from rich.text import Text

    if isinstance(cell, Text):
        return cell
    return Text.from_markup(cell) if isinstance(cell, str) else Text(str(cell))
