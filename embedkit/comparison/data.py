"""The rows every configuration of a comparison is scored on, and the splits they all share.

Paired comparisons need identical test rows: the rows kept are those every compared encoder
embedded and that carry the label; the splits are made once on them (grouped, stratified, the
data's own split kept) and each configuration's dataset is laid out on the same rows in the same
order, so a row index means the same case in every configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from embedkit.comparison.grid import Configuration, Encoder
from embedkit.dataset import Dataset, groups_for, labelled_dataset, purge_shared_groups, run_splits
from embedkit.errors import EmbedkitError
from embedkit.store import EmbeddingTable, join_tables, read_embedding_table


@dataclass
class SharedRows:
    ref: Dataset  # ids, labels, split, group and metadata of the shared rows (no embeddings)
    groups: np.ndarray | None
    group_note: str
    left_out: dict = field(default_factory=dict)  # rows not shared, by reason
    tables: dict[Encoder, EmbeddingTable] = field(default_factory=dict)


def take(ds: Dataset, rows: np.ndarray) -> Dataset:
    """The given rows of a dataset, every field alike."""
    return replace(ds, ids=ds.ids[rows], blocks={m: b[rows] for m, b in ds.blocks.items()}, y=ds.y[rows],
                   split=None if ds.split is None else ds.split[rows],
                   columns={k: v[rows] for k, v in ds.columns.items()})


def shared_rows(encoders: list[Encoder], label: str, group_col: str | None, use_groups: bool) -> SharedRows:
    """Read every encoder's table once; keep the labelled rows that all of them embedded."""
    tables = {e: read_embedding_table(e.folder) for e in encoders}
    first = {}
    for e in encoders:
        first.setdefault(e.modality, e)
    if not tables:
        raise EmbedkitError("no encoder to compare")
    ref = labelled_dataset(join_tables({m: tables[e] for m, e in first.items()}), [label], [])
    every = [set(t.ids) for t in tables.values()]
    in_all = set.intersection(*every)
    keep = np.flatnonzero(np.array([i in in_all for i in ref.ids], dtype=bool))
    left_out = {"not_in_every_table": len(set.union(*every) - in_all), "unlabelled": len(in_all) - len(keep)}
    ref = take(ref, keep)
    if len(ref.ids) == 0:
        raise EmbedkitError(f"no labelled row is embedded by every compared encoder ({', '.join(e.name for e in encoders)}"
                            f"); were they extracted from the same data?")
    for e in encoders:  # every table must tell the same story about a row
        t = tables[e]
        pos = {i: n for n, i in enumerate(t.ids)}
        for col in (label, "split", "group"):
            if col not in t.columns or col not in ref.columns:
                continue
            theirs = [t.columns[col][pos[i]] for i in ref.ids]
            differ = sum(_cell(a) != _cell(b) for a, b in zip(theirs, ref.columns[col]))
            if differ:
                raise EmbedkitError(f"the {e.modality} table of {e.name} disagrees with the others on '{col}' for "
                                    f"{differ} rows: extract every encoder from the same table")
    groups, note = groups_for(ref, group_col, use_groups)
    return SharedRows(ref, groups, note, left_out, tables)


def _cell(v):
    return None if v is None or v != v else str(v)


def dataset_for(conf: Configuration, shared: SharedRows, label: str) -> Dataset:
    """The configuration's embeddings on the shared rows, in the shared order."""
    encoders = {m: e for m, e in (("image", conf.image), ("text", conf.text)) if e is not None}
    es = join_tables({m: shared.tables[e] for m, e in encoders.items()})
    ds = labelled_dataset(es, [label], list(encoders))
    position = {i: n for n, i in enumerate(ds.ids)}
    rows = np.array([position[i] for i in shared.ref.ids], dtype=np.int64)
    ds = take(ds, rows)
    if not np.array_equal(ds.ids, shared.ref.ids):  # the guarantee every paired comparison rests on
        raise AssertionError("a configuration's rows differ from the shared rows")
    return ds


def make_splits(shared: SharedRows, train_cfg) -> tuple[list[dict], list[int], dict]:
    """One split per seed (or fold), made once on the shared rows; (splits, seeds, rows purged from the data's
    own split so that no group crosses it)."""
    ref, groups = shared.ref, shared.groups
    purged = {"train": 0, "val": 0}
    if ref.split is not None and train_cfg.data_split:
        _, purged = purge_shared_groups({k: np.flatnonzero(ref.split == k) for k in ("train", "val", "test")}, groups)
    splits, seeds = run_splits(ref, train_cfg, groups)
    return splits, seeds, purged
