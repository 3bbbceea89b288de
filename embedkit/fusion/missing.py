"""Rows that lack a modality: how they are recognised, masked, and which model may take them.

A missing modality is a whole block of NaN in the model's input, as the store's outer join
(`load_embeddings(how="outer")`) writes it; a block that is only partly NaN is an error, never
guessed at. Each row's *combination* is the set of modalities it really has ("image+text",
"image", "text"), named in one order everywhere (metrics, calibration, predictions).

A fitted model takes a row that lacks modality m in exactly one of three ways, and says which:
- "stand-in": the model carries an aligner (--align); m is stood in for by the present modality
  moved across the gap fitted on training rows (predict.complete_blocks);
- "token" / "mask": a fusion head trained on rows that lacked m (in the data, or masked at random
  by modality dropout) replaces it by its learned missing token, or masks it out (gated, attention);
- None: the model never saw m missing; such rows are refused with one line, never silently.
"""

from __future__ import annotations

import numpy as np

from embedkit.fusion.evaluate import InvalidInputError

MODALITY_ORDER = ("image", "text")
# fusions that take a presence mask (the rest: unimodal heads and the logistic baseline need complete rows)
MASKED_FUSIONS = ("early", "late", "gated", "attention", "lowrank")
MASK_ONLY_HEADS = ("gated", "attention")  # a missing modality is masked out; no learned token


def presence_mask(X: np.ndarray, dims) -> np.ndarray:
    """(rows, blocks) bool: which modality blocks each row has. A missing block is all NaN; a partly NaN
    block, an infinite value or a row with no block at all is refused with one line."""
    X = np.asarray(X)
    starts = np.cumsum((0, *dims))
    mask = np.empty((len(X), len(dims)), dtype=bool)
    bad = np.isinf(X).any(axis=1)
    for j in range(len(dims)):
        nan = np.isnan(X[:, starts[j]:starts[j + 1]])
        every = nan.all(axis=1)
        bad |= nan.any(axis=1) & ~every
        mask[:, j] = ~every
    if bad.any():
        raise InvalidInputError(f"X has {int(bad.sum())} of {len(X)} rows with NaN or infinite values (a missing "
                                f"modality is a whole block of NaN); drop or impute them first")
    empty = ~mask.any(axis=1)
    if empty.any():
        raise InvalidInputError(f"X has {int(empty.sum())} of {len(X)} rows with NaN or infinite values in every "
                                f"modality block (no modality present); drop them")
    return mask


def block_presence(blocks: dict) -> dict[str, np.ndarray]:
    """modality -> bool per row: the rows whose embedding is there (finite), for a dict of blocks."""
    return {m: np.isfinite(b).all(axis=1) for m, b in blocks.items()}


def combinations(blocks: dict, modalities=MODALITY_ORDER) -> np.ndarray:
    """Each row's combination of the given modalities it has: 'image+text', 'image' or 'text' ('' for none)."""
    present = block_presence({m: blocks[m] for m in modalities if m in blocks})
    out = np.full(len(next(iter(blocks.values()))), "", dtype=object)
    for m in (m for m in MODALITY_ORDER if m in present):
        out = np.where(present[m], np.where(out == "", m, out + "+" + m), out)
    return out


def handling(est, info: dict) -> dict[str, str | None]:
    """modality -> how the fitted model takes a row that lacks it: 'stand-in', 'token', 'mask' or None."""
    modalities = list(info["modalities"])
    if info.get("alignment"):
        return {m: "stand-in" for m in MODALITY_ORDER}
    learned = getattr(est, "learned_missing_", None)
    if learned is None or len(modalities) < 2:
        return {m: None for m in modalities}
    how = "mask" if getattr(est, "fusion", None) in MASK_ONLY_HEADS else "token"
    return {m: how if ok else None for m, ok in zip(modalities, learned)}


def unhandled_rows(est, info: dict, blocks: dict) -> tuple[np.ndarray, str | None]:
    """(bool per row: the model cannot take it, one line saying why) for rows lacking one of its modalities."""
    how = handling(est, info)
    n = len(next(iter(blocks.values())))
    present = block_presence(blocks)
    needed = list(info["modalities"])
    has = {m: present.get(m, np.zeros(n, dtype=bool)) for m in set(needed) | set(present)}
    bad, why = np.zeros(n, dtype=bool), None
    for m in needed:
        lacking = ~has[m]
        if how.get(m) == "stand-in":  # a stand-in is made from the other modality
            lacking &= ~np.any([has[o] for o in MODALITY_ORDER if o != m and o in has] or [np.zeros(n, bool)], axis=0)
        elif how.get(m) is not None:
            lacking &= ~np.any([has[o] for o in needed if o != m], axis=0)  # the others carry the row
        if lacking.any():
            bad |= lacking
            maskable = info.get("kind") != "logistic" and len(needed) > 1
            why = why or (refusal(m, int(lacking.sum()), n, maskable) if how.get(m) is None else
                          f"{int(lacking.sum())} of {n} rows have none of the model's modalities ({', '.join(needed)})")
    return bad, why


def refusal(modality: str, n_rows: int, of: int, maskable: bool = True) -> str:
    fix = ("retrain with --modality-dropout P (estimator: modality_dropout=P) or on rows that lack it, or with "
           "--align for a stand-in" if maskable else
           f"retrain with a fusion that takes a presence mask ({', '.join(MASKED_FUSIONS)}) or with --align for a "
           f"stand-in")
    return (f"{n_rows} of {of} rows lack {modality}, and this model saw no row without {modality} in training, so it "
            f"has learned nothing to put in its place: {fix}")


def mask_share(blocks: dict, modality: str, rate: float, seed: int = 0, order=None) -> tuple[dict, np.ndarray]:
    """A copy of `blocks` with `modality` removed (NaN) from round(rate * eligible) rows, the eligible rows
    being those that have it and another modality. The rows masked at a lower rate are among those masked at
    a higher one (one seeded order), so a curve over rates is nested. -> (blocks, masked rows)."""
    if not 0.0 <= rate <= 1.0:
        raise InvalidInputError(f"a masking rate must lie in [0, 1], got {rate}")
    present = block_presence(blocks)
    if modality not in present:
        raise InvalidInputError(f"cannot mask {modality}: these rows have {', '.join(present)} only")
    others = [present[m] for m in present if m != modality]
    eligible = np.flatnonzero(present[modality] & (np.any(others, axis=0) if others else False))
    if order is None:
        order = np.random.default_rng(seed).permutation(len(eligible))
    masked = np.sort(eligible[order[:int(round(rate * len(eligible)))]])
    out = dict(blocks)
    out[modality] = blocks[modality].copy()
    out[modality][masked] = np.nan
    return out, masked
