"""Near-duplicate rows: the same image or report stored twice under different ids.

A grouped split only keeps apart the rows a group column can see. A re-exported, resized or
re-compressed copy of an image, or a report pasted for two patients, gets another id and lands on
the other side of the split; the test score then measures memory, not skill. Two rows are near
duplicates when the cosine of their embeddings (same modality, same encoder) reaches a threshold,
or when their content hashes (extract's image_sha256 / text_sha256) are equal.

Neighbours are found in blocks of rows (L2-normalised float32, one matrix product per block, top-k
kept), so memory grows with n * block, never n * n. Clusters are the connected components of the
pairs (scipy.sparse.csgraph); `merge_groups` turns each cluster, joined with the stored groups, into
one group so that a split never separates it.

Thresholds (cosine), calibrated in benchmarks/near_duplicates.py on the 315 VQA-RAD images and their
2,506 distinct questions: each image re-encoded (JPEG q60, greyscale PNG), resized (1/2, 1/4), cropped
(5 %, 10 % a side) and combined, each question edited (case, punctuation, a typo, a word dropped, a
prefix); the threshold is the lowest that makes no false pair among the distinct originals, rounded up.
Results and recall per kind of copy: benchmarks/results/near_duplicates.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# model name -> cosine threshold measured for that encoder (see the module docstring)
CALIBRATED = {"efficientnet-lite0": 0.93, "minilm": 0.97}
# any other encoder: a conservative default, said to be uncalibrated wherever it is used
DEFAULT = {"image": 0.95, "text": 0.97}
TOP_K = 10  # neighbours kept per row: pairs beyond the 10th nearest join through the cluster
BLOCK_ROWS = 1024  # rows per matrix product: 1024 x n float32 scores in memory at once


def threshold_for(modality: str, provenance: dict | None, override: float | None = None) -> tuple[float, str]:
    """(cosine threshold, where it comes from) for one modality's encoder."""
    if override is not None:
        if not 0.0 < override <= 1.0:
            from embedkit.errors import EmbedkitError

            raise EmbedkitError(f"a near-duplicate threshold is a cosine in (0, 1], got {override}")
        return float(override), "given"
    name = (provenance or {}).get("name")
    if name in CALIBRATED:
        return CALIBRATED[name], f"calibrated for {name} (benchmarks/near_duplicates.py)"
    return DEFAULT.get(modality, 0.95), (f"default, not calibrated for {name or 'this encoder'}: check the pairs "
                                         f"listed, or set the threshold")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32; all-zero rows stay zero (they match nothing)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def nearest_neighbours(query: np.ndarray, base: np.ndarray | None = None, k: int = TOP_K,
                       block: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's k nearest base rows by cosine: (indices [nq, k], cosines [nq, k]), nearest first.

    base None: the query rows against themselves, a row never its own neighbour. Rows are
    L2-normalised here; scores are computed `block` query rows at a time."""
    q = l2_normalise(query)
    same = base is None
    b = q if same else l2_normalise(base)
    k = max(0, min(k, len(b) - (1 if same else 0)))
    idx = np.zeros((len(q), k), dtype=np.int64)
    cos = np.zeros((len(q), k), dtype=np.float32)
    if k == 0:
        return idx, cos
    for start in range(0, len(q), block):
        s = q[start:start + block] @ b.T
        if same:
            s[np.arange(len(s)), np.arange(start, start + len(s))] = -np.inf
        top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(np.arange(k), (len(s), 1))
        vals = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        idx[start:start + len(s)] = np.take_along_axis(top, order, axis=1)
        cos[start:start + len(s)] = np.take_along_axis(vals, order, axis=1)
    return idx, cos


@dataclass
class Duplicates:
    """Duplicates among the rows of one modality. Rows with equal content (hash) are one unit, searched
    once (a clique of identical copies would otherwise fill every row's top-k); `a`, `b`, `cosine` are
    the pairs of distinct units whose cosine reaches the threshold (a < b, unit numbers)."""

    unit: np.ndarray  # unit per row
    first: np.ndarray  # the first row of each unit
    a: np.ndarray
    b: np.ndarray
    cosine: np.ndarray
    rows: np.ndarray | None = None  # positions of these rows in a larger table (None: the same)

    def row_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Edges between rows joining every duplicate: each row to its unit's first row, and unit pairs."""
        r = np.arange(len(self.unit)) if self.rows is None else self.rows
        copies = np.flatnonzero(self.first[self.unit] != np.arange(len(self.unit)))
        a = np.concatenate([self.first[self.unit[copies]], self.first[self.a]])
        b = np.concatenate([copies, self.first[self.b]])
        return r[a], r[b]

    def members(self) -> list[np.ndarray]:
        """Rows of each unit (positions in the larger table when `rows` is set)."""
        r = np.arange(len(self.unit)) if self.rows is None else self.rows
        order = np.argsort(self.unit, kind="stable")
        return [r[g] for g in np.split(order, np.flatnonzero(np.diff(self.unit[order])) + 1)]


def content_units(hashes, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit per row, first row of each unit): rows sharing a content hash share a unit; no hash, own unit."""
    seen: dict = {}
    unit = np.empty(n, dtype=np.int64)
    first = []
    for i in range(n):
        h = None if hashes is None else hashes[i]
        if h is not None and h in seen:
            unit[i] = seen[h]
            continue
        unit[i] = len(first)
        first.append(i)
        if h is not None:
            seen[h] = unit[i]
    return unit, np.array(first, dtype=np.int64)


def near_duplicate_pairs(x: np.ndarray, threshold: float, hashes=None, k: int = TOP_K,
                         neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> Duplicates:
    """Rows with equal content hashes, and pairs of distinct contents whose cosine reaches `threshold`
    among each one's k nearest. `neighbours`: nearest_neighbours(x[first]) to reuse (unit order)."""
    unit, first = content_units(hashes, len(x))
    idx, cos = neighbours if neighbours is not None else nearest_neighbours(x[first], k=k)
    rows, cols = np.nonzero(cos >= threshold)
    found: dict = {}
    for i, j, c in zip(rows, idx[rows, cols], cos[rows, cols]):
        found[(int(min(i, j)), int(max(i, j)))] = float(c)
    keys = sorted(found)
    return Duplicates(unit, first, np.array([p[0] for p in keys], dtype=np.int64),
                      np.array([p[1] for p in keys], dtype=np.int64),
                      np.array([found[p] for p in keys], dtype=np.float32))


def clusters(n: int, *edges: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Connected component per row (0..n_clusters-1) of the graph made by the (a, b) edge lists."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a = np.concatenate([np.asarray(e[0], dtype=np.int64) for e in edges]) if edges else np.zeros(0, np.int64)
    b = np.concatenate([np.asarray(e[1], dtype=np.int64) for e in edges]) if edges else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def group_edges(groups) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining every row of a stored group to the group's first row (rows without a group: none)."""
    first: dict = {}
    a, b = [], []
    for i, g in enumerate(groups if groups is not None else []):
        if g is None:
            continue
        j = first.setdefault(g, i)
        if j != i:
            a.append(j)
            b.append(i)
    return np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)


def merge_groups(ids, groups, pairs_by_modality: dict[str, Duplicates]) -> tuple[np.ndarray, dict]:
    """Groups in which every near-duplicate cluster is one group, joined with the stored groups.

    A row whose component is a single stored group keeps that group's name (and a lone row keeps
    None, independent as before); a component that joins rows across groups is named
    `near-dup:<its first row's group or id>`. -> (groups, summary counts)."""
    ids = np.asarray(ids, dtype=object)
    n = len(ids)
    stored = np.array([None] * n, dtype=object) if groups is None else np.asarray(groups, dtype=object)
    edges = [group_edges(stored)] + [p.row_edges() for p in pairs_by_modality.values()]
    component = clusters(n, *edges)
    members: dict[int, list[int]] = {}
    for i, c in enumerate(component):
        members.setdefault(int(c), []).append(i)
    out = stored.copy()
    merged_components, rows_regrouped = 0, 0
    for rows in members.values():
        names = {stored[i] for i in rows}
        if len(rows) == 1 or (len(names) == 1 and None not in names):
            continue  # nothing joined: a lone row, or one stored group as it was
        first = rows[0]
        name = f"near-dup:{stored[first] if stored[first] is not None else ids[first]}"
        out[rows] = name
        merged_components += 1
        rows_regrouped += len(rows)
    sizes = np.bincount(component)
    summary = {"near_duplicate_pairs": {m: int(len(p.a)) for m, p in pairs_by_modality.items()},
               "groups_formed": merged_components, "rows_regrouped": rows_regrouped,
               "largest_group_rows": int(sizes.max()) if n else 0}
    return out, summary


def cross_split_rows(x_query: np.ndarray, x_base: np.ndarray, threshold: float,
                     query_groups=None, base_groups=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Query rows (e.g. test) whose nearest base row (e.g. train) of another group is a near duplicate.

    -> (query row positions, their nearest base row, cosine). Rows of one group never cross a split,
    so a neighbour in the row's own group is skipped (the next nearest counts)."""
    k = 1 if query_groups is None or base_groups is None else min(TOP_K, len(x_base))
    idx, cos = nearest_neighbours(x_query, x_base, k=k)
    if not idx.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    ok = cos >= threshold
    if k > 1:
        qg = np.asarray(query_groups, dtype=object)
        bg = np.asarray(base_groups, dtype=object)
        same = np.array([[qg[i] is not None and bg[j] == qg[i] for j in row] for i, row in enumerate(idx)],
                        dtype=bool).reshape(idx.shape)
        ok &= ~same
    hit = ok.any(axis=1)
    first = ok.argmax(axis=1)
    rows = np.flatnonzero(hit)
    return rows, idx[rows, first[rows]], cos[rows, first[rows]]


# ---------------------------------------------------------------- on a dataset (train) and a store (extract)


def grouping_modalities(available, chosen=None) -> list[str]:
    """Which modalities' near-duplicates join groups: as chosen, else images (texts only without images).

    Identical short texts (a question asked of many images, a templated sentence) are common and
    legitimate, so texts join groups only when asked for or when there is nothing else."""
    available = [m for m in ("image", "text") if m in available]
    if chosen:
        from embedkit.errors import EmbedkitError

        missing = [m for m in chosen if m not in available]
        if missing:
            raise EmbedkitError(f"no {' or '.join(missing)} embeddings to find near-duplicates in (have: "
                                f"{', '.join(available) or 'none'})")
        return [m for m in available if m in chosen]
    return available[:1]


def dataset_pairs(ds, modalities, thresholds: dict | None = None) -> tuple[dict[str, Duplicates], dict[str, dict]]:
    """Near-duplicate pairs of a Dataset (or EmbeddingSet) per modality, and the threshold used for each.

    Rows that lack a modality (NaN rows of an outer join) take part in no pair of it."""
    pairs, used = {}, {}
    for m in modalities:
        x = ds.blocks[m] if hasattr(ds, "blocks") else ds.embeddings[m]
        rows = np.flatnonzero(np.isfinite(x).all(axis=1))
        t, source = threshold_for(m, ds.provenance.get(m), (thresholds or {}).get(m))
        hashes = ds.columns.get(f"{m}_sha256")
        pairs[m] = near_duplicate_pairs(x[rows], t, None if hashes is None else hashes[rows])
        pairs[m].rows = rows
        used[m] = {"threshold": t, "source": source}
    return pairs, used


def near_duplicate_groups(ds, groups, modalities, thresholds: dict | None = None) -> tuple[np.ndarray, dict]:
    """The groups of a training run with every near-duplicate cluster made one group (`--group-near-dups`)."""
    pairs, used = dataset_pairs(ds, modalities, thresholds)
    merged, summary = merge_groups(ds.ids, groups, pairs)
    return merged, {**summary, "thresholds": used}


def check_splits(ds, idx: dict, groups, modalities, thresholds: dict | None = None) -> dict:
    """Per modality: validation and test rows whose nearest earlier-split row (train; for test also
    validation) of another group is a near duplicate. Cheap: one blocked product per split pair."""
    out = {}
    for m in modalities:
        x = ds.blocks[m]
        t, source = threshold_for(m, ds.provenance.get(m), (thresholds or {}).get(m))
        found = {}
        for later, earlier in (("val", ("train",)), ("test", ("train", "val"))):
            q = idx.get(later, np.zeros(0, np.int64))
            base = np.concatenate([idx[e] for e in earlier if e in idx]) if any(e in idx for e in earlier) else q[:0]
            if not len(q) or not len(base):
                found[f"{later}_rows"] = 0
                continue
            rows, _, _ = cross_split_rows(x[q], x[base], t, None if groups is None else groups[q],
                                          None if groups is None else groups[base])
            found[f"{later}_rows"] = int(len(rows))
        out[m] = {**found, "threshold": t, "threshold_source": source}
    return out


def regroup_store(out_dir, modalities=None, thresholds: dict | None = None) -> dict:
    """`extract --group-near-dups`: rewrite the stored `group` column of every dataset under
    `out_dir` so that each near-duplicate cluster (joined with the table's groups) is one group.

    Embeddings are copied bit for bit (store.relabel_parts); the thresholds and counts go into the
    provenance. A later extract without the flag puts the table's groups back."""
    from embedkit.store import find_datasets, load_embeddings, part_files, read_parquet_schema, relabel_parts

    found = find_datasets(out_dir)
    if any(len(v) > 1 for v in found.values()):
        from embedkit.errors import EmbedkitError

        several = [m for m, v in found.items() if len(v) > 1]
        raise EmbedkitError(f"--group-near-dups: '{out_dir}' holds {' and '.join(several)} embeddings from "
                            f"several encoders; group each output folder on its own")
    es = load_embeddings(out_dir, how="outer")
    chosen = grouping_modalities(es.embeddings, modalities)
    stored = es.columns.get("group")
    pairs, used = dataset_pairs(es, chosen, thresholds)
    merged, summary = merge_groups(es.ids, stored, pairs)
    summary["thresholds"] = used
    new_group = dict(zip(es.ids.tolist(), merged.tolist()))
    for folders in found.values():
        directory = folders[0]
        schema = read_parquet_schema(part_files(directory)[0])

        def values_for(part):
            values = {name: part.column(name).to_pylist() for name in part.column_names}
            values["group"] = [new_group[i] for i in values["id"]]
            return values

        relabel_parts(directory, schema, values_for, {"group_near_duplicates": summary})
    return summary


def warn_near_duplicates(ds, idx: dict, groups, modalities, thresholds: dict | None = None,
                         grouped: bool = False) -> dict:
    """train's default check: check_splits, and a warning with the count and the fix when rows are found."""
    from embedkit.console import say

    found = check_splits(ds, idx, groups, modalities, thresholds)
    for m, r in found.items():
        checked = len(idx.get("test", [])) + len(idx.get("val", []))
        if r["threshold_source"].startswith("default") and r["test_rows"] + r["val_rows"] > 0.5 * checked:
            r["note"] = "the default threshold matches most rows: it does not suit this encoder"
            say(f"note: near-duplicate check skipped for {m}: at cosine {r['threshold']:g} ({r['threshold_source']}) "
                f"{r['test_rows'] + r['val_rows']} of {checked} validation and test rows match a training row, so "
                f"the threshold does not suit this encoder; set --near-dup-threshold")
            continue
        if r["test_rows"] or r["val_rows"]:
            fix = ("they are already grouped by near-duplicate clusters, so these pairs are below the cluster "
                   "(a chain broke at the top-k); list them with `embedkit audit`" if grouped else
                   "retrain with --group-near-dups (each cluster becomes one group); `embedkit audit` lists them")
            say(f"[yellow]warning:[/] {r['test_rows']} test and {r['val_rows']} validation rows have a near-duplicate "
                f"{m} (cosine >= {r['threshold']:g}) in an earlier split under another id or group: their scores "
                f"are optimistic; {fix}")
    return found
