"""Modality-gap alignment: scikit-learn transformers that change what the classifier sees.

Contrastive encoders put image and text embeddings in two narrow cones; the difference of
their means is the "modality gap". Three aligners, all fitted on TRAINING rows only:

- `GapShift(lambda_)`, the published method: L2-normalise; gap = mean(image) - mean(text);
  text' = norm(text + lambda/2 gap), image' = norm(image - lambda/2 gap). lambda 1 makes the two
  means (before renormalising) equal, 0 only normalises, lambda < 0 widens the gap.
- `ModalityCenter()`, C3 (Zhang et al. 2024): subtract each modality's own mean, renormalise.
- `ModalityStandardize()`: per-feature z-scores with each modality's own mean and std.

A shift by a constant is, for a linear layer, only a change of bias (REFERENCE.md section 5), so
GapShift can act only through the renormalisation; centering removes each cone's shared direction
before renormalising, and standardising also equalises the per-feature spread of the modalities.
`embedkit.fusion.gap.gap_report` measures what each does, including a distribution-level gap (a linear
probe and an MMD) that a centroid number cannot see.

X is either {"image": (n, d), "text": (n, d)} (at transform either key may be absent: a row set
with one modality) or one (n, 2d) array [image | text]; transform returns the kind it was given.

Where we differ from the published code, on purpose:
- The statistics come from `fit` on the rows it is given, which must be the training split only;
  transform is row-wise and never computes statistics from the rows it changes. The published
  code pooled train and test rows (transductive: test data leaked into the features).
- Embeddings of different widths (e.g. 768 vs 4096) are refused. The published code resampled one
  vector to the other's length by 1-D interpolation, which pairs unrelated coordinates; only a
  shared space (or a learned projection) makes the gap meaningful.
- The paper's Gaussian noise injection never existed in its code and is not implemented here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import NotFittedError
from torch import nn

from embedkit.errors import EmbedkitError
from embedkit.fusion.evaluate import InvalidInputError

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data
except ImportError:  # older releases kept the same two checks as estimator methods

    def validate_data(estimator, X, skip_check_array, reset):
        estimator._check_feature_names(X, reset=reset)
        estimator._check_n_features(X, reset=reset)

ALIGN_METHODS = ("none", "shift", "center", "standardize")
MODALITIES = ("image", "text")

_EPS = 1e-12  # same eps as torch.nn.functional.normalize, so numpy and torch paths agree
# Features of unit rows lie in [-1, 1] and float32 resolves ~6e-8 there: a smaller std is no spread.
_CONSTANT_STD = 1e-7
# A mean of unit rows shorter than this (mean within-modality cosine ~0.01, e.g. after centering)
# points in a direction set by noise: its centroid distance would be a random number.
_MIN_CENTROID_NORM = 0.1
_MAX_PLOT_POINTS = 2000


class AlignerNotFittedError(EmbedkitError, NotFittedError):
    """transform before fit: a user error for the CLI, a NotFittedError for scikit-learn tools."""


class NotNumbersError(EmbedkitError, TypeError):
    """Embeddings that are not numbers (scikit-learn expects a TypeError for these)."""


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


# ------------------------------------------------------------------------------------ input checks


def _matrix(x, name: str) -> np.ndarray:
    """A finite, non-empty 2-D float array (float dtypes kept, other numbers become float32)."""
    if hasattr(x, "toarray"):  # scipy.sparse
        raise InvalidInputError(f"{name} is a sparse matrix; embeddings are dense: pass .toarray()")
    x = np.asarray(x)
    if x.dtype.kind == "c":
        raise InvalidInputError(f"{name}: Complex data not supported; embeddings are real numbers")
    if x.dtype.kind not in "fiub":
        try:
            x = x.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise NotNumbersError(f"{name} must hold numbers only ({str(e).splitlines()[0]})") from None
    if x.dtype.kind != "f":
        x = x.astype(np.float32)
    if x.ndim != 2:
        raise InvalidInputError(f"{name} must be a 2-D array (rows, width), got shape {x.shape}")
    for axis, what in ((0, "sample"), (1, "feature")):
        if x.shape[axis] == 0:
            raise InvalidInputError(f"{name} has 0 {what}(s) (shape={x.shape}) while a minimum of 1 is required.")
    if not np.isfinite(x).all():
        raise InvalidInputError(f"{name} contain NaN or infinite values")
    return x


def _check_widths(image_width: int, text_width: int) -> None:
    if image_width != text_width:
        raise InvalidInputError(
            f"image embeddings are {image_width}-d but text embeddings are {text_width}-d: the modality gap "
            "needs one shared space; embed both with a shared-space encoder (CLIP, or embedkit's shared "
            "encoder shared:PATH) or learn a projection with `embedkit project`"
        )


def _paired(image, text, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Image and text rows of one width and one row count (joined on id), or a one-line error."""
    image, text = _matrix(image, "image embeddings"), _matrix(text, "text embeddings")
    _check_widths(image.shape[1], text.shape[1])
    if image.shape[0] != text.shape[0]:
        raise InvalidInputError(
            f"{what} needs the same rows in both modalities (joined on id), got {image.shape[0]} image rows "
            f"and {text.shape[0]} text rows"
        )
    return image, text


def _lambda(value) -> float:
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"lambda must be a number, got {value!r}") from None
    if not np.isfinite(lam):
        raise InvalidInputError(f"lambda must be finite, got {value!r}")
    return lam


def _unit64(x: np.ndarray) -> np.ndarray:
    return l2_normalize(x.astype(np.float64))


def _shift_rows(x_n: np.ndarray, gap: np.ndarray, step: float) -> np.ndarray:
    """Unit rows moved by `step * gap`, then renormalised (float64)."""
    return l2_normalize(x_n + step * np.asarray(gap, dtype=np.float64))


def _inverse_std(std: np.ndarray) -> np.ndarray:
    """1/std, and 0 for features that never varied in training (they stay 0, never NaN or huge)."""
    std = np.asarray(std, dtype=np.float64)
    safe = np.where(std > _CONSTANT_STD, std, 1.0)
    return np.where(std > _CONSTANT_STD, 1.0 / safe, 0.0)


# ------------------------------------------------------------------------------------ aligners


class _PairedAligner(TransformerMixin, BaseEstimator):
    """Shared fit/transform plumbing; subclasses say what happens to one modality's unit rows.

    Fitted attributes: `image_mean_`, `text_mean_` (float32 means of the L2-normalised training
    rows), `gap_ = image_mean_ - text_mean_`, `n_fit_rows_`, `n_features_in_` (2 x width, the
    [image | text] layout) and, for a DataFrame, `feature_names_in_`.
    """

    _kind = ""
    _vectors = ("image_mean", "text_mean", "gap")

    def fit(self, X, y=None):
        """Fit on the TRAINING rows only, both modalities present and paired (row i = one sample).

        A gap from image rows and text rows of different samples would also contain the
        difference between those samples, hence the pairing.
        """
        if y is not None and np.asarray(y).ndim == 2 and np.asarray(y).shape[1] > 1:
            raise InvalidInputError(
                "fit(X) takes one X, {'image': rows, 'text': rows} or [image | text]; a 2-D y was given "
                "(the old fit(image, text) call?)"
            )
        self._check_params()
        blocks, _ = self._read(X, reset=True)
        if blocks["image"] is None or blocks["text"] is None:
            raise InvalidInputError("fit needs both image and text rows of the training split")
        image, text = _paired(blocks["image"], blocks["text"], "fit")
        image_n, text_n = _unit64(image), _unit64(text)
        image_mean, text_mean = image_n.mean(axis=0), text_n.mean(axis=0)
        self.image_mean_ = image_mean.astype(np.float32)
        self.text_mean_ = text_mean.astype(np.float32)
        self.gap_ = (image_mean - text_mean).astype(np.float32)
        self.n_fit_rows_ = int(image.shape[0])
        self._fit_spread(image_n, text_n)
        return self

    def transform(self, X):
        """The aligned rows, of the kind and float dtype given. Row-wise: no row depends on another."""
        self._check_fitted()
        self._check_params()
        blocks, as_array = self._read(X, reset=False)
        out = {m: None if x is None else self._align(m, _unit64(x)).astype(x.dtype, copy=False)
               for m, x in blocks.items()}
        if as_array:
            return np.hstack([out["image"], out["text"]])
        return {m: out[m] for m in X}

    def stand_in(self, present: str, x) -> np.ndarray:
        """Estimate the MISSING modality's raw normalised rows from the `present` one's rows `x`.

        For a row set with one modality (a report without an image, or the reverse) a fusion
        classifier still needs both blocks. Copying the present rows would put them in the wrong
        cone, which the classifier would read as a modality signal; zeros or the training mean
        would discard the sample's own content. So the rows move to where the other modality
        lives, keeping their content: across the fitted gap for the gap-based aligners (the
        "Mind the gap" picture of one cloud translated by the gap), by matching z-scores for
        ModalityStandardize. Only training statistics are used, row by row; pass the result to
        transform({missing: ...}) like any raw row (transform normalises it first).
        """
        if present not in MODALITIES:
            raise InvalidInputError(f"present must be 'image' or 'text', got {present!r}")
        self._check_fitted()
        x = self._checked_width(_matrix(x, f"{present} embeddings"), present)
        return self._partner(present, _unit64(x)).astype(x.dtype, copy=False)

    def to_dict(self) -> dict:
        """JSON-safe state (lists of floats, exact for float32), for a model folder without pickle."""
        self._check_fitted()
        self._check_params()
        state = {"kind": self._kind, "params": self._params(), "n_fit_rows": int(self.n_fit_rows_)}
        state.update({name: [float(v) for v in getattr(self, name + "_")] for name in self._vectors})
        return state

    def __sklearn_is_fitted__(self) -> bool:
        # `lambda_` ends in "_" but is a parameter: say explicitly what being fitted means.
        return hasattr(self, "gap_")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # ---- what subclasses define
    def _check_params(self) -> None:
        pass

    def _params(self) -> dict:
        return {}

    def _fit_spread(self, image_n: np.ndarray, text_n: np.ndarray) -> None:
        pass

    def _align(self, modality: str, x_n: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _partner(self, present: str, x_n: np.ndarray) -> np.ndarray:
        """Gap-based: text = norm(image - gap), image = norm(text + gap)."""
        return _shift_rows(x_n, self.gap_, -1.0 if present == "image" else 1.0)

    # ---- plumbing
    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise AlignerNotFittedError(
                f"{type(self).__name__} is not fitted: call fit(X) on the training rows first")

    def _checked_width(self, x: np.ndarray, modality: str) -> np.ndarray:
        width = self.gap_.shape[0]
        if x.shape[1] != width:
            raise InvalidInputError(
                f"{modality} embeddings are {x.shape[1]}-d but the aligner was fitted on {width}-d embeddings")
        return x

    def _read(self, X, reset: bool) -> tuple[dict, bool]:
        """({'image': rows or None, 'text': rows or None}, whether X was the [image | text] array)."""
        if hasattr(X, "toarray"):  # before the dict test: scipy's DOK sparse matrix is a dict
            raise InvalidInputError("X is a sparse matrix; embeddings are dense: pass X.toarray()")
        if isinstance(X, dict):
            unknown = sorted(str(k) for k in X if k not in MODALITIES)
            if unknown:
                raise InvalidInputError(f"X has keys {unknown}; a dict X holds 'image' and/or 'text' rows")
            blocks = {m: None if X.get(m) is None else _matrix(X[m], f"{m} embeddings") for m in MODALITIES}
            if all(b is None for b in blocks.values()):
                raise InvalidInputError("X holds neither image nor text rows")
            if reset:  # fit: both modalities are required (checked there), each of one width
                self.n_features_in_ = 2 * next(b.shape[1] for b in blocks.values() if b is not None)
                if hasattr(self, "feature_names_in_"):
                    del self.feature_names_in_
            else:
                blocks = {m: b if b is None else self._checked_width(b, m) for m, b in blocks.items()}
            return blocks, False
        x = _matrix(X, "X")
        try:  # scikit-learn's own bookkeeping: n_features_in_, feature_names_in_, their messages
            validate_data(self, X, skip_check_array=True, reset=reset)
        except ValueError as e:  # one line, as every embedkit error
            raise InvalidInputError(" ".join(str(e).split())) from None
        if x.shape[1] % 2:
            raise InvalidInputError(
                f"X has {x.shape[1]} feature(s); the array form is [image | text], two halves of equal width, "
                "so it needs an even number of columns")
        half = x.shape[1] // 2
        blocks = {"image": x[:, :half], "text": x[:, half:]}
        if not reset:
            blocks = {m: self._checked_width(b, m) for m, b in blocks.items()}
        return blocks, True


class GapShift(_PairedAligner):
    """The published gap shift: image' = norm(image - lambda/2 gap), text' = norm(text + lambda/2 gap).

    lambda_ = 0 switches the shift off but transform still L2-normalises, so every lambda in a
    grid (and every method, via make_aligner("none")) sees the same preprocessing.
    """

    _kind = "gap_shift"

    def __init__(self, lambda_: float = 1.0):
        self.lambda_ = lambda_

    def with_lambda(self, lambda_: float) -> "GapShift":
        """A copy with another lambda and the same fitted gap (for a lambda grid without refitting)."""
        other = GapShift(lambda_)
        for name, value in vars(self).items():
            if name.endswith("_") and name != "lambda_":
                setattr(other, name, value.copy() if isinstance(value, np.ndarray) else value)
        return other

    def _check_params(self) -> None:
        _lambda(self.lambda_)

    def _params(self) -> dict:
        return {"lambda_": _lambda(self.lambda_)}

    def _align(self, modality: str, x_n: np.ndarray) -> np.ndarray:
        step = _lambda(self.lambda_) / 2.0
        return _shift_rows(x_n, self.gap_, -step if modality == "image" else step)


class ModalityCenter(_PairedAligner):
    """C3-style: subtract each modality's own training mean, then renormalise.

    Removes the direction every row of a cone shares, so what is left is what tells samples
    apart; a row equal to its modality's mean becomes the zero row.
    """

    _kind = "modality_center"

    def _align(self, modality: str, x_n: np.ndarray) -> np.ndarray:
        return l2_normalize(x_n - getattr(self, f"{modality}_mean_").astype(np.float64))


class ModalityStandardize(_PairedAligner):
    """Per-modality feature standardisation: (unit row - modality mean) / modality std, per feature.

    Means and stds are those of the L2-normalised TRAINING rows of each modality (`image_std_`,
    `text_std_`, population std as StandardScaler uses). A feature that never varied in training
    carries no scale to standardise by: it is 0 for every row, never NaN or an unscaled value.
    The output is not renormalised: z-scores are what the classifier should see.
    """

    _kind = "modality_standardize"
    _vectors = ("image_mean", "text_mean", "gap", "image_std", "text_std")

    def _fit_spread(self, image_n: np.ndarray, text_n: np.ndarray) -> None:
        self.image_std_ = image_n.std(axis=0).astype(np.float32)
        self.text_std_ = text_n.std(axis=0).astype(np.float32)

    def _z(self, modality: str, x_n: np.ndarray) -> np.ndarray:
        mean = getattr(self, f"{modality}_mean_").astype(np.float64)
        return (x_n - mean) * _inverse_std(getattr(self, f"{modality}_std_"))

    def _align(self, modality: str, x_n: np.ndarray) -> np.ndarray:
        return self._z(modality, x_n)

    def _partner(self, present: str, x_n: np.ndarray) -> np.ndarray:
        """z-score transfer: missing = its mean + its std * (the present row's z-scores)."""
        missing = "text" if present == "image" else "image"
        mean, std = (getattr(self, f"{missing}_{s}_").astype(np.float64) for s in ("mean", "std"))
        return mean + std * self._z(present, x_n)


_ALIGNERS = {cls._kind: cls for cls in (GapShift, ModalityCenter, ModalityStandardize)}


def make_aligner(method: str, lambda_: float | None = None) -> _PairedAligner:
    """An unfitted aligner for a method in ALIGN_METHODS.

    "none" is GapShift(0.0), L2-normalisation only, so every method sees the same preprocessing;
    "shift" is GapShift(lambda_, default 1). lambda_ belongs to "shift" alone and is refused elsewhere.
    """
    if method not in ALIGN_METHODS:
        raise EmbedkitError(f"unknown alignment method {method!r}; choose one of {', '.join(ALIGN_METHODS)}")
    if method == "shift":
        return GapShift(1.0 if lambda_ is None else _lambda(lambda_))
    if lambda_ is not None and not (method == "none" and _lambda(lambda_) == 0.0):
        raise EmbedkitError(f"lambda sets the 'shift' method only; '{method}' takes no lambda")
    return {"none": GapShift(0.0), "center": ModalityCenter(), "standardize": ModalityStandardize()}[method]


def aligner_from_dict(d: dict) -> _PairedAligner:
    """An aligner back from `to_dict()` (or a gap shift saved by an earlier embedkit), validated."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in _ALIGNERS:
        raise EmbedkitError(f"not a saved aligner (kind {kind!r}; expected one of {', '.join(_ALIGNERS)})")
    cls = _ALIGNERS[kind]
    params = d.get("params")
    if params is None and kind == "gap_shift" and "lambda" in d:  # saved before `params` existed
        params = {"lambda_": d["lambda"]}
    expected = set(cls().get_params())
    if not isinstance(params, dict) or set(params) != expected:
        raise EmbedkitError(f"saved {kind} aligner has params {params!r}; expected the keys {sorted(expected)}")
    aligner = cls(**params)
    aligner._check_params()
    missing = [k for k in (*cls._vectors, "n_fit_rows") if k not in d]
    if missing:
        raise EmbedkitError(f"saved {kind} aligner is missing {', '.join(missing)}")
    vectors = {k: _saved_vector(d[k], kind, k) for k in cls._vectors}
    if len({v.shape for v in vectors.values()}) != 1 or vectors["gap"].shape[0] == 0:
        raise EmbedkitError(f"saved {kind} aligner is corrupt: its vectors must be non-empty and of one length")
    if not np.allclose(vectors["gap"], vectors["image_mean"] - vectors["text_mean"], atol=1e-5):
        raise EmbedkitError(f"saved {kind} aligner is corrupt: gap is not image_mean - text_mean")
    if any((vectors[k] < 0).any() for k in ("image_std", "text_std") if k in vectors):
        raise EmbedkitError(f"saved {kind} aligner is corrupt: a standard deviation is negative")
    n_fit = d["n_fit_rows"]
    if isinstance(n_fit, bool) or not isinstance(n_fit, int) or n_fit < 1:
        raise EmbedkitError(f"saved {kind} aligner is corrupt: n_fit_rows must be a positive integer")
    for k, v in vectors.items():
        setattr(aligner, k + "_", v)
    aligner.n_fit_rows_ = n_fit
    aligner.n_features_in_ = 2 * vectors["gap"].shape[0]
    return aligner


def _saved_vector(value, kind: str, name: str) -> np.ndarray:
    try:
        v = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise EmbedkitError(f"saved {kind} aligner is corrupt: {name} is not a list of numbers") from None
    if v.ndim != 1 or not np.isfinite(v).all():
        raise EmbedkitError(f"saved {kind} aligner is corrupt: {name} must be a finite vector")
    return v


def fit_aligners(image, text, methods=ALIGN_METHODS, lambda_: float = 1.0, fit_rows=None) -> dict:
    """{method: aligner fitted on the rows `fit_rows` (indices or a boolean mask; default all)}."""
    image, text = _paired(image, text, "alignment")
    fit = _fit_index(len(image), fit_rows)
    return {m: make_aligner(m, lambda_ if m == "shift" else None).fit({"image": image[fit], "text": text[fit]})
            for m in _methods(methods)}


def _methods(methods) -> list[str]:
    methods = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in methods if m not in ALIGN_METHODS]
    if not methods or bad:
        raise EmbedkitError(f"alignment methods must come from {', '.join(ALIGN_METHODS)} (got {methods})")
    return list(dict.fromkeys(methods))


def _fit_index(n: int, fit_rows) -> np.ndarray:
    if fit_rows is None:
        return np.arange(n)
    try:
        idx = np.arange(n)[np.asarray(fit_rows)]
    except IndexError:
        raise EmbedkitError(f"fit_rows must be row indices below {n} or a boolean mask of {n} rows") from None
    if idx.ndim != 1 or len(idx) == 0:
        raise EmbedkitError("fit_rows selects no rows: the aligners need training rows to fit on")
    return idx


# ------------------------------------------------------------------------------------ torch


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


# ------------------------------------------------------------------------------------ gap statistics


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


def gap_geometry(image, text) -> dict:
    """Centroid and cosine statistics of paired rows, measured on the rows scaled to unit length.

    Keys: gap_norm, mean_pair_cosine, mean_within_image_cosine, mean_within_text_cosine,
    centroid_distance (None when a mean is too short to have a direction).
    """
    image, text = _paired(image, text, "gap statistics")
    image_n, text_n = _unit64(image), _unit64(text)
    image_c, text_c = image_n.mean(axis=0), text_n.mean(axis=0)
    return {
        "gap_norm": float(np.linalg.norm(image_c - text_c)),
        "mean_pair_cosine": float(np.einsum("ij,ij->i", image_n, text_n).mean()),
        "mean_within_image_cosine": _mean_offdiag_cosine(image_n),
        "mean_within_text_cosine": _mean_offdiag_cosine(text_n),
        "centroid_distance": _centroid_distance(image_c, text_c),
    }


def _centroid_distance(image_c: np.ndarray, text_c: np.ndarray) -> float | None:
    """Distance between the mean directions; None when a mean is too short to have a direction."""
    if min(np.linalg.norm(image_c), np.linalg.norm(text_c)) < _MIN_CENTROID_NORM:
        return None
    return float(np.linalg.norm(l2_normalize(image_c) - l2_normalize(text_c)))


def gap_stats(image, text, lambda_=None, gap=None) -> dict:
    """Descriptive modality-gap statistics of paired rows (joined on id, same row order).

    Keys: n_rows, gap_norm (|mean(image) - mean(text)| of normalised rows), mean_pair_cosine
    (matching rows), mean_within_image_cosine / mean_within_text_cosine (mean off-diagonal
    pairwise cosine, the cone effect), centroid_distance (between the normalised means).
    With lambda_, the same after the shift under `after_` keys, plus `lambda`.

    A diagnostic, not a training step: unless `gap` is given (e.g. a train-fitted
    GapShift.gap_), the gap used for the shift is fitted on all rows passed here.
    """
    image, text = _paired(image, text, "gap_stats")
    stats = {"n_rows": int(image.shape[0]), **gap_geometry(image, text)}
    if lambda_ is not None:
        lam = _lambda(lambda_)
        shifted = _shifted(image, text, lam, gap)
        stats["lambda"] = lam
        stats.update({f"after_{k}": v for k, v in gap_geometry(*shifted).items()})
    return stats


def _shifted(image, text, lam: float, gap) -> tuple[np.ndarray, np.ndarray]:
    """Both modalities after the gap shift, by `gap` or by the gap of these rows."""
    image_n, text_n = _unit64(image), _unit64(text)
    if gap is None:
        gap = image_n.mean(axis=0) - text_n.mean(axis=0)
    else:
        gap = np.asarray(gap, dtype=np.float64)
        if gap.shape != (image.shape[1],) or not np.isfinite(gap).all():
            raise EmbedkitError(f"gap must be a finite vector as long as the embeddings ({image.shape[1]}), "
                                f"got shape {gap.shape}")
    return _shift_rows(image_n, gap, -lam / 2), _shift_rows(text_n, gap, lam / 2)


def plot_gap_pca(image, text, path, lambda_=None, gap=None, aligners: dict | None = None) -> Path:
    """Write a PNG of both modalities in 2-D PCA: before, and after a shift and/or fitted aligners.

    The PCA is fitted once on the union of the normalised embeddings (before alignment) and every
    panel uses the same axes, so the movement itself is visible. With lambda_: a gap-shift panel,
    by `gap` (default: the gap of the rows passed, descriptive; pass a train-fitted gap_ to show
    what training did). With aligners ({method: fitted aligner}, e.g. from fit_aligners): one panel
    each, rows scaled to unit length (standardised rows are not). At most 2000 points are drawn.
    """
    # Imported here: plotting is optional and Figure + Agg canvas leave pyplot's global state alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA

    image, text = _matrix(image, "image embeddings"), _matrix(text, "text embeddings")
    _check_widths(image.shape[1], text.shape[1])
    if image.shape[1] < 2:
        raise EmbedkitError("a 2-D PCA plot needs embeddings at least 2 wide")
    image_n, text_n = _unit64(image), _unit64(text)
    panels = [("before (L2-normalised)", image_n, text_n)]
    if lambda_ is not None:
        lam = _lambda(lambda_)
        panels.append((f"gap shift, lambda = {lam:g}", *_shifted(image, text, lam, gap)))
    for name, aligner in (aligners or {}).items():
        if isinstance(aligner, GapShift) and _lambda(aligner.lambda_) == 0.0:
            continue  # L2-normalisation only: the "before" panel
        out = aligner.transform({"image": image, "text": text})
        label = f"{name}, lambda = {aligner.lambda_:g}" if isinstance(aligner, GapShift) else name
        panels.append((label, _unit64(out["image"]), _unit64(out["text"])))

    # Same sampled rows in every panel; a seeded draw keeps the picture reproducible.
    rng = np.random.default_rng(0)
    per_modality = _MAX_PLOT_POINTS // 2
    pick_image = np.sort(rng.permutation(len(image_n))[:per_modality])
    pick_text = np.sort(rng.permutation(len(text_n))[:per_modality])
    pca = PCA(n_components=2, random_state=0).fit(np.vstack([image_n[pick_image], text_n[pick_text]]))
    var = pca.explained_variance_ratio_

    fig = Figure(figsize=(5 * len(panels), 5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, img, txt) in zip(axes, panels):
        gap_norm = float(np.linalg.norm(img.mean(axis=0) - txt.mean(axis=0)))
        pi, pt = pca.transform(img[pick_image]), pca.transform(txt[pick_text])
        ax.scatter(pi[:, 0], pi[:, 1], s=6, alpha=0.5, c="tab:blue", label=f"image ({len(img)} rows, {len(pi)} shown)")
        ax.scatter(pt[:, 0], pt[:, 1], s=6, alpha=0.5, c="tab:orange", label=f"text ({len(txt)} rows, {len(pt)} shown)")
        ax.set_title(f"{label}: gap norm {gap_norm:.3f}")
        ax.set_xlabel(f"PC1 ({var[0]:.0%})")
        ax.set_ylabel(f"PC2 ({var[1]:.0%})")
        ax.legend(loc="best", markerscale=3)
    fig.suptitle("Modality gap: 2-D PCA of L2-normalised embeddings (axes fitted before alignment)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
