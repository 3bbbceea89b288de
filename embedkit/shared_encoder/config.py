"""SharedEncoderConfig: the sizes of one shared image+text transformer (REFERENCE.md section 2).

The paper trains ViT-B/16 at 224 px, width 768, 12 layers. Those sizes would take days on a
2-core laptop and collapse on a clinic's few hundred pairs, so every default here is scaled down to
what learned on VQA-RAD (1,600 pairs, 314 images) in about a minute on 2 cores without collapsing
(examples/pretrain_defaults.py; the earlier width 256, depth 6 at 112 px collapsed after 40 minutes).
Widths, depths, image size and patch size are the knobs that cost time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from embedkit.errors import EmbedkitError

MODALITY_MODES = ("concat", "add", "token")
BUDGET_MATCHES = ("none", "total", "non_embedding")


@dataclass
class SharedEncoderConfig:
    width: int = 128  # residual width of every block (paper: 768)
    depth: int = 4  # number of transformer blocks, shared + specific (paper: 12)
    heads: int = 4  # attention heads; head dim = width / heads = 32
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * width
    image_size: int = 64  # square input side; 64 px keeps 16 patches (paper: 224)
    patch_size: int = 16  # ViT-B/16 patches -> (64/16)^2 = 16 image tokens
    max_text_len: int = 128  # BERT word pieces incl. [CLS]/[SEP] (paper's CLIP context: 77); 64 cut most notes
    embed_dim: int = 128  # shared output space (paper: 512)
    vocab_size: int = 0  # 0 = len(tokenizer), filled in when training starts
    # How a block knows which modality it is looking at (blocks are shared, so it must be told):
    # "concat": a learnable modality vector concatenated to every token; the stems then emit
    #           width - modality_dim channels (paper: 748 + 20 = 768);
    # "add":    a learnable modality vector added to every token;
    # "token":  one learnable modality token inserted in the sequence after CLS.
    modality_mode: str = "concat"
    modality_dim: int = 8  # the paper's 20 of 768, scaled to width 256 (only used by "concat")
    n_specific_early: int = 0  # modality-specific blocks at the start of the stack (ablation)
    n_specific_late: int = 0  # modality-specific blocks at the end of the stack (ablation)
    text_pool: str = "cls"  # "cls" (the [CLS] position) or "mean" over the attention mask
    logit_scale_init: float = 1 / 0.07  # CLIP's temperature init
    logit_scale_max: float = 100.0  # CLIP's cap, keeps the softmax from saturating
    tokenizer: str = "minilm"  # for training: a folder or "minilm"; a saved model uses its own copy
    shared: bool = True  # False: two separate stacks of `depth` blocks (the baseline)
    # MS-CLIP (REFERENCE.md section 3): the shared blocks keep one pair of LayerNorms per modality,
    # their attention and MLP weights stay shared. False: Roy et al., LayerNorms shared too.
    ln_per_modality: bool = False
    # MS-CLIP's light modality-specific parallel branch, here a bottleneck MLP per modality beside
    # each shared block's MLP (hidden width adapter_dim, output zero-initialised so training starts
    # from the plain shared block); 0 = none.
    adapter_dim: int = 0
    # Separate baseline only (shared=False): "total" or "non_embedding" = width/depth describe the
    # SHARED model, and training shrinks them until the two stacks have about its parameter count
    # (all parameters, or all but the token table) once the tokenizer's vocabulary is known.
    # "none" = build the two stacks at width/depth as given (what a saved, matched config says).
    match_budget: str = "none"

    @property
    def token_width(self) -> int:
        """Width the stems, CLS and positional embeddings produce before the modality is added."""
        return self.width - self.modality_dim if self.modality_mode == "concat" else self.width

    def validate(self) -> "SharedEncoderConfig":
        problems = []
        if self.modality_mode not in MODALITY_MODES:
            problems.append(f"modality_mode must be one of {', '.join(MODALITY_MODES)}")
        if self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by heads {self.heads}")
        if self.modality_mode == "concat" and not 0 < self.modality_dim < self.width:
            problems.append("modality_dim must be between 1 and width - 1")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.n_specific_early < 0 or self.n_specific_late < 0:
            problems.append("n_specific_early/late must be >= 0")
        if self.n_specific_early + self.n_specific_late > self.depth:
            problems.append("n_specific_early + n_specific_late exceeds depth")
        if self.text_pool not in ("cls", "mean"):
            problems.append("text_pool must be 'cls' or 'mean'")
        if self.adapter_dim < 0:
            problems.append("adapter_dim must be >= 0 (0 = no parallel branch)")
        if self.match_budget not in BUDGET_MATCHES:
            problems.append(f"match_budget must be one of {', '.join(BUDGET_MATCHES)}")
        elif self.match_budget != "none" and self.shared:
            problems.append("match_budget sizes the separate baseline: set shared=false with it")
        if self.max_text_len < 3:
            problems.append("max_text_len must be at least 3 ([CLS], one token, [SEP])")
        if problems:
            raise EmbedkitError("shared encoder config: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SharedEncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EmbedkitError(f"shared encoder config has unknown keys: {', '.join(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SharedEncoderConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise EmbedkitError(f"cannot read shared encoder config {path}: {type(e).__name__}") from None
