"""Parquet output: one dataset folder per (modality, model), written so that a crash loses nothing.

Layout under `--out`:
  image__dinov2-small/part-00000.parquet ...   rows: id, path, sha256, embedding, split, group, labels, metadata
  text__minilm/part-00000.parquet ...          the same, plus `text`: the exact text that was embedded
  errors.parquet                              id, path, stage, reason (this run's skipped inputs)
  manifest.json                               provenance, counts and costs of the last run

Crash safety: a part is written as `part-N.parquet.tmp` and renamed when complete (rename is
atomic), so after `kill -9` only whole, readable parts remain; the next run deletes the `.tmp`
and embeds what is missing. Rows change only through whole-file replacement: dropping stale rows
and updating labels, split, group and metadata from an edited table (`relabel_parts`) both rewrite a
part to `.tmp` and rename it over the old one.
Provenance (the resolved encoder spec) is stored as JSON under the schema metadata key `embedkit`.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedkit.errors import EmbedkitError

META_KEY = b"embedkit"
BASE_COLUMNS = ("id", "path", "sha256", "embedding", "split", "group")
TEXT_COLUMN = "text"  # text tables only: the exact text that was embedded (for leakage checks on training rows)
RESERVED_COLUMNS = (*BASE_COLUMNS, TEXT_COLUMN)  # no label or metadata column may take these names
# Provenance fields that must agree for rows to live in one embedding column.
IDENTITY_FIELDS = ("source", "family", "revision", "pooling", "dim", "preprocess", "max_length", "normalize", "dtype",
                   "quantize", "backend", "precision")


def identity_value(provenance: dict, key: str):
    """An identity field as recorded; tables from before backends existed ran torch at their dtype."""
    if key in provenance:
        return provenance[key]
    if key == "backend":
        return "torch"
    if key == "precision":
        if provenance.get("quantize"):
            return provenance["quantize"]
        return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(provenance.get("dtype"))
    return None


# Page checksums (CRC32) are written into every part and verified on every read: a flipped bit in a
# stored vector fails loudly instead of changing a number.
WRITE_OPTIONS = {"compression": "zstd", "write_page_checksum": True}


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file read with its page checksums verified; a damaged file is one clear error."""
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise EmbedkitError(f"{path} is damaged or not an embedkit Parquet file ({_first_line(e)}); re-extract "
                            f"with --overwrite, or restore it") from None


def read_parquet_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise EmbedkitError(f"{path} is damaged or not an embedkit Parquet file ({_first_line(e)}); re-extract "
                            f"with --overwrite, or restore it") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]


def dataset_dir(out: Path, modality: str, model_name: str) -> Path:
    name = model_name.split(":", 1)[-1].rstrip("/")
    name = Path(name).name if ("/" in name and Path(name).exists()) or name.startswith((".", "/", "~")) else name
    return Path(out) / f"{modality}__{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-')}"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------- schema


def build_schema(dim: int, columns: dict[str, list], provenance: dict, text_column: bool = False) -> pa.Schema:
    """Schema from the values of every carried-through column across all items (so parts agree).

    `columns` holds labels and metadata; a name among BASE_COLUMNS there is the base column itself.
    """
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("path", pa.string()),
              pa.field("sha256", pa.string()), pa.field("embedding", pa.list_(pa.float32(), dim)),
              pa.field("split", pa.string()), pa.field("group", pa.string())]
    if text_column:
        fields.append(pa.field(TEXT_COLUMN, pa.string()))
    for name, values in columns.items():
        if name in BASE_COLUMNS or (text_column and name == TEXT_COLUMN):
            continue
        try:
            typ = pa.array(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            typ = pa.string()  # mixed types: keep everything, as text
        fields.append(pa.field(name, pa.string() if pa.types.is_null(typ) else typ))
    return pa.schema(fields, metadata={META_KEY: json.dumps(provenance, default=str).encode()})


def to_column(values: list, typ: pa.DataType) -> pa.Array:
    if pa.types.is_string(typ):
        values = [None if v is None else str(v) for v in values]
    return pa.array(values, type=typ)


# ---------------------------------------------------------------- writing


class PartWriter:
    """Streams rows into row groups; closes a part every `rows_per_part` rows or `seconds_per_part`."""

    def __init__(self, directory: Path, schema: pa.Schema, row_group_size: int = 256, rows_per_part: int = 8192,
                 seconds_per_part: float = 60.0):
        self.directory, self.schema = Path(directory), schema
        self.row_group_size, self.rows_per_part, self.seconds_per_part = row_group_size, rows_per_part, seconds_per_part
        self.directory.mkdir(parents=True, exist_ok=True)
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._part_rows = 0
        self._opened_at = 0.0
        self.rows_written = 0
        self.bytes_written = 0

    def write(self, columns: dict[str, list], embeddings: np.ndarray) -> None:
        dim = self.schema.field("embedding").type.list_size
        flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
        arrays = []
        for f in self.schema:
            if f.name == "embedding":
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, dim))
            elif f.name == "group" and "group" not in columns:  # a writer with no groups (e.g. a projection)
                arrays.append(pa.nulls(len(embeddings), pa.string()))
            else:
                arrays.append(to_column(columns[f.name], f.type))
        self._buffer.append(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        self._buffered += len(embeddings)
        if self._buffered >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        if self._writer is None:
            self._tmp = self._next_part().with_suffix(".parquet.tmp")
            self._writer = pq.ParquetWriter(self._tmp, self.schema, **WRITE_OPTIONS)
            self._opened_at = time.monotonic()
        self._writer.write_table(pa.Table.from_batches(self._buffer, self.schema))
        self._part_rows += self._buffered
        self._buffer, self._buffered = [], 0
        if self._part_rows >= self.rows_per_part or time.monotonic() - self._opened_at > self.seconds_per_part:
            self._close_part()

    def _close_part(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        final = self._tmp.with_suffix("")  # drop ".tmp"
        os.replace(self._tmp, final)
        self.rows_written += self._part_rows
        self.bytes_written += final.stat().st_size
        self._writer, self._tmp, self._part_rows = None, None, 0

    def close(self) -> None:
        self._flush()
        self._close_part()

    def _next_part(self) -> Path:
        numbers = [int(m.group(1)) for p in self.directory.iterdir() if (m := re.match(r"part-(\d+)\.parquet", p.name))]
        return self.directory / f"part-{max(numbers, default=-1) + 1:05d}.parquet"


# ---------------------------------------------------------------- resume state


def part_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("part-*.parquet"))


def remove_partial_parts(directory: Path) -> int:
    """Delete parts a killed run left half-written. Returns how many."""
    stale = list(Path(directory).glob("part-*.parquet.tmp")) if Path(directory).is_dir() else []
    for p in stale:
        p.unlink()
    return len(stale)


def read_provenance(path: Path) -> dict:
    meta = read_parquet_schema(path).metadata or {}
    if META_KEY not in meta:
        raise EmbedkitError(f"{path} was not written by embedkit (no '{META_KEY.decode()}' schema metadata)")
    try:
        provenance = json.loads(meta[META_KEY])
    except ValueError:
        provenance = None
    if not isinstance(provenance, dict):
        raise EmbedkitError(f"{path} has damaged provenance (its '{META_KEY.decode()}' metadata is not a JSON "
                            f"object); re-extract with --overwrite")
    return provenance


def existing_hashes(directory: Path) -> dict[str, str]:
    """id -> sha256 of every row already stored."""
    out: dict[str, str] = {}
    for p in part_files(directory):
        t = read_parquet(p, columns=_require_columns(p, ["id", "sha256"]))
        out.update(zip(t.column("id").to_pylist(), t.column("sha256").to_pylist()))
    return out


def check_same_encoder(directory: Path, provenance: dict) -> None:
    parts = part_files(directory)
    if not parts:
        return
    old = read_provenance(parts[0])
    diff = [k for k in IDENTITY_FIELDS if k in provenance and identity_value(old, k) != provenance.get(k)]
    if diff:
        raise EmbedkitError(f"{directory} holds embeddings from another configuration (differs in "
                            f"{', '.join(diff)}); use --overwrite to start over or choose another --out")


def drop_rows(directory: Path, ids: set[str]) -> int:
    """Rewrite parts without `ids` (changed or vanished inputs). Each part is replaced atomically."""
    dropped = 0
    for p in part_files(directory):
        t = read_parquet(p)
        keep = np.array([i not in ids for i in t.column("id").to_pylist()], dtype=bool)
        if keep.all():
            continue
        dropped += int((~keep).sum())
        if keep.any():
            tmp = p.with_suffix(".parquet.tmp")
            pq.write_table(t.filter(pa.array(keep)), tmp, **WRITE_OPTIONS)
            os.replace(tmp, p)
        else:
            p.unlink()
    return dropped


def _require_columns(path: Path, needed: list[str], all_columns: bool = False) -> list[str]:
    """The columns to read from `path` (`needed`, or all with all_columns), after checking `needed` are there."""
    names = read_parquet_schema(path).names
    missing = [c for c in needed if c not in names]
    if missing:
        raise EmbedkitError(f"{path} has no {' or '.join(repr(c) for c in missing)} column: not an embedkit "
                            f"embedding part; re-extract with --overwrite")
    return names if all_columns else needed


# Columns whose change is not a relabelling: the id and the content hash are the row's identity, and
# `text` follows from the hash (the same content reads as the same text).
_NOT_LABELS = ("id", "sha256", "embedding", TEXT_COLUMN)


def relabel_parts(directory: Path, schema: pa.Schema, values_for, provenance_update: dict) -> int:
    """Bring stored rows' labels, split, group, metadata and path up to date; embeddings stay as stored.

    `schema` is the schema new rows get (build_schema over the current table; its embedding field is
    ignored, each part keeps its own). `values_for(part)` returns, for a part read without its embedding
    column, the current values of every other column of `schema`, in the part's row order. A part is
    rewritten (to .tmp, then renamed over itself) only when a value, the schema, or one of the
    `provenance_update` keys of its provenance differs. Returns how many rows changed a value.
    """
    relabelled = 0
    for p in part_files(directory):
        old_schema, provenance = read_parquet_schema(p), read_provenance(p)
        old = read_parquet(p, columns=[n for n in old_schema.names if n != "embedding"])
        new_provenance = json.loads(json.dumps({**provenance, **provenance_update}, default=str))
        target = pa.schema([old_schema.field("embedding") if f.name == "embedding" else f for f in schema],
                           metadata={META_KEY: json.dumps(new_provenance, default=str).encode()})
        values = values_for(old)
        new = {f.name: to_column(values[f.name], f.type) for f in target if f.name != "embedding"}
        changed = _changed_rows(old, new)
        label_like = [changed[n] for n in changed if n not in _NOT_LABELS]
        relabelled += int(np.any(label_like, axis=0).sum()) if label_like else 0
        same_schema = target.remove_metadata().equals(old_schema.remove_metadata())
        if same_schema and new_provenance == provenance and not any(v.any() for v in changed.values()):
            continue
        embedding = read_parquet(p, columns=["embedding"]).column("embedding")  # copied as stored, bit for bit
        table = pa.Table.from_arrays([embedding if f.name == "embedding" else new[f.name] for f in target],
                                     schema=target)
        tmp = p.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp, **WRITE_OPTIONS)
        os.replace(tmp, p)
    return relabelled


def _changed_rows(old: pa.Table, new: dict[str, pa.Array]) -> dict[str, np.ndarray]:
    """Per column (of either side), which rows differ; a column one side lacks counts as all None there."""
    n = old.num_rows
    out = {}
    for name in dict.fromkeys([*old.column_names, *new]):
        a = old.column(name).to_pylist() if name in old.column_names else [None] * n
        b = new[name].to_pylist() if name in new else [None] * n
        out[name] = np.array([not (x == y or (x != x and y != y)) for x, y in zip(a, b)], dtype=bool)
    return out


def write_errors(out: Path, skipped: list) -> Path:
    schema = pa.schema([("id", pa.string()), ("path", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
                        ("modality", pa.string())])
    cols = {name: [getattr(s, name, None) for s in skipped] for name in schema.names}
    path = Path(out) / "errors.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(cols, schema=schema), tmp, write_page_checksum=True)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- reading back


@dataclass
class EmbeddingTable:
    """One (modality, model) dataset read back: rows in file order."""

    ids: list[str]
    embeddings: np.ndarray  # float32 [n, dim]
    columns: dict[str, list]  # every other column
    provenance: dict

    def __repr__(self) -> str:  # one line: a notebook user wants the shape, not every vector and column value
        return (f"EmbeddingTable({len(self.ids)} ids, {self.embeddings.shape[1]}-d "
                f"{self.provenance.get('name', '?')}, columns: {', '.join(self.columns) or 'none'})")


def read_embedding_table(path: str | Path) -> EmbeddingTable:
    """A dataset folder or a single Parquet file; accepts list and fixed_size_list embeddings."""
    path = Path(path)
    parts = part_files(path) if path.is_dir() else [path]
    if not parts:
        raise EmbedkitError(f"no embedding parts in {path}")
    provs = [read_provenance(p) for p in parts]
    for p, prov in zip(parts[1:], provs[1:]):
        diff = [k for k in IDENTITY_FIELDS if identity_value(prov, k) != identity_value(provs[0], k)]
        if diff:
            raise EmbedkitError(f"{path} mixes embeddings from different model configurations ({', '.join(diff)} "
                                f"differ in {p.name}); re-extract with --overwrite")
        fingerprints = (prov.get("encoder_fingerprint"), provs[0].get("encoder_fingerprint"))
        if None not in fingerprints and fingerprints[0] != fingerprints[1]:
            raise EmbedkitError(f"{path} mixes embeddings from different encoders (the encoder fingerprint differs "
                                f"in {p.name}); re-extract with --overwrite")
    table = pa.concat_tables([read_parquet(p, columns=_require_columns(p, ["id", "embedding"], all_columns=True))
                              for p in parts], promote_options="permissive")
    emb = table.column("embedding").combine_chunks()
    if not (pa.types.is_list(emb.type) or pa.types.is_fixed_size_list(emb.type)) or \
            not pa.types.is_floating(emb.type.value_type):
        raise EmbedkitError(f"{path}: the 'embedding' column holds {emb.type}, not lists of floats; not an embedkit "
                            f"embedding table (re-extract with --overwrite)")
    if pa.types.is_fixed_size_list(emb.type):
        matrix = emb.values.to_numpy(zero_copy_only=False).reshape(len(emb), emb.type.list_size)
    else:
        matrix = np.asarray(emb.to_pylist(), dtype=np.float32)
    matrix = matrix.astype(np.float32, copy=False)
    columns = {n: table.column(n).to_pylist() for n in table.column_names if n not in ("id", "embedding")}
    return EmbeddingTable(table.column("id").to_pylist(), matrix, columns, provs[0])


@dataclass
class EmbeddingSet:
    """Embeddings of several modalities joined on id: row i of every array is the same sample."""

    ids: np.ndarray
    embeddings: dict[str, np.ndarray]  # modality -> float32 [n, dim]
    columns: dict[str, np.ndarray]  # labels, split, metadata (object arrays)
    provenance: dict[str, dict]  # modality -> provenance
    unmatched: dict[str, int] = field(default_factory=dict)  # modality -> rows without a partner
    present: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> rows that have it (outer join)

    def __repr__(self) -> str:  # one line: ids, each modality's width and model, columns; never the arrays
        mods = ", ".join(f"{m} {e.shape[1]}-d {self.provenance.get(m, {}).get('name', '?')}"
                         + (f" ({int(self.present[m].sum())} present)" if m in self.present and
                            not self.present[m].all() else "")
                         for m, e in self.embeddings.items())
        lost = {m: k for m, k in self.unmatched.items() if k}
        return (f"EmbeddingSet({len(self.ids)} ids; {mods or 'no modality'}; columns: "
                f"{', '.join(self.columns) or 'none'}"
                + (f"; unmatched: {', '.join(f'{m} {k}' for m, k in lost.items())}" if lost else "") + ")")

    @property
    def label_columns(self) -> list[str]:
        for prov in self.provenance.values():
            return list(prov.get("label_columns", []))
        return []


def find_datasets(out: str | Path) -> dict[str, list[Path]]:
    """modality -> dataset folders under an extract output."""
    found: dict[str, list[Path]] = {}
    for d in sorted(Path(out).glob("*__*")):
        if d.is_dir() and part_files(d):
            found.setdefault(d.name.split("__", 1)[0], []).append(d)
    return found


def load_embeddings(out: str | Path, modalities: list[str] | None = None,
                    models: dict[str, str] | None = None, how: str = "inner") -> EmbeddingSet:
    """Read an extract output folder back as numpy arrays joined on `id` across modalities.

    `models` picks a dataset when one modality was embedded with several models,
    e.g. {"image": "dinov2-small"}. how="outer" keeps rows that lack a modality: their
    embedding rows are NaN and `present[modality]` says which rows have it.
    """
    out = Path(out)
    if not out.exists():
        raise EmbedkitError(f"embedding folder '{out}' does not exist")
    found = find_datasets(out)
    if not found:
        raise EmbedkitError(f"no embeddings under '{out}': run `embedkit extract` first")
    modalities = modalities or sorted(found)
    tables: dict[str, EmbeddingTable] = {}
    for m in modalities:
        if m not in found:
            raise EmbedkitError(f"no {m} embeddings under '{out}' (found: {', '.join(sorted(found))})")
        dirs = found[m]
        if models and m in models:
            dirs = [d for d in dirs if d.name == dataset_dir(out, m, models[m]).name]
        if len(dirs) != 1:
            names = ", ".join(d.name.split("__", 1)[1] for d in found[m])
            raise EmbedkitError(f"{m} embeddings from several models under '{out}' ({names}): pick one")
        tables[m] = read_embedding_table(dirs[0])
    return join_tables(tables, how=how)


def join_tables(tables: dict[str, EmbeddingTable], how: str = "inner") -> EmbeddingSet:
    """Join on id (inner, or outer with NaN rows); counts rows of each modality that found no partner."""
    id_sets = [set(t.ids) for t in tables.values()]
    common = set.intersection(*id_sets)
    ids = np.array(sorted(common if how == "inner" else set.union(*id_sets)), dtype=object)
    embeddings, columns, provenance, unmatched, present = {}, {}, {}, {}, {}
    for m, t in tables.items():
        pos = {i: n for n, i in enumerate(t.ids)}
        order = np.array([pos.get(i, -1) for i in ids], dtype=np.int64)
        has = order >= 0
        present[m] = has
        emb = np.full((len(ids), t.embeddings.shape[1]), np.nan, dtype=np.float32)
        emb[has] = t.embeddings[order[has]]
        embeddings[m] = emb
        provenance[m] = t.provenance
        unmatched[m] = len(t.ids) - len(common)
        for name, values in t.columns.items():
            picked = np.array([values[k] if k >= 0 else None for k in order], dtype=object)
            if name in ("path", "sha256"):
                columns[f"{m}_{name}"] = picked
            elif name not in columns:
                columns[name] = picked
            else:  # fill what an earlier modality lacked (outer join)
                gap = np.array([v is None for v in columns[name]], dtype=bool) & has
                columns[name][gap] = picked[gap]
    return EmbeddingSet(ids, embeddings, columns, provenance, unmatched, present)
