"""DICOM images through pydicom: found, described, pseudonymised, chosen and turned into pixels.

A file is DICOM when its name ends in .dcm/.dicom/.dic or when bytes 128-131 say "DICM" (PACS exports name
files by UID, with no extension). At scan time only a header is read (`read_header`): an allowlist of
non-identifying tags becomes `dicom_*` columns, and PatientID, StudyInstanceUID and SeriesInstanceUID become
salted HMAC-SHA256 pseudonyms (`dicom_patient` is the default group); no other tag leaves the file, and no
reason, note or column quotes a tag value. `select_and_expand` keeps one image per series (or study) of a
folder scan and gives each chosen item its frame: the middle one, or every frame as its own row.

At decode time `dicom_rgb` turns one frame into 8-bit RGB the way a viewer shows it: modality LUT
(rescale slope/intercept), then the VOI LUT or window (the file's first, or `--dicom-window`), MONOCHROME1
inverted, palette colour looked up, YBR converted, any bit depth and signedness scaled to 0-255.
Compressed transfer syntaxes decode through pydicom's plugins where their packages are installed
(`pip install 'embedkit[dicom]'`); a file none can decode is a recorded skip naming the syntax and the package.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from embedkit.errors import EmbedkitError
from embedkit.items import DicomFrame, Item, SkippedInput

DICOM_EXTS = {".dcm", ".dicom", ".dic"}
SALT_FILE = "dicom_salt.key"  # beside the embeddings: share the Parquet files, not this file
WINDOW_HELP = "auto (the file's first VOI LUT or window, else its full range), minmax, N (the file's N-th) or C,W"
PER_CHOICES = ("study", "series", "image")
FRAME_CHOICES = ("middle", "all")
MAX_AGE = 90  # ages above 89 identify people (HIPAA Safe Harbor): stored as 90
_PIP_NAMES = {"gdcm": "python-gdcm"}  # import names pydicom reports -> pip names
_DICOM_EXTRA = {"pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "python-gdcm"}  # pyproject's dicom extra

# The allowlist: (column, DICOM keyword). Nothing else is read from a file but the pseudonymised ids below and
# what decoding needs; values are parsed by `_column_value`.
ALLOWED_TAGS = (("dicom_modality", "Modality"), ("dicom_body_part", "BodyPartExamined"),
                ("dicom_view_position", "ViewPosition"), ("dicom_manufacturer", "Manufacturer"),
                ("dicom_model", "ManufacturerModelName"), ("dicom_pixel_spacing_mm", "PixelSpacing"),
                ("dicom_patient_age", "PatientAge"), ("dicom_patient_sex", "PatientSex"),
                ("dicom_study_year", "StudyDate"), ("dicom_photometric", "PhotometricInterpretation"))
PSEUDONYMS = (("dicom_patient", "PatientID", "p"), ("dicom_study", "StudyInstanceUID", "st"),
              ("dicom_series", "SeriesInstanceUID", "se"))
COLUMNS = tuple(c for c, _ in ALLOWED_TAGS) + tuple(c for c, _, _ in PSEUDONYMS) + ("dicom_frames", "dicom_frame")
_HEADER_TAGS = [k for _, k in ALLOWED_TAGS] + [k for _, k, _ in PSEUDONYMS] + [
    "ImagerPixelSpacing", "SOPClassUID", "SeriesNumber", "InstanceNumber", "NumberOfFrames", "SamplesPerPixel",
    "PixelData", "FloatPixelData", "DoubleFloatPixelData"]


class DicomReadError(Exception):
    """A DICOM file that cannot be used; the message is the recorded reason and never quotes a tag value."""


# ---------------------------------------------------------------- detection and options


def looks_like_dicom(path: Path) -> bool:
    """A .dcm/.dicom/.dic name, or the DICM marker after the 128-byte preamble (files named by UID)."""
    if path.suffix.lower() in DICOM_EXTS:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_key(rel: Path) -> str:
    """The item id of a DICOM file: its path without a .dcm-like suffix; a UID name keeps its last '.part'."""
    return (rel.with_suffix("") if rel.suffix.lower() in DICOM_EXTS else rel).as_posix()


def check_window(value: str) -> str:
    """--dicom-window as given, or one error line naming the choices."""
    v = value.strip().lower()
    if v in ("auto", "minmax") or re.fullmatch(r"[1-9][0-9]*", v):
        return v
    m = re.fullmatch(r"(-?[0-9.]+),([0-9.]+)", v)
    if m and _is_float(m[1]) and _is_float(m[2]) and float(m[2]) > 0:
        return f"{float(m[1]):g},{float(m[2]):g}"
    raise EmbedkitError(f"--dicom-window '{value}': choose {WINDOW_HELP} (e.g. 40,400 for soft tissue)")


def check_choice(value: str | None, choices: tuple, flag: str) -> str | None:
    if value is not None and value not in choices:
        raise EmbedkitError(f"{flag} '{value}': choose {', '.join(choices)}")
    return value


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- salt and pseudonyms


def load_salt(path: Path) -> bytes:
    """The secret that keys the pseudonyms: read from `path`, created there (32 random bytes) on first use.

    Kept beside the embeddings so a resume hashes the same patient to the same group. Whoever holds it can test
    guessed PatientIDs against the pseudonyms: share the Parquet files, not this file."""
    path = Path(path)
    for _ in range(50):
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "x") as f:  # exclusive: two runs starting together agree on one salt
                    f.write(secrets.token_hex(32) + "\n")
            except FileExistsError:
                pass
            except OSError as e:
                raise EmbedkitError(f"cannot write the DICOM salt file {path}: {e.strerror}") from None
            continue
        except OSError as e:
            raise EmbedkitError(f"cannot read the DICOM salt file {path}: {e.strerror}") from None
        if re.fullmatch(r"[0-9a-f]{64}", text):
            return bytes.fromhex(text)
        time.sleep(0.02)  # another run is writing it
    raise EmbedkitError(f"the DICOM salt file {path} is damaged (expected 64 hex digits): restore it, or delete "
                        f"it and re-extract with --overwrite (every pseudonym changes)")


def pseudonym(salt: bytes, prefix: str, value) -> str | None:
    """`prefix-` + 20 hex digits of HMAC-SHA256(salt, value); None for an empty value."""
    text = str(value).strip() if value is not None else ""
    if not text:
        return None
    return f"{prefix}-{hmac.new(salt, text.encode('utf-8'), hashlib.sha256).hexdigest()[:20]}"


# ---------------------------------------------------------------- headers


@dataclass
class DicomHeader:
    columns: dict  # dicom_* columns: allowlisted values and pseudonyms, nothing else
    frames: int
    series_number: float | None
    instance_number: float | None


def _quiet_pydicom():
    """pydicom's validation warnings quote tag values (a malformed birth date, a name): never let them reach
    stderr or a log. Process-wide and idempotent."""
    import warnings

    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def read_header(path: Path, salt: bytes) -> DicomHeader:
    """The allowlisted columns and pseudonyms of one file, its frame count and order; DicomReadError if it holds
    no image this reader can use. Only the listed tags are parsed; pixel data is skipped over, not read."""
    _quiet_pydicom()
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        ds = dcmread(path, defer_size=256, specific_tags=_HEADER_TAGS, force=path.suffix.lower() in DICOM_EXTS)
    except InvalidDicomError:
        raise DicomReadError("not a DICOM file") from None
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as e:
        raise DicomReadError(f"DICOM header cannot be read ({type(e).__name__})") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomReadError(f"DICOM file holds no image ({_sop_class(ds)})")
    if "PixelData" not in ds:
        raise DicomReadError("DICOM float pixel data is not read (parametric maps)")
    check_decodable(ds)
    columns = {col: _column_value(col, ds) for col, _ in ALLOWED_TAGS}
    columns.update({col: pseudonym(salt, prefix, ds.get(kw)) for col, kw, prefix in PSEUDONYMS})
    frames = _int(ds.get("NumberOfFrames")) or 1
    columns["dicom_frames"] = frames
    return DicomHeader(columns, frames, _number(ds.get("SeriesNumber")), _number(ds.get("InstanceNumber")))


def _sop_class(ds) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", None)
    if uid is None:
        return "no SOP class"
    name = getattr(uid, "name", "") or ""
    return f"SOP class {name}" if name and name != str(uid) else f"SOP class {uid}"


def check_decodable(ds) -> None:
    """DicomReadError naming the transfer syntax and the package that would decode it, when none installed here
    can (checked at scan time, before any model loads)."""
    from pydicom.pixels import get_decoder

    syntax = getattr(ds.get("file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DicomReadError(f"no DICOM decoder exists for {_syntax(syntax)} (video or unknown compression)") \
            from None
    if not decoder.is_available:
        raise DicomReadError(f"cannot decode {_syntax(syntax)}: no decoder installed here; install "
                             f"{' or '.join(_packages(decoder.missing_dependencies))}")


def _syntax(uid) -> str:
    name = getattr(uid, "name", "") or ""
    return f"{name} ({uid})" if name and name != str(uid) else f"transfer syntax {uid}"


def _packages(missing: list[str]) -> list[str]:
    """pydicom's 'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0' lines as pip names
    ('pylibjpeg + pylibjpeg-openjpeg'); the ones embedkit's dicom extra brings say so."""
    out = []
    for line in missing:
        needs = line.split("requires", 1)[-1]
        names = [re.split(r"[<>=!~ ]", n.strip(), maxsplit=1)[0] for n in needs.split(" and ")]
        names = [_PIP_NAMES.get(n, n) for n in names if n and n != "numpy"]
        if names:
            extra = " (pip install 'embedkit[dicom]')" if all(n in _DICOM_EXTRA for n in names) else ""
            out.append(" + ".join(names) + extra)
    return out or ["a pydicom decoding plugin"]


def _column_value(col: str, ds):
    if col == "dicom_pixel_spacing_mm":
        spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        try:
            return round(float(spacing[0]), 6) if spacing else None
        except (TypeError, ValueError, IndexError):
            return None
    keyword = dict(ALLOWED_TAGS)[col]
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    if not text:
        return None
    if col == "dicom_patient_age":  # AgeString: 064Y, 006M, 003W, 010D
        m = re.fullmatch(r"0*([0-9]{1,3})([DWMY])", text.upper())
        if not m:
            return None
        years = int(m[1]) / {"D": 365.25, "W": 52.18, "M": 12, "Y": 1}[m[2]]
        return round(min(years, MAX_AGE), 2)
    if col == "dicom_study_year":
        return int(text[:4]) if re.fullmatch(r"[0-9]{8}.*", text) else None
    if col == "dicom_patient_sex":
        return text.upper() if text.upper() in ("M", "F", "O") else None
    return text


def _int(v) -> int | None:
    try:
        return int(v) if v is not None and str(v).strip() != "" else None
    except (TypeError, ValueError):
        return None


def _number(v) -> float | None:
    try:
        return float(v) if v is not None and str(v).strip() != "" else None
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- scan: columns, groups, choice, frames


@dataclass
class DicomScan:
    """What the DICOM half of a scan found; sources.py folds it into its SourceScan."""

    items: list[Item]
    skipped: list[SkippedInput] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    not_chosen: int = 0  # files left out by --dicom-per


class DicomReader:
    """Reads each DICOM file's header once per scan, keyed by its resolved path."""

    def __init__(self, salt_file: Path | None):
        self.salt_file = salt_file
        self._salt: bytes | None = None
        self.ephemeral = False  # pseudonyms keyed by a salt no file keeps: they change with every scan
        self.headers: dict[Path, DicomHeader | str] = {}

    @property
    def salt(self) -> bytes:
        if self._salt is None:
            # no folder to keep it in (a library call without one): pseudonyms valid for this scan only
            self._salt = load_salt(self.salt_file) if self.salt_file is not None else secrets.token_bytes(32)
            self.ephemeral = self.salt_file is None
        return self._salt

    def header(self, path: Path) -> DicomHeader | str:
        """The file's header, or the reason it cannot be used."""
        key = path.resolve()
        if key not in self.headers:
            try:
                self.headers[key] = read_header(path, self.salt)
            except DicomReadError as e:
                self.headers[key] = str(e)
        return self.headers[key]

    def add_columns(self, rows: list[dict], root: Path, image_col: str) -> None:
        """Give each table row whose image is a DICOM file the file's dicom_* columns (in place), so templates,
        --group-col and subgroups can name them. Paths outside DATA or missing are left to the table's checks."""
        real_root = root.resolve()
        for row in rows:
            value = row.get(image_col)
            if not value:
                continue
            path = root / str(value)
            if path.is_file() and path.resolve().is_relative_to(real_root) and looks_like_dicom(path):
                h = self.header(path)
                if isinstance(h, DicomHeader):
                    for c, v in h.columns.items():
                        row.setdefault(c, v)


def select_and_expand(items: list[Item], root: Path, reader: DicomReader, per: str, frames: str, window: str,
                      default_group: bool) -> DicomScan:
    """Items whose image is DICOM get their header columns, the patient pseudonym as group (unless a group came
    from elsewhere or `default_group` is off), one image per `per` unit, and their frame(s); others pass through."""
    result = DicomScan([])
    chosen_units: dict[tuple, Item] = {}
    dicom_items: list[tuple[Item, DicomHeader]] = []
    no_patient = 0
    for it in items:
        if it.image_path is None or not looks_like_dicom(it.image_path):
            result.items.append(it)
            continue
        h = reader.header(it.image_path)
        if isinstance(h, str):
            result.skipped.append(SkippedInput(it.id, _rel(it.image_path, root), "scan", h))
            if it.has_text:  # the report is still a sample of its own
                result.items.append(replace(it, image_path=None))
            continue
        for c, v in h.columns.items():
            it.meta.setdefault(c, v)
        if default_group and it.group is None:
            it.group = h.columns["dicom_patient"]
        no_patient += h.columns["dicom_patient"] is None
        dicom_items.append((it, h))
    # one image per series or study (folder scans): the middle instance of the lowest-numbered series
    if per != "image":
        units: dict[tuple, list[tuple[Item, DicomHeader]]] = {}
        for it, h in dicom_items:
            study, series = h.columns["dicom_study"], h.columns["dicom_series"]
            unit = (study, series) if per == "series" else (study,)
            if study is None or (per == "series" and series is None) or it.has_text:
                unit = ("file", it.id)  # no UID to group by, or a file paired with its own report
            units.setdefault(unit, []).append((it, h))
        for unit, members in units.items():
            members.sort(key=lambda m: (_order(m[1].series_number), m[1].columns["dicom_series"] or "",
                                        _order(m[1].instance_number), m[0].id))
            if per == "study" and len(members) > 1:  # the first series, then its middle instance
                first = members[0][1].columns["dicom_series"]
                members = [m for m in members if m[1].columns["dicom_series"] == first]
            chosen_units[unit] = members[len(members) // 2][0]
        chosen = {id(it) for it in chosen_units.values()}
        result.not_chosen = sum(id(it) not in chosen for it, _ in dicom_items)
        dicom_items = [(it, h) for it, h in dicom_items if id(it) in chosen]
    for it, h in dicom_items:
        if frames == "all" and h.frames > 1:
            for k in range(h.frames):
                result.items.append(replace(it, id=f"{it.id}#frame{k}", meta={**it.meta, "dicom_frame": k},
                                            labels=dict(it.labels), dicom=DicomFrame(k, window)))
        else:
            it.meta["dicom_frame"] = h.frames // 2
            it.dicom = DicomFrame(h.frames // 2, window)
            result.items.append(it)
    result.notes = _notes(dicom_items, result, per, frames, no_patient)
    if reader.ephemeral and dicom_items:
        result.notes.append("DICOM: no salt file given (SourceOptions.dicom_salt_file): the patient, study and "
                            "series pseudonyms hold for this scan only")
    return result


def _order(v: float | None) -> float:
    return float("inf") if v is None else v


def _notes(chosen: list, result: DicomScan, per: str, frames: str, no_patient: int) -> list[str]:
    if not chosen and not result.not_chosen:
        return []
    headers = [h for _, h in chosen]
    count = lambda c: len({h.columns[c] for h in headers if h.columns[c] is not None})  # noqa: E731
    notes = [f"DICOM: {len(headers) + result.not_chosen} files read; embedding {len(headers)} from "
             f"{count('dicom_patient')} patients, {count('dicom_study')} studies, {count('dicom_series')} series"]
    if result.not_chosen:
        notes.append(f"DICOM: {result.not_chosen} files not embedded: one image per {per} (the middle instance; "
                     f"--dicom-per image embeds every file)")
    multi = sum(h.frames > 1 for h in headers)
    if multi:
        notes.append(f"DICOM: {multi} multi-frame files: " + ("every frame is its own row (dicom_frame)"
                     if frames == "all" else "their middle frame (--dicom-frames all embeds each frame)"))
    if no_patient:
        notes.append(f"DICOM: {no_patient} files have no PatientID: they belong to no group, so a grouped split "
                     f"cannot keep their patients together")
    elif count("dicom_patient") == 1 and len(headers) > 1:
        notes.append("DICOM: every file has the same PatientID (anonymised to one value?): all rows form one group")
    return notes


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- pixels


def dicom_rgb(path: str | Path, read: DicomFrame | None = None) -> np.ndarray:
    """One frame as a viewer shows it, as an H x W x 3 uint8 array; DicomReadError with the reason otherwise."""
    _quiet_pydicom()
    from pydicom import Dataset
    from pydicom.pixels import pixel_array

    read = read or DicomFrame(None, "auto")
    ds = Dataset()
    try:
        if read.frame is None:  # not chosen at scan time (a caller outside extract): the middle frame
            read = replace(read, frame=_frame_count(path) // 2)
        arr = pixel_array(os.fspath(path), ds_out=ds, index=read.frame)
    except FileNotFoundError:
        raise DicomReadError("file not found") from None
    except Exception as e:  # noqa: BLE001 - a plugin's own error types: all mean "cannot decode this file"
        raise DicomReadError(_decode_failure(path, e)) from None
    try:
        return _display_rgb(arr, ds, read)
    except DicomReadError:
        raise
    except (ValueError, KeyError, AttributeError, TypeError, IndexError, NotImplementedError) as e:
        raise DicomReadError(f"DICOM pixels cannot be displayed ({type(e).__name__}: {_redacted(e)})") from None


def _decode_failure(path, e: Exception) -> str:
    """Why pixel data did not decode: the transfer syntax, the decoders that tried, and what else would."""
    from pydicom.filereader import read_file_meta_info
    from pydicom.pixels import get_decoder

    try:
        syntax = read_file_meta_info(path).TransferSyntaxUID
    except Exception:  # noqa: BLE001 - no usable file meta: say what pydicom said
        syntax = None
    detail = f"{type(e).__name__}: {_redacted(e)}"
    if syntax is None or not syntax.is_compressed:
        return f"DICOM pixel data cannot be decoded ({detail})"
    try:
        decoder = get_decoder(syntax)
        tried, missing = ", ".join(decoder.available_plugins), decoder.missing_dependencies
    except NotImplementedError:
        tried, missing = "", []
    also = f"; {' or '.join(_packages(missing))} may decode it" if missing else ""
    return f"cannot decode {_syntax(syntax)} pixel data with {tried or 'no decoder'} ({detail}){also}"


def _frame_count(path) -> int:
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames"])
    return _int(ds.get("NumberOfFrames")) or 1


def _redacted(e: Exception) -> str:
    """The first line of a library message (the first plugin's, under pydicom's "raised by all plugins:"), with
    anything quoted (values) removed."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
    line = lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", line)[:120]


def _display_rgb(arr: np.ndarray, ds, read: DicomFrame) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)[..., :3]
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _to_uint8(rgb.astype(np.float64) / (2**bits - 1))
    if arr.ndim == 3 and arr.shape[-1] == 3:  # RGB, or YBR that pydicom converted to RGB
        bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
        return _to_uint8(arr.astype(np.float64) / (2**bits - 1))
    if arr.ndim != 2:
        raise DicomReadError(f"DICOM pixel array of shape {tuple(arr.shape)} is not one image")
    _frame_functional_groups(ds, read.frame)
    unit = _grey_unit(arr, ds, read.window)
    if photometric == "MONOCHROME1" or (photometric == "MONOCHROME2"
                                        and str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"):
        unit = 1.0 - unit  # MONOCHROME1: the lowest value is white
    return np.repeat(_to_uint8(unit)[..., None], 3, axis=2)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _frame_functional_groups(ds, frame: int | None) -> None:
    """Enhanced multi-frame files keep rescale and window per frame (functional groups): lift them to the top
    level where pydicom's LUT functions look, unless the top level has its own."""
    for seq_name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if not seq:
            continue
        group = seq[frame if seq_name.startswith("PerFrame") and frame is not None and frame < len(seq) else 0]
        for macro, keywords in (("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
                                ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction"))):
            if group.get(macro):
                for kw in keywords:
                    if kw in group[macro][0] and kw not in ds:
                        setattr(ds, kw, group[macro][0].get(kw))


def _grey_unit(arr: np.ndarray, ds, window: str) -> np.ndarray:
    """Stored values -> modality values -> [0, 1] through the chosen VOI (window or LUT)."""
    from pydicom.pixels import apply_modality_lut, apply_windowing

    values = apply_modality_lut(arr, ds)
    if window == "minmax":
        return _minmax(values)
    if "," in window:  # C,W given on the command line: pydicom's LINEAR window into 0..255
        center, width = (float(x) for x in window.split(","))
        return apply_windowing(values, _window_dataset(center, width, "LINEAR")) / 255.0
    index = 0 if window == "auto" else int(window) - 1
    luts = [item for item in ds.get("VOILUTSequence") or [] if "LUTDescriptor" in item and "LUTData" in item]
    centers, widths = _multi(ds.get("WindowCenter")), _multi(ds.get("WindowWidth"))
    if luts and index < len(luts):  # a LUT first, as pydicom's apply_voi_lut prefers it
        return _voi_lut(values, luts[index], ds)
    if centers and widths and index < min(len(centers), len(widths)):
        func = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        return apply_windowing(values, _window_dataset(centers[index], widths[index], func)) / 255.0
    if window == "auto":
        return _minmax(values)
    n = max(len(luts), min(len(centers), len(widths)))
    raise DicomReadError(f"--dicom-window {window}: the file has {n} window(s)")


def _voi_lut(values: np.ndarray, item, ds) -> np.ndarray:
    """A VOI LUT Sequence item applied, into [0, 1]. Our own lookup: pydicom 3.0.2's apply_voi indexes an 8-bit
    LUT through uint8, so a 12-bit input wraps round (value 512 reads entry 0)."""
    entries, first, depth = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16
    data = item["LUTData"]
    if isinstance(data.value, (bytes, bytearray)):  # OW: 16-bit words in the file's byte order
        big = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") == "1.2.840.10008.1.2.2"
        lut = np.frombuffer(data.value, dtype=">u2" if big else "<u2")[:entries]
    else:
        lut = np.asarray(data.value if isinstance(data.value, (list, tuple)) else [data.value], dtype=np.int64)
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, len(lut) - 1)
    return lut[index].astype(np.float64) / (2**depth - 1)


def _window_dataset(center: float, width: float, func: str):
    """A dataset holding only a window, 8-bit unsigned: pydicom's formula then maps it onto 0..255."""
    from pydicom import Dataset

    w = Dataset()
    w.PhotometricInterpretation, w.BitsStored, w.PixelRepresentation = "MONOCHROME2", 8, 0
    w.WindowCenter, w.WindowWidth, w.VOILUTFunction = center, width, func
    return w


def _multi(value) -> list[float]:
    if value is None:
        return []
    values = list(value) if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__") else [value]
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return []


def _minmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
