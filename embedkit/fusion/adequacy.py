"""Too little data to say much: what a run must say out loud, and how a number shows when it cannot be trusted.

A model trained and tested on a handful of rows still prints numbers, and a 2-row test set can show AUROC
1.000 [1.000, 1.000]. These rules make such numbers say what they are:
- fewer than MIN_TEST_ROWS test rows, or fewer than MIN_ROWS_PER_CLASS rows of a class in any split: a
  warning (CLI, metrics.json, the model card);
- a metric that cannot be computed: "n/a (why)", never "nan";
- an interval wider than TOO_WIDE, or one over fewer than MIN_TEST_ROWS units: "too wide to tell" / "too
  few rows to tell" beside it;
- a model with more parameters than training rows: said, since it can fit them by heart.
"""

from __future__ import annotations

import math

import numpy as np

MIN_TEST_ROWS = 30
MIN_ROWS_PER_CLASS = 5
TOO_WIDE = 0.3

_SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}
_CONSEQUENCE = {
    "train": "the model has almost nothing to learn it from",
    "val": "the best epoch, threshold and temperature chosen on it are noisy; use more data or --cv",
    "test": "its recall, precision and F1, and the macro-F1 averaging them, rest on a handful of cases",
}


def class_counts(y, rows, classes=None) -> dict[str, int]:
    """Rows of each class among `rows` (multilabel: positives per label), every known class included."""
    y = np.asarray(y)[np.asarray(rows, dtype=np.int64)]
    if y.ndim == 2:
        return {str(j if classes is None else classes[j]): int(y[:, j].sum()) for j in range(y.shape[1])}
    counts = {str(c): 0 for c in (classes if classes is not None else [])}
    for v, n in zip(*np.unique(np.asarray(y, dtype=object).astype(str), return_counts=True)):
        counts[str(v)] = int(n)
    return counts


def findings(y, idx: dict, classes=None) -> list[dict]:
    """Small-data findings of one run's split: {kind, split, message} each (message without 'warning:')."""
    out = []
    n_test = len(idx["test"])
    if n_test < MIN_TEST_ROWS:
        out.append({"kind": "small_test", "split": "test",
                    "message": f"only {n_test} test rows (fewer than {MIN_TEST_ROWS}): every test number and "
                               f"interval is too uncertain to act on; use more data or --cv"})
    if classes is None and np.ndim(y) == 1:  # every class of the data, so one absent from a split counts 0
        classes = sorted({str(v) for v in np.asarray(y, dtype=object).tolist()})
    for split in ("train", "val", "test"):
        if not len(idx.get(split, ())):
            continue
        small = {c: n for c, n in class_counts(y, idx[split], classes).items() if n < MIN_ROWS_PER_CLASS}
        if small:
            out.append({"kind": "small_class", "split": split, "classes": small,
                        "message": f"{_SPLIT_WORDS[split]} has fewer than {MIN_ROWS_PER_CLASS} rows of "
                                   + ", ".join(f"{c} ({n})" for c, n in small.items()) + f": {_CONSEQUENCE[split]}"})
    return out


def parameters_finding(n_parameters: int, n_train_rows: int) -> dict | None:
    """Said when the model has more parameters than it had training rows."""
    if not n_parameters or n_parameters <= n_train_rows:
        return None
    return {"kind": "more_parameters_than_rows", "split": "train",
            "message": f"the model has {n_parameters:,} parameters and was trained on {n_train_rows:,} rows: it can "
                       f"fit its training rows by heart, so only the held-out scores say anything"}


def number(v, why: str | None = None, digits: int = 3) -> str:
    """A metric as printed: its value, or 'n/a (why)' when it could not be computed."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return f"n/a ({why or 'not computable here'})"
    return f"{v:.{digits}f}"


def interval(low, high, n_rows: int | None = None, digits: int = 3) -> str:
    """'[low, high]', with 'too wide to tell', or 'too few rows to tell' when it rests on fewer than MIN_TEST_ROWS
    rows, where that is what it shows."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "n/a (undefined in most resamples)"
    text = f"[{low:.{digits}f}, {high:.{digits}f}]"
    if n_rows is not None and n_rows < MIN_TEST_ROWS:
        return text + f" too few rows to tell ({n_rows})"
    return text + (" too wide to tell" if high - low > TOO_WIDE else "")


def why_undefined(metric: str, metrics: dict) -> str:
    """Why a metric of these rows is missing, in a few words (compute_metrics' own note where it left one)."""
    if metric == "auroc" and metrics.get("auroc_note"):
        return "a class has no positive or negative rows here"
    return "not computable on these rows"
