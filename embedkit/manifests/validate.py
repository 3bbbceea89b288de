"""Reading and validating one manifest file against the schema; every problem names the file, the key and its
line, so a user can fix the file without reading code."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from embedkit.errors import EmbedkitError
from embedkit.manifests import schema as s
from embedkit.manifests.derive import Filter, Label, match_key
from embedkit.manifests.lines import key_error
from embedkit.manifests.manifest import DatasetManifest, Join
from embedkit.templates import parse_template


class _Checker:
    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    def fail(self, path: tuple, problem: str):
        raise key_error(self.path, self.text, path, problem)

    def table(self, data: dict, spec: dict, path: tuple = ()) -> dict:
        for key, value in data.items():
            if key not in spec:
                self.fail(path + (key,), f"unknown key '{key}' (allowed here: {', '.join(spec)})")
            k = spec[key]
            if not s.is_kind(k.kind, value):
                self.fail(path + (key,), f"must be {s.KIND_TEXT[k.kind]}, not {type(value).__name__}")
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
    top = c.table(data, s.TOP)
    layout = c.table(top.get("layout", {}), s.LAYOUT, ("layout",))
    meta = c.table(top["metadata"], s.METADATA, ("metadata",))
    image = c.table(top.get("image", {}), s.IMAGE, ("image",))
    text_ = c.table(top.get("text", {}), s.TEXT, ("text",))
    split = c.table(top.get("split", {}), s.SPLIT, ("split",))
    leakage = c.table(top.get("leakage", {}), s.LEAKAGE, ("leakage",))

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
        c.table(j, s.JOIN, ("metadata", "joins", i))
        _check_suffix(c, ("metadata", "joins", i, "file"), j["file"])
        joins.append(Join(j["file"], [j["on"]] if isinstance(j["on"], str) else j["on"]))
    filters = []
    for i, f in enumerate(meta.get("filters", [])):
        c.table(f, s.FILTER, ("metadata", "filters", i))
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
        if not isinstance(mapping, dict) or not all(isinstance(v, s.SCALAR) for v in mapping.values()):
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
        if n in (s.IMAGE_PATH_COL, s.TEXT_PATH_COL):
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
    if not name.lower().removesuffix(".gz").endswith(s.TABLE_SUFFIXES):
        c.fail(path, f"'{name}' is not a .csv, .tsv, .jsonl or .json file (optionally .gz)")


def _label(c: _Checker, lab: dict, path: tuple) -> Label:
    c.table(lab, s.LABEL, path)
    multi = lab["task"] == "multilabel"
    if multi and ("columns" not in lab or "column" in lab):
        c.fail(path, "a multilabel label needs 'columns' (a list), not 'column'")
    if not multi and ("column" not in lab or "columns" in lab):
        c.fail(path, f"a {lab['task']} label needs 'column', not 'columns'")
    derive = lab.get("derive")
    if derive is not None:
        c.table(derive, s.DERIVE, path + ("derive",))
        if ("map" in derive) == bool(derive.get("yes_no")):
            c.fail(path + ("derive",), "give exactly one of map = {...} or yes_no = true")
        mapping = derive.get("map", {})
        if not all(isinstance(v, s.SCALAR) for v in mapping.values()):
            c.fail(path + ("derive", "map"), "values must be strings or numbers")
        if len({match_key(k) for k in mapping}) != len(mapping):
            c.fail(path + ("derive", "map"), "two keys are the same value (keys ignore case and '.0')")
        if lab["task"] == "binary" and "map" in derive:
            outs = set(mapping.values()) | ({derive["other"]} if "other" in derive else set())
            if len(outs) > 2:
                c.fail(path + ("derive", "map"), f"a binary label maps to {len(outs)} different values")
    return Label(name=lab["name"], task=lab["task"], column=lab.get("column"), columns=lab.get("columns"),
                 derive=derive, classes=lab.get("classes"), positive=lab.get("positive"),
                 description=lab.get("description", ""))
