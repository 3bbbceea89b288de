"""Parameter budgets: how many parameters a config's model has, and the separate-encoders
baseline sized to match a shared model (Roy et al. compare the two at equal budgets).

The budget counts the token table, so it is only known once the tokenizer is: a config with
match_budget set (the `separate` preset) is turned into a concrete one by `resolve_budget`
when training starts, and the model folder saves that concrete config."""

from __future__ import annotations

from dataclasses import replace

import torch

from embedkit.errors import EmbedkitError
from embedkit.shared_encoder.config import SharedEncoderConfig
from embedkit.shared_encoder.model import SharedEncoder


def count_parameters(cfg: SharedEncoderConfig, exclude_token_embedding: bool = False) -> int:
    """Parameters of the model `cfg` describes, counted on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = SharedEncoder(cfg)
    n = sum(p.numel() for p in model.parameters())
    if exclude_token_embedding:
        n -= model.tok_embed.weight.numel()
    return n


def matched_separate_config(
    cfg: SharedEncoderConfig, exclude_token_embedding: bool = False, tolerance: float = 0.10
) -> SharedEncoderConfig:
    """The separate-encoders baseline with (about) the shared model's parameter budget.

    Two stacks cost about twice the block parameters, so the baseline gets narrower blocks
    (widths in steps of 2*heads, keeping the head dim even) and, only if no width comes within
    5 %, fewer blocks: the deepest shape within 5 % wins, else the closest within `tolerance`.
    With exclude_token_embedding=True the vocab table is left out of the budget: it is large
    (30522 x width) but costs no compute, and counting it lets the baseline keep almost the
    full width in both stacks.
    """
    cfg.validate()
    target = count_parameters(cfg, exclude_token_embedding)
    best = None
    step = 2 * cfg.heads
    min_width = step * 4 + (cfg.modality_dim if cfg.modality_mode == "concat" else 0)
    for depth in range(cfg.depth, 0, -1):
        for width in range(cfg.width, min_width - 1, -step):
            cand = replace(cfg, width=width, depth=depth, shared=False, n_specific_early=0, n_specific_late=0,
                           ln_per_modality=False, adapter_dim=0, match_budget="none")
            n = count_parameters(cand, exclude_token_embedding)
            err = abs(n - target) / target
            if best is None or err < best[0]:
                best = (err, cand)
            if n < target:  # narrower only drifts further below the budget
                break
        if best[0] <= 0.05:
            return best[1]
    if best[0] > tolerance:
        raise EmbedkitError(f"no separate-encoder shape within {tolerance:.0%} of the shared budget")
    return best[1]


def resolve_budget(cfg: SharedEncoderConfig, vocab_size: int) -> SharedEncoderConfig:
    """The config to build once the vocabulary is known: vocab_size filled in (if 0) and, when
    match_budget asks for it, the separate baseline shrunk to the budget of the shared model that
    width/depth (and the other fields) describe. Concrete configs come back unchanged but for vocab_size."""
    if vocab_size <= 0:
        raise EmbedkitError("resolve_budget needs the tokenizer's vocabulary size")
    if cfg.vocab_size == 0:
        cfg = replace(cfg, vocab_size=vocab_size)
    if cfg.match_budget == "none":
        return cfg.validate()
    reference = replace(cfg, shared=True, match_budget="none")
    return matched_separate_config(reference, exclude_token_embedding=cfg.match_budget == "non_embedding")
