"""Label derivation: how a row's raw values are matched (filters, joins, maps) and become label values."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from embedkit.templates import format_value, is_missing


def match_key(v: Any) -> str | None:
    """Canonical form for matching values: strips, ignores case, and "2", "2.0", 2 and 2.0 are one value."""
    if type(v) is str:
        return _str_key(v)
    if is_missing(v):
        return None
    if isinstance(v, bool):
        return str(v).lower()
    return format_value(v).casefold()


@lru_cache(maxsize=1 << 16)  # label codes, view names and the like repeat on every row of a big table
def _str_key(v: str) -> str | None:
    return None if is_missing(v) else format_value(v).casefold()


@dataclass
class Filter:
    column: str
    op: str
    value: Any = None
    strip: bool = True  # strip surrounding whitespace from this column's values in the loaded rows

    def __post_init__(self):
        values = self.value if isinstance(self.value, list) else [self.value]
        self._wanted = {match_key(x) for x in values}

    def keep(self, row: dict) -> bool:
        v = match_key(row.get(self.column))
        if self.op == "notnull":
            return v is not None
        hit = v is not None and v in self._wanted  # a missing value equals nothing
        return hit if self.op in ("==", "in") else not hit


@dataclass
class Label:
    name: str  # the column load_rows writes the derived label into
    task: str  # binary | multiclass | multilabel
    column: str | None = None  # source column (binary, multiclass)
    columns: list[str] | None = None  # source columns (multilabel: one 0/1 entry per column)
    derive: dict | None = None  # {map = {...}} or {yes_no = true}, plus optional missing / other
    classes: list | None = None  # derived values outside this list become None
    positive: Any = None
    description: str = ""

    def __post_init__(self):
        self._map = {match_key(k): v for k, v in (self.derive or {}).get("map", {}).items()}

    def value(self, row: dict) -> Any:
        if self.task == "multilabel":
            return [self._one(row.get(c)) for c in self.columns]
        return self._one(row.get(self.column))

    def _one(self, v: Any) -> Any:
        d = self.derive or {}
        if is_missing(v):
            return d.get("missing")
        if d.get("yes_no"):
            out = {"yes": 1, "no": 0}.get(match_key(v))
        elif "map" in d:
            out = self._map.get(match_key(v))
        else:
            out = v.strip() if isinstance(v, str) else v
        if out is None:
            out = d.get("other")
        if self.classes is not None and out not in self.classes:
            return None
        return out
