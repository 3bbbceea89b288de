"""A trained model folder read as one snapshot, every loaded number checked.

`train --out` replaces a model folder whole (guards.replaced_folder: staged beside it, swapped in). A
reader that opened embedkit_model.json before a swap and model.safetensors after it would apply one
model's calibration and threshold to another's weights. `snapshot(folder)` copies the files a model is
loaded from into a private folder and checks that the folder was the same one (same inode, same file
sizes and times) before and after the copy, retrying a few times while a swap is under way; everything
is then read from the copy. A folder whose swap was interrupted between its two renames (no FOLDER, a
`.FOLDER.old` beside it) is read from the old copy, which is the last complete model.

`check_model_numbers(est, info, where)`: what the JSON and the tensors say must be usable numbers:
finite, a temperature > 0, thresholds in [0, 1], the standardisation vectors shaped as the estimator's
input (a 1-element tensor would broadcast silently) with scales > 0.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from embedkit.errors import EmbedkitError

# What loading a model reads: its JSON files and safetensors at the top of the folder.
_MODEL_SUFFIXES = (".json", ".safetensors")
SNAPSHOT_TRIES = 5


def readable_folder(folder: Path) -> Path:
    """The folder to read: `folder`, or its `.NAME.old` copy when a swap stopped between its renames."""
    folder = Path(folder)
    aside = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and aside.is_dir():
        from embedkit.console import say

        say(f"note: {folder} is being replaced or its replacement stopped half-way; reading the previous model "
            f"from {aside.name} (the next `train --out` there restores or replaces it)")
        return aside
    return folder


def _state(folder: Path) -> tuple:
    st = os.stat(folder)
    files = []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.endswith(_MODEL_SUFFIXES) and e.is_file():
                s = e.stat()
                files.append((e.name, s.st_size, s.st_mtime_ns, s.st_ino))
    return st.st_dev, st.st_ino, tuple(sorted(files))


@contextmanager
def snapshot(folder):
    """Yield a private copy of the model files of `folder`, taken while the folder did not change."""
    folder = readable_folder(Path(folder))
    if not folder.is_dir():
        yield folder  # not a folder: the loader says what is wrong with the path as given
        return
    tmp = Path(tempfile.mkdtemp(prefix="embedkit-model-"))
    try:
        for _ in range(SNAPSHOT_TRIES):
            try:
                before = _state(folder)
                for name, *_ in before[2]:
                    shutil.copyfile(folder / name, tmp / name)
                if _state(folder) == before:
                    break
            except FileNotFoundError:
                pass  # a swap removed the folder or a file between our reads: read again
            for p in tmp.iterdir():
                p.unlink()
        else:
            raise EmbedkitError(f"model folder '{folder}' kept changing while it was read (another run is "
                                f"replacing it); run again when that run has finished")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bad(where, what: str) -> EmbedkitError:
    return EmbedkitError(f"model folder '{where}' is damaged or was edited ({what}); retrain it")


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _all_finite(value) -> bool:
    """Every number in a JSON value is finite (json reads NaN and Infinity without complaint)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    return True


def check_model_numbers(est, info: dict, where) -> None:
    """Refuse numbers a model could not honestly be applied with (see the module docstring)."""
    calib = info.get("calibration") or {}
    if not isinstance(calib, dict):
        raise _bad(where, "calibration is not an object")
    t = calib.get("temperature", 1.0)
    if not _finite_number(t) or t <= 0:
        raise _bad(where, f"calibration temperature {t!r} is not a finite number > 0")
    thresholds = calib.get("threshold", 0.5)
    for th in thresholds if isinstance(thresholds, list) else [thresholds]:
        if not _finite_number(th) or not 0 <= th <= 1:
            raise _bad(where, f"decision threshold {th!r} is not a number in [0, 1]")
    for key in ("alignment", "learned_lambda", "ood_guard"):
        if not _all_finite(info.get(key)):
            raise _bad(where, f"its {key} holds NaN or infinite numbers")
    n = getattr(est, "n_features_in_", None)
    for attr in ("mean_", "scale_"):
        v = getattr(est, attr, None)
        if v is None:
            continue
        v = np.asarray(v)
        if isinstance(n, (int, np.integer)) and v.shape != (int(n),):
            raise _bad(where, f"{attr.rstrip('_')} has shape {list(v.shape)}, the model takes {int(n)} features")
        if not np.isfinite(v).all() or (attr == "scale_" and not (v > 0).all()):
            raise _bad(where, f"{attr.rstrip('_')} holds NaN, infinite{' or non-positive' * (attr == 'scale_')} "
                              f"values")
