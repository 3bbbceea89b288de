"""`embedkit audit EMB`: the data problems that make a clinic's number wrong, found before training.

One pass over an extract folder (every row, outer-joined across modalities, labelled or not):
  near-duplicates   per modality, images or texts whose embeddings are nearly identical (cosine
                    threshold calibrated per encoder, near_duplicates.py) plus equal content hashes;
                    pairs and clusters by id with each side's split, across splits and within one
                    counted apart
  leakage           the text-leakage scan (leakage.py) on the training rows
  balance           rows per split, per class and split, per modality combination; group sizes and
                    groups found in several splits; tiny classes and subgroups
  outliers          rows far from every other row of their modality (k-th neighbour distance)
  label noise       rows whose label disagrees with out-of-fold predictions (label_noise.py)
Everything goes to DIR/audit.json (every count and id list, lists capped at `max_listed` with the
exact count beside); `summary_lines` gives the one-screen summary. Nothing is fitted for a model.

`audit_dataset(es, cfg)` runs on an EmbeddingSet already loaded (what `embedkit compare` can call).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from embedkit.dataset import SPLIT_NAMES
from embedkit.leakage import label_key
from embedkit.near_duplicates import (TOP_K, Duplicates, clusters, content_units, merge_groups, near_duplicate_pairs,
                                      nearest_neighbours, threshold_for)

AUDIT_FILE = "audit.json"
_NOT_SUBGROUPS = ("id", "split", "group", "text")


@dataclass
class AuditConfig:
    labels: list[str] = field(default_factory=list)  # one column: classes; several 0/1 columns: multilabel
    group_col: str | None = None  # None: the group extract stored (e.g. a patient id), if any
    thresholds: dict[str, float] = field(default_factory=dict)  # modality -> cosine; default: calibrated
    models: dict[str, str] = field(default_factory=dict)  # modality -> model, when several were extracted
    max_listed: int = 1000  # pairs, clusters, outliers and candidates listed per finding (counts are exact)
    min_rows: int = 10  # a class (per split) or subgroup value with fewer rows is "tiny"
    max_subgroup_values: int = 20  # a metadata column with 2..this many values is a subgroup column
    outlier_mads: float = 5.0  # outlier: k-th neighbour distance above median + this many scaled MADs
    outlier_k: int = 5
    label_noise: bool = True
    folds: int = 5  # out-of-fold predictions for label noise
    seed: int = 0


def audit(emb_dir, cfg: AuditConfig | None = None) -> dict:
    """Audit an extract folder; see the module docstring. Raises EmbedkitError only if it cannot be read."""
    from embedkit.store import load_embeddings

    cfg = cfg or AuditConfig()
    es = load_embeddings(emb_dir, models=cfg.models or None, how="outer")
    result = audit_dataset(es, cfg)
    result["embeddings"] = str(emb_dir)
    return result


def audit_dataset(es, cfg: AuditConfig | None = None) -> dict:
    """The audit of an EmbeddingSet (load_embeddings(..., how="outer")) as a JSON-ready dict."""
    from embedkit.errors import EmbedkitError

    cfg = cfg or AuditConfig()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    ids = np.asarray(es.ids, dtype=object)
    n = len(ids)
    present = {m: (es.present[m] if m in es.present else np.isfinite(x).all(axis=1)) for m, x in es.embeddings.items()}
    split = _splits(es.columns.get("split"), n)
    missing = [c for c in cfg.labels if c not in es.columns]
    if missing:
        raise EmbedkitError(f"label column '{missing[0]}' is not in the embeddings; columns: "
                            f"{', '.join(sorted(c for c in es.columns if not c.endswith(('_path', '_sha256'))))}")
    groups, group_column = _groups(es, cfg.group_col)
    out: dict = {
        "embedkit_audit": 1, "rows": int(n), "labels": cfg.labels,
        "modalities": {m: {"model": es.provenance[m].get("name"), "dim": int(x.shape[1]),
                           "rows": int(present[m].sum())} for m, x in es.embeddings.items()},
        "rows_per_modality_combination": dict(Counter("+".join(m for m in present if present[m][i]) or "none"
                                                      for i in range(n))),
        "splits": dict(Counter(split.tolist())),
    }
    out["balance"] = _balance(es, cfg, split)
    out["groups"] = _group_report(groups, group_column, split, ids, cfg.max_listed)
    out["tiny"] = _tiny(es, cfg, split)
    seconds["overview"] = time.perf_counter() - t0

    pairs = {}
    out["exact_duplicates"], out["near_duplicates"], out["outliers"] = {}, {}, {}
    for m, x in es.embeddings.items():
        t = time.perf_counter()
        rows = np.flatnonzero(present[m])
        hashes = es.columns.get(f"{m}_sha256")
        hashes = None if hashes is None else hashes[rows]
        unit, first = content_units(hashes, len(rows))
        # one search per distinct content: its top-k serve the near-duplicates and the outliers
        neighbours = nearest_neighbours(x[rows][first], k=max(TOP_K, cfg.outlier_k))
        threshold, source = threshold_for(m, es.provenance.get(m), cfg.thresholds.get(m))
        pairs[m] = near_duplicate_pairs(x[rows], threshold, hashes, neighbours=neighbours)
        pairs[m].rows = rows
        where = _Where(ids, split, groups)
        out["exact_duplicates"][m] = _exact(pairs[m], where, cfg.max_listed) if hashes is not None else \
            {"note": "no content hashes stored"}
        out["near_duplicates"][m] = {"threshold": threshold, "threshold_source": source,
                                     **_near(pairs[m], where, n, cfg.max_listed)}
        out["outliers"][m] = _outliers(x[rows][first], neighbours, pairs[m], where, cfg)
        seconds[f"neighbours_{m}"] = time.perf_counter() - t

    t = time.perf_counter()
    out["leakage"] = _leakage(es, cfg, split)
    seconds["leakage"] = time.perf_counter() - t
    t = time.perf_counter()
    merged, _ = merge_groups(ids, groups, pairs)
    out["label_noise"] = _label_noise(es, cfg, merged, ids, split, present)
    seconds["label_noise"] = time.perf_counter() - t
    out["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    out["config"] = asdict(cfg)
    return out


# ---------------------------------------------------------------- pieces


def _splits(values, n: int) -> np.ndarray:
    if values is None:
        return np.array(["none"] * n, dtype=object)
    return np.array(["none" if v is None else SPLIT_NAMES.get(str(v).strip().lower(), f"other:{v}")
                     for v in values], dtype=object)


def _groups(es, group_col: str | None):
    name = group_col or "group"
    if name not in es.columns:
        if group_col:
            from embedkit.errors import EmbedkitError

            raise EmbedkitError(f"group column '{group_col}' is not in the embeddings")
        return None, None
    values = np.array([None if v is None or v != v else str(v) for v in es.columns[name]], dtype=object)
    if all(v is None for v in values):
        return None, None
    stored = next((p.get("group_col") for p in es.provenance.values() if p.get("group_col")), None)
    return values, group_col or stored or "group"


def _label_values(es, labels: list[str]):
    """One label column: its values (None where missing). Several: a 0/1 matrix with NaN where not 0/1."""
    if len(labels) == 1:
        return np.array([None if v is None or v != v else v for v in es.columns[labels[0]]], dtype=object)
    on, off = {"1", "True", "yes", "true"}, {"0", "False", "no", "false"}
    return np.array([[1.0 if label_key(v) in on else 0.0 if label_key(v) in off else np.nan
                      for v in es.columns[c]] for c in labels], dtype=np.float64).T


def _balance(es, cfg: AuditConfig, split) -> dict:
    if not cfg.labels:
        return {}
    y = _label_values(es, cfg.labels)
    out = {}
    for s in sorted(set(split.tolist())):
        rows = split == s
        if y.ndim == 1:
            counts = Counter(label_key(v) for v in y[rows] if v is not None)
            out[s] = {"classes": dict(sorted(counts.items())), "unlabelled": int(sum(v is None for v in y[rows]))}
        else:
            out[s] = {"positives": {c: int(np.nansum(y[rows, j])) for j, c in enumerate(cfg.labels)},
                      "unlabelled": int(np.isnan(y[rows]).any(axis=1).sum())}
    return out


def _group_report(groups, column, split, ids, max_listed: int) -> dict:
    if groups is None:
        return {"column": None, "note": "no group column: rows are assumed independent"}
    sizes = Counter(g for g in groups if g is not None)
    splits_of: dict = {}
    for g, s in zip(groups, split):
        if g is not None:
            splits_of.setdefault(g, set()).add(s)
    crossing = sorted(g for g, s in splits_of.items() if len(s) > 1)
    values = np.array(list(sizes.values()))
    return {"column": column, "n_groups": len(sizes), "rows_without_group": int(sum(g is None for g in groups)),
            "rows_per_group": {"min": int(values.min()), "median": float(np.median(values)),
                               "max": int(values.max())} if len(values) else None,
            "largest": [{"group": g, "rows": k} for g, k in sizes.most_common(5)],
            "in_several_splits": {"count": len(crossing), "groups": [{"group": g, "splits": sorted(splits_of[g])}
                                                                     for g in crossing[:max_listed]]}}


def _tiny(es, cfg: AuditConfig, split) -> dict:
    found = {"classes": [], "subgroups": []}
    if len(cfg.labels) == 1:
        y = _label_values(es, cfg.labels)
        classes = sorted({label_key(v) for v in y if v is not None})
        for s in sorted(set(split.tolist())):
            counts = Counter(label_key(v) for v in y[split == s] if v is not None)
            found["classes"] += [{"split": s, "class": c, "rows": int(counts.get(c, 0))} for c in classes
                                 if counts.get(c, 0) < cfg.min_rows]
    skip = set(cfg.labels) | set(_NOT_SUBGROUPS)
    for name, values in es.columns.items():
        if name in skip or name.endswith(("_path", "_sha256")):
            continue
        counts = Counter(label_key(v) for v in values if v is not None and v == v)
        if 2 <= len(counts) <= cfg.max_subgroup_values:
            found["subgroups"] += [{"column": name, "value": v, "rows": k} for v, k in sorted(counts.items())
                                   if k < cfg.min_rows]
    return found


@dataclass
class _Where:
    """Row -> id, split, group: what every listed duplicate names."""

    ids: np.ndarray
    split: np.ndarray
    groups: np.ndarray | None

    def group(self, i) -> str:
        return f"row:{self.ids[i]}" if self.groups is None or self.groups[i] is None else str(self.groups[i])

    def describe(self, rows) -> dict:
        return {"ids": [str(self.ids[i]) for i in rows], "splits": sorted({str(self.split[i]) for i in rows}),
                "groups": len({self.group(i) for i in rows})}


def _exact(d: Duplicates, where: _Where, max_listed: int) -> dict:
    """Rows whose content hash is equal: clusters, and those that span splits or groups."""
    dup = sorted((r for r in d.members() if len(r) > 1), key=len, reverse=True)
    across_splits = [r for r in dup if len({where.split[i] for i in r}) > 1]
    across_groups = [r for r in dup if len({where.group(i) for i in r}) > 1]
    return {"clusters": len(dup), "rows": int(sum(len(r) for r in dup)),
            "clusters_across_splits": len(across_splits), "clusters_across_groups": len(across_groups),
            "clusters_across_groups_and_splits": sum(len({where.split[i] for i in r}) > 1 for r in across_groups),
            "listed": [where.describe(r) for r in (across_groups + [r for r in dup if len({where.group(i)
                                                                                          for i in r}) == 1])
                       [:max_listed]]}


def _near(d: Duplicates, where: _Where, n: int, max_listed: int) -> dict:
    """Pairs of distinct contents (images, texts) that are nearly identical, and their clusters."""
    members = d.members()
    split_sets = [{where.split[i] for i in r} for r in members]
    group_sets = [{where.group(i) for i in r} for r in members]
    cross_split = np.array([split_sets[a] != split_sets[b] or len(split_sets[a]) > 1 for a, b in zip(d.a, d.b)],
                           dtype=bool)
    cross_group = np.array([group_sets[a] != group_sets[b] or len(group_sets[a] | group_sets[b]) > 1
                            for a, b in zip(d.a, d.b)], dtype=bool)
    leaking = cross_split & cross_group
    component = clusters(len(members), (d.a, d.b))
    in_pairs = np.zeros(len(members), dtype=bool)
    in_pairs[d.a] = in_pairs[d.b] = True
    by: dict = {}
    for u in np.flatnonzero(in_pairs):
        by.setdefault(int(component[u]), []).append(u)
    comps = sorted((np.concatenate([members[u] for u in us]) for us in by.values()), key=len, reverse=True)
    leak_rows = np.zeros(n, dtype=bool)
    for a, b in zip(d.a[leaking], d.b[leaking]):
        leak_rows[members[a]] = leak_rows[members[b]] = True
    order = np.lexsort((d.b, d.a, -d.cosine))  # most similar first
    return {
        "pairs": int(len(d.a)),
        "across_splits": {"pairs": int(leaking.sum()), "rows": int(leak_rows.sum()),
                          "what": "pairs of distinct contents in different splits and different groups: the "
                                  "leakage a grouped split does not see"},
        "across_splits_same_group": int((cross_split & ~cross_group).sum()),
        "within_split": {"pairs": int((~cross_split).sum())},
        "clusters": {"count": len(comps), "rows": int(sum(len(c) for c in comps)),
                     "largest": int(len(comps[0])) if comps else 0,
                     "across_splits": sum(len({where.split[i] for i in c}) > 1 for c in comps),
                     "listed": [where.describe(c) for c in comps[:max_listed]]},
        "listed": [{"a": str(where.ids[members[d.a[k]][0]]), "b": str(where.ids[members[d.b[k]][0]]),
                    "rows_a": int(len(members[d.a[k]])), "rows_b": int(len(members[d.b[k]])),
                    "cosine": round(float(d.cosine[k]), 5), "splits_a": sorted(map(str, split_sets[d.a[k]])),
                    "splits_b": sorted(map(str, split_sets[d.b[k]])), "across_splits_and_groups": bool(leaking[k])}
                   for k in order[:max_listed]],
    }


def _outliers(x_units, neighbours, d: Duplicates, where: _Where, cfg: AuditConfig) -> dict:
    """Distinct contents far from every other one (k-th neighbour distance), and all-zero vectors."""
    _, cos = neighbours
    k = min(cfg.outlier_k, cos.shape[1])
    if k == 0:
        return {"rule": "too few rows", "count": 0, "listed": []}
    zero = np.linalg.norm(x_units, axis=1) == 0
    distance = 1.0 - cos[:, k - 1]
    med = float(np.median(distance))
    mad = float(np.median(np.abs(distance - med))) * 1.4826
    cut = med + cfg.outlier_mads * max(mad, 1e-6)
    flagged = np.flatnonzero((distance > cut) | zero)
    flagged = flagged[np.argsort(-distance[flagged])]
    members = d.members()
    return {"rule": f"cosine distance to the {k}th nearest distinct content above median + {cfg.outlier_mads:g} "
                    f"scaled MADs ({cut:.4f}), or an all-zero vector",
            "count": int(sum(len(members[u]) for u in flagged)), "contents": int(len(flagged)),
            "zero_vectors": int(zero.sum()), "median_distance": round(med, 5),
            "listed": [{**where.describe(members[u]), "distance": round(float(distance[u]), 5)}
                       for u in flagged[:cfg.max_listed]]}


def _leakage(es, cfg: AuditConfig, split) -> dict | None:
    if not cfg.labels or "text" not in es.columns:
        return None
    from embedkit.leakage import scan_text_leakage

    rows = np.flatnonzero(split == "train") if (split == "train").any() else np.arange(len(split))
    y = _label_values(es, cfg.labels)
    texts = [es.columns["text"][i] for i in rows]
    if y.ndim == 1:
        classes = sorted({label_key(v) for v in y[rows] if v is not None})
        result = scan_text_leakage(texts, y[rows], "multiclass" if len(classes) > 2 else "binary", classes,
                                   label_names=cfg.labels)
    else:
        ok = ~np.isnan(y[rows]).any(axis=1)
        result = scan_text_leakage([t for t, k in zip(texts, ok) if k], y[rows][ok].astype(int), "multilabel",
                                   cfg.labels, label_names=cfg.labels)
    return {**result, "scanned": "training rows" if (split == "train").any() else "all rows (no split column)"}


def _label_noise(es, cfg: AuditConfig, merged_groups, ids, split, present) -> dict | None:
    if not cfg.label_noise or len(cfg.labels) != 1:
        return None if not cfg.labels else {"note": "label noise is checked for one label column at a time"}
    from embedkit.label_noise import label_noise_candidates

    y = _label_values(es, cfg.labels)
    labelled = np.array([v is not None for v in y], dtype=bool)
    blocks = {m: np.where(present[m][:, None], x, np.nan) for m, x in es.embeddings.items()}
    r = label_noise_candidates(blocks, [label_key(v) if v is not None else None for v in y], merged_groups,
                               cfg.folds, cfg.seed)
    classes = r["classes"]
    return {"method": "confident learning (cleanlab.filter.find_label_issues, prune_by_noise_rate) on "
                      f"{cfg.folds}-fold out-of-fold probabilities of a logistic regression on the standardised "
                      "embeddings (PCA <= 64 per modality); folds keep each group and near-duplicate cluster whole",
            "rows_labelled": int(labelled.sum()), "rows_scored": r["n_scored"], "count": int(len(r["rows"])),
            "out_of_fold_balanced_accuracy": r.get("out_of_fold_balanced_accuracy"),
            "classes_left_out": r["skipped"], **({"note": r["note"]} if "note" in r else {}),
            "advice": "look at these rows again; do not drop or relabel test rows only because a model disagrees",
            "listed": [{"id": str(ids[i]), "split": str(split[i]), "label": label_key(y[i]),
                        "predicted": classes[int(p)], "self_confidence": round(float(c), 5)}
                       for i, p, c in zip(r["rows"][:cfg.max_listed], r["predicted"], r["self_confidence"])]}


# ---------------------------------------------------------------- output


def write_audit(result: dict, out_dir) -> Path:
    from embedkit.store import write_json_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / AUDIT_FILE, result)
    return out_dir / AUDIT_FILE


def summary_lines(r: dict) -> list[str]:
    """The one-screen summary: one line per finding, counts only (ids are in audit.json)."""
    mods = ", ".join(f"{m} {v['rows']} ({v['model']}, {v['dim']}-d)" for m, v in r["modalities"].items())
    combos = ", ".join(f"{k} {v}" for k, v in r["rows_per_modality_combination"].items())
    lines = [f"{r['rows']} rows: {mods}; per combination: {combos}",
             "splits: " + ", ".join(f"{k} {v}" for k, v in sorted(r["splits"].items()))]
    for s, b in (r.get("balance") or {}).items():
        parts = b.get("classes") or b.get("positives") or {}
        lines.append(f"  {s}: " + ", ".join(f"{k} {v}" for k, v in parts.items())
                     + (f", unlabelled {b['unlabelled']}" if b["unlabelled"] else ""))
    g = r["groups"]
    if g.get("column"):
        lines.append(f"groups ('{g['column']}'): {g['n_groups']}, rows per group {g['rows_per_group']['min']}-"
                     f"{g['rows_per_group']['max']}; {g['in_several_splits']['count']} groups in several splits")
    else:
        lines.append("groups: none stored (rows assumed independent)")
    for m, e in r["exact_duplicates"].items():
        if "clusters" in e:
            lines.append(f"exact duplicate {m}s: {e['rows']} rows in {e['clusters']} clusters; "
                         f"{e['clusters_across_groups_and_splits']} span groups and splits (leakage), "
                         f"{e['clusters_across_splits'] - e['clusters_across_groups_and_splits']} more span splits "
                         f"within one group")
    for m, d in r["near_duplicates"].items():
        lines.append(f"near-duplicate {m}s (cosine >= {d['threshold']:g}, {d['threshold_source'].split(' (')[0]}): "
                     f"{d['pairs']} pairs of distinct contents, {d['across_splits']['pairs']} across splits and groups "
                     f"({d['across_splits']['rows']} rows), {d['within_split']['pairs']} within a split; "
                     f"{d['clusters']['count']} clusters, largest {d['clusters']['largest']} rows")
    tiny = r["tiny"]
    if tiny["classes"] or tiny["subgroups"]:
        lines.append(f"tiny: {len(tiny['classes'])} class/split cells and {len(tiny['subgroups'])} subgroup values "
                     f"with fewer than {r['config']['min_rows']} rows")
    for m, o in r["outliers"].items():
        lines.append(f"outlier {m}s: {o['count']} rows" + (f" ({o['zero_vectors']} all-zero)" if o.get("zero_vectors")
                                                            else ""))
    lk = r.get("leakage")
    if lk is not None:
        found = [x["token"] for x in lk["rules"]] + [x["token"] for x in lk["label_words"]]
        lines.append(f"text leakage ({lk['n_rows_scanned']} {lk['scanned']} scanned): "
                     + (", ".join(f"'{t}'" for t in dict.fromkeys(found)) if found else "nothing found"))
    ln = r.get("label_noise")
    if ln:
        lines.append(f"label-noise candidates: {ln['count']} of {ln['rows_scored']} rows" if "count" in ln
                     else f"label noise: {ln['note']}")
        if "count" in ln and ln.get("note"):
            lines.append(f"  note: {ln['note']}")
    return lines
