"""OneEncoder: the universal projection (`project --arch up`) and a modality added later to a frozen projection.

Data: embeddings with known structure (a shared latent seen through different random maps and noise),
written through the real store where a folder is needed; models go through the real save/load code.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from embedkit.errors import EmbedkitError
from embedkit.shared_encoder.project import (
    WEIGHTS,
    AddModality,
    ProjectionHeads,
    fit_added_modality,
    fit_projection,
    project_embeddings,
)
from embedkit.shared_encoder.universal import UniversalSettings
from embedkit.store import load_embeddings

from conftest import REPO
from test_train import write_embeddings

TINY_UP = UniversalSettings(width=32, n_tokens=2, depth=1, heads=2, mlp_ratio=2.0)


def _views(n: int, seed: int = 0, widths=(24, 40, 12), noise=0.3):
    """Three modalities of the same n items: one 6-d latent through a random map per modality, plus noise."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 6))
    return [(latent @ rng.normal(size=(6, w)) + noise * rng.normal(size=(n, w))).astype(np.float32) for w in widths]


def test_up_learns_a_toy_alignment_and_round_trips(tmp_path):
    image, text, _ = _views(400)
    heads, m = fit_projection(image, text, dim=16, epochs=30, lr=2e-3, seed=0, val_fraction=0.25, arch="up", up=TINY_UP)
    r = m["val_retrieval"]
    assert m["config"]["arch"] == "up" and r["n"] == 100
    assert r["i2t_R@1"] > 10 * r["chance_R@1"] and r["t2i_R@1"] > 10 * r["chance_R@1"]
    # The held-out rows are only evaluated: the input standardisation saw the other rows only.
    fitted = np.setdiff1d(np.arange(400), m["val_rows"])
    assert len(fitted) == m["n_train"] == 300
    np.testing.assert_allclose(heads.net.image_mean.numpy(), image[fitted].mean(0), rtol=1e-4, atol=1e-5)
    # A shuffled pairing carries no signal: held-out retrieval stays near chance.
    _, m0 = fit_projection(image, np.random.default_rng(1).permutation(text), dim=16, epochs=30, lr=2e-3, seed=0,
                           val_fraction=0.25, arch="up", up=TINY_UP)
    assert m0["val_retrieval"]["i2t_R@1"] < 0.06

    heads.save(tmp_path / "up")
    loaded = ProjectionHeads.load(tmp_path / "up")
    assert loaded.config == heads.config and loaded.config["up"]["width"] == 32
    a, b = heads.apply(image=image[:7], text=text[:7]), loaded.apply(image=image[:7], text=text[:7])
    assert a[0].shape == (7, 16) and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.allclose(np.linalg.norm(a[0], axis=1), 1.0, atol=1e-5)
    # The modality token is what tells the shared transformer which modality it reads.
    assert set(dict(heads.net.named_parameters())) >= {"up.tokens.image", "up.tokens.text", "up.blocks.0.qkv.weight"}


@pytest.mark.parametrize("arch", ["up", "linear"])
def test_added_modality_learns_and_leaves_the_frozen_projection_bit_identical(tmp_path, arch):
    image, text, meta = _views(400, seed=2)
    base, _ = fit_projection(image[:300], text[:300], dim=16, epochs=25, lr=2e-3, seed=0, arch=arch, up=TINY_UP)
    base.save(tmp_path / "base")
    frozen = ProjectionHeads.load(tmp_path / "base")
    grown, m = fit_added_modality(frozen, "meta", meta, text, "text", epochs=40, lr=3e-3, seed=0, val_fraction=0.25)
    r = m["val_retrieval"]
    assert m["partner"] == "text" and r["n"] == 100 and r["i2t_R@1"] > 10 * r["chance_R@1"]
    fitted = np.setdiff1d(np.arange(400), m["val_rows"])
    np.testing.assert_allclose(grown.net.meta_mean.numpy(), meta[fitted].mean(0), rtol=1e-4, atol=1e-5)
    assert 0 < m["trained_parameters"] < m["frozen_parameters"] if arch == "up" else m["trained_parameters"] > 0
    grown.save(tmp_path / "grown")
    before, after = load_file(tmp_path / "base" / WEIGHTS), load_file(tmp_path / "grown" / WEIGHTS)
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    assert {k for k in after if k not in before} and all("meta" in k for k in after if k not in before)
    reloaded = ProjectionHeads.load(tmp_path / "grown")
    assert reloaded.modalities == ["image", "text", "meta"]
    assert np.array_equal(reloaded.transform(image[:5], "image"), frozen.transform(image[:5], "image"))
    assert np.array_equal(reloaded.transform(meta[:5], "meta"), grown.transform(meta[:5], "meta"))
    # the input is not modified: the frozen heads still know two modalities only
    assert frozen.modalities == ["image", "text"]


def _folders(tmp_path, n=240, offset_held_out=1000.0):
    """EMB (image + text) and EMB2 (a second text table, 'metadata sentences') for the same ids, with a
    train/test split and groups of two rows. Test rows, and train rows whose group also has a test row,
    carry a huge offset: if one of them reached a fit, the fitted input means would show it."""
    image, text, meta = _views(n, seed=3)
    ids = np.array([f"r{i:03d}" for i in range(n)], dtype=object)
    split = np.array(["train"] * (n - 60) + ["test"] * 60, dtype=object)
    group = np.array([f"g{i // 2}" for i in range(n)], dtype=object)
    group[n - 61] = group[n - 60]  # a train row sharing its group with a test row: never fitted on
    cols = {"split": split, "group": group}
    kept_out = (split == "test") | (group == group[n - 60])
    for x in (image, text, meta):
        x[kept_out] += offset_held_out
    emb, emb2 = tmp_path / "emb", tmp_path / "emb2"
    write_embeddings(emb, "image", "imgenc", ids, image, cols)
    write_embeddings(emb, "text", "txtenc", ids, text, cols)
    write_embeddings(emb2, "text", "metaenc", ids[::-1], meta[::-1].copy(), {k: v[::-1] for k, v in cols.items()})
    return emb, emb2, kept_out


def test_project_up_then_add_modality_end_to_end(tmp_path):
    emb, emb2, kept_out = _folders(tmp_path)
    out = tmp_path / "p"
    r = project_embeddings(emb, out, dim=16, epochs=25, arch="up", up=TINY_UP)
    assert r["arch"] == "up" and r["fit"]["n_train"] + r["fit"]["n_val"] == int((~kept_out).sum())
    ids = np.array([f"r{i:03d}" for i in range(240)])
    assert r["fit"]["val_ids"] and set(r["fit"]["val_ids"]) <= set(ids[~kept_out])
    # groups (two rows each) are held out whole: no group is on both sides of the fit's held-out split
    group = {i: f"g{int(i[1:]) // 2}" for i in ids}
    val_groups = {group[i] for i in r["fit"]["val_ids"]}
    assert not val_groups & {group[i] for i in ids[~kept_out] if i not in set(r["fit"]["val_ids"])}
    heads = ProjectionHeads.load(out / "projection")
    # Held-out rows never reach a fit: the input means were fitted without the offset rows.
    for m in ("image", "text"):
        assert np.abs(getattr(heads.net, f"{m}_mean").numpy()).max() < 20

    out2 = tmp_path / "p2"
    r2 = project_embeddings(emb, out2, heads_dir=out / "projection", epochs=40,
                            add=AddModality("meta", emb2, partner=None))
    added = r2["added"]
    assert added["trained"] and added["partner"] == "image"  # both join all rows; ties go to image
    assert added["fit"]["n_train"] + added["fit"]["n_val"] == int((~kept_out).sum())
    assert added["fit"]["val_ids"] and set(added["fit"]["val_ids"]) <= set(ids[~kept_out])
    assert np.abs(ProjectionHeads.load(out2 / "projection").net.meta_mean.numpy()).max() < 20
    held = added["fit"]["val_retrieval"]
    assert held["i2t_R@1"] > 5 * held["chance_R@1"]
    before, after = load_file(out / "projection" / WEIGHTS), load_file(out2 / "projection" / WEIGHTS)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert (out2 / "projection" / "metrics.json").is_file()
    s = load_embeddings(out2, modalities=["image", "text", "meta"])
    assert {m: v.shape for m, v in s.embeddings.items()} == {m: (240, 16) for m in ("image", "text", "meta")}
    assert s.provenance["meta"]["name"] == "metaenc+proj" and s.provenance["meta"]["projection"]["sha256"]
    # image and text are projected exactly as the frozen projection does it
    np.testing.assert_array_equal(s.embeddings["image"], load_embeddings(out, ["image"]).embeddings["image"])

    # applying the 3-modality projection to the same data reproduces the new modality, training nothing
    r3 = project_embeddings(emb, tmp_path / "p3", heads_dir=out2 / "projection", add=AddModality("meta", emb2))
    assert not r3["added"]["trained"] and r3["fit"] == {}
    np.testing.assert_array_equal(load_embeddings(tmp_path / "p3", ["meta"]).embeddings["meta"],
                                  load_embeddings(out2, ["meta"]).embeddings["meta"])


def test_bad_inputs_are_refused_with_a_reason(tmp_path):
    emb, emb2, _ = _folders(tmp_path, offset_held_out=0.0)
    project_embeddings(emb, tmp_path / "p", dim=8, epochs=2)
    heads_dir = tmp_path / "p" / "projection"
    heads = ProjectionHeads.load(heads_dir)
    x = np.zeros((4, 12), np.float32)
    cases = [
        (lambda: heads.transform(x, "audio"), "no 'audio' modality"),
        (lambda: fit_added_modality(heads, "meta", x, x, "audio"), "partner 'audio'"),
        (lambda: fit_added_modality(heads, "meta", x, x, "text"), "width 40"),  # partner from another encoder
        (lambda: fit_added_modality(heads, "Meta__x", x, np.zeros((4, 40), np.float32), "text"), "modality name"),
        (lambda: fit_added_modality(heads, "text", x, np.zeros((4, 40), np.float32), "text"), "already has"),
        (lambda: fit_projection(x, x, arch="mlp"), "unknown projection arch"),
        (lambda: project_embeddings(emb, tmp_path / "q", add=AddModality("meta", emb2)), "needs --heads"),
        (lambda: project_embeddings(emb, tmp_path / "q", heads_dir=heads_dir,
                                    add=AddModality("meta", emb2, partner="audio")), "--partner"),
        (lambda: project_embeddings(emb, tmp_path / "q", heads_dir=heads_dir, add=AddModality("meta", emb)),
         "--add-source"),  # EMB holds two tables
    ]
    for call, message in cases:
        with pytest.raises(EmbedkitError, match=message):
            call()
    # EMB2 describing other items: nothing joins
    other = tmp_path / "other"
    write_embeddings(other, "text", "metaenc", np.array(["zz1", "zz2"], dtype=object), x[:2], {})
    with pytest.raises(EmbedkitError, match="no id of"):
        project_embeddings(emb, tmp_path / "q", heads_dir=heads_dir, add=AddModality("meta", other))
    # through the CLI: one `error:` line, exit 2, no traceback, nothing on stdout
    r = subprocess.run([sys.executable, "-m", "embedkit.cli", "project", str(emb), "--out", str(tmp_path / "q"),
                        "--heads", str(heads_dir), "--add-modality", "meta", str(other)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
