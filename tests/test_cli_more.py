"""CLI paths a user takes: a shipped manifest on real data, gap diagnostics, datasets, demo pieces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
        assert name in r.stdout  # a listing is data: `embedkit datasets > file` keeps it


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


def test_demo_runs_end_to_end_keeps_its_outputs_and_says_each_thing_once(tmp_path):
    """The README's first command as a new user runs it (no --out, 80 columns), on a smaller clinic."""
    r = subprocess.run([sys.executable, "-m", "embedkit.cli", "demo", "--n", "36", "--seeds", "2"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80",
                            "EMBEDKIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    out = tmp_path / "embedkit-demo"  # the default --out: kept, not a temporary folder
    summary = json.loads((out / "summary.json").read_text())
    assert summary["synthetic"] is True and summary["n"] == 36
    for m, model, dim in (("image", "efficientnet-lite0", 1280), ("text", "minilm", 384)):
        e = summary["extract"][m]
        assert (e["model"], e["dim"], e["backend"], e["precision"]) == (model, dim, "torch", "fp32")
    assert not (tmp_path / "cache").exists()  # torch fp32 by default: no backend exports built and left behind
    models = [row["model"] for row in summary["results"]]
    assert {"image only", "text only", "early fusion", "late fusion", "logistic regression"} <= set(models)
    assert (out / "models" / "early_fusion" / "model.safetensors").is_file()

    # the last line says what to open: the report of the model best on VALIDATION, never chosen on test
    best = max(summary["results"], key=lambda row: row["val_macro_f1"])
    assert summary["best"]["model"] == best["model"]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("open ") and last.split()[1] == str(Path("embedkit-demo") / Path(best["folder"]).relative_to(
        Path(summary["out"])) / "report.html"), last
    assert (tmp_path / last.split()[1]).read_text().startswith("<!DOCTYPE html>")

    # per model: the test set's size, the seeds' spread and the saved model's bootstrap interval
    n_test = (tmp_path / "embedkit-demo" / "data" / "labels.csv").read_text().count(",test\n")
    for row in summary["results"]:
        assert row["test_n"] == n_test and row["spread"]["macro_f1"]["n_runs"] == 2
        ci = row["interval"]["macro_f1"]
        assert ci["low"] <= row["test"]["macro_f1"] <= ci["high"]
        assert row["peak_rss_mb"] == summary["steps"][row["model"]]["peak_rss_mb"]  # its own step's peak
    assert f"test n: {n_test}" in r.stderr and "macro-F1" in r.stderr  # the table a user reads
    if sys.platform == "linux":
        assert summary["peak_rss_scope"] == "step"

    # each message once for the run, not once per model; the synthetic data's expected findings in one line
    said = [line for line in r.stderr.splitlines() if line.startswith(("groups:", "warning", "note", "leakage"))]
    assert len(said) == len(set(said)), said
    assert "leakage?" not in r.stderr and "have a near-duplicate" not in r.stderr and r.stderr.count("groups: ") == 1
    assert r.stderr.count("the synthetic pictures") == (1 if summary["messages"]["by_design"] else 0)
    folded = summary["library_warnings"]
    assert (out / "warnings.txt").is_file() == (folded["count"] > 0)
    assert "Warning:" not in r.stderr and "[transformers]" not in r.stderr, r.stderr
    assert max(map(len, r.stderr.splitlines())) <= 80 or "open " in max(r.stderr.splitlines(), key=len)
