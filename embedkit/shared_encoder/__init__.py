"""A shared image+text encoder trained by embedkit itself, and a light projection on frozen embeddings.

See REFERENCE.md sections 2-3. Extraction uses SharedEncoderRunner; training uses pretrain with a
PretrainConfig (presets: resolve_pretrain_config); project_embeddings maps frozen embeddings into one space
(linear heads or OneEncoder's universal projection) and can add a modality later.
"""

from embedkit.shared_encoder.budget import count_parameters, matched_separate_config
from embedkit.shared_encoder.config import SharedEncoderConfig
from embedkit.shared_encoder.model import SharedEncoder, clip_loss
from embedkit.shared_encoder.pretrain_config import PretrainConfig, PretrainSettings, StageConfig, resolve_pretrain_config
from embedkit.shared_encoder.retrieval import retrieval_metrics
from embedkit.shared_encoder.collapse import collapse_check
from embedkit.shared_encoder.project import (
    AddModality,
    ProjectionHeads,
    fit_added_modality,
    fit_projection,
    project_embeddings,
)
from embedkit.shared_encoder.runner import SharedEncoderRunner, load_shared_encoder, save_shared_encoder
from embedkit.shared_encoder.train import pretrain
from embedkit.shared_encoder.universal import UniversalSettings
from embedkit.shared_encoder.unpaired import Unpaired, extra_items, select_unpaired

__all__ = [
    "SharedEncoderConfig",
    "count_parameters",
    "matched_separate_config",
    "SharedEncoder",
    "clip_loss",
    "retrieval_metrics",
    "SharedEncoderRunner",
    "load_shared_encoder",
    "save_shared_encoder",
    "ProjectionHeads",
    "fit_projection",
    "pretrain",
    "Unpaired",
    "select_unpaired",
    "extra_items",
    "PretrainConfig",
    "PretrainSettings",
    "StageConfig",
    "resolve_pretrain_config",
    "collapse_check",
    "AddModality",
    "fit_added_modality",
    "project_embeddings",
    "UniversalSettings",
]
