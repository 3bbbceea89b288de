"""The shared encoder and the projection as users reach them: pretrain -> extract shared:PATH -> retrieval;
project two unimodal encoders into one space -> alignment works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from embedkit.store import load_embeddings, read_embedding_table

from conftest import REPO


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)


def test_pretrain_then_extract_with_shared_prefix(tmp_path, paired_folder):
    model = tmp_path / "shared"
    r = _cli("pretrain", paired_folder, "--out", model, "--width", "32", "--depth", "2", "--image-size", "32",
             "--embed-dim", "16", "--epochs", "1", "--batch-size", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
    emb = tmp_path / "emb"
    r = _cli("extract", paired_folder, "--out", emb, "--image-model", f"shared:{model}", "--text-model",
             f"shared:{model}", "--no-progress")
    assert r.returncode == 0, r.stderr
    s = load_embeddings(emb)
    assert s.embeddings["image"].shape == (8, 16) and s.embeddings["text"].shape == (8, 16)
    # the same vectors as the runner gives directly on the same preprocessed input
    from embedkit.encoders.preprocess import decode_image, normalize_batch
    from embedkit.shared_encoder import SharedEncoderRunner
    import torch

    runner = SharedEncoderRunner(model)
    t = read_embedding_table(next(emb.glob("image__*")))
    pixels = normalize_batch([decode_image(paired_folder / p, runner.preprocess) for p in t.columns["path"]],
                             runner.preprocess)
    np.testing.assert_allclose(t.embeddings, runner.embed_images(torch.from_numpy(pixels)).numpy(), atol=1e-5)
    r = _cli("retrieval", emb)
    assert r.returncode == 0 and json.loads(r.stdout)["n"] == 8
    assert json.loads((emb / "retrieval.json").read_text())["i2t_R@1"] == json.loads(r.stdout)["i2t_R@1"]


def test_project_puts_two_encoders_in_one_space(tmp_path):
    from test_train import write_embeddings

    rng = np.random.default_rng(0)
    n, latent = 300, rng.normal(size=(300, 8))
    img = latent @ rng.normal(size=(8, 24)) + 0.1 * rng.normal(size=(n, 24))
    txt = latent @ rng.normal(size=(8, 40)) + 0.1 * rng.normal(size=(n, 40))
    ids = np.array([f"i{i}" for i in range(n)], dtype=object)
    cols = {"dx": np.array(["a", "b"] * (n // 2), dtype=object),
            "split": np.array(["train"] * 200 + ["test"] * 100, dtype=object)}
    emb = tmp_path / "emb"
    write_embeddings(emb, "image", "dino", ids, img.astype(np.float32), cols)
    write_embeddings(emb, "text", "llm", ids, txt.astype(np.float32), cols)
    out = tmp_path / "proj"
    r = _cli("project", emb, "--out", out, "--dim", "16", "--epochs", "60")
    assert r.returncode == 0, r.stderr
    s = load_embeddings(out)
    assert s.embeddings["image"].shape == (300, 16) == s.embeddings["text"].shape
    assert s.provenance["image"]["projection"]["sha256"]
    r = _cli("retrieval", out, "--split", "test")
    rep = json.loads(r.stdout)
    assert rep["n"] == 100 and rep["i2t_R@5"] > 5 * rep["chance_R@1"] * 5  # far above chance on held-out rows
    # alignment now works on encoders that never shared a space
    r = _cli("train", out, "--label", "dx", "--fusion", "early", "--align-lambda", "1.0", "--out", tmp_path / "m",
             "--epochs", "3")
    assert r.returncode == 0, r.stderr
    # applying the saved heads to the same data reproduces the projection exactly
    r = _cli("project", emb, "--out", tmp_path / "again", "--heads", out / "projection")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(load_embeddings(tmp_path / "again").embeddings["text"], s.embeddings["text"], atol=1e-6)


def test_projection_is_fitted_on_training_rows_whose_group_stays_in_training():
    import numpy as np

    from embedkit.shared_encoder.project import projection_rows

    cols = {"split": np.array(["train", "train", "train", "test", None], dtype=object),
            "group": np.array(["a", "b", "c", "b", None], dtype=object)}
    assert projection_rows(cols).tolist() == [True, False, True, False, False]
    assert projection_rows({"split": np.array([None, None], dtype=object)}).tolist() == [True, True]
