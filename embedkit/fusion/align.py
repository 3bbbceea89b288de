"""Modality-gap alignment: shift image and text embeddings toward each other along the gap.

Contrastive encoders put image and text embeddings in two narrow cones; the difference of
their means is the "modality gap". The published method:

1. L2-normalise every image and every text row;
2. gap = mean(image) - mean(text);
3. text' = text + (lambda/2) gap,  image' = image - (lambda/2) gap;
4. L2-normalise again.

lambda = 1 makes the two means (before step 4) equal, 0 leaves the rows where they are (only
normalised), lambda < 0 widens the gap.

Where we differ from the published code, on purpose:
- The gap is estimated by `GapShift.fit` on the rows it is given, which must be the training
  split only; transform never computes statistics from the rows it shifts. The published
  code pooled train and test rows (transductive: test data leaked into the features).
- Embeddings of different widths (e.g. 768 vs 4096) are refused. The published code
  resampled one vector to the other's length by 1-D interpolation, which pairs unrelated
  coordinates; only a shared space (or a learned projection) makes the gap meaningful.
- The paper's Gaussian noise injection never existed in its code and is not implemented here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedkit.errors import EmbedkitError

_EPS = 1e-12  # same eps as torch.nn.functional.normalize, so numpy and torch paths agree
_MAX_PLOT_POINTS = 2000


def l2_normalize(x) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero instead of becoming NaN.

    Norms are taken in float64 so large float32 values cannot overflow; the result keeps the
    input's float dtype (integers become float32).
    """
    x = np.asarray(x)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    x64 = x.astype(np.float64)
    norms = np.linalg.norm(x64, axis=-1, keepdims=True)
    return (x64 / np.maximum(norms, _EPS)).astype(dtype)


def _rows(x, name: str) -> np.ndarray:
    """A finite float32 (rows, width) matrix, or a one-line error naming `name`."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise EmbedkitError(f"{name} embeddings must be a non-empty 2-D array (rows, width), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise EmbedkitError(f"{name} embeddings contain NaN or infinite values")
    return x


def _check_widths(image_width: int, text_width: int) -> None:
    if image_width != text_width:
        raise EmbedkitError(
            f"image embeddings are {image_width}-d but text embeddings are {text_width}-d: the modality gap "
            "needs one shared space; embed both with a shared-space encoder (CLIP, or embedkit's shared "
            "encoder shared:PATH) or learn a projection with `embedkit project`"
        )


def _gap(image_n: np.ndarray, text_n: np.ndarray) -> np.ndarray:
    return (image_n.mean(axis=0, dtype=np.float64) - text_n.mean(axis=0, dtype=np.float64)).astype(np.float32)


def _shift(x_n: np.ndarray, gap: np.ndarray, step: float) -> np.ndarray:
    """Normalised rows moved by `step * gap`, then renormalised (steps 3 and 4)."""
    return l2_normalize(x_n.astype(np.float64) + step * gap.astype(np.float64)).astype(np.float32)


def _lambda(value) -> float:
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise EmbedkitError(f"lambda must be a number, got {value!r}") from None
    if not np.isfinite(lam):
        raise EmbedkitError(f"lambda must be finite, got {value!r}")
    return lam


class GapShift:
    """Fit the modality gap on training rows; shift any rows (train, validation, test) by it.

    lambda_ = 0 switches the shift off but transform still L2-normalises, so every lambda in a
    grid sees the same preprocessing.

    Fitted attributes: `gap_`, `image_mean_`, `text_mean_` (float32 vectors, means of the
    normalised rows) and `n_fit_rows_`.
    """

    def __init__(self, lambda_: float = 0.0):
        self.lambda_ = lambda_

    def __repr__(self) -> str:
        return f"GapShift(lambda_={self.lambda_!r})"

    def fit(self, image, text) -> "GapShift":
        """Estimate the gap from the TRAINING rows only, each row present in both modalities.

        Rows must be paired (joined on id): a gap from image rows and text rows of different
        samples would also contain the difference between those samples.
        """
        _lambda(self.lambda_)
        image, text = _rows(image, "image"), _rows(text, "text")
        _check_widths(image.shape[1], text.shape[1])
        if image.shape[0] != text.shape[0]:
            raise EmbedkitError(
                f"fit needs the same training rows in both modalities (joined on id), got {image.shape[0]} "
                f"image rows and {text.shape[0]} text rows"
            )
        image_n, text_n = l2_normalize(image), l2_normalize(text)
        self.image_mean_ = image_n.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.text_mean_ = text_n.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.gap_ = _gap(image_n, text_n)
        self.n_fit_rows_ = int(image.shape[0])
        return self

    def transform(self, image=None, text=None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(image', text') as float32; pass None for a modality a row set does not have.

        Row-wise only: the result for a row never depends on the other rows passed.
        """
        gap = self._fitted_gap()
        step = _lambda(self.lambda_) / 2.0
        out = []
        for x, name, sign in ((image, "image", -1.0), (text, "text", 1.0)):
            if x is None:
                out.append(None)
                continue
            x = _rows(x, name)
            if x.shape[1] != gap.shape[0]:
                raise EmbedkitError(
                    f"{name} embeddings are {x.shape[1]}-d but the gap was fitted on {gap.shape[0]}-d embeddings"
                )
            out.append(_shift(l2_normalize(x), gap, sign * step))
        return out[0], out[1]

    def with_lambda(self, lambda_: float) -> "GapShift":
        """A copy with another lambda and the same fitted gap (for a lambda grid without refitting)."""
        other = GapShift(lambda_)
        for name in ("gap_", "image_mean_", "text_mean_"):
            if hasattr(self, name):
                setattr(other, name, getattr(self, name).copy())
        if hasattr(self, "n_fit_rows_"):
            other.n_fit_rows_ = self.n_fit_rows_
        return other

    def to_dict(self) -> dict:
        """JSON-safe state (lists of floats, exact for float32), for a model folder without pickle."""
        self._fitted_gap()
        return {
            "kind": "gap_shift",
            "lambda": _lambda(self.lambda_),
            "gap": [float(v) for v in self.gap_],
            "image_mean": [float(v) for v in self.image_mean_],
            "text_mean": [float(v) for v in self.text_mean_],
            "n_fit_rows": int(self.n_fit_rows_),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "GapShift":
        missing = [k for k in ("lambda", "gap", "image_mean", "text_mean", "n_fit_rows") if k not in d]
        if d.get("kind", "gap_shift") != "gap_shift" or missing:
            raise EmbedkitError(f"not a saved gap shift (kind {d.get('kind')!r}, missing {missing})")
        shift = cls(_lambda(d["lambda"]))
        vectors = [np.asarray(d[k], dtype=np.float32) for k in ("gap", "image_mean", "text_mean")]
        if any(v.ndim != 1 or v.shape != vectors[0].shape or not np.isfinite(v).all() for v in vectors):
            raise EmbedkitError("saved gap shift is corrupt: gap and means must be finite vectors of one length")
        shift.gap_, shift.image_mean_, shift.text_mean_ = vectors
        shift.n_fit_rows_ = int(d["n_fit_rows"])
        return shift

    def _fitted_gap(self) -> np.ndarray:
        if not hasattr(self, "gap_"):
            raise EmbedkitError("GapShift is not fitted: call fit(image, text) on the training rows first")
        return self.gap_


def shift_torch(image, text, gap, lam):
    """Differentiable transform: same result as GapShift.transform, gradients flow to `lam`.

    `lam` is a tensor (e.g. an nn.Parameter trained with the classifier); `gap` comes from a
    GapShift fitted on the training rows. Either of image/text may be None.
    """
    gap = torch.as_tensor(gap)
    lam = torch.as_tensor(lam)
    out = []
    for x, name, sign in ((image, "image", -0.5), (text, "text", 0.5)):
        if x is None:
            out.append(None)
            continue
        if x.shape[-1] != gap.shape[-1]:
            raise EmbedkitError(f"{name} embeddings are {x.shape[-1]}-d but the gap is {gap.shape[-1]}-d")
        g = gap.to(device=x.device, dtype=x.dtype)
        out.append(F.normalize(F.normalize(x, dim=-1, eps=_EPS) + sign * lam.to(x) * g, dim=-1, eps=_EPS))
    return out[0], out[1]


class LearnedGapShift(nn.Module):
    """The gap shift with lambda learned jointly with the classifier (initialised 0 = off).

    The gap is a fixed buffer (saved in the state dict, never trained): fit it with GapShift
    on the training rows. lambda is unconstrained; the optimiser may take it below 0 or past 1.
    """

    def __init__(self, gap):
        super().__init__()
        self.register_buffer("gap", torch.as_tensor(np.asarray(gap, dtype=np.float32)).clone())
        self.lam = nn.Parameter(torch.tensor(0.0))

    def forward(self, image, text):
        return shift_torch(image, text, self.gap, self.lam)


def _mean_offdiag_cosine(x_n: np.ndarray) -> float:
    """Mean cosine over all pairs i != j of normalised rows (the "cone effect").

    sum_{i != j} x_i.x_j = |sum_i x_i|^2 - sum_i |x_i|^2 is exact and O(rows * width), so no
    subsampling or rows x rows matrix is needed.
    """
    n = x_n.shape[0]
    if n < 2:
        return float("nan")
    x = x_n.astype(np.float64)
    s = x.sum(axis=0)
    return float((s @ s - np.einsum("ij,ij->", x, x)) / (n * (n - 1)))


def _stats(image_n: np.ndarray, text_n: np.ndarray) -> dict:
    image_c = image_n.mean(axis=0, dtype=np.float64)
    text_c = text_n.mean(axis=0, dtype=np.float64)
    return {
        "gap_norm": float(np.linalg.norm(image_c - text_c)),
        "mean_pair_cosine": float(np.einsum("ij,ij->i", image_n.astype(np.float64), text_n).mean()),
        "mean_within_image_cosine": _mean_offdiag_cosine(image_n),
        "mean_within_text_cosine": _mean_offdiag_cosine(text_n),
        # Distance between the mean directions: unlike gap_norm it does not shrink as cones widen.
        "centroid_distance": float(np.linalg.norm(l2_normalize(image_c) - l2_normalize(text_c))),
    }


def gap_stats(image, text, lambda_=None, gap=None) -> dict:
    """Descriptive modality-gap statistics of paired rows (joined on id, same row order).

    Keys: n_rows, gap_norm (|mean(image) - mean(text)| of normalised rows), mean_pair_cosine
    (matching rows), mean_within_image_cosine / mean_within_text_cosine (mean off-diagonal
    pairwise cosine, the cone effect), centroid_distance (between the normalised means).
    With lambda_, the same after the shift under `after_` keys, plus `lambda`.

    A diagnostic, not a training step: unless `gap` is given (e.g. a train-fitted
    GapShift.gap_), the gap used for the shift is fitted on all rows passed here.
    """
    image, text = _rows(image, "image"), _rows(text, "text")
    _check_widths(image.shape[1], text.shape[1])
    if image.shape[0] != text.shape[0]:
        raise EmbedkitError(f"gap_stats needs paired rows, got {image.shape[0]} image and {text.shape[0]} text rows")
    image_n, text_n = l2_normalize(image), l2_normalize(text)
    stats = {"n_rows": int(image.shape[0]), **_stats(image_n, text_n)}
    if lambda_ is not None:
        lam = _lambda(lambda_)
        g = _gap(image_n, text_n) if gap is None else _gap_vector(gap, image.shape[1])
        after = _stats(_shift(image_n, g, -lam / 2), _shift(text_n, g, lam / 2))
        stats["lambda"] = lam
        stats.update({f"after_{k}": v for k, v in after.items()})
    return stats


def _gap_vector(gap, width: int) -> np.ndarray:
    gap = np.asarray(gap, dtype=np.float32)
    if gap.shape != (width,) or not np.isfinite(gap).all():
        raise EmbedkitError(f"gap must be a finite vector as long as the embeddings ({width}), got shape {gap.shape}")
    return gap


def plot_gap_pca(image, text, path, lambda_=None, gap=None) -> Path:
    """Write a PNG of both modalities in 2-D PCA; with lambda_, before and after side by side.

    The PCA is fitted once on the union of the normalised embeddings (before the shift) and the
    after panel uses the same axes, so the shift itself is visible. `gap` defaults to the gap
    of the rows passed (descriptive); pass a train-fitted GapShift.gap_ to show what training
    did. Titles give the gap norm over all rows; at most 2000 points are drawn.
    """
    # Imported here: plotting is optional and Figure + Agg canvas leave pyplot's global state alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA

    image, text = _rows(image, "image"), _rows(text, "text")
    _check_widths(image.shape[1], text.shape[1])
    if image.shape[1] < 2:
        raise EmbedkitError("a 2-D PCA plot needs embeddings at least 2 wide")
    image_n, text_n = l2_normalize(image), l2_normalize(text)
    panels = [("before", image_n, text_n)]
    if lambda_ is not None:
        lam = _lambda(lambda_)
        g = _gap(image_n, text_n) if gap is None else _gap_vector(gap, image.shape[1])
        panels.append((f"after, lambda = {lam:g}", _shift(image_n, g, -lam / 2), _shift(text_n, g, lam / 2)))

    # Same sampled rows in every panel; a seeded draw keeps the picture reproducible.
    rng = np.random.default_rng(0)
    per_modality = _MAX_PLOT_POINTS // 2
    pick_image = np.sort(rng.permutation(len(image_n))[:per_modality])
    pick_text = np.sort(rng.permutation(len(text_n))[:per_modality])
    pca = PCA(n_components=2, random_state=0).fit(np.vstack([image_n[pick_image], text_n[pick_text]]))
    var = pca.explained_variance_ratio_

    fig = Figure(figsize=(5.5 * len(panels), 5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, img, txt) in zip(axes, panels):
        gap_norm = float(np.linalg.norm(img.mean(axis=0, dtype=np.float64) - txt.mean(axis=0, dtype=np.float64)))
        pi, pt = pca.transform(img[pick_image]), pca.transform(txt[pick_text])
        ax.scatter(pi[:, 0], pi[:, 1], s=6, alpha=0.5, c="tab:blue", label=f"image ({len(img)} rows, {len(pi)} shown)")
        ax.scatter(pt[:, 0], pt[:, 1], s=6, alpha=0.5, c="tab:orange", label=f"text ({len(txt)} rows, {len(pt)} shown)")
        ax.set_title(f"{label}: gap norm {gap_norm:.3f}")
        ax.set_xlabel(f"PC1 ({var[0]:.0%})")
        ax.set_ylabel(f"PC2 ({var[1]:.0%})")
        ax.legend(loc="best", markerscale=3)
    fig.suptitle("Modality gap: 2-D PCA of L2-normalised embeddings")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
