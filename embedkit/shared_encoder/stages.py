"""MoMo's stage-wise training: the masked objectives, their training-only heads, and each stage's batches.

MoMo (REFERENCE.md section 3) trains one fully shared transformer in stages: images alone, then
unpaired images and texts, then pairs. A StageConfig names its data and objectives:
  data "images"   every usable training image, paired or not            -> mim
  data "unpaired" one batch of images and one of texts per step, the
                  pairs' own halves and the unpaired items together      -> mim + mlm summed, so every
                                                                            update carries both modalities
  data "pairs"    the training pairs                                     -> clip (+ mim, mlm on the same pairs)
Objectives, sized for a CPU:
  mim  SimMIM: a learned mask token replaces a share of the patch embeddings; one linear layer
       predicts the masked patches' pixels, normalised per patch (MAE), mean squared error on masked
       patches only.
  mlm  BERT: 15 % of the word pieces are picked (80 % -> [MASK], 10 % -> a random piece, 10 % kept) and
       predicted through a small transform whose output layer is the token embedding itself (tied).
The contrastive loss of a "pairs" stage sees the clean inputs, the masked objectives a masked copy:
an encoder never shown a mask token at inference should not learn its embedding from masked inputs.
TrainingHeads hold what the objectives add to the encoder; they are trained and checkpointed (for an
exact resume) but never exported into model.safetensors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from embedkit.encoders.preprocess import normalize_batch
from embedkit.errors import EmbedkitError
from embedkit.shared_encoder.config import SharedEncoderConfig
from embedkit.shared_encoder.model import SharedEncoder, clip_loss
from embedkit.shared_encoder.pretrain_config import PretrainConfig, StageConfig
from embedkit.shared_encoder.runner import image_preprocess

HEADS_PREFIX = "heads."  # the heads' tensors inside the resumable training state, never in the model folder
MASKED = ("mim", "mlm")


class TrainingHeads(nn.Module):
    """The masked objectives' extra parameters: used in training only, not part of the exported model."""

    def __init__(self, cfg: SharedEncoderConfig, objectives: set[str]):
        super().__init__()
        tw = cfg.token_width
        if "mim" in objectives:
            self.mask_token = nn.Parameter(torch.randn(1, 1, tw) * 0.02)
            self.pixel_decoder = nn.Linear(cfg.width, 3 * cfg.patch_size**2)  # SimMIM's one-layer decoder
        if "mlm" in objectives:
            self.mlm_transform = nn.Sequential(nn.Linear(cfg.width, tw), nn.GELU(), nn.LayerNorm(tw))
            self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))


def objectives_of(recipe: PretrainConfig) -> set[str]:
    return {o for s in recipe.stages for o in s.objectives}


def check_stages(plan: list[StageConfig]) -> None:
    """What a stage's data allows: the contrastive loss needs pairs (unpaired images and texts are not partners)."""
    for s in plan:
        if "clip" in s.objectives and s.data != "pairs":
            raise EmbedkitError(f"stage '{s.name}': the clip objective needs data 'pairs', not '{s.data}'")


def build_heads(cfg: SharedEncoderConfig, recipe: PretrainConfig) -> TrainingHeads | None:
    """The heads a recipe's masked objectives need, or None for a contrastive-only recipe."""
    used = objectives_of(recipe) & set(MASKED)
    return TrainingHeads(cfg, used) if used else None


# ----------------------------------------------------------------------------- batches of the banks

def pixels(images: np.ndarray, index: torch.Tensor, cfg: SharedEncoderConfig) -> torch.Tensor:
    """Normalised pixels [B, 3, S, S] of rows `index` of a uint8 image bank: every stage's images pass here."""
    return torch.from_numpy(normalize_batch([images[i] for i in index.tolist()], image_preprocess(cfg)))


def tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor):
    """Rows of a token bank, trimmed to their longest text: every stage's texts pass here."""
    mask = attention_mask[rows]
    L = int(mask.sum(1).max())  # padding shared by the whole batch: attention cost is O(L^2)
    return input_ids[rows, :L], mask[:, :L]


# ----------------------------------------------------------------------------- objectives

def patch_targets(px: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, S, S] -> [B, n_patches, 3*patch*patch], each patch normalised to mean 0, variance 1 (MAE)."""
    B, C, S, _ = px.shape
    n = S // patch
    t = px.view(B, C, n, patch, n, patch).permute(0, 2, 4, 3, 5, 1).reshape(B, n * n, patch * patch * C)
    mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
    return (t - mean) / (var + 1e-6).sqrt()


def random_patch_mask(B: int, n: int, ratio: float, g: torch.Generator) -> torch.Tensor:
    """[B, n] bool with exactly max(1, round(ratio * n)) patches masked per image, seeded by g."""
    k = max(1, round(ratio * n))
    order = torch.rand(B, n, generator=g).argsort(dim=1)
    return torch.zeros(B, n, dtype=torch.bool).scatter_(1, order[:, :k], True)


def mim_loss(model: SharedEncoder, heads: TrainingHeads, px: torch.Tensor, ratio: float,
             g: torch.Generator) -> torch.Tensor:
    cfg = model.cfg
    n = (cfg.image_size // cfg.patch_size) ** 2
    mask = random_patch_mask(len(px), n, ratio, g)
    states = model.token_states("image", px, patch_mask=mask, mask_token=heads.mask_token)
    pred = heads.pixel_decoder(states[mask])
    return F.mse_loss(pred, patch_targets(px, cfg.patch_size)[mask])


def mask_tokens(ids: torch.Tensor, attn: torch.Tensor, tok: dict, prob: float, g: torch.Generator):
    """BERT's masking -> (masked ids, labels with -100 where nothing is predicted). At least one piece
    per batch is picked, so the loss always exists. `tok`: mask_id, special_ids, n_vocab."""
    candidate = attn.bool() & ~torch.isin(ids, tok["special_ids"])
    picked = (torch.rand(ids.shape, generator=g) < prob) & candidate
    if not picked.any() and candidate.any():
        first = candidate.nonzero()[0]
        picked[first[0], first[1]] = True
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=g)
    random_ids = torch.randint(0, tok["n_vocab"], ids.shape, generator=g)
    masked = torch.where(picked & (roll < 0.8), torch.full_like(ids, tok["mask_id"]), ids)
    masked = torch.where(picked & (roll >= 0.8) & (roll < 0.9), random_ids, masked)
    return masked, labels


def mlm_loss(model: SharedEncoder, heads: TrainingHeads, ids: torch.Tensor, attn: torch.Tensor, tok: dict,
             prob: float, g: torch.Generator) -> torch.Tensor:
    masked, labels = mask_tokens(ids, attn, tok, prob, g)
    states = model.token_states("text", masked, attention_mask=attn)
    picked = labels != -100
    h = heads.mlm_transform(states[picked])
    logits = h @ model.tok_embed.weight.T + heads.mlm_bias  # tied to the input embedding (BERT)
    return F.cross_entropy(logits, labels[picked])


# ----------------------------------------------------------------------------- stages

def stage_pools(stage: StageConfig, banks: dict, train_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a stage draws from: pair rows, or rows of the image and text banks (training items only)."""
    if stage.data == "pairs":
        return {"pairs": train_rows}
    images = torch.cat([banks["pair_images"], banks["unpaired_images"]])
    if stage.data == "images":
        return {"images": images}
    return {"images": images, "texts": torch.cat([train_rows, banks["unpaired_texts"]])}


def stage_counts(stage: StageConfig, pools: dict, banks: dict) -> dict:
    """How many items of each kind a stage uses (distinct images; texts and pairs as rows)."""
    n_pairs = len(pools.get("pairs", []))
    n_img = len(pools.get("images", []))
    n_txt = len(pools.get("texts", []))
    unpaired_img = len(banks["unpaired_images"]) if "images" in pools else 0
    unpaired_txt = len(banks["unpaired_texts"]) if "texts" in pools else 0
    if stage.data == "pairs":  # the pairs' own images and texts
        n_img, n_txt = len(banks["pair_images"]), n_pairs
    return {"stage": stage.name, "data": stage.data, "objectives": list(stage.objectives), "epochs": stage.epochs,
            "pairs": n_pairs, "images": n_img, "texts": n_txt,
            "unpaired_images": unpaired_img, "unpaired_texts": unpaired_txt}


def steps_per_epoch(pools: dict, bs: int) -> int:
    """Pairs and images: one pass over the pool. Unpaired: a pass over the larger pool, the smaller cycled."""
    return max(len(p) // min(bs, len(p)) for p in pools.values() if len(p))


def stage_batches(pools: dict, bs: int, g: torch.Generator):
    """Per step a dict of index tensors ("pairs" or "images"/"texts"); the order depends only on g."""
    steps = steps_per_epoch(pools, bs)
    orders = {}
    for name, pool in pools.items():
        b = min(bs, len(pool))
        # Enough shuffled passes to fill every step; a pool the size of one epoch takes exactly one.
        passes = -(-steps * b // len(pool))
        order = torch.cat([pool[torch.randperm(len(pool), generator=g)] for _ in range(passes)])
        orders[name] = order[: steps * b].view(steps, b)
    for s in range(steps):
        yield {name: order[s] for name, order in orders.items()}


def stage_loss(model: SharedEncoder, heads: TrainingHeads | None, stage: StageConfig, batch: dict, data: dict,
               banks: dict, settings, g: torch.Generator, augment) -> torch.Tensor:
    """The loss of one step under a stage's objectives; `augment(px, g)` crops training images."""
    cfg, objectives, loss = model.cfg, set(stage.objectives), 0.0
    if "pairs" in batch:
        rows = batch["pairs"]
        px = pixels(banks["images"], data["image_index"][rows], cfg)
        ids, attn = tokens(banks["input_ids"], banks["attention_mask"], rows)
    else:
        px = pixels(banks["images"], batch["images"], cfg)
        ids, attn = tokens(banks["input_ids"], banks["attention_mask"], batch["texts"]) if "texts" in batch else (None, None)
    if settings.augment:
        px = augment(px, g)
    if "clip" in objectives:
        img, txt, scale = model(px, ids, attn)
        loss = loss + clip_loss(img, txt, scale)
    if "mim" in objectives:
        loss = loss + mim_loss(model, heads, px, settings.mim_mask_ratio, g)
    if "mlm" in objectives and ids is not None:
        loss = loss + mlm_loss(model, heads, ids, attn, banks["tok"], settings.mlm_probability, g)
    return loss
