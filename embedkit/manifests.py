"""Data manifests: one TOML file per dataset (data_manifests/*.toml) saying where its files are, how its
metadata becomes rows, text and labels, and what leaks. The schema is documented in data_manifests/SCHEMA.md.

Every error names the manifest file, the key and its line, so a user can fix the file without reading code.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from embedkit.errors import EmbedkitError
from embedkit.items import SourceOptions
from embedkit.sources import read_table
from embedkit.templates import format_value, is_missing, parse_template

ACCESS = ("open", "credentialed", "on request")
TASKS = ("binary", "multiclass", "multilabel")
OPS = ("==", "!=", "in", "not_in", "notnull")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")  # each optionally followed by .gz
IMAGE_PATH_COL = "_image_path"
TEXT_PATH_COL = "_text_path"


# --- where a key is in the TOML text (tomllib gives no line numbers) ------------------------------------------

_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_HEADER = re.compile(rf"\s*(\[\[?)\s*({_DOTTED})\s*\]")
_KEYLINE = re.compile(rf"\s*({_DOTTED})\s*=")


def _parts(dotted: str) -> tuple:
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in re.findall(_PART, dotted))


def _key_lines(text: str) -> list[tuple[tuple, int]]:
    """(key path, line) for every table header and `key =` line; array-of-tables entries get their index."""
    entries, table, seen, in_string = [], (), {}, False
    for n, line in enumerate(text.splitlines(), 1):
        quotes = (line.count('"""') + line.count("'''")) % 2 == 1
        if in_string:  # inside a multi-line string: nothing here is a key
            in_string = not quotes
            continue
        m = _HEADER.match(line)
        if m:
            path = _parts(m[2])
            if m[1] == "[[":
                seen[path] = seen.get(path, -1) + 1
                path += (seen[path],)
            table = path
            entries.append((table, n))
        elif (m := _KEYLINE.match(line)):
            entries.append((table + _parts(m[1]), n))
        in_string = quotes
    return entries


def _line_of(text: str, path: tuple) -> int:
    """Line of the deepest header or key that contains `path` (an inline table points at its key)."""
    best, line = -1, 1
    for p, n in _key_lines(text):
        if len(p) > best and path[:len(p)] == p:
            best, line = len(p), n
    return line


def _dotted(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "(top level)"


# --- schema ---------------------------------------------------------------------------------------------------

class _K(NamedTuple):
    kind: str  # str | bool | strs | table | tables | str_table | scalar | scalars | value | str_or_strs
    required: bool = False
    choices: tuple | None = None


_TOP = {"name": _K("str", True), "description": _K("str", True), "license": _K("str", True),
        "access": _K("str", True, ACCESS), "citation": _K("str"), "homepage": _K("str"), "obtain": _K("str"),
        "layout": _K("table"), "metadata": _K("table", True), "image": _K("table"), "text": _K("table"),
        "labels": _K("tables"), "split": _K("table"), "leakage": _K("table")}
_LEAKAGE = {"notes": _K("strs"), "fields": _K("strs")}
_LAYOUT = {"root_hint": _K("str"), "image_dir": _K("str"), "expected_files": _K("strs")}
_METADATA = {"files": _K("strs", True), "columns": _K("strs"), "id_col": _K("str"), "split_from_file": _K("str_table"),
             "joins": _K("tables"), "filters": _K("tables"), "recode": _K("table")}
_JOIN = {"file": _K("str", True), "on": _K("str_or_strs", True)}
_FILTER = {"column": _K("str", True), "op": _K("str", True, OPS), "value": _K("value"), "strip": _K("bool")}
_IMAGE = {"path_col": _K("str"), "path_pattern": _K("str"), "search_dirs": _K("strs")}
_TEXT = {"col": _K("str"), "template": _K("str"), "file_col": _K("str"), "file_pattern": _K("str")}
_LABEL = {"name": _K("str", True), "task": _K("str", True, TASKS), "column": _K("str"), "columns": _K("strs"),
          "derive": _K("table"), "classes": _K("scalars"), "positive": _K("scalar"), "description": _K("str")}
_DERIVE = {"map": _K("table"), "yes_no": _K("bool"), "missing": _K("scalar"), "other": _K("scalar")}
_SPLIT = {"column": _K("str"), "recommended": _K("str"), "group_col": _K("str")}

_SCALAR = (str, int, float, bool)
_KIND_TEXT = {"str": "a string", "bool": "true or false", "strs": "a list of strings", "table": "a table",
              "tables": "a list of tables", "str_table": "a table of strings", "scalar": "a string or number",
              "scalars": "a list of strings or numbers", "value": "a string, number or list of them",
              "str_or_strs": "a string or a list of strings"}


def _is_kind(kind: str, v: Any) -> bool:
    strs = isinstance(v, list) and all(isinstance(x, str) for x in v)
    scalars = isinstance(v, list) and all(isinstance(x, _SCALAR) for x in v)
    return {"str": isinstance(v, str), "bool": isinstance(v, bool), "strs": strs, "table": isinstance(v, dict),
            "tables": isinstance(v, list) and all(isinstance(x, dict) for x in v),
            "str_table": isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
            "scalar": isinstance(v, _SCALAR), "scalars": scalars, "value": isinstance(v, _SCALAR) or scalars,
            "str_or_strs": isinstance(v, str) or strs}[kind]


def _key(v: Any) -> str | None:
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


# --- the manifest ---------------------------------------------------------------------------------------------

@dataclass
class Filter:
    column: str
    op: str
    value: Any = None
    strip: bool = True  # strip surrounding whitespace from this column's values in the loaded rows

    def __post_init__(self):
        values = self.value if isinstance(self.value, list) else [self.value]
        self._wanted = {_key(x) for x in values}

    def keep(self, row: dict) -> bool:
        v = _key(row.get(self.column))
        if self.op == "notnull":
            return v is not None
        hit = v is not None and v in self._wanted  # a missing value equals nothing
        return hit if self.op in ("==", "in") else not hit


@dataclass
class Join:
    file: str
    on: list[str]


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
        self._map = {_key(k): v for k, v in (self.derive or {}).get("map", {}).items()}

    def value(self, row: dict) -> Any:
        if self.task == "multilabel":
            return [self._one(row.get(c)) for c in self.columns]
        return self._one(row.get(self.column))

    def _one(self, v: Any) -> Any:
        d = self.derive or {}
        if is_missing(v):
            return d.get("missing")
        if d.get("yes_no"):
            out = {"yes": 1, "no": 0}.get(_key(v))
        elif "map" in d:
            out = self._map.get(_key(v))
        else:
            out = v.strip() if isinstance(v, str) else v
        if out is None:
            out = d.get("other")
        if self.classes is not None and out not in self.classes:
            return None
        return out


@dataclass
class DatasetManifest:
    path: Path
    name: str
    description: str
    license: str
    access: str
    citation: str = ""
    homepage: str = ""
    obtain: str = ""
    # [layout]
    root_hint: str = ""
    image_dir: str | None = None
    expected_files: list[str] = field(default_factory=list)
    # [metadata]
    files: list[str] = field(default_factory=list)
    columns: list[str] | None = None  # declared columns (after joins); lets load_manifest check names early
    id_col: str | None = None
    split_from_file: dict[str, str] = field(default_factory=dict)
    joins: list[Join] = field(default_factory=list)
    filters: list[Filter] = field(default_factory=list)
    recode: dict[str, dict] = field(default_factory=dict)
    # [image]
    image_path_col: str | None = None
    image_path_pattern: str | None = None
    image_search_dirs: list[str] = field(default_factory=list)
    # [text]
    text_col: str | None = None
    text_template: str | None = None
    text_file_col: str | None = None
    text_file_pattern: str | None = None
    # [[labels]], [split], [leakage]
    labels: list[Label] = field(default_factory=list)
    split_col: str | None = None
    split_recommended: str = ""
    group_col: str | None = None
    leakage: list[str] = field(default_factory=list)  # [leakage].notes
    leakage_fields: list[str] = field(default_factory=list)  # [leakage].fields
    source_text: str = field(default="", repr=False)

    @property
    def tasks(self) -> list[str]:
        return [f"{lab.name} ({lab.task})" for lab in self.labels]

    @property
    def modalities(self) -> list[str]:
        has_text = self.text_col or self.text_template or self.text_file_col or self.text_file_pattern
        return [m for m, on in (("image", self.has_image), ("text", has_text)) if on]

    @property
    def has_image(self) -> bool:
        return bool(self.image_path_col or self.image_path_pattern)

    def error(self, path: tuple, problem: str) -> EmbedkitError:
        return EmbedkitError(f"{self.path}, line {_line_of(self.source_text, path)}, key {_dotted(path)}: {problem}")

    def column_refs(self) -> list[tuple[tuple, str]]:
        """(key path, column) for every data column the manifest names."""
        refs = []

        def add(path, col):
            if col:
                refs.append((path, col))

        add(("metadata", "id_col"), self.id_col)
        for i, f in enumerate(self.filters):
            add(("metadata", "filters", i, "column"), f.column)
        for col in self.recode:
            add(("metadata", "recode", col), col)
        add(("image", "path_col"), self.image_path_col)
        add(("text", "col"), self.text_col)
        add(("text", "file_col"), self.text_file_col)
        for path, tmpl in ((("image", "path_pattern"), self.image_path_pattern),
                           (("text", "template"), self.text_template),
                           (("text", "file_pattern"), self.text_file_pattern)):
            for col in parse_template(tmpl).fields if tmpl else ():
                add(path, col)
        for i, lab in enumerate(self.labels):
            add(("labels", i, "column"), lab.column)
            for col in lab.columns or ():
                add(("labels", i, "columns"), col)
        if not self.split_from_file:
            add(("split", "column"), self.split_col)
        add(("split", "group_col"), self.group_col)
        return refs

    def added_columns(self) -> list[tuple[tuple, str]]:
        """(key path, column) for every column load_rows writes that the data must not already have."""
        out = [(("labels", i, "name"), lab.name) for i, lab in enumerate(self.labels) if lab.name != lab.column]
        if self.split_from_file:
            out.append((("metadata", "split_from_file"), self.split_col))
        if self.has_image:
            out.append((("image",), IMAGE_PATH_COL))
        if self.text_file_pattern:
            out.append((("text", "file_pattern"), TEXT_PATH_COL))
        return out

    # --- rows ---------------------------------------------------------------------------------------------

    def load_rows(self, root: Path) -> list[dict]:
        """The metadata rows under `root`: split added, filters applied, labels derived, paths resolved."""
        root = Path(root)
        if not root.is_dir():
            hint = f" (expected: {self.root_hint})" if self.root_hint else ""
            raise EmbedkitError(f"data folder {root} for dataset '{self.name}' does not exist{hint}")
        for pattern in self.expected_files:
            if next(iter(root.glob(pattern)), None) is None:
                raise self.error(("layout", "expected_files"),
                                 f"nothing under {root} matches '{pattern}'; is {root} the dataset's root folder?")
        if self.image_dir and not (root / self.image_dir).is_dir():
            raise self.error(("layout", "image_dir"), f"folder '{self.image_dir}' not found under {root}")

        joined = []
        for i, j in enumerate(self.joins):
            rows, cols = self._read(root, j.file, ("metadata", "joins", i, "file"))
            for col in j.on:
                if col not in cols:
                    raise self.error(("metadata", "joins", i, "on"),
                                     f"column '{col}' is missing from data file {j.file}")
            joined.append((j, _index(rows, j.on), cols))
        join_cols = {c for _, _, cols in joined for c in cols}

        out: list[dict] = []
        for name in self.files:
            rows, cols = self._read(root, name, ("metadata", "files"))
            self._check_columns(cols, join_cols, name)
            if self.split_from_file:
                for row in rows:
                    row[self.split_col] = self.split_from_file.get(name)
            for j, index, _ in joined:
                rows = _join(rows, index, j.on)
            out.extend(rows)

        for f in self.filters:
            if f.strip:
                for row in out:
                    if isinstance(row.get(f.column), str):
                        row[f.column] = row[f.column].strip()
            out = [row for row in out if f.keep(row)]
        self._check_ids(out)
        image_tmpl = parse_template(self.image_path_pattern) if self.image_path_pattern else None
        text_tmpl = parse_template(self.text_file_pattern) if self.text_file_pattern else None
        recode = {col: {_key(k): v for k, v in mapping.items()} for col, mapping in self.recode.items()}
        for row in out:
            for lab in self.labels:  # from the raw values: recode below is for the text only
                row[lab.name] = lab.value(row)
            if self.has_image:
                row[IMAGE_PATH_COL] = self._image_path(row, root, image_tmpl)
            if text_tmpl is not None:
                row[TEXT_PATH_COL] = _fill(text_tmpl, row)
            for col, mapping in recode.items():
                new = mapping.get(_key(row.get(col)))
                if new is not None:
                    row[col] = new
        return out

    def _read(self, root: Path, name: str, key: tuple) -> tuple[list[dict], list[str]]:
        path = root / name
        if not path.is_file():
            raise self.error(key, f"data file {name} not found under {root}")
        try:
            rows = read_table(path)
        except EmbedkitError as e:
            raise self.error(key, f"cannot read data file: {e}") from None
        return rows, list(dict.fromkeys(k for r in rows for k in r))

    def _check_columns(self, cols: list[str], join_cols: set[str], name: str) -> None:
        have = set(cols) | join_cols
        where = name + (" (or the joined files)" if self.joins else "")
        for path, col in self.column_refs():
            if col not in have:
                raise self.error(path, f"column '{col}' is missing from data file {where}")
        for path, col in self.added_columns():
            if col in have:
                raise self.error(path, f"column '{col}' would overwrite a column of data file {name}; choose "
                                       f"another name")

    def _check_ids(self, rows: list[dict]) -> None:
        if not self.id_col:
            return
        seen = set()
        for row in rows:
            k = _key(row.get(self.id_col))
            if k is None:
                raise self.error(("metadata", "id_col"), f"id column '{self.id_col}' has an empty value")
            if k in seen:  # the id is the join key across modalities: duplicates would merge two samples
                raise self.error(("metadata", "id_col"), f"id column '{self.id_col}' has duplicate values")
            seen.add(k)

    def _image_path(self, row: dict, root: Path, tmpl) -> str | None:
        rel = _fill(tmpl, row) if tmpl is not None else row.get(self.image_path_col)
        if is_missing(rel):
            return None
        rel = str(rel).strip()
        for d in self.image_search_dirs:  # e.g. HAM10000's images, split over two folders
            if (root / d / rel).is_file():
                return f"{d}/{rel}"
        # not found anywhere: keep the first candidate so the extractor records it as a missing file
        return f"{self.image_search_dirs[0]}/{rel}" if self.image_search_dirs else rel

    def source_options(self) -> SourceOptions:
        """How `extract` reads this manifest's rows; a text template (this one or --text-template) may name
        neither [leakage].fields nor the columns the labels are derived from, unless leakage is allowed."""
        return SourceOptions(metadata=None, id_col=self.id_col,
                             image_col=IMAGE_PATH_COL if self.has_image else None,
                             text_col=self.text_col, text_template=self.text_template,
                             text_file_col=TEXT_PATH_COL if self.text_file_pattern else self.text_file_col,
                             label_cols=[lab.name for lab in self.labels], split_col=self.split_col,
                             group_col=self.group_col, leakage_fields=self.leaking_columns())

    def leaking_columns(self) -> list[str]:
        """[leakage].fields, then the source columns of the labels (a derived label's raw column is the answer too)."""
        sources = [c for lab in self.labels for c in (lab.column, *(lab.columns or ())) if c]
        return list(dict.fromkeys([*self.leakage_fields, *sources]))


def _fill(tmpl, row: dict) -> str | None:
    """A path from a pattern; None when a field it needs is missing (never a path containing 'unknown')."""
    if any(is_missing(row.get(f)) for f in tmpl.fields):
        return None
    return tmpl.render(row)


def _index(rows: list[dict], on: list[str]) -> dict[tuple, list[dict]]:
    index: dict[tuple, list[dict]] = {}
    for r in rows:
        key = tuple(_key(r.get(c)) for c in on)
        if None not in key:  # a missing key matches nothing, not other missing keys
            index.setdefault(key, []).append(r)
    return index


def _join(rows: list[dict], index: dict[tuple, list[dict]], on: list[str]) -> list[dict]:
    """Inner join; one output row per match; columns the left row already has keep the left value."""
    out = []
    for r in rows:
        for o in index.get(tuple(_key(r.get(c)) for c in on), ()):
            out.append({**o, **r})
    return out


# --- loading and validation -----------------------------------------------------------------------------------

class _Checker:
    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    def fail(self, path: tuple, problem: str):
        raise EmbedkitError(f"{self.path}, line {_line_of(self.text, path)}, key {_dotted(path)}: {problem}")

    def table(self, data: dict, spec: dict, path: tuple = ()) -> dict:
        for key, value in data.items():
            if key not in spec:
                self.fail(path + (key,), f"unknown key '{key}' (allowed here: {', '.join(spec)})")
            k = spec[key]
            if not _is_kind(k.kind, value):
                self.fail(path + (key,), f"must be {_KIND_TEXT[k.kind]}, not {type(value).__name__}")
            if k.choices and value not in k.choices:
                self.fail(path + (key,), f"'{value}' is not one of: {', '.join(k.choices)}")
        for key, k in spec.items():
            if k.required and key not in data:
                self.fail(path, f"missing required key '{key}'")
        return data

    def template(self, path: tuple, text: str | None):
        if text is None:
            return None
        try:
            return parse_template(text)
        except EmbedkitError as e:
            self.fail(path, str(e))


def load_manifest(path: str | Path) -> DatasetManifest:
    """Read and validate one manifest; every problem names the file, the key and its line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EmbedkitError(f"cannot read manifest {path}: {e.__class__.__name__}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = m[1] if m else len(text.splitlines()) or 1
        raise EmbedkitError(f"{path}, line {line}: invalid TOML: {re.sub(r' ?[(]at .*[)]$', '', msg)}") from None

    c = _Checker(path, text)
    top = c.table(data, _TOP)
    layout = c.table(top.get("layout", {}), _LAYOUT, ("layout",))
    meta = c.table(top["metadata"], _METADATA, ("metadata",))
    image = c.table(top.get("image", {}), _IMAGE, ("image",))
    text_ = c.table(top.get("text", {}), _TEXT, ("text",))
    split = c.table(top.get("split", {}), _SPLIT, ("split",))
    leakage = c.table(top.get("leakage", {}), _LEAKAGE, ("leakage",))

    files = meta["files"]
    if not files:
        c.fail(("metadata", "files"), "name at least one metadata file")
    for f in files:
        _check_suffix(c, ("metadata", "files"), f)
    for f in meta.get("split_from_file", {}):
        if f not in files:
            c.fail(("metadata", "split_from_file"), f"'{f}' is not one of metadata.files")

    joins = []
    for i, j in enumerate(meta.get("joins", [])):
        c.table(j, _JOIN, ("metadata", "joins", i))
        _check_suffix(c, ("metadata", "joins", i, "file"), j["file"])
        joins.append(Join(j["file"], [j["on"]] if isinstance(j["on"], str) else j["on"]))
    filters = []
    for i, f in enumerate(meta.get("filters", [])):
        c.table(f, _FILTER, ("metadata", "filters", i))
        op, has = f["op"], "value" in f
        if op == "notnull" and has:
            c.fail(("metadata", "filters", i, "value"), "op 'notnull' takes no value")
        if op != "notnull" and not has:
            c.fail(("metadata", "filters", i), f"op '{op}' needs a value")
        if has and (op in ("in", "not_in")) != isinstance(f["value"], list):
            c.fail(("metadata", "filters", i, "value"), f"op '{op}' needs " +
                   ("a list of values" if op in ("in", "not_in") else "a single value"))
        filters.append(Filter(f["column"], op, f.get("value"), f.get("strip", True)))
    for col, mapping in meta.get("recode", {}).items():
        if not isinstance(mapping, dict) or not all(isinstance(v, _SCALAR) for v in mapping.values()):
            c.fail(("metadata", "recode", col), "must be a table of value = replacement")

    if "path_col" in image and "path_pattern" in image:
        c.fail(("image",), "give path_col or path_pattern, not both")
    if image and not ("path_col" in image or "path_pattern" in image):
        c.fail(("image",), "needs path_col or path_pattern")
    if len(text_) > 1:
        c.fail(("text",), f"give one of col, template, file_col, file_pattern (got {', '.join(text_)})")
    if not image and not text_:
        c.fail((), "a manifest needs an [image] or a [text] section (or both)")
    c.template(("image", "path_pattern"), image.get("path_pattern"))
    template = c.template(("text", "template"), text_.get("template"))
    c.template(("text", "file_pattern"), text_.get("file_pattern"))

    labels = []
    for i, lab in enumerate(top.get("labels", [])):
        labels.append(_label(c, lab, ("labels", i)))
    names = [lab.name for lab in labels]
    for i, n in enumerate(names):
        if n in names[:i]:
            c.fail(("labels", i, "name"), f"label name '{n}' is used twice")
        if n in (IMAGE_PATH_COL, TEXT_PATH_COL):
            c.fail(("labels", i, "name"), f"'{n}' is reserved")

    m = DatasetManifest(
        path=path, name=top["name"], description=top["description"], license=top["license"],
        access=top["access"], citation=top.get("citation", ""), homepage=top.get("homepage", ""),
        obtain=top.get("obtain", ""), root_hint=layout.get("root_hint", ""), image_dir=layout.get("image_dir"),
        expected_files=layout.get("expected_files", []), files=files, columns=meta.get("columns"),
        id_col=meta.get("id_col"), split_from_file=meta.get("split_from_file", {}), joins=joins, filters=filters,
        recode=meta.get("recode", {}), image_path_col=image.get("path_col"),
        image_path_pattern=image.get("path_pattern"), image_search_dirs=image.get("search_dirs", []),
        text_col=text_.get("col"), text_template=text_.get("template"), text_file_col=text_.get("file_col"),
        text_file_pattern=text_.get("file_pattern"), labels=labels,
        split_col=split.get("column", "split" if meta.get("split_from_file") else None),
        split_recommended=split.get("recommended", ""), group_col=split.get("group_col"),
        leakage=leakage.get("notes", []), leakage_fields=leakage.get("fields", []), source_text=text)

    if template is not None:  # the sentence must not contain the answer
        label_cols = {col for lab in labels for col in [lab.name, lab.column, *(lab.columns or [])] if col}
        leaked = [f for f in template.fields if f in label_cols]
        if leaked:
            c.fail(("text", "template"), f"names the label column(s) {', '.join(leaked)}: the text would contain "
                                         f"the answer")
    if m.columns is not None:  # declared columns: catch a misspelt name now rather than on the data
        declared = set(m.columns)
        for ref_path, col in m.column_refs():
            if col not in declared:
                c.fail(ref_path, f"names column '{col}', which is not in metadata.columns")
        for col in m.leakage_fields:
            if col not in declared:
                c.fail(("leakage", "fields"), f"names column '{col}', which is not in metadata.columns")
    return m


def _check_suffix(c: _Checker, path: tuple, name: str) -> None:
    if not name.lower().removesuffix(".gz").endswith(TABLE_SUFFIXES):
        c.fail(path, f"'{name}' is not a .csv, .tsv, .jsonl or .json file (optionally .gz)")


def _label(c: _Checker, lab: dict, path: tuple) -> Label:
    c.table(lab, _LABEL, path)
    multi = lab["task"] == "multilabel"
    if multi and ("columns" not in lab or "column" in lab):
        c.fail(path, "a multilabel label needs 'columns' (a list), not 'column'")
    if not multi and ("column" not in lab or "columns" in lab):
        c.fail(path, f"a {lab['task']} label needs 'column', not 'columns'")
    derive = lab.get("derive")
    if derive is not None:
        c.table(derive, _DERIVE, path + ("derive",))
        if ("map" in derive) == bool(derive.get("yes_no")):
            c.fail(path + ("derive",), "give exactly one of map = {...} or yes_no = true")
        mapping = derive.get("map", {})
        if not all(isinstance(v, _SCALAR) for v in mapping.values()):
            c.fail(path + ("derive", "map"), "values must be strings or numbers")
        if len({_key(k) for k in mapping}) != len(mapping):
            c.fail(path + ("derive", "map"), "two keys are the same value (keys ignore case and '.0')")
        if lab["task"] == "binary" and "map" in derive:
            outs = set(mapping.values()) | ({derive["other"]} if "other" in derive else set())
            if len(outs) > 2:
                c.fail(path + ("derive", "map"), f"a binary label maps to {len(outs)} different values")
    return Label(name=lab["name"], task=lab["task"], column=lab.get("column"), columns=lab.get("columns"),
                 derive=derive, classes=lab.get("classes"), positive=lab.get("positive"),
                 description=lab.get("description", ""))


# --- finding manifests ----------------------------------------------------------------------------------------

def manifest_dirs() -> list[Path]:
    """The repository's data_manifests folder, else a copy shipped inside the package."""
    here = Path(__file__).resolve().parent
    return [d for d in (here.parent / "data_manifests", here / "data_manifests") if d.is_dir()]


def list_manifests(folder: str | Path | None = None) -> list[DatasetManifest]:
    folders = [Path(folder)] if folder is not None else manifest_dirs()[:1]
    return sorted((load_manifest(p) for d in folders for p in d.glob("*.toml")), key=lambda m: m.name)


def find_manifest(name_or_path: str | Path) -> DatasetManifest:
    """A manifest by path, or by bare name (file stem or `name` key) in the shipped data_manifests folder."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or len(p.parts) > 1 or p.is_file():
        if not p.is_file():
            raise EmbedkitError(f"manifest file {p} not found")
        return load_manifest(p)
    name = str(name_or_path).strip().lower().replace("-", "_")
    for d in manifest_dirs():
        if (d / f"{name}.toml").is_file():
            return load_manifest(d / f"{name}.toml")
    known = list_manifests() if manifest_dirs() else []
    for m in known:
        if m.name.lower().replace("-", "_") == name:
            return m
    raise EmbedkitError(f"no dataset manifest named '{name_or_path}' (known: "
                        f"{', '.join(m.name for m in known) or 'none'}); or pass the path of a .toml file")
