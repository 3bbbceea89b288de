"""A data manifest in memory: one dataclass with the validated keys, and what it names (columns it reads,
columns it adds). Validation lives in validate.py, row loading in rows.py, leakage lists in leakage.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.items import SourceOptions
from embedkit.manifests import leakage, rows
from embedkit.manifests.derive import Filter, Label
from embedkit.manifests.lines import key_error
from embedkit.manifests.schema import IMAGE_PATH_COL, TEXT_PATH_COL
from embedkit.templates import parse_template


@dataclass
class Join:
    file: str
    on: list[str]


@dataclass(repr=False)
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
    source_text: str = ""

    def __repr__(self) -> str:  # a notebook prints this: one line, not every key and the TOML text
        return (f"DatasetManifest({self.name!r}, {self.path.name}, access={self.access!r}, "
                f"modalities={'+'.join(self.modalities) or 'none'}, tasks=[{', '.join(self.tasks)}], "
                f"files={len(self.files)})")

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
        return key_error(self.path, self.source_text, path, problem)

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

    def load_rows(self, root: Path) -> list[dict]:
        """The metadata rows under `root`: split added, filters applied, labels derived, paths resolved."""
        return rows.load_rows(self, root)

    def source_options(self) -> SourceOptions:
        """How `extract` reads this manifest's rows (leakage fields included)."""
        return leakage.source_options(self)

    def leaking_columns(self) -> list[str]:
        """[leakage].fields, then the source columns of the labels."""
        return leakage.leaking_columns(self)
