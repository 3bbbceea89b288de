"""embedkit audit and near-duplicates: planted copies of real images found across splits, distinct images
left apart, --group-near-dups in train and extract, label-noise candidates, the CLI and its page."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedkit.audit import AuditConfig, audit, audit_dataset
from embedkit.errors import EmbedkitError
from embedkit.near_duplicates import merge_groups, near_duplicate_pairs, nearest_neighbours
from embedkit.store import BASE_COLUMNS, PartWriter, build_schema, load_embeddings

from conftest import REPO, shared_data_dir

N_IMAGES = 30  # real VQA-RAD images; 6 of them get a copy under a new id on the other side of the split
COPIES = {"reencoded": 3, "half_size": 3}  # put on the other side of the split; one more re-encoded copy stays on
SAME_SIDE = 6  # its original's side (image 6): a within-split duplicate, counted apart


def test_blocked_search_equals_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 24)).astype(np.float32)
    x[150:160] = x[:10] + rng.normal(size=(10, 24)).astype(np.float32) * 0.01  # 10 planted near copies
    idx, cos = nearest_neighbours(x, k=4, block=64)  # 5 blocks, the last one short
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    ref = np.argsort(-s, axis=1)[:, :4]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(cos, np.take_along_axis(s, ref, axis=1), atol=1e-5)
    d = near_duplicate_pairs(x, 0.99)
    assert list(zip(d.a, d.b)) == [(i, 150 + i) for i in range(10)]  # exactly the planted pairs
    # equal content hashes make one unit, searched once; its rows join the same cluster
    hashes = [f"h{i}" for i in range(300)]
    hashes[299] = "h0"
    d = near_duplicate_pairs(x, 0.99, hashes)
    assert d.unit[299] == d.unit[0] and len(d.first) == 299
    groups, summary = merge_groups([f"r{i}" for i in range(300)], None, {"image": d})
    assert groups[0] == groups[150] == groups[299] != groups[1] and groups[2] == groups[152]
    assert groups[5] != groups[6] and groups[200] is None  # lone rows stay independent
    assert summary["groups_formed"] == 10 and summary["rows_regrouped"] == 21


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Real VQA-RAD images, each one train or test; 6 copied (JPEG q60 re-encode, half size q90) under new ids and
    put on the OTHER side of the split; extracted with the offline EfficientNet-Lite0 through extract()."""
    src = shared_data_dir() / "vqa_rad" / "images"
    if not src.is_dir():
        pytest.skip(f"VQA-RAD not found at {src} (set EMBEDKIT_SHARED_DATA to the folder holding vqa_rad/)")
    from embedkit.extract import ExtractConfig, extract
    from embedkit.items import SourceOptions

    root = tmp_path_factory.mktemp("planted")
    (root / "img").mkdir()
    files = sorted(src.glob("*.jpg"))[::10][:N_IMAGES]
    rows, copies = [], {}
    for k, f in enumerate(files):
        im = Image.open(f).convert("RGB")
        im.save(root / "img" / f"{f.stem}.png")
        split = "test" if k % 3 == 2 else "train"
        rows.append({"id": f.stem, "image": f"img/{f.stem}.png", "split": split, "patient": f"p{k}",
                     "label": k % 4 // 2})
        kind = "reencoded" if k < COPIES["reencoded"] or k == SAME_SIDE else "half_size" \
            if k < sum(COPIES.values()) else None
        if kind:
            copy = im if kind == "reencoded" else im.resize((im.width // 2, im.height // 2), Image.BICUBIC)
            copy.save(root / "img" / f"copy_{f.stem}.jpg", quality=60 if kind == "reencoded" else 90)
            other = split if k == SAME_SIDE else "test" if split == "train" else "train"
            rows.append({"id": f"copy_{f.stem}", "image": f"img/copy_{f.stem}.jpg", "split": other,
                         "patient": f"q{k}", "label": k % 4 // 2})
            copies[f"copy_{f.stem}"] = f.stem
    with open(root / "table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    source = SourceOptions(metadata=root / "table.csv", id_col="id", image_col="image", split_col="split",
                           group_col="patient", label_cols=["label"])
    extract(root, root / "emb", ExtractConfig(text_model=None, progress=False), source=source)
    return root, source, copies


def test_audit_finds_planted_copies_across_splits_and_no_false_pair(planted, tmp_path):
    root, _, copies = planted
    r = audit(root / "emb", AuditConfig(labels=["label"], label_noise=False))
    nd = r["near_duplicates"]["image"]
    assert nd["threshold_source"].startswith("calibrated for efficientnet-lite0")
    found = {frozenset((p["a"], p["b"])) for p in nd["listed"]}
    assert found == {frozenset(kv) for kv in copies.items()}  # every planted copy, and no pair of distinct images
    across = {frozenset((p["a"], p["b"])) for p in nd["listed"] if p["across_splits_and_groups"]}
    assert all(p["splits_a"] != p["splits_b"] for p in nd["listed"] if p["across_splits_and_groups"])
    cross = len(copies) - 1  # the copy of image SAME_SIDE stays on its original's side
    assert len(across) == nd["across_splits"]["pairs"] == cross and nd["across_splits"]["rows"] == 2 * cross
    assert nd["within_split"]["pairs"] == 1
    assert nd["clusters"]["count"] == len(copies) and nd["clusters"]["largest"] == 2
    assert r["exact_duplicates"]["image"]["clusters"] == 0
    n_test = N_IMAGES // 3 + sum(1 for k in range(sum(COPIES.values())) if k % 3 != 2)  # copies of train images
    assert r["splits"] == {"train": N_IMAGES + len(copies) - n_test, "test": n_test}
    assert r["groups"]["n_groups"] == N_IMAGES + len(copies)
    # the CLI: exit 0, audit.json with the same finding, a one-screen summary, and the HTML page
    out = tmp_path / "audit"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "embedkit.cli", "audit", str(root / "emb"), "--label", "label",
                        "--no-label-noise", "--out", str(out)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert f"{cross} across splits and groups" in " ".join(p.stderr.split())
    saved = json.loads((out / "audit.json").read_text())
    assert saved["near_duplicates"]["image"]["across_splits"]["pairs"] == cross
    from embedkit.report import build_report

    page = build_report(out).read_text()
    assert "Near-duplicate images" in page and next(iter(copies)) in page
    with pytest.raises(EmbedkitError, match="does not exist"):  # the CLI's one `error:` line and exit 2
        audit(tmp_path / "nope")


def test_train_warns_about_cross_split_copies_and_groups_them_away(planted, tmp_path):
    from embedkit.train import TrainConfig, train

    root, _, copies = planted
    cfg = dict(labels=["label"], fusion="image", epochs=2, bootstrap=0, ood_guard="none")
    m = train(root / "emb", tmp_path / "m", TrainConfig(**cfg))
    found = m["data"]["near_duplicates_across_splits"]["image"]
    # each cross-split pair has one side in test; the same-side copy's pair may sit in train and validation
    assert found["test_rows"] == len(copies) - 1
    g = train(root / "emb", tmp_path / "g", TrainConfig(**cfg, group_near_duplicates=True))
    assert g["data"]["near_duplicates_across_splits"]["image"]["test_rows"] == 0
    # the data's split is kept: each copy's training side is purged, so no cluster crosses it
    assert g["data"]["purged_rows"]["train"] == len(copies) - 1 and "near-duplicate clusters" in g["data"]["groups"]


def test_extract_group_near_duplicates_rewrites_groups_only(planted, tmp_path):
    import shutil

    from embedkit.extract import ExtractConfig, extract

    root, source, copies = planted
    emb = tmp_path / "emb"
    shutil.copytree(root / "emb", emb)
    before = load_embeddings(emb)
    extract(root, emb, ExtractConfig(text_model=None, progress=False, group_near_duplicates=True), source=source)
    after = load_embeddings(emb)
    np.testing.assert_array_equal(after.embeddings["image"], before.embeddings["image"])  # bit for bit
    group = dict(zip(after.ids.tolist(), after.columns["group"].tolist()))
    for copy, original in copies.items():
        assert group[copy] == group[original] and group[copy].startswith("near-dup:")
    untouched = [i for i in after.ids if i not in copies and i not in copies.values()]
    assert all(group[i] == g for i, g in zip(before.ids, before.columns["group"]) if i in untouched)
    part = sorted((emb / "image__efficientnet-lite0").glob("part-*.parquet"))[0]
    prov = json.loads(pq.read_schema(part).metadata[b"embedkit"])
    assert prov["group_near_duplicates"]["groups_formed"] == len(copies)
    # a later run without the flag puts the table's groups back
    extract(root, emb, ExtractConfig(text_model=None, progress=False), source=source)
    again = load_embeddings(emb)
    assert dict(zip(again.ids.tolist(), again.columns["group"].tolist()))[next(iter(copies))].startswith("q")


def _store(out, ids, blocks: dict, columns: dict, texts=None):
    for modality, x in blocks.items():
        prov = {"name": f"t-{modality}", "source": "t", "family": "t", "revision": "1", "pooling": "mean",
                "dim": x.shape[1], "preprocess": None, "max_length": None, "normalize": False, "dtype": "float32",
                "label_columns": [c for c in columns if c not in BASE_COLUMNS]}
        cols = {k: list(v) for k, v in columns.items() if k not in BASE_COLUMNS}
        w = PartWriter(out / f"{modality}__t", build_schema(x.shape[1], cols, prov, text_column=texts is not None
                                                           and modality == "text"))
        batch = {"id": list(ids), "path": list(ids), "sha256": [f"{modality}{i}" for i in ids], **cols}
        batch.update({k: list(columns[k]) if k in columns else [None] * len(ids) for k in BASE_COLUMNS
                      if k not in batch and k != "embedding"})
        if texts is not None and modality == "text":
            batch["text"] = list(texts)
        w.write(batch, x.astype(np.float32))
        w.close()
    return out


def test_label_noise_candidates_find_planted_flips_and_audit_reports_balance(tmp_path):
    rng = np.random.default_rng(0)
    n = 240
    y = np.arange(n) % 3
    x = rng.normal(size=(3, 16))[y] * 3 + rng.normal(size=(n, 16))
    flipped = rng.choice(n, 12, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + 1) % 3
    ids = np.array([f"r{i:03d}" for i in range(n)], dtype=object)
    split = np.array(["train"] * 200 + ["test"] * 40, dtype=object)
    cols = {"dx": np.array(["a", "b", "c"], dtype=object)[noisy], "split": split,
            "site": np.array(["north"] * 236 + ["south"] * 4, dtype=object)}
    emb = _store(tmp_path / "emb", ids, {"image": x}, cols)
    r = audit_dataset(load_embeddings(emb, how="outer"), AuditConfig(labels=["dx"]))
    ln = r["label_noise"]
    listed = {c["id"] for c in ln["listed"]}
    planted = set(ids[flipped])
    assert len(listed & planted) >= 10 and len(listed - planted) <= 4  # recall >= 10/12, few false alarms
    assert ln["out_of_fold_balanced_accuracy"] > 0.9 and "note" not in ln
    assert {c["label"] for c in ln["listed"] if c["id"] in planted} <= {"a", "b", "c"}
    counts = {k: int(v) for k, v in zip(*np.unique(cols["dx"][split == "test"], return_counts=True))}
    assert r["balance"]["test"]["classes"] == counts
    assert {"column": "site", "value": "south", "rows": 4} in r["tiny"]["subgroups"]
    assert r["rows_per_modality_combination"] == {"image": n} and r["groups"]["column"] is None
