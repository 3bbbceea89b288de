"""Fusion classifiers on stored embeddings, their metrics and splits.

Names are imported on first use, so `from embedkit.fusion import FusionClassifier` (what `predict`
needs) does not also import the metrics and splitting code with scikit-learn's heavier modules.
"""

_API = {
    "FusionClassifier": "embedkit.fusion.estimator",
    "LogisticBaseline": "embedkit.fusion.estimator",
    "NotFittedEmbedkitError": "embedkit.fusion.estimator",
    "InvalidInputError": "embedkit.fusion.evaluate",
    "compute_metrics": "embedkit.fusion.evaluate",
    "detect_task": "embedkit.fusion.evaluate",
    "expected_calibration_error": "embedkit.fusion.evaluate",
    "kfold_indices": "embedkit.fusion.evaluate",
    "split_indices": "embedkit.fusion.evaluate",
    "summarize_runs": "embedkit.fusion.evaluate",
    "EarlyFusionHead": "embedkit.fusion.models",
    "LateFusionHead": "embedkit.fusion.models",
    "GatedFusionHead": "embedkit.fusion.models",
    "AttentionFusionHead": "embedkit.fusion.models",
    "LowRankFusionHead": "embedkit.fusion.models",
}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'embedkit.fusion' has no attribute '{name}'")


__all__ = sorted(_API)
