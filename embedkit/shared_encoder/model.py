"""SharedEncoder: one transformer stack for images and text (REFERENCE.md section 2).

Shared (shared=True): every transformer block, its LayerNorms included, is one nn.Module used
for both modalities (ln_per_modality=True: MS-CLIP, each shared block keeps a LayerNorm pair per
modality; adapter_dim > 0: plus a small per-modality MLP beside the shared MLP). Modality-specific: the stems (patch conv / token embedding), positional
embeddings, CLS, the modality vector or token, optional early/late specific blocks, the final
LayerNorm and the projection into the joint space. shared=False builds two full stacks from the
same code: the separate-encoders baseline.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from embedkit.errors import EmbedkitError
from embedkit.shared_encoder.config import SharedEncoderConfig

MODALITIES = ("image", "text")


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x)) [+ adapter[modality](ln2(x))].

    modalities: build the LayerNorms once per modality (MS-CLIP) while attention and MLP stay one
    set of weights; adapter_dim > 0 adds a per-modality bottleneck MLP beside the shared MLP.
    A plain block (no modalities, no adapter) keeps the state-dict names of earlier versions.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, ln_modalities: tuple[str, ...] = (),
                 adapter_dim: int = 0):
        super().__init__()
        self.heads = heads

        def norm() -> nn.Module:
            return nn.ModuleDict({m: nn.LayerNorm(width) for m in ln_modalities}) if ln_modalities else nn.LayerNorm(width)

        self.ln1 = norm()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = norm()
        self.fc = nn.Linear(width, int(mlp_ratio * width))
        self.out = nn.Linear(int(mlp_ratio * width), width)
        self.adapter = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(width, adapter_dim), nn.GELU(), nn.Linear(adapter_dim, width))
            for m in MODALITIES
        }) if adapter_dim else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, modality: str | None = None) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = self.qkv(_norm(self.ln1, modality)(x)).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask: [B,1,1,L], True = attend
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, W))
        h = _norm(self.ln2, modality)(x)
        x = x + self.out(F.gelu(self.fc(h)))
        return x if self.adapter is None else x + self.adapter[modality](h)


def _norm(ln: nn.Module, modality: str | None) -> nn.Module:
    if not isinstance(ln, nn.ModuleDict):
        return ln
    if modality not in ln:
        raise EmbedkitError(f"this block has one LayerNorm per modality: say which ({', '.join(ln)}), got {modality}")
    return ln[modality]


class SharedEncoder(nn.Module):
    def __init__(self, cfg: SharedEncoderConfig):
        super().__init__()
        self.cfg = cfg.validate()
        if cfg.vocab_size <= 0:
            raise EmbedkitError("shared encoder config has vocab_size 0: set it to len(tokenizer) (pretrain does)")
        W, tw = cfg.width, cfg.token_width
        n_patches = (cfg.image_size // cfg.patch_size) ** 2

        # Stems. The text CLS is the [CLS] row of the token embedding: the BERT tokenizer already
        # puts it first, and the row is text-only, so it is the modality-specific text CLS.
        self.patch_embed = nn.Conv2d(3, tw, cfg.patch_size, cfg.patch_size)
        self.tok_embed = nn.Embedding(cfg.vocab_size, tw)
        self.cls_image = nn.Parameter(torch.zeros(1, 1, tw))
        self.pos_image = nn.Parameter(torch.zeros(1, 1 + n_patches, tw))
        self.pos_text = nn.Parameter(torch.zeros(1, cfg.max_text_len, tw))
        # Also built in separate mode, where it is redundant but keeps the two variants comparable.
        mod_dim = cfg.modality_dim if cfg.modality_mode == "concat" else W
        self.modality = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, mod_dim)) for m in MODALITIES})

        # Blocks: per modality the stack is early-specific + shared + late-specific. The MS-CLIP
        # options (per-modality LayerNorms, adapters) only concern shared blocks: specific ones
        # are per modality already.
        def stack(n: int, **ms_clip) -> nn.ModuleList:
            return nn.ModuleList(Block(W, cfg.heads, cfg.mlp_ratio, **ms_clip) for _ in range(n))

        if cfg.shared:
            n_early, n_late = cfg.n_specific_early, cfg.n_specific_late
            self.shared_blocks = stack(cfg.depth - n_early - n_late, adapter_dim=cfg.adapter_dim,
                                       ln_modalities=MODALITIES if cfg.ln_per_modality else ())
        else:
            n_early, n_late = cfg.depth, 0
            self.shared_blocks = stack(0)
        self.early = nn.ModuleDict({m: stack(n_early) for m in MODALITIES})
        self.late = nn.ModuleDict({m: stack(n_late) for m in MODALITIES})

        self.ln_final = nn.ModuleDict({m: nn.LayerNorm(W) for m in MODALITIES})
        self.head = nn.ModuleDict({m: nn.Linear(W, cfg.embed_dim, bias=False) for m in MODALITIES})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale_init)))
        if self.logit_scale.device.type != "meta":  # parameter counting builds on meta: skip
            self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        # A second pass: modules() yields a Block before its Linears, so scaling them in the loop above
        # was overwritten by the plain init (found in review: proj had std 0.020, not 0.0035).
        for m in self.modules():
            if isinstance(m, Block):
                # GPT-2: residual output projections scaled by depth keep the residual stream O(1).
                for lin in (m.proj, m.out):
                    nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * self.cfg.depth))
        for p in [self.cls_image, self.pos_image, self.pos_text, *self.modality.values()]:
            nn.init.normal_(p, std=0.02)
        for block in self.shared_blocks:  # after the loop above, which would re-draw them
            for branch in (block.adapter or {}).values():  # a zero branch: training starts from the shared block
                nn.init.zeros_(branch[-1].weight)

    def blocks(self, modality: str) -> list[Block]:
        """The blocks one modality runs through, in order; shared ones are the same objects."""
        return [*self.early[modality], *self.shared_blocks, *self.late[modality]]

    def _states(self, x: torch.Tensor, modality: str, mask: torch.Tensor | None):
        """x: [B, L, token_width] with CLS at 0 and positions added; mask: [B, L] bool or None.
        -> (states after the final LayerNorm, mask), both with the modality token in "token" mode."""
        B, L, _ = x.shape
        mod = self.modality[modality].expand(B, -1, -1)
        if self.cfg.modality_mode == "concat":
            x = torch.cat([x, mod.expand(B, L, -1)], dim=-1)
        elif self.cfg.modality_mode == "add":
            x = x + mod
        else:  # "token": inserted right after CLS, always attended to
            x = torch.cat([x[:, :1], mod, x[:, 1:]], dim=1)
            if mask is not None:
                mask = torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]), mask[:, 1:]], dim=1)
        attn_mask = None if mask is None else mask[:, None, None, :]
        for block in self.blocks(modality):
            x = block(x, attn_mask, modality)
        return self.ln_final[modality](x), mask

    def _encode(self, x: torch.Tensor, modality: str, mask: torch.Tensor | None) -> torch.Tensor:
        x, mask = self._states(x, modality, mask)
        if modality == "text" and self.cfg.text_pool == "mean":
            w = mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * w).sum(1) / w.sum(1).clamp(min=1)
        else:
            pooled = x[:, 0]
        return F.normalize(self.head[modality](pooled), dim=-1)

    def _image_tokens(self, pixel_values: torch.Tensor, patch_mask=None, mask_token=None) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # [B, n_patches, tw]
        if patch_mask is not None:  # SimMIM: the masked patches' embeddings become the mask token
            x = torch.where(patch_mask.unsqueeze(-1), mask_token.to(x.dtype).expand_as(x), x)
        return torch.cat([self.cls_image.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_image

    def _text_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embed(input_ids) + self.pos_text[:, : input_ids.shape[1]]

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [B, 3, image_size, image_size] normalised with mean/std 0.5 -> [B, embed_dim]."""
        return self._encode(self._image_tokens(pixel_values), "image", None)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids/attention_mask: [B, L<=max_text_len] from the tokenizer -> [B, embed_dim]."""
        return self._encode(self._text_tokens(input_ids), "text", attention_mask.bool())

    def token_states(self, modality: str, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     patch_mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """The encode path without pooling or projection, for masked objectives (stages.py).

        image: inputs = pixel_values; patch_mask [B, n_patches] bool marks patches whose embedding is
               replaced by mask_token [1, 1, token_width] -> [B, n_patches, width] (CLS left out).
        text:  inputs = input_ids (masked by the caller) with attention_mask -> [B, L, width].
        """
        if modality == "image":
            x, _ = self._states(self._image_tokens(inputs, patch_mask, mask_token), "image", None)
        else:
            x, _ = self._states(self._text_tokens(inputs), "text", attention_mask.bool())
        if self.cfg.modality_mode == "token":  # drop the inserted modality token: positions match the inputs
            x = torch.cat([x[:, :1], x[:, 2:]], dim=1)
        return x[:, 1:] if modality == "image" else x

    def forward(self, pixel_values, input_ids, attention_mask):
        scale = self.logit_scale.exp().clamp(max=self.cfg.logit_scale_max)
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask), scale


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on row-aligned pairs: each row's own partner is its only positive."""
    logits = scale * img @ txt.T
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
