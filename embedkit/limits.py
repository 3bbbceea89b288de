"""Checks at the point of use: counts a user types, files that another file names, files opened inside a folder.

- `check_count(value, flag, low, high, unit)`: a count typed on the command line (seeds, sweep points,
  classes, batch size) within bounds, else one line naming the flag and the bound.
- `estimate_note(...)`: the line said before long work (how many fits, roughly how long).
- `named_file(folder, name, kind)`: a file that a results file (bench.json) names must be a plain relative
  path inside `folder`, a regular file once links are followed inside it, and of the expected type.
- `open_inside(path, real_root)`: open a data file and prove that what was opened lies inside the data folder
  (the scan-time check repeated at open time: a file swapped for a link out of the folder is refused).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from embedkit.errors import EmbedkitError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIGNATURES = {"png": PNG_SIGNATURE}


def check_count(value, flag: str, low: int, high: int, why: str = "") -> int:
    """`value` as an int in [low, high], else a one-line error naming `flag` (and why the bound exists)."""
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise EmbedkitError(f"{flag} must be a whole number, got {value!r}") from None
    if n != value and not isinstance(value, str):
        raise EmbedkitError(f"{flag} must be a whole number, got {value!r}")
    if not low <= n <= high:
        raise EmbedkitError(f"{flag} must lie between {low} and {high}, got {n}{f' ({why})' if why else ''}")
    return n


def estimate_note(fits: int, what: str, seconds_each: float | None = None) -> str:
    """'note: 60 fits (5 seeds x 12 sweep points) ...' said before the work starts."""
    rough = f", roughly {_duration(fits * seconds_each)} on this machine" if seconds_each else ""
    return f"note: {fits} model fits ({what}){rough}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def named_file(folder: Path, name, kind: str) -> Path | None:
    """`folder / name` if `name` is a plain relative path to a regular file inside `folder` (links followed
    must stay inside) whose first bytes are a `kind` file; None otherwise (the caller leaves it out)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return None
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    real_root = Path(os.path.realpath(folder))
    path = Path(folder) / rel
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(real_root) or not real.is_file():
        return None
    try:
        with open(real, "rb") as f:
            head = f.read(len(_SIGNATURES[kind]))
    except OSError:
        return None
    return path if head == _SIGNATURES[kind] else None


def open_inside(path: Path, real_root: Path):
    """Open `path` for reading (binary) and check that the opened file lies inside `real_root` (resolved): the
    file's real path must be inside, and be the very file that was opened (so a link swapped in between the
    two looks is caught). Raises OSError (EACCES) with the reason otherwise."""
    f = open(path, "rb")
    try:
        real = os.path.realpath(path)
        opened, there = os.fstat(f.fileno()), os.stat(real)
        if not Path(real).is_relative_to(real_root) or (opened.st_dev, opened.st_ino) != (there.st_dev, there.st_ino):
            raise PermissionError(13, "outside the data folder (a link out of it)", str(path))
    except BaseException:
        f.close()
        raise
    return f


# Bounds on what a user types. Each is far beyond any sensible run and far below what exhausts a laptop.
MAX_SEEDS = 100  # --seeds: a spread over 100 splits is already tight; more is hours of the same
MAX_FOLDS = 50  # --cv
MAX_SWEEP = 201  # --align-sweep candidates (a lambda grid of 0.01 over [-1, 1])
MAX_BOOTSTRAP = 100_000  # --bootstrap resamples
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536  # train and extract --batch-size: one batch is held in memory at once
MAX_EXTRACT_BATCH = 4_096
MAX_PROJECTION_DIM = 8_192  # project --dim
MAX_CLASSES = 1_000  # a label with more distinct values is an id or free-text column, not a class label
NOTE_FITS = 20  # more fits than this: say how many before starting


def check_train_counts(cfg) -> None:
    """The counts of a TrainConfig within bounds, before any data is read."""
    check_count(cfg.seeds, "--seeds", 1, MAX_SEEDS, "each seed is one more fit")
    if cfg.cv is not None:
        check_count(cfg.cv, "--cv", 2, MAX_FOLDS)
    check_count(cfg.bootstrap, "--bootstrap", 0, MAX_BOOTSTRAP)
    check_count(cfg.epochs, "--epochs", 1, MAX_EPOCHS)
    check_count(cfg.batch_size, "--batch-size", 1, MAX_BATCH)


def check_classes(n: int, label: str) -> None:
    if n > MAX_CLASSES:
        raise EmbedkitError(f"label '{label}' has {n} distinct values, more than {MAX_CLASSES} classes: is it an id or "
                            f"a free-text column? choose a class label with --label")


def fits_note(n_runs: int, n_candidates: int, spread: str) -> str | None:
    """The line said before training when the run fits many models (None when few)."""
    fits = n_runs * n_candidates
    if fits <= NOTE_FITS:
        return None
    return estimate_note(fits, f"{n_runs} {spread} x {n_candidates} alignment candidates") + \
        "; a progress line follows each run"
