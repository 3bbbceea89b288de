"""The modality-gap report: what each alignment method does to paired image/text rows.

Centroid numbers alone mislead: a mean shift closes the centroid gap and leaves the rest of the
distribution gap (Liu et al. 2026 found a distribution-level gap predicts task quality far better,
REFERENCE.md section 5). So besides the geometry (`gap_geometry`) every method gets two
distribution-level measures of the rows as the classifier sees them: a linear probe that tries to
tell the modalities apart, and a kernel MMD^2. Each number comes with a plain-language line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedkit.errors import EmbedkitError
from embedkit.fusion.align import ALIGN_METHODS, MODALITIES, fit_aligners, gap_geometry

_PROBE_PAIRS = 2000
_MMD_PAIRS = 1000
_COLLAPSED_COSINE = 0.98

# One line each: what a number means and which way is better. Details in the docstrings below.
EXPLAIN = {
    "gap_norm": "distance between the image and the text centroid of unit-length rows (0 = the means coincide)",
    "centroid_distance": "distance between the two mean directions (0 = same, 2 = opposite; n/a when a mean is "
                         "too near 0 to have a direction)",
    "mean_pair_cosine": "cosine of each image with its own text, averaged (1 = partners point the same way)",
    "mean_within_image_cosine": "cosine between two different images, averaged (near 1 = one narrow cone)",
    "mean_within_text_cosine": "cosine between two different texts, averaged (near 1 = one narrow cone)",
    "probe_accuracy": "a linear classifier telling image from text on rows it did not train on (1 = it always can, "
                      "0.5 or below = it cannot)",
    "mmd2": "kernel MMD^2 between the image and the text rows (about 0 = one distribution, may dip below 0; sees "
            "more than the means)",
}

_METHOD_NOTES = {
    "none": "L2-normalised only",
    "shift": "published gap shift by lambda/2 x gap each way, renormalised",
    "center": "each modality minus its own training mean, renormalised (C3)",
    "standardize": "per-modality feature z-scores with training mean and std",
}


def _probe_accuracy(aligner, image: np.ndarray, text: np.ndarray, fit_mask: np.ndarray, pairs: np.ndarray,
                    seed: int) -> float | None:
    """Cross-validated accuracy of a logistic regression telling image rows (0) from text rows (1).

    Folds are made of pairs (row i of both modalities), so every fold holds as many image as text
    rows (stratified by construction) and the probe cannot recognise a sample's content instead of
    its modality. The aligner is refitted in each fold on that fold's training pairs among the fit
    rows: aligning on the test fold too would force its means to mirror the training fold's and
    push the accuracy below 0.5. Rows are divided by one global scale (RMS feature of the training
    fold) so every method meets the same regularisation without amplifying noise-level features.
    """
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold

    if len(pairs) < 4:
        return None
    scores = []
    for train, test in KFold(n_splits=min(5, len(pairs)), shuffle=True, random_state=seed).split(pairs):
        train, test = pairs[train], pairs[test]
        fit = train[fit_mask[train]]
        if len(fit) == 0:
            continue  # no fit rows in this fold's training part: nothing honest to align with
        fold = clone(aligner).fit({"image": image[fit], "text": text[fit]})
        x_train, y_train = _stacked(fold, image[train], text[train])
        x_test, y_test = _stacked(fold, image[test], text[test])
        scale = float(np.sqrt(np.mean(x_train**2))) or 1.0
        probe = LogisticRegression(max_iter=2000).fit(x_train / scale, y_train)
        scores.append(probe.score(x_test / scale, y_test))
    return float(np.mean(scores)) if scores else None


def _stacked(aligner, image: np.ndarray, text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = aligner.transform({"image": image, "text": text})
    return np.vstack([out["image"], out["text"]]).astype(np.float64), np.repeat([0, 1], len(image))


def _mmd2(image: np.ndarray, text: np.ndarray) -> float | None:
    """Unbiased RBF-kernel MMD^2; bandwidth sigma^2 = median squared distance over the pooled rows / 2."""
    from sklearn.metrics.pairwise import euclidean_distances

    m, n = len(image), len(text)
    if m < 2 or n < 2:
        return None
    z = np.vstack([image, text]).astype(np.float64)
    d2 = np.maximum(euclidean_distances(z, squared=True), 0.0)
    median = float(np.median(d2[np.triu_indices(len(z), k=1)]))
    k = np.exp(-d2 / (2.0 * median)) if median > 0 else np.ones_like(d2)  # all rows equal: no difference
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    within = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within - 2.0 * kxy.mean())


def _collapse_warnings(before: dict) -> list[dict]:
    warnings = []
    for m in MODALITIES:
        cos = before[f"mean_within_{m}_cosine"]
        if cos > _COLLAPSED_COSINE:
            warnings.append({
                "code": "collapsed", "modality": m, "mean_within_cosine": cos,
                "message": f"{m} embeddings are collapsed: two different {m}s have cosine {cos:.3f} on average "
                           f"(> {_COLLAPSED_COSINE}), so samples barely differ and the centroid numbers mostly "
                           f"measure one shared direction; try center or standardize, and check the {m} encoder "
                           f"and its pooling",
            })
    return warnings


def _json_number(v):
    return None if v is None or not np.isfinite(v) else float(v)


def gap_report(image, text, methods=ALIGN_METHODS, lambda_: float = 1.0, fit_rows=None, seed: int = 0,
               progress: bool = False) -> dict:
    """What each alignment method does to paired image/text rows, with plain-language explanations.

    Each method's aligner is fitted on `fit_rows` (indices or a boolean mask; default all rows)
    and applied to every row. Per method: the geometry of the rows scaled to unit length
    (gap_norm, centroid_distance, mean_pair_cosine, within-modality cosines) and the
    distribution-level gap of the rows as the classifier sees them: probe_accuracy (at most 2000
    pairs, the aligner refitted inside each fold, see _probe_accuracy) and mmd2 (at most 1000
    pairs); one seeded draw for every method. `warnings` flags modalities collapsed before any
    alignment. JSON-safe: a number that cannot be computed is None. progress: a bar over the methods
    (alike in cost: the probe's folds dominate each).
    """
    from embedkit.console import progress_bar

    aligners = fit_aligners(image, text, methods, lambda_, fit_rows)  # checks the rows and fit_rows
    image, text = np.asarray(image), np.asarray(text)
    n, n_fit = len(image), next(iter(aligners.values())).n_fit_rows_
    fit_mask = np.ones(n, bool)
    if fit_rows is not None:
        fit_mask[:] = False
        fit_mask[np.arange(n)[np.asarray(fit_rows)]] = True
    sample = np.random.default_rng(seed).permutation(n)[:_PROBE_PAIRS]
    per_method = {}
    with progress_bar(progress) as bar:
        task = bar.add_task("gap per method", total=len(aligners), rate="")
        for name, aligner in aligners.items():
            bar.update(task, rate=name)
            out = aligner.transform({"image": image, "text": text})
            stats = {**gap_geometry(out["image"], out["text"]),
                     "probe_accuracy": _probe_accuracy(aligner, image, text, fit_mask, sample, seed),
                     "mmd2": _mmd2(out["image"][sample[:_MMD_PAIRS]], out["text"][sample[:_MMD_PAIRS]])}
            per_method[name] = {"description": _METHOD_NOTES[name], "params": aligner.get_params(),
                                **{k: _json_number(v) for k, v in stats.items()}}
            bar.advance(task)
    return {
        "n_rows": n, "width": int(image.shape[1]), "n_fit_rows": n_fit,
        "fitted_on": f"all {n} rows" if n_fit == n else f"{n_fit} of {n} rows (fit_rows)",
        "evaluated_on": f"all {n} rows",
        "lambda": aligners["shift"].lambda_ if "shift" in aligners else None, "seed": seed,
        "methods": per_method, "explain": EXPLAIN, "warnings": _collapse_warnings(gap_geometry(image, text)),
    }


def gap_report_for_folder(emb, methods: list[str], lambda_: float | None = None, split: str | None = None,
                          out=None, progress: bool = False) -> tuple[dict, Path]:
    """`embedkit gap`: the report of an extract folder, aligners fitted on `split` rows (default all);
    writes gap.json and gap_pca.png into `out` (default: the folder). Returns (report, out)."""
    from embedkit.fusion.align import plot_gap_pca
    from embedkit.store import load_embeddings, write_json_atomic

    if not methods or any(m not in ALIGN_METHODS for m in methods):
        raise EmbedkitError(f"--align takes a comma-separated list of {', '.join(ALIGN_METHODS)} "
                            f"(got '{','.join(methods)}')")
    if lambda_ is not None and "shift" not in methods:
        raise EmbedkitError("--lambda sets the shift: add shift to --align")
    es = load_embeddings(emb, modalities=["image", "text"])
    image, text = es.embeddings["image"], es.embeddings["text"]
    n = len(es.ids)
    if n == 0:
        raise EmbedkitError(f"no sample under '{emb}' has both image and text embeddings (joined on id)")
    fit_rows, fitted_on = None, f"all {n} rows"
    if split:
        column = es.columns.get("split")
        found = sorted({str(v) for v in column if v is not None}) if column is not None else []
        fit_rows = np.array([v == split for v in column]) if column is not None else np.zeros(n, bool)
        if not fit_rows.any():
            raise EmbedkitError(f"--split {split}: no rows have split '{split}' under '{emb}' (splits found: "
                                f"{', '.join(found[:10]) or 'none'})")
        fitted_on = f"{int(fit_rows.sum())} of {n} rows (split == '{split}')"
    lam = 1.0 if lambda_ is None else lambda_
    report = gap_report(image, text, methods=methods, lambda_=lam, fit_rows=fit_rows, progress=progress)
    report.update(fitted_on=fitted_on, source=str(emb), unmatched_rows=es.unmatched)
    out = Path(out or emb)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "gap.json", report)
    plot_gap_pca(image, text, out / "gap_pca.png", aligners=fit_aligners(image, text, methods, lam, fit_rows))
    return report, out
