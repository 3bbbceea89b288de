"""Did a contrastive run learn a space, or collapse? Checked after every pretrain.

A collapsed CLIP-style space maps every input of a modality to nearly one point: within-modality
cosines near 1 and retrieval at chance. A space can also be spread out and still not match images
to their texts: retrieval at chance with ordinary cosines. Nothing else tells a user (the loss still
falls), so pretrain runs this on the held-out rows (the training rows when none are held out) and
warns, saying which of the two it saw; "collapsed" in metrics.json is true for either.

Retrieval is measured among DISTINCT candidates: one pair per image (the first), so chance
R@k is k / n and a data set with several texts per image is not marked down for ties.
Thresholds (documented defaults, every one a keyword):
  max_cosine = 0.95       mean pairwise cosine within images or within texts above this: collapsed
  chance_factor = 1.5     R@1 and R@5 (each the mean of both directions) at or below 1.5x chance: collapsed
"""

from __future__ import annotations

import numpy as np

from embedkit.shared_encoder.retrieval import retrieval_metrics

MAX_COSINE = 0.95
CHANCE_FACTOR = 1.5
# What mattered on VQA-RAD (README "A shared encoder that learns on a laptop"): measured, not guessed.
# On VQA-RAD ~110 steps at lr 5e-4 stayed near chance; ~450 at 1e-3 (20 epochs) on a width-128 model learned.
ADVICE = ("what helped on VQA-RAD: more optimizer steps (epochs x pairs / batch_size; the defaults give ~500 "
          "on 1,600 pairs, --set epochs=N), lr about 1e-3, one pair per image per batch (unique_in_batch=true), "
          "a small model (the defaults: width 128, depth 4, 64 px); texts that describe their images")


def mean_pairwise_cosine(emb) -> float:
    """Mean cosine over all pairs of distinct rows (rows L2-normalised first)."""
    x = np.asarray(emb.detach().cpu() if hasattr(emb, "detach") else emb, dtype=np.float64)
    n = len(x)
    if n < 2:
        return float("nan")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = x.sum(0)
    return float((s @ s - n) / (n * (n - 1)))  # sum over i != j of x_i . x_j, without the n x n matrix


def first_per_image(image_index) -> np.ndarray:
    """Positions of the first row of each distinct image, in row order."""
    _, first = np.unique(np.asarray(image_index), return_index=True)
    return np.sort(first)


def collapse_check(img_emb, txt_emb, image_index, *, where: str = "held-out",
                   max_cosine: float = MAX_COSINE, chance_factor: float = CHANCE_FACTOR) -> dict:
    """Within-modality cosine and distinct-candidate retrieval of row-aligned embeddings.

    image_index: which image each row shows (rows sharing it are deduplicated for retrieval).
    -> a JSON-able dict with "collapsed" and the "reasons" (empty when it learned).
    """
    keep = first_per_image(image_index)
    img, txt = np.asarray(img_emb)[keep], np.asarray(txt_emb)[keep]
    out = {
        "on": where,
        "n_images": int(len(keep)),
        "image_cosine": round(mean_pairwise_cosine(img), 4),
        "text_cosine": round(mean_pairwise_cosine(txt), 4),
        "thresholds": {"max_cosine": max_cosine, "chance_factor": chance_factor},
    }
    reasons = [f"{m} embeddings are nearly identical (mean cosine {out[f'{m}_cosine']:.3f} > {max_cosine})"
               for m in ("image", "text") if out[f"{m}_cosine"] > max_cosine]
    if len(keep) >= 5:  # fewer distinct images cannot tell learning from luck
        r = retrieval_metrics(img, txt, ks=(1, 5))
        chance = {k: min(1.0, k / len(keep)) for k in (1, 5)}
        out["retrieval"] = {k: round(v, 4) for k, v in r.items() if "R@" in k and "chance" not in k}
        out["chance"] = {f"R@{k}": round(c, 4) for k, c in chance.items()}
        # Averaged over the two directions: single R@1 counts are a hit or two, too noisy alone.
        at_chance = all((r[f"i2t_R@{k}"] + r[f"t2i_R@{k}"]) / 2 <= chance_factor * chance[k] for k in (1, 5))
        if at_chance and chance[5] < 1.0 / chance_factor:  # with <8 images R@5 is near 1 for any model
            out_of = ", ".join(f"{d} R@{k} {r[f'{d}_R@{k}']:.3f}" for k in (1, 5) for d in ("i2t", "t2i"))
            reasons.append(f"retrieval is not clearly above chance ({out_of}; chance R@1 {chance[1]:.3f}, "
                           f"R@5 {chance[5]:.3f}, within {chance_factor}x)")
    out["collapsed"] = bool(reasons)
    out["reasons"] = reasons
    if reasons:
        out["advice"] = ADVICE
    return out


def warning_line(check: dict) -> str | None:
    """The one stderr line pretrain prints for a collapsed run (None when it learned)."""
    if not check.get("collapsed"):
        return None
    spread = all(not r.endswith(f"> {check['thresholds']['max_cosine']})") for r in check["reasons"])
    what = ("did not learn to match images and texts (its space is spread out, not collapsed)" if spread
            else "looks collapsed")
    noisy = (f"; only {check['n_images']} distinct {check['on']} images: a hit or two decides, --set "
             "val_fraction=0.2 measures on more" if check["n_images"] < 50 else "")
    return (f"warning: the shared encoder {what} on the {check['on']} rows: {'; '.join(check['reasons'])}{noisy}. "
            f"{check['advice']}")
