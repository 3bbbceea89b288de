"""The fusion heads: the reference's early and late fusion (Restrepo et al., arXiv 2406.02601), and
three that mix the modalities by more than concatenation (gated, attention, low-rank).

Every head takes the modality blocks side by side in one (n, sum(in_dims)) tensor (or a list of
blocks) and, optionally, a presence mask (n, blocks) of bools, and returns logits (n, n_out). A
missing modality is handled in one of two ways, never silently (the estimator refuses a row whose
missing modality the head never saw missing in training):
- a learned missing token (early, late, lowrank; `missing_token=True`): the block's values are
  replaced by a learned vector in the head's input space, trained on the rows that lacked it;
- the mask itself (gated, attention): a missing modality's gate or attention key is masked out.

Parameter counts (weights and biases; a missing token adds sum(d_m)), for two 512-d blocks and one
output (binary), at the estimator's defaults (tests/test_fusion_missing.py checks these numbers):
    early      H=128                                            131,585
    late       H=64 per modality                                 66,049
    gated      H=64 (gate 130 -> 128)                            82,497
    attention  H=64, 4 heads, feed-forward 128, pre-norm         99,329
    lowrank    H=64, rank 4                                      99,077
The layer order of early and late fusion (ReLU -> Dropout -> BatchNorm) is the published one, kept
so that results compare with the paper's.
"""

from __future__ import annotations

import torch
from torch import nn

HEADS_NEEDING_BLOCKS = ("late", "gated", "attention", "lowrank")  # two or more modality blocks


def _blocks(x, in_dims: list[int]) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else list(torch.split(x, in_dims, dim=1))


class _MaskedHead(nn.Module):
    """What every head shares: block widths, and the optional learned missing token."""

    def __init__(self, in_dims: list[int], missing_token: bool = False, min_blocks: int = 1):
        super().__init__()
        self.in_dims = [int(d) for d in in_dims]
        if len(self.in_dims) < min_blocks:
            raise ValueError(f"{type(self).__name__} needs at least {min_blocks} modality blocks")
        # one vector of sum(d_m): block m's slice is modality m's token; zeros = the training mean after
        # standardisation, so an untrained token starts as mean imputation
        self.missing = nn.Parameter(torch.zeros(sum(self.in_dims))) if missing_token else None

    def filled(self, x, mask) -> torch.Tensor:
        """x as one tensor, each missing block replaced by its learned token (if the head has one)."""
        if isinstance(x, (list, tuple)):
            x = torch.cat(list(x), dim=1)
        if mask is None or self.missing is None or bool(mask.all()):
            return x
        full = mask.repeat_interleave(torch.as_tensor(self.in_dims, device=mask.device), dim=1)
        return torch.where(full, x, self.missing)


class EarlyFusionHead(_MaskedHead):
    """concat(blocks) -> Linear(sum, hidden) -> ReLU -> Dropout -> BatchNorm1d -> Linear(hidden, n_out).

    With a single block this is the unimodal baseline head.
    """

    def __init__(self, in_dims: list[int], hidden: int = 128, dropout: float = 0.0, n_out: int = 1,
                 missing_token: bool = False):
        super().__init__(in_dims, missing_token)
        self.net = nn.Sequential(
            nn.Linear(sum(self.in_dims), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, n_out),
        )

    def forward(self, x, mask=None) -> torch.Tensor:
        return self.net(self.filled(x, mask))


class LateFusionHead(_MaskedHead):
    """Per block Linear(d, hidden) -> ReLU -> Dropout -> BatchNorm1d; concat -> Linear(hidden * blocks, n_out)."""

    def __init__(self, in_dims: list[int], hidden: int = 64, dropout: float = 0.0, n_out: int = 1,
                 missing_token: bool = False):
        super().__init__(in_dims, missing_token, min_blocks=2)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout), nn.BatchNorm1d(hidden))
            for d in self.in_dims
        )
        self.out = nn.Linear(hidden * len(self.in_dims), n_out)

    def forward(self, x, mask=None) -> torch.Tensor:
        blocks = _blocks(self.filled(x, mask), self.in_dims)
        return self.out(torch.cat([branch(b) for branch, b in zip(self.branches, blocks)], dim=1))


class GatedFusionHead(_MaskedHead):
    """Gated multimodal unit (Arevalo et al., 2017) for M blocks: h_m = tanh(W_m x_m); per hidden unit a
    gate over the modalities, softmax of Linear([h_1 .. h_M, mask]) with a missing modality's gate at
    -inf; out = Linear(Dropout(sum_m z_m * h_m)). With two blocks the softmax is the GMU's sigmoid gate
    z, 1 - z. The gate reads the projected h (not the raw inputs, as the GMU does), which keeps it small."""

    def __init__(self, in_dims: list[int], hidden: int = 64, dropout: float = 0.0, n_out: int = 1):
        super().__init__(in_dims, min_blocks=2)
        m = len(self.in_dims)
        self.hidden = hidden
        self.proj = nn.ModuleList(nn.Linear(d, hidden) for d in self.in_dims)
        self.gate = nn.Linear(m * hidden + m, m * hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x, mask=None) -> torch.Tensor:
        blocks = _blocks(self.filled(x, mask), self.in_dims)
        h = torch.stack([torch.tanh(p(b)) for p, b in zip(self.proj, blocks)], dim=1)  # (n, M, H)
        present = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if mask is None else mask
        logits = self.gate(torch.cat([h.flatten(1), present.to(h.dtype)], dim=1)).view_as(h)
        z = torch.softmax(logits.masked_fill(~present[:, :, None], float("-inf")), dim=1)
        return self.out(self.drop((z * h).sum(dim=1)))


class AttentionFusionHead(_MaskedHead):
    """One token per modality (Linear(d_m, H) plus a learned modality embedding), one pre-norm Transformer
    encoder layer across the tokens with missing modalities masked out as keys, mean over the present
    tokens, Linear(H, n_out)."""

    def __init__(self, in_dims: list[int], hidden: int = 64, dropout: float = 0.0, n_out: int = 1, heads: int = 4):
        super().__init__(in_dims, min_blocks=2)
        if hidden % heads:
            raise ValueError(f"attention fusion: the hidden width {hidden} must be a multiple of heads {heads}")
        self.proj = nn.ModuleList(nn.Linear(d, hidden) for d in self.in_dims)
        self.modality = nn.Parameter(0.02 * torch.randn(len(self.in_dims), hidden))
        self.layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout, batch_first=True, norm_first=True)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x, mask=None) -> torch.Tensor:
        blocks = _blocks(self.filled(x, mask), self.in_dims)
        tokens = torch.stack([p(b) for p, b in zip(self.proj, blocks)], dim=1) + self.modality  # (n, M, H)
        present = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask
        y = self.layer(tokens, src_key_padding_mask=None if mask is None else ~present)
        # where(), not a product: a masked position's output may be anything (the fused kernel leaves it)
        y = torch.where(present[:, :, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
        return self.out(y.sum(dim=1) / present.sum(dim=1, keepdim=True).to(y.dtype))


class LowRankFusionHead(_MaskedHead):
    """Low-rank multimodal fusion (Liu et al., ACL 2018): per block h_m = Dropout(ReLU(W_m x_m)) with a 1
    appended; fused = sum_r w_r prod_m (h_m F_m[r]) + b (width H), the tensor fusion of the h_m computed
    through rank-r modality factors (linear in the number of modalities); out = Linear(ReLU(fused))."""

    def __init__(self, in_dims: list[int], hidden: int = 64, dropout: float = 0.0, n_out: int = 1, rank: int = 4,
                 missing_token: bool = False):
        super().__init__(in_dims, missing_token, min_blocks=2)
        self.proj = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout))
                                  for d in self.in_dims)
        self.factors = nn.ParameterList(nn.Parameter(nn.init.xavier_normal_(torch.empty(rank, hidden + 1, hidden)))
                                        for _ in self.in_dims)
        self.rank_weight = nn.Parameter(torch.full((rank,), 1.0 / rank))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x, mask=None) -> torch.Tensor:
        blocks = _blocks(self.filled(x, mask), self.in_dims)
        fused = None
        for p, f, b in zip(self.proj, self.factors, blocks):
            h = p(b)
            h = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype, device=h.device)], dim=1)
            part = torch.einsum("nk,rkh->rnh", h, f)
            fused = part if fused is None else fused * part
        return self.out(torch.relu(torch.einsum("r,rnh->nh", self.rank_weight, fused) + self.bias))
