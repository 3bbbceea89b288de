"""Fusion classifiers on stored embeddings, their metrics and splits."""

from embedkit.fusion.estimator import FusionClassifier, LogisticBaseline, NotFittedEmbedkitError
from embedkit.fusion.evaluate import (
    InvalidInputError,
    compute_metrics,
    detect_task,
    expected_calibration_error,
    kfold_indices,
    split_indices,
    summarize_runs,
)
from embedkit.fusion.models import EarlyFusionHead, LateFusionHead

__all__ = [
    "EarlyFusionHead",
    "FusionClassifier",
    "InvalidInputError",
    "LateFusionHead",
    "LogisticBaseline",
    "NotFittedEmbedkitError",
    "compute_metrics",
    "detect_task",
    "expected_calibration_error",
    "kfold_indices",
    "split_indices",
    "summarize_runs",
]
