"""Label-noise candidates: rows whose label disagrees with what the other rows predict for them.

Confident learning (Northcutt et al., JAIR 2021) through cleanlab (`cleanlab.filter.find_label_issues`,
pruned by noise rate): it needs out-of-fold predicted probabilities, made here by a logistic
regression on each modality's standardised embeddings (reduced to at most 64 principal components,
fitted without labels), with folds that keep a group (a patient, a near-duplicate cluster) in one
fold: a duplicated row would otherwise vouch for its own label. A candidate is a row to look at
again, never one to drop unread: relabelling only the rows a model disagrees with biases a test set
towards that model.
"""

from __future__ import annotations

import numpy as np

MAX_COMPONENTS = 64
WEAK_MODEL = 0.8  # out-of-fold balanced accuracy below which the candidates are said to be unreliable


def features(blocks: dict[str, np.ndarray], seed: int = 0) -> np.ndarray:
    """Each modality standardised and reduced to <= MAX_COMPONENTS principal components (no labels used);
    rows that lack a modality (NaN) get its mean, i.e. zeros."""
    from sklearn.decomposition import PCA

    parts = []
    for x in blocks.values():
        x = np.asarray(x, dtype=np.float32)
        has = np.isfinite(x).all(axis=1)
        z = np.zeros((len(x), 0), dtype=np.float32)
        if has.sum() >= 2:
            mean, std = x[has].mean(axis=0), x[has].std(axis=0) + 1e-6
            s = (x[has] - mean) / std
            k = min(MAX_COMPONENTS, s.shape[1], int(has.sum()) - 1)
            if k < s.shape[1]:
                s = PCA(k, svd_solver="covariance_eigh").fit_transform(s)  # n >> d: one d x d eigh
            z = np.zeros((len(x), s.shape[1]), dtype=np.float32)
            z[has] = s / (np.sqrt((s ** 2).sum(axis=1).mean()) + 1e-6) * np.sqrt(s.shape[1])
        parts.append(z)
    return np.concatenate(parts, axis=1)


def out_of_fold_proba(x: np.ndarray, y: np.ndarray, groups=None, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Probabilities of each row from a logistic regression that never saw the row (or its group)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict

    cv = (StratifiedGroupKFold(folds, shuffle=True, random_state=seed) if groups is not None
          else StratifiedKFold(folds, shuffle=True, random_state=seed))
    model = LogisticRegression(C=0.1, max_iter=500)
    return cross_val_predict(model, x, y, cv=cv, groups=groups, method="predict_proba")


def label_noise_candidates(blocks: dict[str, np.ndarray], labels, groups=None, folds: int = 5, seed: int = 0) -> dict:
    """-> {"rows": positions, "self_confidence": P(given label), "predicted": class index, "classes": names,
    "skipped": {class: rows}} for rows whose label looks wrong, most suspicious first.

    labels: one label per row (None: left out). Classes with fewer rows than folds are left out (named)."""
    from cleanlab.filter import find_label_issues

    labels = np.asarray(labels, dtype=object)
    keys, counts = np.unique(np.array([str(v) for v in labels if v is not None]), return_counts=True)
    small = {str(k): int(c) for k, c in zip(keys, counts) if c < folds}
    kept_classes = [k for k in keys.tolist() if k not in small]
    rows = np.array([i for i, v in enumerate(labels) if v is not None and str(v) in kept_classes], dtype=np.int64)
    out = {"rows": np.zeros(0, np.int64), "self_confidence": np.zeros(0), "predicted": np.zeros(0, np.int64),
           "classes": kept_classes, "skipped": small, "n_scored": int(len(rows))}
    if len(kept_classes) < 2:
        out["note"] = "fewer than two classes with enough rows"
        return out
    code = {c: k for k, c in enumerate(kept_classes)}
    y = np.array([code[str(labels[i])] for i in rows])
    g = None
    if groups is not None:
        g = np.array([str(v) if v is not None else f"row:{i}" for i, v in zip(rows, np.asarray(groups)[rows])])
        if len(set(g.tolist())) < folds:
            g = None
    x = features({m: b[rows] for m, b in blocks.items()}, seed)
    proba = out_of_fold_proba(x, y, g, folds, seed)
    ranked = find_label_issues(y, proba, return_indices_ranked_by="self_confidence", n_jobs=1)
    out.update(rows=rows[ranked], self_confidence=proba[ranked, y[ranked]], predicted=proba[ranked].argmax(axis=1))
    # how well the rows predict each other's labels: with a weak model most "issues" are what the embeddings
    # cannot tell apart, not wrong labels
    recall = [float((proba[y == c].argmax(axis=1) == c).mean()) for c in range(len(kept_classes))]
    out["out_of_fold_balanced_accuracy"] = float(np.mean(recall))
    if out["out_of_fold_balanced_accuracy"] < WEAK_MODEL:
        out["note"] = (f"the out-of-fold model is weak (balanced accuracy {np.mean(recall):.2f}): most candidates are "
                       f"rows the embeddings cannot tell apart, not wrong labels; read the list from the top")
    return out
