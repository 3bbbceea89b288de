"""CLI paths a user takes: a shipped manifest on real data, gap diagnostics, datasets, demo pieces."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from embedkit.store import load_embeddings

from conftest import REPO, shared_data_dir


def _cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=timeout)


def test_extract_vqa_rad_with_its_manifest_end_to_end(tiny_models, tmp_path):
    data = shared_data_dir() / "vqa_rad"
    if not (data / "trainset.json").is_file():
        pytest.skip(f"VQA-RAD not found at {data} (set EMBEDKIT_SHARED_DATA to the folder holding vqa_rad/)")
    out = tmp_path / "emb"
    r = _cli("extract", data, "--manifest", REPO / "data_manifests" / "vqa_rad.toml", "--out", out,
             "--image-model", tiny_models["dinov2"], "--text-model", tiny_models["bert"], "--batch-size", "64",
             "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "layout: data manifest" in r.stderr
    s = load_embeddings(out)
    assert len(s.ids) == 2095  # every CLOSED question, both modalities
    assert set(s.columns["split"]) == {"train", "test"}
    labels = [v for v in s.columns["answer_yes"] if v is not None]
    assert set(labels) <= {0, 1} and 1500 < len(labels) < 2095
    manifest = json.loads((out / "manifest.json").read_text())
    image = manifest["modalities"]["image"]
    assert image["rows_total"] == 2095 and image["unique_inputs_embedded"] < 320  # each image embedded once
    # rows that share an image share its embedding exactly
    paths = s.columns["image_path"]
    first = {p: i for i, p in reversed(list(enumerate(paths)))}
    same = [(i, first[p]) for i, p in enumerate(paths) if first[p] != i][:50]
    for i, j in same:
        np.testing.assert_array_equal(s.embeddings["image"][i], s.embeddings["image"][j])


def test_gap_command_writes_stats_and_plot(tiny_models, paired_folder, tmp_path):
    out = tmp_path / "emb"
    assert _cli("extract", paired_folder, "--out", out, "--image-model", tiny_models["clip"], "--text-model",
                tiny_models["clip"], "--no-progress").returncode == 0
    r = _cli("gap", out, "--lambda", "1.0")
    assert r.returncode == 0, r.stderr
    stats = json.loads((out / "gap.json").read_text())
    assert stats["methods"]["shift"]["gap_norm"] < stats["methods"]["none"]["gap_norm"]
    assert (out / "gap_pca.png").read_bytes()[:4] == b"\x89PNG"
    assert "gap.json" in r.stderr


def test_datasets_lists_the_shipped_manifests():
    r = _cli("datasets")
    assert r.returncode == 0
    for name in ("brset", "ham10000", "vqa_rad", "mimic_cxr", "iu_xray"):
        assert name in r.stderr


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, embedkit.cli; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_demo_data_is_synthetic_and_balanced(tmp_path):
    from embedkit.demo import CLASSES, make_synthetic_clinic
    from embedkit.sources import read_table

    root = make_synthetic_clinic(tmp_path / "d", n=12)
    assert "SYNTHETIC" in (root / "README.txt").read_text()
    rows = read_table(root / "labels.csv")
    assert [r["label"] for r in rows].count(CLASSES[0]) == 4
    assert all((root / r["image"]).is_file() and (root / r["report"]).is_file() for r in rows)


def test_demo_runs_end_to_end_with_the_offline_models(tmp_path):
    out = tmp_path / "demo"
    r = _cli("demo", "--out", out, "--n", "36", "--seeds", "2", env={"EMBEDKIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    for m in ("image", "text"):  # --backend auto: the fastest here whose parity to torch fp32 passes the floor
        e = summary["extract"][m]
        assert e["backend"] in ("torch", "onnxruntime", "openvino")
        assert e["backend"] == "torch" and e["precision"] == "fp32" or e["parity_min_cosine"] >= 0.99
    assert summary["synthetic"] is True and summary["n"] == 36
    assert summary["extract"]["image"]["model"] == "efficientnet-lite0" and summary["extract"]["image"]["dim"] == 1280
    assert summary["extract"]["text"]["model"] == "minilm" and summary["extract"]["text"]["dim"] == 384
    models = [row["model"] for row in summary["results"]]
    assert {"image only", "text only", "early fusion", "late fusion", "logistic regression"} <= set(models)
    for row in summary["results"]:
        assert row["spread"]["macro_f1"]["n_runs"] == 2
    assert "early fusion" in r.stderr and "macro-F1" in r.stderr  # the table a user reads
    assert (out / "models" / "early_fusion" / "model.safetensors").is_file()
