"""Cross-modal retrieval metrics for row-aligned image/text pairs (the paper's zero-shot eval).

Row i of `img_emb` and row i of `txt_emb` are one pair, and that partner is the ONLY positive:
another row with the same image (several reports of one image) or the same text (a templated
sentence) counts as a negative. Ties are broken against the query: a candidate scoring equal to
the true partner (within 1e-6) ranks ahead of it. So duplicated images or texts cannot earn
credit by luck, and the numbers are a lower bound when a data set holds duplicates; deduplicate
the evaluation rows (one pair per image) to measure retrieval among distinct candidates.
"""

from __future__ import annotations

import numpy as np

TIE_EPS = 1e-6  # float32 dot products of identical vectors can differ in the last bits


def _as_unit(x) -> np.ndarray:
    x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ranks(sim: np.ndarray) -> np.ndarray:
    """1-based rank of column i in row i of `sim`: 1 + number of other columns scoring >= it."""
    own = np.diag(sim)[:, None]
    ahead = sim >= own - TIE_EPS
    np.fill_diagonal(ahead, False)
    return 1 + ahead.sum(axis=1)


def retrieval_metrics(img_emb, txt_emb, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Recall@k and median rank, image->text and text->image, on cosine similarity.

    Keys: i2t_R@1, ..., t2i_R@10, i2t_median_rank, t2i_median_rank, n, chance_R@1.
    """
    img, txt = _as_unit(img_emb), _as_unit(txt_emb)
    if img.shape[0] != txt.shape[0]:
        raise ValueError(f"{img.shape[0]} image rows but {txt.shape[0]} text rows: pairs must be row-aligned")
    sim = img @ txt.T  # [n_images, n_texts]
    out: dict = {"n": int(img.shape[0])}
    for name, r in (("i2t", ranks(sim)), ("t2i", ranks(sim.T))):
        for k in ks:
            out[f"{name}_R@{k}"] = float(np.mean(r <= k)) if len(r) else float("nan")
        out[f"{name}_median_rank"] = float(np.median(r)) if len(r) else float("nan")
    out["chance_R@1"] = 1.0 / max(1, out["n"])
    return out


def retrieval_report(emb_dir, split: str | None = None, models: dict | None = None) -> dict:
    """Cross-modal retrieval over the rows of an extract folder joined on id (optionally one split)."""
    import numpy as np

    from embedkit.errors import EmbedkitError
    from embedkit.store import load_embeddings

    es = load_embeddings(emb_dir, modalities=["image", "text"], models=models)
    image, text = es.embeddings["image"], es.embeddings["text"]
    if image.shape[1] != text.shape[1]:
        raise EmbedkitError(f"image ({image.shape[1]}-d) and text ({text.shape[1]}-d) embeddings are not in one "
                            f"space: extract with CLIP or shared:PATH, or map them with `embedkit project`")
    rows = np.ones(len(es.ids), bool)
    if split is not None:
        rows = np.array([s == split for s in es.columns.get("split", [None] * len(es.ids))])
        if not rows.any():
            raise EmbedkitError(f"no rows with split '{split}' in '{emb_dir}'")
    return {"emb": str(emb_dir), "split": split, **retrieval_metrics(image[rows], text[rows])}
