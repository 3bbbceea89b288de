"""Loading: a manifest's metadata files under a data root become rows (joined, filtered, labels derived,
image and report paths resolved), checked against the data before any model loads."""

from __future__ import annotations

from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.manifests.derive import match_key
from embedkit.manifests.schema import IMAGE_PATH_COL, TEXT_PATH_COL
from embedkit.sources import read_table
from embedkit.templates import is_missing, parse_template


def load_rows(m, root: Path) -> list[dict]:
    """The metadata rows of manifest `m` under `root`: split added, filters applied, labels derived, paths
    resolved."""
    root = Path(root)
    if not root.is_dir():
        hint = f" (expected: {m.root_hint})" if m.root_hint else ""
        raise EmbedkitError(f"data folder {root} for dataset '{m.name}' does not exist{hint}")
    for pattern in m.expected_files:
        if next(iter(root.glob(pattern)), None) is None:
            raise m.error(("layout", "expected_files"),
                          f"nothing under {root} matches '{pattern}'; is {root} the dataset's root folder?")
    if m.image_dir and not (root / m.image_dir).is_dir():
        raise m.error(("layout", "image_dir"), f"folder '{m.image_dir}' not found under {root}")

    joined = []
    for i, j in enumerate(m.joins):
        rows, cols = _read(m, root, j.file, ("metadata", "joins", i, "file"))
        for col in j.on:
            if col not in cols:
                raise m.error(("metadata", "joins", i, "on"), f"column '{col}' is missing from data file {j.file}")
        joined.append((j, _index(rows, j.on), cols))
    join_cols = {c for _, _, cols in joined for c in cols}

    out: list[dict] = []
    for name in m.files:
        rows, cols = _read(m, root, name, ("metadata", "files"))
        _check_columns(m, cols, join_cols, name)
        if m.split_from_file:
            for row in rows:
                row[m.split_col] = m.split_from_file.get(name)
        for j, index, _ in joined:
            rows = _join(rows, index, j.on)
        out.extend(rows)

    for f in m.filters:
        if f.strip:
            for row in out:
                if isinstance(row.get(f.column), str):
                    row[f.column] = row[f.column].strip()
        out = [row for row in out if f.keep(row)]
    _check_ids(m, out)
    image_tmpl = parse_template(m.image_path_pattern) if m.image_path_pattern else None
    text_tmpl = parse_template(m.text_file_pattern) if m.text_file_pattern else None
    recode = {col: {match_key(k): v for k, v in mapping.items()} for col, mapping in m.recode.items()}
    for row in out:
        for lab in m.labels:  # from the raw values: recode below is for the text only
            row[lab.name] = lab.value(row)
        if m.has_image:
            row[IMAGE_PATH_COL] = _image_path(m, row, root, image_tmpl)
        if text_tmpl is not None:
            row[TEXT_PATH_COL] = _fill(text_tmpl, row)
        for col, mapping in recode.items():
            new = mapping.get(match_key(row.get(col)))
            if new is not None:
                row[col] = new
    return out


def _read(m, root: Path, name: str, key: tuple) -> tuple[list[dict], list[str]]:
    path = root / name
    if not path.is_file():
        raise m.error(key, f"data file {name} not found under {root}")
    try:
        rows = read_table(path)
    except EmbedkitError as e:
        raise m.error(key, f"cannot read data file: {e}") from None
    return rows, list(dict.fromkeys(k for r in rows for k in r))


def _check_columns(m, cols: list[str], join_cols: set[str], name: str) -> None:
    have = set(cols) | join_cols
    where = name + (" (or the joined files)" if m.joins else "")
    for path, col in m.column_refs():
        if col not in have:
            raise m.error(path, f"column '{col}' is missing from data file {where}")
    for path, col in m.added_columns():
        if col in have:
            raise m.error(path, f"column '{col}' would overwrite a column of data file {name}; choose another name")


def _check_ids(m, rows: list[dict]) -> None:
    if not m.id_col:
        return
    seen = set()
    for row in rows:
        k = match_key(row.get(m.id_col))
        if k is None:
            raise m.error(("metadata", "id_col"), f"id column '{m.id_col}' has an empty value")
        if k in seen:  # the id is the join key across modalities: duplicates would merge two samples
            raise m.error(("metadata", "id_col"), f"id column '{m.id_col}' has duplicate values")
        seen.add(k)


def _image_path(m, row: dict, root: Path, tmpl) -> str | None:
    rel = _fill(tmpl, row) if tmpl is not None else row.get(m.image_path_col)
    if is_missing(rel):
        return None
    rel = str(rel).strip()
    for d in m.image_search_dirs:  # e.g. HAM10000's images, split over two folders
        if (root / d / rel).is_file():
            return f"{d}/{rel}"
    # not found anywhere: keep the first candidate so the extractor records it as a missing file
    return f"{m.image_search_dirs[0]}/{rel}" if m.image_search_dirs else rel


def _fill(tmpl, row: dict) -> str | None:
    """A path from a pattern; None when a field it needs is missing (never a path containing 'unknown')."""
    if any(is_missing(row.get(f)) for f in tmpl.fields):
        return None
    return tmpl.render(row)


def _index(rows: list[dict], on: list[str]) -> dict[tuple, list[dict]]:
    index: dict[tuple, list[dict]] = {}
    for r in rows:
        key = tuple(match_key(r.get(c)) for c in on)
        if None not in key:  # a missing key matches nothing, not other missing keys
            index.setdefault(key, []).append(r)
    return index


def _join(rows: list[dict], index: dict[tuple, list[dict]], on: list[str]) -> list[dict]:
    """Inner join; one output row per match; columns the left row already has keep the left value."""
    out = []
    for r in rows:
        for o in index.get(tuple(match_key(r.get(c)) for c in on), ()):
            out.append({**o, **r})
    return out
