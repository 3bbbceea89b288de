"""What every input layout turns into: a list of items plus the options that described them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DicomFrame:
    """Which pixels of a DICOM file an item is (see dicom.py): part of its content hash, so a changed frame or
    window is embedded anew."""

    frame: int | None  # 0-based; None: the middle frame
    window: str = "auto"  # --dicom-window


@dataclass
class Item:
    """One sample: an image, a text, or both, with its labels.

    `id` is the join key across modalities: stable, derived from the relative path (or the
    manifest's id column), never from row order alone.
    """

    id: str
    image_path: Path | None = None
    text: str | None = None  # in-memory text (manifest column or template); None if from a file
    text_path: Path | None = None  # a report file, read when its batch is embedded
    labels: dict[str, Any] = field(default_factory=dict)
    split: str | None = None
    group: str | None = None  # rows sharing a group (a patient) never sit on both sides of a split
    meta: dict[str, Any] = field(default_factory=dict)  # other columns carried through to Parquet
    dicom: DicomFrame | None = None  # set when image_path is a DICOM file

    @property
    def has_text(self) -> bool:
        return self.text is not None or self.text_path is not None


@dataclass
class SourceOptions:
    """How to read a data folder or a metadata table; mirrors the `extract` flags one to one.

    A data manifest (data_manifests/*.toml) resolves to one of these too.
    """

    metadata: Path | None = None  # CSV or JSONL table; None means: scan the folder
    id_col: str | None = None  # default: image path without extension, else row number; "@row": the row number
    image_col: str | None = None  # paths relative to the data folder
    text_col: str | None = None  # a column holding the report text
    text_file_col: str | None = None  # a column holding a path to a report file
    text_template: str | None = None  # a sentence built from tabular columns, see templates.py
    label_cols: list[str] = field(default_factory=list)
    split_col: str | None = None
    group_col: str | None = None  # a patient / lesion / study column: stored as `group`, for grouped splits
    meta_cols: list[str] | None = None  # None: carry every other column through
    allow_leakage: bool = False  # a template naming a label column or a leakage field is refused unless this is set
    leakage_fields: list[str] = field(default_factory=list)  # columns known to leak (a data manifest's)
    # DICOM images (dicom.py)
    dicom_window: str = "auto"  # auto | minmax | N (the file's N-th window) | C,W
    dicom_frames: str = "middle"  # middle | all (each frame its own row)
    dicom_per: str | None = None  # study | series | image; None: series for a folder scan, image for a table
    dicom_salt_file: Path | None = None  # None: extract keeps it in --out (dicom.SALT_FILE)
    dataset: dict | None = None  # what a data manifest says of the data (source, licence, labels): for model cards


@dataclass
class SkippedInput:
    """An input that could not be used: recorded in errors.parquet, never silently dropped."""

    id: str | None
    path: str | None
    stage: str  # scan | pair | decode | read | embed
    reason: str
    modality: str | None = None  # which embedding lost this input; None when found at scan time
