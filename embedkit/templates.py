"""Tabular metadata -> one sentence per sample, and checks that the sentence does not give the label away.

Syntax (see `parse_template`):
  {field}               the value; a missing value renders as `unknown`
  {field:.0f}           a Python format spec (numbers stored as strings, as the csv module reads them, work too)
  {field|no age given}  fallback text used when the value is missing
  [, aged {age} years]  optional segment: dropped entirely when any field inside it is missing
                        (a field with a fallback never drops its segment)
  {{ }} [[ ]]           literal braces / brackets

Missing = None, NaN, an empty/whitespace string, or "nan", "None", "NA", "N/A", "null" in any case.
Whole-number floats (45.0, or the string "45.0") render as "45" unless a format spec says otherwise.
Runs of spaces left by dropped segments collapse to one; the sentence is stripped.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections import Counter, defaultdict
from dataclasses import dataclass
from numbers import Real
from typing import Any, Iterable, Mapping

from embedkit.errors import EmbedkitError

MISSING_STRINGS = frozenset({"", "nan", "none", "na", "n/a", "null"})
_WHOLE_DECIMAL = re.compile(r"-?\d+\.0+")
_MAX_CATEGORIES = 50  # more distinct values than this: binned into quantiles if numeric, else not checked
# Deciles: coarse enough that a random numeric field cannot score by chance, but a bin straddling a class
# boundary costs accuracy, so a perfectly separating field scores below 1 (about 0.96 for a 1:2 binary label).
_NUMERIC_BINS = 10


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() in MISSING_STRINGS
    if type(value).__name__ in ("NAType", "NaTType"):  # pandas' missing markers, without importing pandas
        return True
    try:
        return bool(value != value)  # NaN of any float type
    except (TypeError, ValueError):
        return False


def _number(s: str) -> int | float:
    try:
        return int(s)
    except ValueError:
        return float(s)


def format_value(value: Any, spec: str = "", field: str = "?") -> str:
    """One value as text (the caller has ruled out missing values)."""
    if spec:
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            pass
        if isinstance(value, str):
            try:  # csv cells are strings: "{age:.0f}" must still work on "45.6"
                return format(_number(value.strip()), spec)
            except (TypeError, ValueError):
                pass
        raise EmbedkitError(f"template field '{field}': format spec '{spec}' does not apply to a "
                            f"{type(value).__name__} value")
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, Real) and not isinstance(value, int):
        f = float(value)
        return str(int(f)) if f.is_integer() else str(value)
    text = str(value).strip()
    if _WHOLE_DECIMAL.fullmatch(text):
        return text.split(".")[0]
    return text


@dataclass(frozen=True)
class _Field:
    name: str
    spec: str
    fallback: str | None


@dataclass(frozen=True)
class _Segment:
    parts: tuple  # of str | _Field


class Template:
    """A compiled template: parse once, render per row."""

    def __init__(self, source: str, parts: list):
        self.source = source
        self._parts = parts
        names: list[str] = []
        for part in parts:
            for p in part.parts if isinstance(part, _Segment) else (part,):
                if isinstance(p, _Field) and p.name not in names:
                    names.append(p.name)
        self.fields = names

    def __repr__(self) -> str:
        return f"Template({self.source!r})"

    def render(self, row: Mapping) -> str:
        out = []
        for part in self._parts:
            if isinstance(part, _Segment):
                texts = [self._one(p, row) for p in part.parts]
                if None not in texts:
                    out.extend(texts)
            else:
                text = self._one(part, row)
                out.append("unknown" if text is None else text)
        return re.sub(r" {2,}", " ", "".join(out)).strip()

    @staticmethod
    def _one(part, row: Mapping) -> str | None:
        """Text of a literal or field; None for a missing field without fallback."""
        if isinstance(part, str):
            return part
        value = row.get(part.name)
        if is_missing(value):
            return part.fallback
        return format_value(value, part.spec, part.name)


def parse_template(text: str) -> Template:
    """Compile a template; a malformed one raises EmbedkitError naming the problem and its position."""
    if isinstance(text, Template):
        return text
    if not isinstance(text, str):
        raise EmbedkitError(f"a text template must be a string, not {type(text).__name__}")

    def fail(problem: str, pos: int, hint: bool = False):
        # Positions count characters from 1, as an editor's column does.
        extra = " (write '{{', '}}', '[[' or ']]' for a literal brace or bracket)" if hint else ""
        raise EmbedkitError(f"text template: {problem} at character {pos + 1}{extra}")

    parts: list = []
    current = parts  # where literals and fields go: the top level or the open segment
    segment_start = None
    literal: list[str] = []

    def flush():
        if literal:
            current.append("".join(literal))
            literal.clear()

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "{}[]" and text[i + 1:i + 2] == c:  # doubled: a literal character
            literal.append(c)
            i += 2
            continue
        if c == "{":
            end = i + 1
            while end < n and text[end] not in "{}":
                end += 1
            if end >= n or text[end] == "{":
                fail("unclosed '{'", i, hint=True)
            head, bar, fallback = text[i + 1:end].partition("|")
            name, _, spec = head.partition(":")
            name = name.strip()
            if not name:
                fail("empty field name", i)
            if any(ch in name for ch in "[]"):
                fail(f"bracket in field name '{name}'", i)
            if spec and not _spec_ok(spec):
                fail(f"invalid format spec '{spec}' for field '{name}'", i)
            flush()
            current.append(_Field(name, spec, fallback if bar else None))
            i = end + 1
        elif c == "}":
            fail("single '}'", i, hint=True)
        elif c == "[":
            if segment_start is not None:
                fail(f"nested '[' (the segment opened at character {segment_start + 1} is still open)", i)
            flush()
            segment_start, current = i, []
            i += 1
        elif c == "]":
            if segment_start is None:
                fail("']' without a matching '['", i, hint=True)
            flush()
            if not any(isinstance(p, _Field) for p in current):
                fail("optional segment without any {field}", segment_start)
            parts.append(_Segment(tuple(current)))
            segment_start, current = None, parts
            i += 1
        else:
            literal.append(c)
            i += 1
    if segment_start is not None:
        fail("unclosed '['", segment_start, hint=True)
    flush()
    return Template(text, parts)


def _spec_ok(spec: str) -> bool:
    for probe in (1.5, 1, "x"):
        try:
            format(probe, spec)
            return True
        except (TypeError, ValueError):
            pass
    return False


def check_template_fields(template: str | Template, columns: Iterable[str], where: str) -> None:
    """EmbedkitError when the template names a column that the data does not have."""
    t = parse_template(template)
    have = set(columns)
    missing = [f for f in t.fields if f not in have]
    if missing:
        shown = ", ".join(sorted(have)[:30]) + (" ..." if len(have) > 30 else "")
        raise EmbedkitError(f"{where}: the template names column(s) {', '.join(repr(m) for m in missing)} that the "
                            f"data does not have (columns: {shown})")


# --- leakage ---------------------------------------------------------------------------------------------------

NAMES_LABEL = "names a label column"
PREDICTS_LABEL = "predicts the label"


@dataclass(frozen=True)
class LeakageFinding:
    field: str
    label: str
    kind: str  # NAMES_LABEL | PREDICTS_LABEL
    score: float  # balanced accuracy of the per-value majority rule on training rows (1.0 for NAMES_LABEL)


def find_leakage(template: str | Template, rows: list[dict], label_cols: Iterable[str],
                 train_idx: Iterable[int] | None = None, threshold: float = 0.95) -> list[LeakageFinding]:
    """Template fields that are a label column, or that predict a label almost perfectly on the training rows.

    "Predicts": predicting the label as the majority label among training rows with the same field value
    reaches balanced accuracy >= threshold. Each row is left out of its own value's vote, so a field that is
    unique per row (an id) cannot score by memorising itself.
    """
    t = parse_template(template)
    train = rows if train_idx is None else [rows[i] for i in train_idx]
    findings = []
    for label in label_cols:
        for name in t.fields:
            if name == label:
                findings.append(LeakageFinding(name, label, NAMES_LABEL, 1.0))
                continue
            score = _majority_score(train, name, label)
            if score is not None and score >= threshold:
                findings.append(LeakageFinding(name, label, PREDICTS_LABEL, round(score, 4)))
    return findings


def format_leakage(findings: list[LeakageFinding]) -> str:
    """One line per finding; names fields and labels only, never row contents."""
    lines = []
    for f in findings:
        if f.kind == NAMES_LABEL:
            lines.append(f"template field '{f.field}' names the label column '{f.label}'")
        else:
            lines.append(f"template field '{f.field}' predicts the label '{f.label}' "
                         f"(balanced accuracy {f.score:.3f} on training rows)")
    return "\n".join(lines)


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _majority_score(rows: list[dict], field: str, label: str) -> float | None:
    pairs = [(r.get(field), _hashable(r.get(label))) for r in rows if not is_missing(r.get(label))]
    ys = [y for _, y in pairs]
    if len(set(ys)) < 2:
        return None
    keys = _value_keys([v for v, _ in pairs])
    if keys is None:
        return None
    per_value: dict[Any, Counter] = defaultdict(Counter)
    for k, y in zip(keys, ys):
        per_value[k][y] += 1
    overall = Counter(ys)
    correct: Counter = Counter()
    for k, y in zip(keys, ys):
        votes = per_value[k] if per_value[k].total() > 1 else overall  # value seen once: no evidence of its own
        pred = max(votes, key=lambda lab: votes[lab] - (lab == y))
        correct[y] += pred == y
    return sum(correct[c] / overall[c] for c in overall) / len(overall)


def _value_keys(values: list) -> list | None:
    """Category of each value; None when the field has too many non-numeric values to check."""
    missing = "\0missing"
    present = [v for v in values if not is_missing(v)]
    canon = {format_value(v) for v in present}
    if len(canon) <= _MAX_CATEGORIES:
        return [missing if is_missing(v) else format_value(v) for v in values]
    nums = []
    for v in present:
        try:
            x = float(v)
        except (TypeError, ValueError):
            return None
        if math.isnan(x):
            return None
        nums.append(x)
    nums.sort()
    edges = [nums[len(nums) * q // _NUMERIC_BINS] for q in range(1, _NUMERIC_BINS)]  # quantiles of the train values
    return [missing if is_missing(v) else bisect_right(edges, float(v)) for v in values]
