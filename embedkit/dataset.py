"""Embeddings on disk -> a labelled dataset with groups, and its honest train/val/test splits.

load_dataset joins the modalities on id and keeps every carried column (labels, split, group,
metadata, content hashes, texts). groups_for says which rows belong together (a patient); the
split functions keep each group on one side, keep the data's own test split as test, and carve
validation out of training rows only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from embedkit.errors import EmbedkitError
from embedkit.store import EmbeddingSet, find_datasets, load_embeddings

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "validate": "val", "dev": "val", "test": "test", "testing": "test"}


@dataclass
class Dataset:
    ids: np.ndarray
    blocks: dict[str, np.ndarray]  # modality -> float32 [n, d], rows joined on id
    y: np.ndarray  # labels (object) or a 0/1 indicator matrix for multilabel
    split: np.ndarray | None  # "train" | "val" | "test" per row, if the data had a split column
    provenance: dict[str, dict]
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # every carried column, same rows
    dropped_unlabelled: int = 0


def load_dataset(emb_dir, labels: list[str], modalities: list[str], models: dict | None = None) -> Dataset:
    available = sorted(find_datasets(emb_dir))
    missing = [m for m in modalities if m not in available]
    if missing:
        raise EmbedkitError(f"no {' or '.join(missing)} embeddings under '{emb_dir}' (found: "
                            f"{', '.join(available) or 'none'}); choose --fusion "
                            f"{' or '.join(available) or 'after extracting'}")
    es = load_embeddings(emb_dir, modalities=modalities, models=models)
    _check_join(es, modalities)
    for name in labels:
        if name not in es.columns:
            raise EmbedkitError(f"label column '{name}' is not in the embeddings; columns carried through: "
                                f"{', '.join(carried_columns(es.columns)) or 'none'}")
    if len(labels) == 1:
        y = es.columns[labels[0]]
        keep = np.array([v is not None and v == v for v in y], dtype=bool)  # v == v is False for NaN
    else:
        y = np.stack([_binary_column(es.columns[c], c) for c in labels], axis=1)
        keep = ~np.isnan(y).any(axis=1)
    blocks = {m: es.embeddings[m][keep] for m in modalities}
    for m, x in blocks.items():
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise EmbedkitError(f"{int(bad.sum())} {m} embedding rows contain NaN or infinite values; "
                                f"re-extract them (embedkit extract --overwrite)")
    split = None
    if "split" in es.columns and any(v is not None for v in es.columns["split"]):
        split = _normalise_split(es.columns["split"][keep])
    y = y[keep]
    if len(labels) > 1:
        y = y.astype(np.int64)
    columns = {k: v[keep] for k, v in es.columns.items()}
    return Dataset(es.ids[keep], blocks, y, split, es.provenance, columns, dropped_unlabelled=int((~keep).sum()))


def carried_columns(columns: dict) -> list[str]:
    return sorted(c for c in columns if not c.endswith(("_path", "_sha256")) and c not in ("split", "text"))


def _check_join(es: EmbeddingSet, modalities: list[str]) -> None:
    if len(modalities) > 1 and len(es.ids) == 0:
        counts = ", ".join(f"{m} {es.unmatched[m]}" for m in modalities)
        raise EmbedkitError(f"ids do not join across modalities: no id is in both ({counts} rows); were they "
                            f"extracted from the same data?")
    if len(modalities) > 1 and any(es.unmatched.values()):
        from embedkit.console import say

        say("note: rows without a partner in the other modality are left out: "
            + ", ".join(f"{m} {n}" for m, n in es.unmatched.items() if n))


def _binary_column(values: np.ndarray, name: str) -> np.ndarray:
    mapping = {"1": 1.0, "0": 0.0, "true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if v is None:
            continue
        key = str(int(v) if isinstance(v, (bool, np.bool_)) else v).strip().lower()
        key = key[:-2] if key.endswith(".0") else key
        if key not in mapping:
            raise EmbedkitError(f"multilabel needs 0/1 label columns; '{name}' has the value '{v}'")
        out[i] = mapping[key]
    return out


def _normalise_split(values: np.ndarray) -> np.ndarray:
    out = []
    for v in values:
        key = SPLIT_NAMES.get(str(v).strip().lower()) if v is not None else None
        if key is None:
            raise EmbedkitError(f"split column value '{v}' is not one of train, val (validation, validate), test")
        out.append(key)
    return np.array(out, dtype=object)


def groups_for(ds: Dataset, group_col: str | None = None, use_groups: bool = True) -> tuple[np.ndarray | None, str]:
    """(group per row or None, a description): rows sharing a group never cross a split.

    group_col None: the group column extract stored (e.g. a patient id), if any."""
    if not use_groups:
        return None, "none (--no-groups: rows treated as independent)"
    name = group_col or "group"
    if name not in ds.columns:
        if group_col:
            raise EmbedkitError(f"group column '{group_col}' is not in the embeddings; columns carried "
                                f"through: {', '.join(carried_columns(ds.columns)) or 'none'}")
        return None, "none (no group column stored; rows assumed independent)"
    values = ds.columns[name]
    if all(v is None or v != v for v in values):
        if not group_col:  # extract stored no group: the usual case without --group-col
            return None, "none (no group column stored; rows assumed independent)"
        return None, f"none (column '{name}' is empty; rows assumed independent)"
    stored = next((p.get("group_col") for p in ds.provenance.values() if p.get("group_col")), None)
    label = group_col or stored or "group"
    return np.array([None if v is None or v != v else str(v) for v in values], dtype=object), f"column '{label}'"


# ---------------------------------------------------------------- splits


def split_for_run(ds: Dataset, cfg, seed: int, groups=None) -> dict[str, np.ndarray]:
    """train/val/test rows of one run. The data's split column is kept (test stays test); with
    groups, rows of a group that also has test (or validation) rows are purged from the earlier
    split, so no patient sits on both sides; validation is carved from train when the data has none."""
    from embedkit.fusion.evaluate import check_groups_disjoint, split_indices

    if ds.split is None or not cfg.data_split:
        return split_indices(ds.y, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=seed,
                             groups=groups)
    idx = {k: np.flatnonzero(ds.split == k) for k in ("train", "val", "test")}
    if not len(idx["train"]) or not len(idx["test"]):
        raise EmbedkitError("the split column needs train and test rows")
    idx, _ = purge_shared_groups(idx, groups)
    if not len(idx["val"]):  # carve validation out of train, stratified, grouped and seeded; test stays untouched
        tr = idx["train"]
        inner = split_indices(ds.y[tr], val_fraction=cfg.val_fraction / (1 - cfg.test_fraction), test_fraction=0.0,
                              seed=seed, groups=None if groups is None else groups[tr])
        idx["val"], idx["train"] = tr[inner["val"]], tr[inner["train"]]
    check_groups_disjoint(idx, groups)
    return idx


def purge_shared_groups(idx: dict[str, np.ndarray], groups) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Drop validation rows whose group has test rows, and train rows whose group has validation or
    test rows: the data's own split is kept, minus what would put a group on both sides."""
    if groups is None:
        return idx, {"train": 0, "val": 0}
    out, later = {"test": idx["test"]}, set(groups[idx["test"]].tolist()) - {None}
    for name in ("val", "train"):
        rows = idx[name]
        out[name] = rows[np.array([g is None or g not in later for g in groups[rows]], dtype=bool)]
        later |= set(groups[out[name]].tolist()) - {None}
    purged = {k: int(len(idx[k]) - len(out[k])) for k in ("train", "val")}
    return {k: out[k] for k in ("train", "val", "test")}, purged


def cv_runs(ds: Dataset, cfg, groups) -> list[dict[str, np.ndarray]]:
    """Per fold: train/val/test rows. An official test split stays out of the folds: folds run
    inside train+validation (fold k validates) and every fold's model scores the same test rows.
    Without one, fold k is the test fold and validation is carved from the other folds."""
    from embedkit.fusion.evaluate import check_groups_disjoint, kfold_indices, split_indices

    runs = []
    if ds.split is not None and cfg.data_split and (ds.split == "test").any():
        base, _ = purge_shared_groups({k: np.flatnonzero(ds.split == k) for k in ("train", "val", "test")}, groups)
        pool = np.sort(np.concatenate([base["train"], base["val"]]))
        g = None if groups is None else groups[pool]
        for tr, va in kfold_indices(ds.y[pool], cfg.cv, cfg.seed, groups=g):
            runs.append({"train": pool[tr], "val": pool[va], "test": base["test"]})
    else:
        for k, (rest, test) in enumerate(kfold_indices(ds.y, cfg.cv, cfg.seed, groups=groups)):
            inner = split_indices(ds.y[rest], val_fraction=cfg.val_fraction, test_fraction=0.0, seed=cfg.seed + k,
                                  groups=None if groups is None else groups[rest])
            runs.append({"train": rest[inner["train"]], "val": rest[inner["val"]], "test": test})
    for idx in runs:
        check_groups_disjoint(idx, groups)
    return runs


def warn_shared_inputs(ds: Dataset, idx: dict, fix: str = "extract with --group-col (e.g. a patient or image "
                                                         "column)", columns=("image_sha256", "text_sha256")) -> dict:
    """Count test rows whose image file or text is identical to a training row's. Without groups both count;
    with groups train passes the image only (one person under two patient ids), since short texts (a
    question, a templated sentence) repeat across patients without being the same case."""
    shared = {}
    for col in columns:
        if col in ds.columns:
            train_hashes = set(ds.columns[col][idx["train"]].tolist()) - {None}
            n = sum(h in train_hashes for h in ds.columns[col][idx["test"]].tolist())
            if n:
                shared[col.split("_")[0]] = int(n)
    if shared:
        from embedkit.console import say

        say("[yellow]warning:[/] " + ", ".join(f"{n} test rows have the same {m} as a training row" for m, n in
                                               shared.items())
            + f"; these rows are not independent: {fix}")
    return shared


def warn_ungrouped(idx: dict, groups) -> dict | None:
    """--no-groups on data that has a group column: what grouping would have changed (test rows whose group
    also has training or validation rows, which the test score then counts as new cases)."""
    if groups is None:
        return None
    seen = set(groups[np.concatenate([idx["train"], idx["val"]])].tolist()) - {None}
    test_groups = groups[idx["test"]]
    crossing = [g is not None and g in seen for g in test_groups]
    out = {"test_rows_in_groups_seen_in_training": int(sum(crossing)), "test_rows": int(len(test_groups)),
           "test_groups_seen_in_training": int(len({g for g, c in zip(test_groups, crossing) if c})),
           "test_groups": int(len(set(test_groups.tolist()) - {None}))}
    from embedkit.console import say

    say(f"[yellow]warning:[/] --no-groups: {out['test_rows_in_groups_seen_in_training']} of {out['test_rows']} test "
        f"rows belong to {out['test_groups_seen_in_training']} of {out['test_groups']} groups that also have training "
        f"or validation rows; the test score counts them as new cases, so it is optimistic wherever a group's rows "
        f"resemble each other. Leave out --no-groups to keep each group on one side.")
    return out


def row_keys(ds_like, rows, modalities: list[str]) -> list[str]:
    """sha256 of (id, content hash of each modality) per row: the same sample, not merely the same id."""
    cols = ds_like.columns
    parts = [np.asarray(ds_like.ids, dtype=object)[rows]]
    parts += [np.asarray(cols[f"{m}_sha256"], dtype=object)[rows] for m in modalities if f"{m}_sha256" in cols]
    return [hashlib.sha256("|".join(str(v) for v in vals).encode()).hexdigest()[:20] for vals in zip(*parts)]