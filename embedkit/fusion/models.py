"""The two fusion heads of the reference (Restrepo et al., arXiv 2406.02601), as executed there.

Both take the modality blocks side by side in one (n, sum(in_dims)) tensor (or a list of
blocks) and return logits (n, n_out). The layer order (ReLU -> Dropout -> BatchNorm) is the
published one, kept so that results compare with the paper's.
"""

from __future__ import annotations

import torch
from torch import nn


def _blocks(x, in_dims: list[int]) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else list(torch.split(x, in_dims, dim=1))


class EarlyFusionHead(nn.Module):
    """concat(blocks) -> Linear(sum, hidden) -> ReLU -> Dropout -> BatchNorm1d -> Linear(hidden, n_out).

    With a single block this is the unimodal baseline head.
    """

    def __init__(self, in_dims: list[int], hidden: int = 128, dropout: float = 0.0, n_out: int = 1):
        super().__init__()
        self.in_dims = [int(d) for d in in_dims]
        self.net = nn.Sequential(
            nn.Linear(sum(self.in_dims), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, n_out),
        )

    def forward(self, x) -> torch.Tensor:
        if isinstance(x, (list, tuple)):
            x = torch.cat(list(x), dim=1)
        return self.net(x)


class LateFusionHead(nn.Module):
    """Per block Linear(d, hidden) -> ReLU -> Dropout -> BatchNorm1d; concat -> Linear(hidden * blocks, n_out)."""

    def __init__(self, in_dims: list[int], hidden: int = 64, dropout: float = 0.0, n_out: int = 1):
        super().__init__()
        if len(in_dims) < 2:
            raise ValueError("LateFusionHead needs at least two modality blocks")
        self.in_dims = [int(d) for d in in_dims]
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout), nn.BatchNorm1d(hidden))
            for d in self.in_dims
        )
        self.out = nn.Linear(hidden * len(self.in_dims), n_out)

    def forward(self, x) -> torch.Tensor:
        blocks = _blocks(x, self.in_dims)
        return self.out(torch.cat([branch(b) for branch, b in zip(self.branches, blocks)], dim=1))
