"""The manifest schema: which keys each table allows, their kinds and choices (data_manifests/SCHEMA.md)."""

from __future__ import annotations

from typing import Any, NamedTuple

ACCESS = ("open", "credentialed", "on request")
TASKS = ("binary", "multiclass", "multilabel")
OPS = ("==", "!=", "in", "not_in", "notnull")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")  # each optionally followed by .gz
IMAGE_PATH_COL = "_image_path"
TEXT_PATH_COL = "_text_path"


class Key(NamedTuple):
    kind: str  # str | bool | strs | table | tables | str_table | scalar | scalars | value | str_or_strs
    required: bool = False
    choices: tuple | None = None


TOP = {"name": Key("str", True), "description": Key("str", True), "license": Key("str", True),
       "access": Key("str", True, ACCESS), "citation": Key("str"), "homepage": Key("str"), "obtain": Key("str"),
       "layout": Key("table"), "metadata": Key("table", True), "image": Key("table"), "text": Key("table"),
       "labels": Key("tables"), "split": Key("table"), "leakage": Key("table")}
LEAKAGE = {"notes": Key("strs"), "fields": Key("strs")}
LAYOUT = {"root_hint": Key("str"), "image_dir": Key("str"), "expected_files": Key("strs")}
METADATA = {"files": Key("strs", True), "columns": Key("strs"), "id_col": Key("str"),
            "split_from_file": Key("str_table"), "joins": Key("tables"), "filters": Key("tables"),
            "recode": Key("table")}
JOIN = {"file": Key("str", True), "on": Key("str_or_strs", True)}
FILTER = {"column": Key("str", True), "op": Key("str", True, OPS), "value": Key("value"), "strip": Key("bool")}
IMAGE = {"path_col": Key("str"), "path_pattern": Key("str"), "search_dirs": Key("strs")}
TEXT = {"col": Key("str"), "template": Key("str"), "file_col": Key("str"), "file_pattern": Key("str")}
LABEL = {"name": Key("str", True), "task": Key("str", True, TASKS), "column": Key("str"), "columns": Key("strs"),
         "derive": Key("table"), "classes": Key("scalars"), "positive": Key("scalar"), "description": Key("str")}
DERIVE = {"map": Key("table"), "yes_no": Key("bool"), "missing": Key("scalar"), "other": Key("scalar")}
SPLIT = {"column": Key("str"), "recommended": Key("str"), "group_col": Key("str")}

SCALAR = (str, int, float, bool)
KIND_TEXT = {"str": "a string", "bool": "true or false", "strs": "a list of strings", "table": "a table",
             "tables": "a list of tables", "str_table": "a table of strings", "scalar": "a string or number",
             "scalars": "a list of strings or numbers", "value": "a string, number or list of them",
             "str_or_strs": "a string or a list of strings"}


def is_kind(kind: str, v: Any) -> bool:
    strs = isinstance(v, list) and all(isinstance(x, str) for x in v)
    scalars = isinstance(v, list) and all(isinstance(x, SCALAR) for x in v)
    return {"str": isinstance(v, str), "bool": isinstance(v, bool), "strs": strs, "table": isinstance(v, dict),
            "tables": isinstance(v, list) and all(isinstance(x, dict) for x in v),
            "str_table": isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
            "scalar": isinstance(v, SCALAR), "scalars": scalars, "value": isinstance(v, SCALAR) or scalars,
            "str_or_strs": isinstance(v, str) or strs}[kind]
