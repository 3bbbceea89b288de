"""`embedkit audit` at clinic scale: 10,000 rows of 1,280-d image + 384-d text embeddings.

    python benchmarks/audit_speed.py --rows 10000

Synthetic embeddings written through the real store (fixed_size_list Parquet, provenance, text
column): images are non-negative like a CNN's pooled features, in 40 clusters; texts in 40
clusters of their own; a binary label that follows the image cluster with 10 % flipped; a
train/val/test split by a patient group of 3 rows; 200 planted near-duplicates (a row copied with a
little noise under a new id, half of them across splits). The audit runs in this process on every
core the machine has (2 here); peak memory is this process's. Goal: under a minute, and the
neighbour search never holds an n x n matrix (1024 x n scores at a time).
Writes benchmarks/results/audit_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from embedkit.audit import AuditConfig, audit
from embedkit.costs import peak_rss_mb
from embedkit.store import BASE_COLUMNS, PartWriter, build_schema

WORDS = "opacity effusion normal consolidation nodule clear lobe left right mild stable follow up chest".split()


def write_set(out: Path, n: int, planted: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    base = n - planted
    cluster = rng.integers(0, 40, base)
    y = (cluster % 2).astype(np.int64)
    flip = rng.random(base) < 0.10
    y[flip] = 1 - y[flip]
    img = np.maximum(rng.normal(size=(40, 1280))[cluster] * 0.6 + rng.normal(size=(base, 1280)), 0)
    txt = rng.normal(size=(40, 384))[rng.integers(0, 40, base)] + rng.normal(size=(base, 384)) * 0.8
    group = np.arange(base) // 3
    split = np.array(["train", "val", "test"], dtype=object)[rng.choice(3, group.max() + 1, p=[0.7, 0.15, 0.15])][group]
    src = rng.choice(base, planted, replace=False)  # each planted row copies one original
    img = np.vstack([img, img[src] + rng.normal(size=(planted, 1280)) * 0.05])
    txt = np.vstack([txt, txt[src] + rng.normal(size=(planted, 384)) * 0.02])
    y = np.concatenate([y, y[src]])
    group = np.concatenate([group.astype(str), [f"copy{i}" for i in range(planted)]]).astype(object)
    new_split = split[src].copy()
    half = np.arange(planted) < planted // 2
    new_split[half] = np.where(split[src][half] == "test", "train", "test")  # half put on the other side
    split = np.concatenate([split, new_split])
    ids = [f"r{i:06d}" for i in range(n)]
    texts = [" ".join(rng.choice(WORDS, 12)) for _ in range(n)]
    for modality, x in (("image", img), ("text", txt)):
        labels = {"label": y.tolist()}
        prov = {"name": f"bench-{modality}", "source": "bench", "family": "bench", "revision": "1", "pooling": "mean",
                "dim": x.shape[1], "preprocess": None, "max_length": None, "normalize": False, "dtype": "float32",
                "label_columns": ["label"]}
        w = PartWriter(out / f"{modality}__bench", build_schema(x.shape[1], labels, prov,
                                                               text_column=modality == "text"))
        cols = {"id": ids, "path": ids, "sha256": [f"{modality}{i}" for i in ids], "split": split.tolist(),
                "group": group.tolist(), **labels}
        if modality == "text":
            cols["text"] = texts
        cols.update({c: [None] * n for c in BASE_COLUMNS if c not in cols and c != "embedding"})
        w.write(cols, x.astype(np.float32))
        w.close()
    return {"planted_near_duplicates": planted, "planted_across_splits": int(half.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--planted", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audit_speed.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        planted = write_set(Path(tmp) / "emb", args.rows, args.planted)
        t0 = time.perf_counter()
        r = audit(Path(tmp) / "emb", AuditConfig(labels=["label"], thresholds={"image": 0.95, "text": 0.95}))
        seconds = time.perf_counter() - t0
    nd = {m: {k: r["near_duplicates"][m][k] for k in ("pairs", "across_splits", "within_split")}
          | {"clusters": r["near_duplicates"][m]["clusters"]["count"]} for m in r["near_duplicates"]}
    result = {"rows": args.rows, "dims": {"image": 1280, "text": 384}, "cores": os.cpu_count(),
              "load_average": list(os.getloadavg()), "seconds": round(seconds, 2), "goal_seconds": 60,
              "met": seconds < 60, "seconds_by_stage": r["seconds"], "peak_rss_mb": round(peak_rss_mb(), 1),
              "largest_score_block_mb": round(1024 * args.rows * 4 / 2**20, 1), **planted, "found": nd,
              "label_noise_candidates": r["label_noise"]["count"], "outliers": {m: o["count"] for m, o in
                                                                                 r["outliers"].items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
