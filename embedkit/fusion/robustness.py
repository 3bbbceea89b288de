"""How a model holds up as a modality goes missing: the robustness curve of `evaluate --drop-modality`.

At each rate r the modality is removed (its block set to NaN, as the store's outer join leaves a
missing modality) from round(r * eligible) of the rows, the eligible rows being those that have it
and another modality; the rows masked at a lower rate are among those masked at a higher one (one
seeded order, missing.mask_share), so the curve is nested and its points differ only by masking.
The model as trained then takes those rows its own way (learned token, masking or the aligner's
stand-in) or refuses them, and the point says so instead of holding a number. Macro-F1, accuracy
and ECE come with bootstrap intervals over the same resampled groups at every rate.
"""

from __future__ import annotations

import numpy as np

from embedkit.errors import EmbedkitError
from embedkit.fusion.evaluate import InvalidInputError, bootstrap_metrics, compute_metrics
from embedkit.fusion.missing import MODALITY_ORDER, mask_share

DEFAULT_RATES = (0.0, 0.25, 0.5, 0.75, 1.0)


def parse_rates(text: str | None) -> list[float]:
    """'0,0.25,0.5' -> [0.0, 0.25, 0.5]: shares in [0, 1], ascending, each once."""
    if text is None or not str(text).strip():
        return list(DEFAULT_RATES)
    try:
        rates = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InvalidInputError(f"--rates wants comma-separated shares in [0, 1], e.g. 0,0.25,0.5 (got '{text}')") \
            from None
    if not rates or any(not 0.0 <= r <= 1.0 for r in rates):
        raise InvalidInputError(f"--rates wants shares in [0, 1], got '{text}'")
    return sorted(set(rates))


def robustness_curve(score, blocks: dict, y_true, classes, task: str, threshold: float, modality: str,
                     rates=DEFAULT_RATES, groups=None, n_resamples: int = 1000, seed: int = 0) -> dict:
    """score(blocks) -> calibrated probabilities of every row (raising EmbedkitError when the model refuses
    rows); -> {"modality", "rows", "eligible_rows", "seed", "points": [{"rate", "rows_masked", "macro_f1",
    "accuracy", "ece", "intervals" | "refused"}], "what"}."""
    if modality not in MODALITY_ORDER:
        raise InvalidInputError(f"--drop-modality must be image or text, got '{modality}'")
    if modality not in blocks:
        raise InvalidInputError(f"--drop-modality {modality}: the model takes {', '.join(blocks)} only")
    points = []
    for rate in rates:
        masked_blocks, masked = mask_share(blocks, modality, float(rate), seed)
        point = {"rate": float(rate), "rows_masked": int(len(masked))}
        try:
            proba = score(masked_blocks)
        except EmbedkitError as e:
            points.append({**point, "refused": str(e)})
            continue
        m = compute_metrics(y_true, proba, classes, task, threshold)
        point.update({k: m[k] for k in ("macro_f1", "accuracy", "ece")})
        if n_resamples:
            b = bootstrap_metrics(y_true, proba, classes, task, threshold, groups, n_resamples=n_resamples, seed=seed)
            point["intervals"] = {k: {"low": b["metrics"][k]["low"], "high": b["metrics"][k]["high"]}
                                  for k in ("macro_f1", "accuracy", "ece")}
            point["interval_unit"] = b["unit"]
        points.append(point)
    _, every = mask_share(blocks, modality, 1.0, seed)
    return {"modality": modality, "rows": int(len(np.asarray(y_true))), "eligible_rows": int(len(every)),
            "seed": seed, "n_resamples": n_resamples, "points": points,
            "what": (f"{modality} removed from a share of the rows that have it and another modality (nested, "
                     f"seed {seed}); the model as trained takes them or refuses; 95% bootstrap intervals over "
                     f"the same resampled {'groups' if groups is not None else 'rows'} at every rate")}
