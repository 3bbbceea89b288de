"""OneEncoder's universal projection (REFERENCE.md section 3): one light transformer over frozen embeddings.

Each modality's frozen embedding goes through its own linear adapter into `n_tokens` tokens of
width `width`; a learnable modality token is put in front, and the same small transformer (shared
blocks, final LayerNorm, output linear) runs for every modality. The modality token's output is the
embedding. A modality added later gets only a new adapter and token: everything shared stays as it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from embedkit.errors import EmbedkitError
from embedkit.shared_encoder.model import Block


@dataclass
class UniversalSettings:
    width: int = 128  # token width inside the projection
    n_tokens: int = 4  # tokens each frozen embedding is split into by its adapter
    depth: int = 1  # shared transformer blocks
    heads: int = 4  # attention heads; must divide width
    mlp_ratio: float = 2.0  # MLP hidden width / width

    def validate(self) -> "UniversalSettings":
        if min(self.width, self.n_tokens, self.depth, self.heads) < 1 or self.mlp_ratio <= 0:
            raise EmbedkitError(f"universal projection settings must be positive, got {asdict(self)}")
        if self.width % self.heads:
            raise EmbedkitError(f"universal projection width {self.width} is not divisible by heads {self.heads}")
        return self


class UniversalProjection(nn.Module):
    """Frozen embedding [B, d_in] of modality m -> [B, dim] (not normalised; the caller does that)."""

    def __init__(self, settings: UniversalSettings, dim: int):
        super().__init__()
        self.settings = settings.validate()
        s = settings
        self.adapters = nn.ModuleDict()
        self.tokens = nn.ParameterDict()
        self.blocks = nn.ModuleList(Block(s.width, s.heads, s.mlp_ratio) for _ in range(s.depth))
        self.ln = nn.LayerNorm(s.width)
        self.out = nn.Linear(s.width, dim)

    def add_modality(self, name: str, d_in: int) -> list[nn.Parameter]:
        """A new adapter and modality token; returns their parameters (the only ones a later modality trains)."""
        s = self.settings
        self.adapters[name] = nn.Linear(d_in, s.n_tokens * s.width)
        self.tokens[name] = nn.Parameter(0.02 * torch.randn(1, 1, s.width))
        return [*self.adapters[name].parameters(), self.tokens[name]]

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        B, s = x.shape[0], self.settings
        # The adapter's n_tokens slices are distinct linear maps, so tokens need no positional embedding.
        h = torch.cat([self.tokens[modality].expand(B, -1, -1), self.adapters[modality](x).view(B, s.n_tokens, s.width)], 1)
        for block in self.blocks:
            h = block(h)
        return self.out(self.ln(h[:, 0]))
