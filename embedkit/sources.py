"""Input layouts -> items, validated before any model loads.

Three layouts, detected in this order:
  table         a CSV / JSONL / JSON manifest (`--metadata`), or rows from a data manifest
  class folders every image sits directly in a first-level sub-folder, and there are >= 2:
                the folder name is the label `label` (ImageFolder style)
  paired folder images and same-stem report files (case01.jpg + case01.txt), any depth
Class folders may hold reports too; they pair the same way.

DICOM files (by .dcm-like name or the DICM marker) are images wherever an image can be: dicom.py reads their
headers, pseudonymises their ids and picks their frames. Reports may be .txt/.md or documents (.pdf, .docx,
.rtf, .html: documents.py reads them when their batch is embedded).

Every input path stays inside the data folder: a table path like `../x.jpg` or `/abs/x.jpg`, or a
symlink pointing out of DATA, is skipped ("outside the data folder"), never read.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from embedkit.dicom import DICOM_EXTS, DicomReader, check_choice, check_window, dicom_key, looks_like_dicom, select_and_expand
from embedkit.documents import DOCUMENT_EXTS
from embedkit.errors import EmbedkitError
from embedkit.items import Item, SkippedInput, SourceOptions
from embedkit.store import RESERVED_COLUMNS

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
TEXT_EXTS = {".txt", ".md"} | DOCUMENT_EXTS
TABLE_EXTS = {".csv", ".jsonl", ".json", ".tsv"}
ROW_ID = "@row"  # --id-col @row: the row number is the id (a table without an id column)


@dataclass
class SourceScan:
    """The validated inputs and what the user should be told about them."""

    layout: str
    items: list[Item]
    skipped: list[SkippedInput] = field(default_factory=list)
    group_col: str | None = None  # the column item.group came from (None: no groups)
    duplicate_ids: int = 0  # table rows dropped because their id repeats an earlier row's
    not_carried: list[str] = field(default_factory=list)  # table columns named like embedkit's own columns
    notes: list[str] = field(default_factory=list)  # what the user should know (DICOM files chosen, frames)
    dicom_not_chosen: int = 0  # DICOM files left out by --dicom-per

    def counts(self) -> dict:
        images = sum(i.image_path is not None for i in self.items)
        texts = sum(i.has_text for i in self.items)
        pairs = sum(i.image_path is not None and i.has_text for i in self.items)
        reasons = Counter(s.stage for s in self.skipped)
        return {"items": len(self.items), "images": images, "texts": texts, "pairs": pairs,
                "images_without_text": images - pairs, "texts_without_image": texts - pairs,
                "skipped": len(self.skipped), **{f"skipped_{k}": v for k, v in sorted(reasons.items())},
                **({"dicom_files_not_chosen": self.dicom_not_chosen} if self.dicom_not_chosen else {})}


def scan_source(root: str | Path, opts: SourceOptions | None = None, rows: list[dict] | None = None) -> SourceScan:
    """Find every item under `root` (or in `rows`, from a data manifest)."""
    root = Path(root)
    opts = opts or SourceOptions()
    check_window(opts.dicom_window)
    check_choice(opts.dicom_frames, ("middle", "all"), "--dicom-frames")
    check_choice(opts.dicom_per, ("study", "series", "image"), "--dicom-per")
    if not root.exists():
        raise EmbedkitError(f"data folder '{root}' does not exist")
    if rows is not None:
        return items_from_table(rows, root, opts, layout="data manifest")
    if opts.metadata is not None:
        return items_from_table(read_table(opts.metadata), root, opts, layout=f"table {Path(opts.metadata).name}")
    if not root.is_dir():
        raise EmbedkitError(f"'{root}' is a file: pass a data folder, or a table with --metadata")
    return scan_folder(root, opts)


# ---------------------------------------------------------------- folders


def scan_folder(root: Path, opts: SourceOptions | None = None) -> SourceScan:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
    skipped: list[SkippedInput] = []
    real_root = root.resolve()
    inside = []
    for p in files:
        if is_inside(p, real_root):
            inside.append(p)
        else:  # a symlink pointing out of DATA
            rel = p.relative_to(root)
            skipped.append(SkippedInput(rel.with_suffix("").as_posix(), rel.as_posix(), "scan", OUTSIDE))
    files = inside
    top_dirs = {p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}
    kinds = {p: _file_kind(p, root) for p in files}
    # ImageFolder style: every image sits exactly one level down, in >= 2 sub-folders
    depths = {len(p.relative_to(root).parts) for p in files if kinds[p] in ("image", "dicom", "report")}
    class_folders = depths == {2} and len(top_dirs) >= 2

    images: dict[str, Path] = {}
    reports: dict[str, Path] = {}
    for p in files:
        rel = p.relative_to(root)
        key = dicom_key(rel) if kinds[p] == "dicom" else rel.with_suffix("").as_posix()
        ext = p.suffix.lower()
        bucket = images if kinds[p] in ("image", "dicom") else reports if kinds[p] == "report" else None
        if bucket is None:
            if not (p.parent == root and ext in TABLE_EXTS):  # a metadata table at the root is expected
                skipped.append(SkippedInput(key, rel.as_posix(), "scan", f"not an image or report ({ext or 'no extension'})"))
            continue
        if key in bucket:
            skipped.append(SkippedInput(key, rel.as_posix(), "scan",
                                        f"duplicate id: {bucket[key].relative_to(root).as_posix()} has the same stem"))
            continue
        bucket[key] = p

    items = []
    for key in sorted(images.keys() | reports.keys()):
        labels = {"label": key.split("/", 1)[0]} if class_folders else {}
        items.append(Item(id=key, image_path=images.get(key), text_path=reports.get(key), labels=labels))
    if images and reports:  # a paired layout: say which halves are missing, but keep both halves
        for it in items:
            if it.image_path is None or it.text_path is None:
                missing = "image" if it.image_path is None else "report"
                path = (it.image_path or it.text_path).relative_to(root).as_posix()
                skipped.append(SkippedInput(it.id, path, "pair", f"no {missing} file with the same stem"))
    layout = "class sub-folders (label = folder name)" if class_folders else "folder"
    found = " + ".join(k for k, d in (("images", images), ("same-stem reports", reports)) if d)
    scan = SourceScan(f"{layout}: {found or 'no images or reports'}", items, skipped)
    return _with_dicom(scan, root, opts or SourceOptions(), DicomReader(_salt_file(opts)), per_default="series")


def _file_kind(p: Path, root: Path) -> str | None:
    """image | dicom | report | None, by extension, and for names without a known one by content (DICM)."""
    ext = p.suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in TEXT_EXTS:
        return "report"
    if ext in TABLE_EXTS and p.parent == root:
        return None
    return "dicom" if looks_like_dicom(p) else None


def _salt_file(opts: SourceOptions | None):
    return opts.dicom_salt_file if opts is not None else None


def _with_dicom(scan: SourceScan, root: Path, opts: SourceOptions, reader: DicomReader, per_default: str):
    """The scan with its DICOM items described, grouped by patient, chosen and given their frames."""
    d = select_and_expand(scan.items, root, reader, per=opts.dicom_per or per_default, frames=opts.dicom_frames,
                          window=check_window(opts.dicom_window), default_group=opts.group_col is None)
    scan.items, scan.notes, scan.dicom_not_chosen = d.items, scan.notes + d.notes, d.not_chosen
    scan.skipped += d.skipped
    if scan.group_col is None and any(it.dicom is not None and it.group is not None for it in scan.items):
        scan.group_col = "dicom_patient"
    return scan


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


OUTSIDE = "outside the data folder"


def is_inside(path: Path, real_root: Path) -> bool:
    """Whether `path`, with symlinks followed and `..` collapsed, lies under `real_root` (already resolved)."""
    return path.resolve().is_relative_to(real_root)


# ---------------------------------------------------------------- tables


def read_table(path: str | Path) -> list[dict]:
    """Rows of a CSV/TSV, JSONL or JSON-array file, optionally gzipped.

    Empty CSV cells become None; other cells stay strings here, so templates, ids and paths see
    exactly what the table says. The labels and metadata stored at extract time are typed later,
    per column (see `infer_column_types`).
    """
    path = Path(path)
    if not path.is_file():
        raise EmbedkitError(f"metadata file '{path}' does not exist")
    ext = Path(path.name.lower().removesuffix(".gz")).suffix
    if ext not in TABLE_EXTS:
        raise EmbedkitError(f"metadata file '{path.name}' must be .csv, .tsv, .jsonl or .json (optionally .gz)")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            if ext in (".csv", ".tsv"):
                csv.field_size_limit(2**31 - 1)  # a long report in one cell is one field, not an error
                reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
                return [{k: _parse_cell(v) for k, v in row.items() if k is not None} for row in reader]
            if ext == ".jsonl":
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise EmbedkitError(f"{path.name} line {n}: not valid JSON ({e.msg})") from None
            else:
                rows = json.load(f)
    except UnicodeDecodeError:
        raise EmbedkitError(f"{path.name} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise EmbedkitError(f"{path.name}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except (OSError, csv.Error) as e:
        raise EmbedkitError(f"{path.name}: cannot be read ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise EmbedkitError(f"{path.name}: expected a JSON array of objects (JSONL: one object per line)")
    return rows


def _parse_cell(v: str | None):
    # Empty cells are missing values; the rest stays text until its whole column is looked at.
    return None if v is None or v.strip() == "" else v


# A number as a person writes one, without a leading zero (an id such as "007" is text, not 7):
# int(cell) or float(cell) then reads back as the same value the cell shows.
_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]*)?\.[0-9]+(?:[eE][-+]?[0-9]+)?|-?(?:0|[1-9][0-9]*)(?:\.[0-9]*)?[eE][-+]?[0-9]+"
                    r"|-?(?:0|[1-9][0-9]*)\.")
_NA = frozenset({"na", "n/a", "nan", "null", "none", "#n/a", "<na>"})  # pandas' missing markers, any case
_INT64 = 2**63


def infer_column_types(rows: list[dict]) -> list[dict]:
    """Turn the text cells of wholly numeric columns into ints or floats, as pandas reads a CSV.

    A column whose every filled cell is a number becomes int (float when any cell has a fraction or
    an exponent) and its "NA"/"nan"/"null"-style cells become None. A column holding any other text
    ("000123", "7 mg", "yes") or any non-text value (JSON already typed it) stays as it is. Works in
    place and returns `rows`.
    """
    columns: dict[str, str] = {}  # column -> "int" | "float" | "text"
    for row in rows:
        for k, v in row.items():
            kind = columns.get(k, "int")
            if v is None or kind == "text":
                columns.setdefault(k, kind)
                continue
            if not isinstance(v, str):
                columns[k] = "text"  # typed already: leave the column alone
                continue
            cell = v.strip()
            if cell.lower() in _NA:
                columns.setdefault(k, kind)
            elif _INT.fullmatch(cell) and abs(int(cell)) < _INT64:
                columns[k] = kind
            elif _FLOAT.fullmatch(cell):
                columns[k] = "float"
            else:
                columns[k] = "text"
    numeric = {k: int if kind == "int" else float for k, kind in columns.items() if kind != "text"}
    # a column of missing markers only has no number in it: it stays as written
    numeric = {k: t for k, t in numeric.items()
               if any(r.get(k) is not None and r[k].strip().lower() not in _NA for r in rows)}
    for row in rows:
        for k, to_number in numeric.items():
            v = row.get(k)
            if v is not None:
                cell = v.strip()
                row[k] = None if cell.lower() in _NA else to_number(cell)
    return rows


def items_from_table(rows: list[dict], root: Path, opts: SourceOptions, layout: str) -> SourceScan:
    if not rows:
        raise EmbedkitError("the metadata table has no rows")
    reader = DicomReader(opts.dicom_salt_file)
    if opts.image_col:  # DICOM images bring their dicom_* columns into the row: templates and --group-col see them
        reader.add_columns(rows, root, opts.image_col)
    columns = set().union(*(r.keys() for r in rows))
    _check_named_columns(columns, opts)
    template = _checked_template(opts, columns)

    used = {opts.id_col, opts.image_col, opts.text_col, opts.text_file_col, opts.split_col, opts.group_col,
            *opts.label_cols}
    meta_cols = opts.meta_cols if opts.meta_cols is not None else sorted(c for c in columns if c not in used)
    not_carried = [c for c in meta_cols if c in RESERVED_COLUMNS]  # a stray 'split' must not pose as the split
    meta_cols = [c for c in meta_cols if c not in RESERVED_COLUMNS]
    paths = _TablePaths(root)
    items, skipped, seen, duplicates, differing = [], paths.skipped, {}, 0, 0
    content = [opts.text_col, opts.text_file_col, *opts.label_cols, *(template.fields if template else [])]
    for n, row in enumerate(rows):
        image = row.get(opts.image_col) if opts.image_col else None
        if opts.id_col == ROW_ID:
            key = f"row{n:06d}"  # the row number, as for a text-only table without an id column
        elif opts.id_col:
            key = row.get(opts.id_col)
            key = None if key is None else str(key)
        elif image:
            key = _image_key(str(image))
        else:
            key = f"row{n:06d}"  # text-only table without an id column: row order is the only key
        where = f"row {n + 1}"
        if key is None or key == "":
            skipped.append(SkippedInput(None, where, "scan", f"empty id ({opts.id_col})"))
            continue
        if key in seen:
            duplicates += 1
            first = rows[seen[key]]
            differs = not opts.id_col and any(row.get(c) != first.get(c) for c in content if c)
            differing += differs
            hint = "; its text or labels differ: --id-col @row keeps every row" if differs else ""
            skipped.append(SkippedInput(key, where, "scan", f"duplicate id (first seen in row {seen[key] + 1}){hint}"))
            continue
        seen[key] = n
        item = Item(id=key, labels={c: row.get(c) for c in opts.label_cols},
                    split=None if not opts.split_col or row.get(opts.split_col) is None else str(row[opts.split_col]),
                    group=_group_value(row.get(opts.group_col)) if opts.group_col else None,
                    meta={c: row.get(c) for c in meta_cols})
        if image:
            item.image_path = paths.find(opts.image_col, image, key, "image file not found")
        elif opts.image_col:
            skipped.append(SkippedInput(key, where, "scan", f"no image path in column '{opts.image_col}'"))
        if template is not None:
            item.text = template.render(row)
        elif opts.text_col:
            value = row.get(opts.text_col)
            item.text = None if value is None else str(value)
            if item.text is None or not item.text.strip():
                skipped.append(SkippedInput(key, where, "read", f"empty text in column '{opts.text_col}'"))
                item.text = None
        elif opts.text_file_col and row.get(opts.text_file_col):
            item.text_path = paths.find(opts.text_file_col, row[opts.text_file_col], key, "report file not found")
        if item.image_path is not None or item.has_text:
            items.append(item)
    paths.check_any_found()
    _check_duplicates(duplicates, len(rows), opts, differing)
    # numbers are stored as numbers (age 65, not "65"); the text and paths above used the cells as written
    infer_column_types([it.labels for it in items])  # in place: the dicts are the items' own
    infer_column_types([it.meta for it in items])
    scan = SourceScan(layout, items, skipped, group_col=opts.group_col, duplicate_ids=duplicates,
                      not_carried=not_carried)
    scan = _with_dicom(scan, root, opts, reader, per_default="image")  # a table's rows are each kept
    if opts.id_col == ROW_ID and opts.group_col is None:
        _group_rows_by_image(scan, root, opts)
    return scan


def _group_rows_by_image(scan: SourceScan, root: Path, opts: SourceOptions) -> None:
    """--id-col @row: rows that share an image share a group (the image path), so no split puts one image on both
    sides; a group column or a DICOM patient, where there is one, already did better."""
    shared = Counter(it.image_path for it in scan.items if it.image_path is not None and it.group is None)
    for it in scan.items:
        if it.group is None and it.image_path is not None:
            it.group = it.image_path.relative_to(root).as_posix()
    if scan.group_col is None and shared:
        scan.group_col = opts.image_col
        repeated = sum(n for n in shared.values() if n > 1)
        if repeated:
            scan.notes.append(f"--id-col @row: {repeated} rows share an image with another row; each image's rows "
                              f"form one group (column '{opts.image_col}'), so a split keeps them on one side "
                              f"(name a patient column with --group-col to group by patient)")


def _image_key(image: str) -> str:
    """A row's id from its image path: the path without its extension; a name without a known one (a DICOM file
    named by UID, 1.2.840.113619.2.55.3) is kept whole, so two UIDs never collapse to one id."""
    path = Path(image)
    return (path.with_suffix("") if path.suffix.lower() in IMAGE_EXTS | DICOM_EXTS else path).as_posix()


def _check_named_columns(columns: set[str], opts: SourceOptions) -> None:
    named = {"--id-col": opts.id_col, "--image-col": opts.image_col, "--text-col": opts.text_col,
             "--text-file-col": opts.text_file_col, "--split-col": opts.split_col, "--group-col": opts.group_col}
    for flag, col in list(named.items()) + [("--label-col", c) for c in opts.label_cols]:
        if col and col not in columns and not (flag == "--id-col" and col == ROW_ID):
            raise EmbedkitError(f"column '{col}' ({flag}) is not in the table; columns are: "
                                f"{', '.join(sorted(columns))}")
    for col in opts.label_cols:
        if col in RESERVED_COLUMNS:
            raise EmbedkitError(f"label column '{col}' has the name of one of embedkit's own columns "
                                f"({', '.join(RESERVED_COLUMNS)}): rename it in the table")
    if not (opts.image_col or opts.text_col or opts.text_file_col or opts.text_template):
        raise EmbedkitError("name what to embed: --image-col, --text-col, --text-file-col or --text-template")


def _checked_template(opts: SourceOptions, columns: set[str]):
    """The compiled text template, refused when it would put the answer (or a known shortcut) into the text."""
    if not opts.text_template:
        return None
    from embedkit.templates import check_template_fields, parse_template

    template = parse_template(opts.text_template)
    check_template_fields(template, columns, "--text-template")
    if opts.allow_leakage:
        return template
    leaked = [c for c in opts.label_cols if c in template.fields]
    if leaked:
        raise EmbedkitError(f"the text template names the label column(s) {', '.join(leaked)}: the text would "
                            f"contain the answer (pass --allow-leakage if this is intended)")
    leaky = [f for f in template.fields if f in opts.leakage_fields]
    if leaky:
        raise EmbedkitError(f"the text template names {', '.join(repr(f) for f in leaky)}, listed as leaking the label "
                            f"in the data manifest ([leakage].fields): drop it from the template (pass "
                            f"--allow-leakage if this is intended)")
    return template


def _group_value(value) -> str | None:
    """A group cell as text; None when empty (an empty group is no group, not one big group)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip()
    return text or None


class _TablePaths:
    """Resolves the file paths a table names, inside the data folder only, and remembers what it found."""

    def __init__(self, root: Path):
        self.root, self.real_root = root, root.resolve()
        self.skipped: list[SkippedInput] = []
        self.tried: Counter = Counter()  # column -> non-empty paths looked up
        self.found: Counter = Counter()
        self.example: dict[str, str] = {}

    def find(self, column: str, value, key: str, missing: str) -> Path | None:
        value = str(value)
        self.tried[column] += 1
        self.example.setdefault(column, value)
        path = self.root / value  # an absolute value replaces root: caught by the inside check
        if not is_inside(path, self.real_root):
            self.skipped.append(SkippedInput(key, value, "scan", OUTSIDE))
            return None
        if not path.is_file():
            self.skipped.append(SkippedInput(key, value, "scan", missing))
            return None
        self.found[column] += 1
        return path

    def check_any_found(self) -> None:
        """A column none of whose paths exists is a wrong DATA folder, not a text-only (or image-only) run."""
        for column, n in self.tried.items():
            if not self.found[column]:
                raise EmbedkitError(f"none of the {n} paths in column '{column}' is a file inside the data folder "
                                    f"'{self.root}' (e.g. '{self.example[column]}'): pass as DATA the folder these "
                                    f"paths are relative to")


# A few repeated rows are data-entry slips worth recording; many mean the id column is not a row id.
MAX_DUPLICATE_FRACTION = 0.01


def _check_duplicates(duplicates: int, n_rows: int, opts: SourceOptions, differing: int = 0) -> None:
    if duplicates < 2 or duplicates <= MAX_DUPLICATE_FRACTION * n_rows:
        return
    if opts.id_col:
        where, fix = f"column '{opts.id_col}'", "for a patient column use --group-col"
    else:  # ids come from image paths: several rows about one image (questions, readers)
        where, fix = f"column '{opts.image_col}' (the id is the image path)", "name a row id column with --id-col"
        if differing:
            fix += (f", or pass --id-col @row to make each row its own sample ({differing} of the repeated rows "
                    f"come with different text or labels)")
    raise EmbedkitError(f"{duplicates} of {n_rows} rows repeat an id in {where}: ids must be unique per row; {fix}")
