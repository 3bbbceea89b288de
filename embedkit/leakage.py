"""Does the training text give the answer away? A scan of the TRAINING rows' texts, never val/test.

Clinical notes often write the outcome ("patient died", "melanoma confirmed"); a text model then
scores well by reading the label, and that score says nothing about cases where the note is
written before the outcome is known. Two signals, both cheap (one sparse matrix product):

  label words       tokens that are a class name's words or the label column's name's words
  one-feature rules "token present -> class c" with high precision (well above the class base
                    rate) that also covers a real share of class c's rows

Only tokens, class names and numbers leave this module: never a row, never a sentence.
Tokens: lowercase runs of word characters holding at least one letter, 3 characters or longer,
counted once per row. Rows without text (None) are left out of every count, base rates included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer

from embedkit.errors import EmbedkitError

# \w+ with at least one letter ([^\W\d_] is "a letter" in Python's regex), 3+ characters long
TOKEN_PATTERN = r"(?u)\b(?=\w*[^\W\d_])\w{3,}\b"
TASKS = ("binary", "multiclass", "multilabel")


def tokens_of(text: str) -> set[str]:
    """The tokens the scan counts in one text (lowercased); names split on '_' too."""
    text = str(text).lower()
    return set(re.findall(TOKEN_PATTERN, text)) | set(re.findall(TOKEN_PATTERN, text.replace("_", " ")))


def scan_text_leakage(
    texts: Sequence[str | None],
    y,
    task: str,
    classes: Sequence,
    label_names: Sequence[str] = (),
    min_rows: int = 5,
    top: int = 5,
    min_precision: float = 0.9,
    min_lift: float = 0.3,
    min_coverage: float = 0.1,
    groups=None,
) -> dict:
    """Scan training texts for words that give the label away.

    y: 1-D labels (binary, multiclass) whose values are in `classes`, or a 0/1 indicator matrix
    [n, len(classes)] (multilabel; classes are the label names). Rows whose text is None, or whose
    1-D label is not one of `classes`, are not scanned.

    A rule "token -> class c" is flagged when the token is in >= min_rows scanned rows and
    precision P(c | token) >= min_precision, precision - P(c) >= min_lift, and coverage
    (share of class-c rows holding the token) >= min_coverage. The `top` rules by
    coverage * precision are kept.

    -> {"label_words": [{"token", "source", "class", "share", "rows"}...],
        "rules": [{"token", "class", "precision", "coverage", "rows"}...], "n_rows_scanned": int}
    where a label word's "rows" counts class-c rows holding it and a rule's "rows" counts all
    scanned rows holding the token.

    groups: one value per row (a patient): every count is then of groups, not rows (each group's texts
    with one label read as one text), so one patient's many rows holding a token - their name, their
    ward - are one piece of evidence, not a class-wide leak; `unit` says which.
    """
    if task not in TASKS:
        raise EmbedkitError(f"task must be one of {', '.join(TASKS)}, got '{task}'")
    classes = list(classes)
    if groups is not None:
        result = scan_text_leakage(*_per_group(texts, y, groups, task), task, classes, label_names, min_rows, top,
                                   min_precision, min_lift, min_coverage)
        result["n_groups_scanned"] = result["n_rows_scanned"]
        result["n_rows_scanned"] = sum(t is not None for t in texts)
        return {**result, "unit": "group"}
    texts, Y = _scanned_rows(texts, y, task, classes)
    empty = {"label_words": [], "rules": [], "n_rows_scanned": len(texts)}
    if not texts:
        return empty
    try:
        X = CountVectorizer(binary=True, lowercase=True, token_pattern=TOKEN_PATTERN, dtype=np.int32)
        X, vocabulary = X.fit_transform(texts), X.get_feature_names_out()
    except ValueError:  # no text holds a single token
        return empty
    token_rows = np.asarray(X.sum(axis=0)).ravel()  # rows holding each token
    token_class_rows = np.asarray((X.T @ Y))  # [n_tokens, n_classes]: rows of class c holding the token
    class_rows = Y.sum(axis=0)
    return {
        "label_words": _label_words(vocabulary, token_class_rows, class_rows, classes, label_names),
        "rules": _rules(vocabulary, token_rows, token_class_rows, class_rows, classes, len(texts),
                        min_rows, top, min_precision, min_lift, min_coverage),
        "n_rows_scanned": len(texts),
    }


def _scanned_rows(texts, y, task: str, classes: list) -> tuple[list[str], np.ndarray]:
    """-> (texts of the rows scanned, their 0/1 class indicator matrix [n, n_classes] as float)."""
    texts = list(texts)
    y = np.asarray(y, dtype=object if task != "multilabel" else None)
    if len(y) != len(texts):
        raise EmbedkitError(f"leakage scan: {len(texts)} texts but {len(y)} labels")
    has_text = np.array([t is not None for t in texts], dtype=bool)
    if task == "multilabel":
        if y.ndim != 2 or y.shape[1] != len(classes):
            raise EmbedkitError(f"leakage scan: a multilabel y needs {len(classes)} columns, one per label name")
        Y = (y.astype(float) == 1).astype(np.float64)
        keep = has_text
    else:
        if y.ndim != 1:
            raise EmbedkitError("leakage scan: binary and multiclass labels must be one column")
        # labels and class names are matched by value, not type: extract stores 0/1 labels as numbers while a
        # caller may name the classes "0" and "1" (or 0.0 and 1.0); a type mismatch once scanned 0 rows
        index = {label_key(c): k for k, c in enumerate(classes)}
        k = np.array([index.get(label_key(v), -1) if v is not None else -1 for v in y], dtype=np.int64)
        keep = has_text & (k >= 0)  # unlabelled rows tell nothing about the label
        Y = np.zeros((len(k), len(classes)))
        Y[np.nonzero(k >= 0)[0], k[k >= 0]] = 1.0
    rows = np.nonzero(keep)[0]
    return [str(texts[i]) for i in rows], Y[rows]


def _per_group(texts, y, groups, task: str) -> tuple[list, np.ndarray]:
    """One text per (group, label) pair: the group's texts with that label, joined (a row without a group is
    a group of its own)."""
    joined: dict = {}
    for i, (text, g) in enumerate(zip(texts, groups)):
        if text is None:
            continue
        label = tuple(np.asarray(y[i]).tolist()) if task == "multilabel" else y[i]
        key = (f"row:{i}" if g is None or g != g else f"g:{g}", label)
        joined.setdefault(key, []).append(str(text))
    keys = list(joined)
    y_out = np.array([k[1] for k in keys], dtype=None if task == "multilabel" else object)
    return ["\n".join(joined[k]) for k in keys], y_out


def label_key(v) -> str:
    """One spelling per label value: 1, 1.0, "1", np.int64(1) -> "1"; True -> "True"; text stripped."""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, float, np.integer, np.floating)):
        f = float(v)
        return str(int(f)) if f.is_integer() else repr(f)
    text = str(v).strip()
    try:
        f = float(text)
    except ValueError:
        return text
    return str(int(f)) if f.is_integer() else repr(f)


def _plain(c):
    """A class name as plain JSON (numpy scalars become Python numbers)."""
    return c.item() if isinstance(c, np.generic) else c


def _label_words(vocabulary, token_class_rows, class_rows, classes, label_names) -> list[dict]:
    sources: dict[str, str] = {}
    for name in label_names:
        for token in tokens_of(name):
            sources.setdefault(token, "label name")
    for c in classes:
        for token in tokens_of(c):
            sources[token] = "class name"  # a class name is the stronger hint
    column = {t: j for j, t in enumerate(vocabulary)}
    found = []
    for token in sorted(sources):
        j = column.get(token)
        if j is None:
            continue
        total = int(token_class_rows[j].sum())
        for k, c in enumerate(classes):
            rows = int(token_class_rows[j, k])
            share = rows / class_rows[k] if class_rows[k] else 0.0
            others = class_rows.sum() - class_rows[k]
            elsewhere = (total - rows) / others if others else 0.0
            # only where the word is more common in this class than in the others: "no melanoma" in a
            # benign note, or "normal limits" in every class, gives nothing away
            if rows and share > elsewhere:
                found.append({"token": token, "source": sources[token], "class": _plain(c),
                              "share": float(share), "share_elsewhere": float(elsewhere), "rows": rows})
    return sorted(found, key=lambda w: (-w["share"], w["token"]))


def _rules(vocabulary, token_rows, token_class_rows, class_rows, classes, n_rows,
           min_rows, top, min_precision, min_lift, min_coverage) -> list[dict]:
    frequent = token_rows >= min_rows
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = token_class_rows / token_rows[:, None]  # P(y = c | token)
        coverage = token_class_rows / class_rows[None, :]  # P(token | y = c)
    base_rate = class_rows / n_rows
    flagged = (frequent[:, None] & (precision >= min_precision) & (precision - base_rate[None, :] >= min_lift)
               & (coverage >= min_coverage))
    j, k = np.nonzero(flagged)
    score = coverage[j, k] * precision[j, k]
    order = sorted(range(len(j)), key=lambda i: (-score[i], vocabulary[j[i]], k[i]))[:top]
    return [{"token": str(vocabulary[j[i]]), "class": _plain(classes[k[i]]), "precision": float(precision[j[i], k[i]]),
             "coverage": float(coverage[j[i], k[i]]), "rows": int(token_rows[j[i]])} for i in order]


def format_leakage(result: dict, label: str) -> list[str]:
    """Short lines for the user, one per finding; [] when the scan found nothing."""
    where = f" (label '{label}')" if label else ""
    unit = result.get("unit", "row")
    lines = [f"leakage? token '{r['token']}' -> class {r['class']} on {r['coverage']:.0%} of its training {unit}s "
             f"(precision {r['precision']:.2f}){where}" for r in result.get("rules", [])]
    lines += [f"leakage? the {w['source']} word '{w['token']}' is in {w['share']:.0%} of class {w['class']}'s "
              f"training texts ({w['rows']} {unit}s; {w['share_elsewhere']:.0%} of the other classes'){where}"
              for w in result.get("label_words", [])]
    return lines
