"""Loading a trained shared encoder folder, and the inference wrapper extraction calls.

A model folder is self-contained: model.safetensors + config.json + the tokenizer files. No
pickle: weights are safetensors, everything else is JSON.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from embedkit.encoders.preprocess import ImagePreprocess, square_preprocess
from embedkit.errors import EmbedkitError
from embedkit.shared_encoder.config import SharedEncoderConfig
from embedkit.shared_encoder.model import SharedEncoder

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def load_tokenizer(name: str | Path):
    """A transformers tokenizer from a folder, or "minilm": the offline MiniLM package's."""
    from transformers import AutoTokenizer

    if str(name) == "minilm":  # the offline package's folder, resolved where every encoder's source is
        from embedkit.encoders.loading import source_path
        from embedkit.encoders.registry import REGISTRY

        name = source_path(REGISTRY["minilm"])
    try:
        return AutoTokenizer.from_pretrained(str(name))
    except (OSError, ValueError) as e:
        raise EmbedkitError(f"cannot load a tokenizer from {name} ({type(e).__name__})") from None


def image_preprocess(cfg: SharedEncoderConfig) -> ImagePreprocess:
    return square_preprocess(cfg.image_size)


def tokenize(tokenizer, texts: list[str], max_len: int, padding: str = "longest"):
    """-> (input_ids int64 [B, L], attention_mask int64 [B, L], number of texts cut at max_len)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding=padding, return_tensors="pt")
    if getattr(enc, "encodings", None):  # fast tokenizers keep what truncation cut off
        n_truncated = sum(bool(e.overflowing) for e in enc.encodings)
    else:
        n_truncated = sum(len(ids) > max_len for ids in tokenizer(list(texts), verbose=False)["input_ids"])
    return enc["input_ids"], enc["attention_mask"], n_truncated


def save_shared_encoder(model: SharedEncoder, tokenizer, path: str | Path) -> None:
    """Write a self-contained model folder (weights, config, tokenizer); the training state is separate."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = path / (WEIGHTS + ".tmp")
    save_file(weights, str(tmp))
    tmp.replace(path / WEIGHTS)  # a crash mid-save leaves the previous weights intact
    model.cfg.save(path / CONFIG)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def load_shared_encoder(path: str | Path):
    """-> (model in eval mode, tokenizer, cfg, ImagePreprocess) from a folder pretrain() wrote."""
    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise EmbedkitError(f"{path} is not a shared encoder folder: {name} is missing")
    cfg = SharedEncoderConfig.load(path / CONFIG)
    model = SharedEncoder(cfg)
    try:
        state = load_file(path / WEIGHTS)
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise EmbedkitError(f"cannot load {path / WEIGHTS}: {str(e).splitlines()[0][:160]}") from None
    return model.eval(), load_tokenizer(path), cfg, image_preprocess(cfg)


class SharedEncoderRunner:
    """What extraction calls: one model folder, images and texts into the same embed_dim space."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.model, self.tokenizer, self.cfg, self.preprocess = load_shared_encoder(path)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.dim = self.cfg.embed_dim

    @torch.inference_mode()
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised with self.preprocess (normalize_batch) -> float32 [B, dim], L2-normalised."""
        s = self.cfg.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise EmbedkitError(f"shared encoder expects images of shape [B, 3, {s}, {s}], got {list(pixel_values.shape)}")
        x = torch.as_tensor(pixel_values, dtype=torch.float32, device=self.device)
        return self.model.encode_image(x).float().cpu()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """-> (float32 [B, dim] L2-normalised, number of texts truncated at cfg.max_text_len)."""
        if len(texts) == 0:
            return torch.empty(0, self.dim), 0
        ids, mask, n_truncated = tokenize(self.tokenizer, texts, self.cfg.max_text_len)
        out = self.model.encode_text(ids.to(self.device), mask.to(self.device))
        return out.float().cpu(), n_truncated
