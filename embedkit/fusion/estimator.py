"""Scikit-learn style classifiers on stored embeddings: the fusion heads and a logistic baseline.

X is a float matrix with the modality blocks side by side (block widths in `modality_dims`) or
a dict {modality: 2-D array}. y is 1-D labels (binary / multiclass) or a 2-D 0/1 indicator
matrix (multilabel). A fitted estimator saves to a folder as `model.safetensors` +
`estimator.json` and loads back without pickle, so a model folder from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy import sparse
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import DataConversionWarning, NotFittedError
from torch import nn

from embedkit.errors import EmbedkitError
from embedkit.fusion.align import NotNumbersError
from embedkit.fusion.evaluate import InvalidInputError, detect_task
from embedkit.guards import check_finite, check_safetensors, check_same_shapes, read_json_object
from embedkit.fusion.missing import presence_mask, refusal
from embedkit.fusion.models import (HEADS_NEEDING_BLOCKS, AttentionFusionHead, EarlyFusionHead, GatedFusionHead,
                                    LateFusionHead, LowRankFusionHead)

WEIGHTS_FILE, META_FILE = "model.safetensors", "estimator.json"
FUSIONS = ("early", "late", "gated", "attention", "lowrank")


class NotFittedEmbedkitError(EmbedkitError, NotFittedError):
    """predict before fit: a user error for the CLI, a NotFittedError for scikit-learn tools."""


# ---------------------------------------------------------------------------------------------
# input checks shared by both estimators


def _as_matrix(X, modality_dims=None, names=None, allow_missing=False):
    """Return (float32 matrix with the blocks side by side, block widths, block names or None).

    names: at predict time, the modality order seen in fit, so a dict's key order does not matter.
    allow_missing: NaN is checked by the caller (missing.presence_mask: a whole block of NaN is a missing modality).
    Messages follow scikit-learn's wording where its own estimator checks look for it.
    """
    # before the dict test: scipy's dok format is a dict subclass
    if sparse.issparse(X) or (isinstance(X, dict) and any(sparse.issparse(b) for b in X.values())):
        raise InvalidInputError("sparse input is not supported: embeddings are dense, pass X.toarray()")
    try:
        if isinstance(X, dict):
            X = {str(k): v for k, v in X.items()}
            if names is not None:
                if set(X) != set(names):
                    raise InvalidInputError(f"X has modalities {sorted(X)}, the model was fitted on {names}")
                X = {k: X[k] for k in names}
            blocks = [_real_float32(v) for v in X.values()]
            if not blocks or any(b.ndim != 2 for b in blocks):
                raise InvalidInputError("a dict X must map each modality name to a 2-D array (rows x features)")
            if len({len(b) for b in blocks}) > 1:
                raise InvalidInputError(f"modality blocks have different row counts: {[len(b) for b in blocks]}")
            dims, names = tuple(b.shape[1] for b in blocks), list(X)
            if modality_dims is not None and tuple(modality_dims) != dims:
                raise InvalidInputError(f"modality_dims {tuple(modality_dims)} do not match the dict's block widths {dims}")
            X = np.concatenate(blocks, axis=1)
        else:
            X = _real_float32(X)
            if X.ndim != 2:
                raise InvalidInputError(f"X must be 2-D (rows x features), got shape {X.shape}; Reshape your data "
                                        f"(X.reshape(1, -1) for a single row)")
            if X.shape[1] == 0:
                raise InvalidInputError(f"0 feature(s) (shape={X.shape}) while a minimum of 1 is required.")
            dims = (X.shape[1],) if modality_dims is None else tuple(int(d) for d in modality_dims)
            if min(dims) < 1 or sum(dims) != X.shape[1]:
                raise InvalidInputError(f"modality_dims {dims} must be positive and sum to X's {X.shape[1]} columns")
    except InvalidInputError:
        raise
    except TypeError as e:  # np.asarray on a dict or other objects
        raise NotNumbersError(f"X must hold numbers only ({str(e).splitlines()[0]})") from None
    except ValueError as e:  # np.asarray on text or ragged lists
        raise InvalidInputError(f"X must hold numbers only ({str(e).splitlines()[0]})") from None
    if len(X) == 0:
        raise InvalidInputError("X has no rows")
    bad = 0 if allow_missing else int((~np.isfinite(X)).any(axis=1).sum())
    if bad:
        raise InvalidInputError(f"X has {bad} of {len(X)} rows with NaN or infinite values; drop or impute them first")
    return X, dims, names


def _real_float32(block) -> np.ndarray:
    block = np.asarray(block)
    if block.dtype.kind == "c":  # a cast to float would drop the imaginary part silently
        raise InvalidInputError("Complex data not supported: embeddings are real numbers")
    return block.astype(np.float32, copy=False)


def _encode_labels(y, classes=None, task=None):
    """Fit (classes=None) or apply the label encoding. Returns (task, classes, targets): targets are
    class indices for binary/multiclass and a float32 0/1 matrix for multilabel."""
    if y is None:
        raise InvalidInputError("a classifier requires y to be passed, but the target y is None")
    columns = getattr(y, "columns", None)  # a pandas DataFrame names its labels
    y = np.asarray(y)
    task = task or detect_task(y)
    if task == "multilabel":
        if y.ndim != 2 or (classes is not None and y.shape[1] != len(classes)):
            raise InvalidInputError(f"multilabel y must be a 0/1 matrix with one column per label, got shape {y.shape}")
        targets = y.astype(np.float32)
        if classes is None:
            classes = np.asarray([str(c) for c in columns]) if columns is not None else np.arange(y.shape[1])
            if (targets.min(0) == targets.max(0)).all():
                raise InvalidInputError("every label column of y holds one value only; nothing to learn")
        return task, classes, targets
    if y.ndim == 2 and y.shape[1] == 1:
        warnings.warn("A column-vector y was passed when a 1d array was expected; it is read as y.ravel()",
                      DataConversionWarning, stacklevel=3)
        y = y.ravel()
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise InvalidInputError(f"y has {int((~np.isfinite(y)).sum())} missing or infinite labels; drop those rows")
        if (y != np.round(y)).any():  # 0.37 is a regression target or a probability, not a class
            raise InvalidInputError("y is a continuous target (non-integer numbers); pass class labels (ints or strings)")
    if classes is None:
        classes, idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise InvalidInputError(f"y has {len(classes)} class(es) {classes.tolist()}; a classifier needs at least two")
        return task, classes, idx.ravel().astype(np.int64)
    index = {c: i for i, c in enumerate(classes.tolist())}
    try:
        return task, classes, np.array([index[c] for c in y.tolist()], dtype=np.int64)
    except KeyError as e:
        raise InvalidInputError(f"y holds label {e.args[0]!r} not seen in fit (classes {classes.tolist()})") from None


@contextmanager
def _torch_threads(n: int):
    """Run with at most n intra-op threads, then restore the caller's setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(min(n, old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _mean_std(X) -> tuple[np.ndarray, np.ndarray]:
    mean = X.mean(axis=0, dtype=np.float64)
    sq = sum(np.square(c - mean).sum(axis=0) for c in np.array_split(X, len(X) // 4096 + 1))
    return mean, np.sqrt(sq / len(X))


def _loadable_device(saved: str) -> str:
    """A model trained on a GPU loads on a machine without one (the heads are small)."""
    if str(saved).startswith("cuda") and not torch.cuda.is_available():
        return "cpu"
    return saved


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _write(folder, tensors: dict, meta: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE))
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default))
    return folder


def _read(folder, fmt: str):
    folder = Path(folder)
    if not (folder / META_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise InvalidInputError(f"{folder} is not a saved model folder (needs {WEIGHTS_FILE} and {META_FILE})")
    meta = read_json_object(folder / META_FILE, "model file")
    if meta.get("format") != fmt:
        raise InvalidInputError(f"{folder} holds a {meta.get('format')!r} model, not {fmt!r}")
    check_safetensors(folder / WEIGHTS_FILE)  # header and sizes, before any tensor is read
    tensors = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    check_finite(tensors, folder / WEIGHTS_FILE)
    return meta, tensors


class _EmbeddingClassifier(ClassifierMixin, BaseEstimator):
    """What both estimators share: input checks, standardisation, labels out, common metadata."""

    _takes_missing = False  # a whole block of NaN is a missing modality (FusionClassifier) or refused

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True  # y may be a 0/1 indicator matrix
        tags.target_tags.multi_output = True
        return tags

    def _class_weights(self) -> dict | None:
        """class_weight as {class index: weight}: 'balanced' is left to the caller, a dict's keys are labels."""
        if not isinstance(self.class_weight, dict):
            return None
        if self.task_ == "multilabel":
            raise InvalidInputError("class_weight as a dict applies to binary and multiclass y, not multilabel")
        return {i: float(self.class_weight.get(c, 1.0)) for i, c in enumerate(self.classes_.tolist())}

    def _check_fitted(self):
        if not hasattr(self, "classes_"):
            raise NotFittedEmbedkitError(f"this {type(self).__name__} is not fitted yet: call fit first")

    def _check_X(self, X) -> np.ndarray:
        self._check_fitted()
        is_dict = isinstance(X, dict)
        X, dims, _ = _as_matrix(X, names=self.modalities_ if is_dict else None, allow_missing=self._takes_missing)
        if X.shape[1] != self.n_features_in_:
            raise InvalidInputError(f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                                    f"{self.n_features_in_} features as input (the columns it was fitted on)")
        if is_dict and dims != self.modality_dims_:
            raise InvalidInputError(f"modality block widths {dims} differ from the fitted {self.modality_dims_}")
        return X

    def _fit_scaling(self, X, mask=None):
        # Statistics of the training rows only (each block on the rows that have it), in float64 but by row
        # chunks: X.std(dtype=float64) would make a float64 copy of the whole embedding matrix.
        if mask is None or mask.all():
            self.mean_, self.scale_ = _mean_std(X)
        else:
            starts = np.cumsum((0, *self.modality_dims_))
            parts = [_mean_std(X[mask[:, j], starts[j]:starts[j + 1]]) for j in range(len(self.modality_dims_))]
            self.mean_, self.scale_ = (np.concatenate([p[k] for p in parts]) for k in (0, 1))
        self.scale_[self.scale_ == 0] = 1.0  # a constant feature stays 0 instead of becoming NaN

    def _standardise(self, X) -> np.ndarray:
        # float32 throughout: a float64 copy of a large embedding matrix would double memory.
        return (X - self.mean_.astype(np.float32)) / self.scale_.astype(np.float32)

    def _index(self, proba) -> np.ndarray:
        """Predicted class index (binary/multiclass) or 0/1 indicator matrix (multilabel)."""
        if self.task_ == "multiclass":
            return proba.argmax(axis=1)
        p = proba[:, 1] if self.task_ == "binary" else proba
        return (p >= self.threshold).astype(np.int64)

    def predict(self, X):
        """Original labels (binary: positive when p >= threshold); multilabel: 0/1 indicator matrix."""
        idx = self._index(self.predict_proba(X))
        return idx if self.task_ == "multilabel" else self.classes_[idx]

    def _fitted_meta(self) -> dict:
        params = self.get_params()
        if isinstance(params.get("class_weight"), dict):  # JSON keys are text: keep the labels' types
            params["class_weight"] = {"pairs": [[k, v] for k, v in params["class_weight"].items()]}
        return {
            "params": params,
            "task": self.task_,
            "classes": self.classes_.tolist(),
            "classes_dtype": self.classes_.dtype.str,  # round-trips ints, strings and bools
            "n_features_in": self.n_features_in_,
            "modality_dims": list(self.modality_dims_),
            "modalities": self.modalities_,
            "fit_seconds": self.fit_seconds_,
        }

    @staticmethod
    def _params(meta: dict) -> dict:
        """Constructor arguments from saved metadata (inverse of the class_weight packing in _fitted_meta)."""
        params = dict(meta["params"])
        if isinstance(params.get("class_weight"), dict):
            params["class_weight"] = {k: v for k, v in params["class_weight"]["pairs"]}
        return params

    def _restore_meta(self, meta: dict):
        self.task_ = meta["task"]
        self.classes_ = np.asarray(meta["classes"], dtype=np.dtype(meta["classes_dtype"]))
        self.n_features_in_ = meta["n_features_in"]
        self.modality_dims_ = tuple(meta["modality_dims"])
        self.modalities_ = meta["modalities"]
        self.fit_seconds_ = meta["fit_seconds"]


# ---------------------------------------------------------------------------------------------


class FusionClassifier(_EmbeddingClassifier):
    """Early or late fusion head on standardised embeddings, trained with AdamW.

    Defaults are the values the reference code executed (Restrepo et al.), with its defects
    fixed: binary class weighting works, and model selection uses a validation set (eval_set),
    never the test set.

    scale: "standard" standardises every feature with the training rows' mean and std (the
    usual choice for raw embeddings); "none" feeds the rows as given, e.g. L2-normalised and
    gap-aligned embeddings exactly as the published method does. A per-feature standardisation
    after a gap shift would undo most of the shift (a constant offset per feature), so with
    alignment "none" is the right choice.

    noise_std: Gaussian noise added to the head's input during training only, in units of each
    input feature's standard deviation on the training rows (0.1 = 10 % of a feature's spread),
    whatever `scale` is and also with learn_lambda. predict adds none.

    Missing modalities (fusion/missing.py): a row whose block is all NaN lacks that modality; the
    presence mask goes to the head. The head learns what to do with a missing modality (a learned
    token, or masking for gated/attention) from training rows that lack it, and from
    `modality_dropout`: the share of complete training rows, drawn anew each epoch, with one
    modality (chosen at random) masked. predict masks nothing, and refuses a row whose missing
    modality was never missing in training (`learned_missing_`).
    """

    _takes_missing = True

    def __init__(
        self,
        fusion="early",  # early (concatenation; unimodal with one block) | late | gated | attention | lowrank
        modality_dims=None,  # block widths of X's columns; None = a single block
        hidden_dim=128,  # early-fusion hidden width, as in the reference
        late_hidden_dim=64,  # per-modality width of late (as in the reference), gated, attention, lowrank
        dropout=0.0,  # the reference code ran with 0 (its README says 0.2)
        epochs=30,  # reference
        lr=1e-3,  # reference AdamW learning rate
        batch_size=64,  # reference
        weight_decay=0.01,  # the reference left AdamW's default, which is this
        class_weight="balanced",  # reference; None turns weighting off
        patience=None,  # epochs without validation improvement before stopping; needs eval_set
        noise_std=0.0,  # training-time noise, in units of each feature's training std (see class docstring)
        scale="standard",  # "standard": per-feature standardisation on training rows; "none": rows as given
        threshold=0.5,  # binary and multilabel decision threshold on the probability
        random_state=0,  # seeds init, shuffling, dropout and noise; None = a fresh seed
        device="cpu",  # the reference's laptops; "cuda" works but rarely pays for heads this small
        learn_lambda=False,  # train the modality-gap shift's lambda jointly (fit(..., gap=...)); two equal blocks
        lambda_lr=3e-4,  # learning rate of lambda, as in the reference's learned-lambda variant
        modality_dropout=0.0,  # share of complete training rows with one modality masked (per epoch); 2+ blocks
        rank=4,  # lowrank fusion: rank of the modality factors (Liu et al. used 4 on most tasks)
        attention_heads=4,  # attention fusion: heads of its Transformer layer (divides late_hidden_dim)
    ):
        self.fusion = fusion
        self.modality_dims = modality_dims
        self.hidden_dim = hidden_dim
        self.late_hidden_dim = late_hidden_dim
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.class_weight = class_weight
        self.patience = patience
        self.noise_std = noise_std
        self.scale = scale
        self.threshold = threshold
        self.random_state = random_state
        self.device = device
        self.learn_lambda = learn_lambda
        self.lambda_lr = lambda_lr
        self.modality_dropout = modality_dropout
        self.rank = rank
        self.attention_heads = attention_heads

    # -- pieces ---------------------------------------------------------------------------

    def _build_model(self, gap=None, mean=None, scale=None) -> nn.Module:
        n_out = 1 if self.task_ == "binary" else len(self.classes_)
        dims, width, token = list(self.modality_dims_), self.late_hidden_dim, any(self.learned_missing_)
        if self.fusion == "early":
            head = EarlyFusionHead(dims, self.hidden_dim, self.dropout, n_out, missing_token=token)
        elif self.fusion == "late":
            head = LateFusionHead(dims, width, self.dropout, n_out, missing_token=token)
        elif self.fusion == "gated":
            head = GatedFusionHead(dims, width, self.dropout, n_out)
        elif self.fusion == "attention":
            head = AttentionFusionHead(dims, width, self.dropout, n_out, heads=int(self.attention_heads))
        else:
            head = LowRankFusionHead(dims, width, self.dropout, n_out, rank=int(self.rank), missing_token=token)
        if not self.learn_lambda:
            return head
        d = self.modality_dims_[0]
        return _ShiftThenHead(head, np.zeros(d) if gap is None else gap,
                              np.zeros(2 * d) if mean is None else mean, np.ones(2 * d) if scale is None else scale)

    @property
    def learned_missing_(self) -> tuple[bool, ...]:
        """Per modality block: whether the head learned to take a row without it (rows lacking it in
        training, or modality dropout); a row lacking a block marked False is refused."""
        if len(self.modality_dims_) < 2:
            return (False,)
        return tuple(bool(n) or float(self.modality_dropout) > 0 for n in self.missing_rows_)

    @property
    def learned_lambda_(self) -> float:
        """The lambda the classifier learned (learn_lambda=True only)."""
        self._check_fitted()
        return float(self.model_.shift.lam.detach())

    def _loss(self, targets) -> nn.Module:
        """The task's loss with 'balanced' weights (kept as loss_weight_). Binary uses pos_weight =
        n_neg / n_pos (the reference's binary weighting did nothing); multilabel the same per label.
        A dict {label: weight} sets per-class weights (binary: pos_weight = w_positive / w_negative)."""
        n = len(targets)
        given = self._class_weights()
        if given is not None:
            w = np.array([given[i] for i in range(len(self.classes_))])
            w = w if self.task_ == "multiclass" else np.array([w[1] / w[0]])
        elif self.task_ == "multiclass":
            counts = np.bincount(targets, minlength=len(self.classes_))
            w = n / (len(self.classes_) * counts) if self.class_weight == "balanced" else None
        else:
            pos = targets.sum(axis=0) if self.task_ == "multilabel" else np.array([targets.sum()])
            w = (n - pos) / np.maximum(pos, 1) if self.class_weight == "balanced" else None
        self.loss_weight_ = None if w is None else np.asarray(w, dtype=np.float64)
        w = None if w is None else torch.tensor(w, dtype=torch.float32)
        return nn.CrossEntropyLoss(weight=w) if self.task_ == "multiclass" else nn.BCEWithLogitsLoss(pos_weight=w)

    def _targets_tensor(self, targets) -> torch.Tensor:
        if self.task_ == "multiclass":
            return torch.from_numpy(targets)
        t = torch.from_numpy(np.asarray(targets, dtype=np.float32))
        return t[:, None] if self.task_ == "binary" else t

    def _proba(self, logits: torch.Tensor) -> np.ndarray:
        logits = logits.double()  # float64 so rows sum to 1 to rounding
        if self.task_ == "multiclass":
            return torch.softmax(logits, dim=1).cpu().numpy()
        p = torch.sigmoid(logits).cpu().numpy()
        return np.column_stack([1 - p[:, 0], p[:, 0]]) if self.task_ == "binary" else p

    def _check_params(self):
        if self.fusion not in FUSIONS:
            raise InvalidInputError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if not 0.0 <= float(self.modality_dropout) <= 1.0:
            raise InvalidInputError(f"modality_dropout must lie in [0, 1], got {self.modality_dropout!r}")
        if self.fusion == "attention" and int(self.late_hidden_dim) % int(self.attention_heads):
            raise InvalidInputError(f"fusion='attention': late_hidden_dim {self.late_hidden_dim} must be a multiple of "
                                    f"attention_heads {self.attention_heads}")
        if not (self.class_weight in ("balanced", None) or isinstance(self.class_weight, dict)):
            raise InvalidInputError(f"class_weight must be 'balanced', None or a dict {{label: weight}}, got "
                                    f"{self.class_weight!r}")
        if self.scale not in ("standard", "none"):
            raise InvalidInputError(f"scale must be 'standard' or 'none', got {self.scale!r}")
        if int(self.epochs) < 1 or int(self.batch_size) < 2:
            raise InvalidInputError("epochs must be >= 1 and batch_size >= 2")

    # -- API ------------------------------------------------------------------------------

    def fit(self, X, y, eval_set=None, gap=None):
        """Train; with eval_set=(X_val, y_val) keep the epoch with the best validation macro-F1
        (ties: lower validation loss) and stop after `patience` epochs without improvement.

        learn_lambda=True: X holds L2-normalised [image | text] blocks of equal width and `gap` is
        GapShift's gap fitted on the training rows; the model shifts by lambda * gap / 2 itself
        (lambda starts at 0) and standardises after the shift with statistics of the unshifted rows.
        """
        t_fit = time.perf_counter()
        self._check_params()
        X, dims, names = _as_matrix(X, self.modality_dims, allow_missing=True)
        mask = presence_mask(X, dims)
        task, classes, targets = _encode_labels(y)
        if len(targets) != len(X):
            raise InvalidInputError(f"X has {len(X)} rows but y has {len(targets)}")
        if self.fusion in HEADS_NEEDING_BLOCKS and len(dims) < 2:
            raise InvalidInputError(f"fusion={self.fusion!r} needs at least two modality blocks: pass modality_dims or "
                                    f"a dict X")
        if float(self.modality_dropout) > 0 and len(dims) < 2:
            raise InvalidInputError("modality_dropout needs at least two modality blocks: pass modality_dims or a dict X")
        if self.learn_lambda and not mask.all():
            raise InvalidInputError("learn_lambda needs complete rows: stand in for a missing modality first")
        if not mask.any(axis=0).all():
            raise InvalidInputError(f"no training row has modality block {int(np.argmin(mask.any(axis=0))) + 1}")
        self.task_, self.classes_, self.modality_dims_, self.modalities_ = task, classes, dims, names
        self.n_features_in_ = X.shape[1]
        self.missing_rows_ = [int(v) for v in (~mask).sum(axis=0)]  # training rows lacking each block
        self._fit_scaling(X, mask)
        # noise unit: each input feature's training std, measured on what the head is fed
        noise_unit = self.scale_ if self.scale == "none" or self.learn_lambda else np.ones_like(self.scale_)
        if self.learn_lambda:
            if gap is None or len(dims) != 2 or dims[0] != dims[1] or len(gap) != dims[0]:
                raise InvalidInputError("learn_lambda needs two equal-width blocks and fit(..., gap=<gap vector>)")
            # the shift happens inside the model, so standardisation moves there too (after the shift)
            inner_mean, inner_scale = self.mean_, self.scale_
            if self.scale == "none":
                inner_mean, inner_scale = np.zeros_like(inner_mean), np.ones_like(inner_scale)
        if self.learn_lambda or self.scale == "none":
            self.mean_, self.scale_ = np.zeros_like(self.mean_), np.ones_like(self.scale_)
        dev = torch.device(self.device)
        Xt, yt = torch.from_numpy(self._inputs(X)).to(dev), self._targets_tensor(targets).to(dev)
        Mt = torch.from_numpy(mask).to(dev)
        noise_unit = torch.from_numpy(noise_unit.astype(np.float32)).to(dev)
        loss_fn = self._loss(targets).to(dev)
        val = None
        if eval_set is not None:
            X_val, y_val = eval_set
            _, _, val_targets = _encode_labels(y_val, self.classes_, self.task_)
            Xv, Mv = self._model_input(X_val)
            val = (Xv.to(dev), Mv.to(dev), self._targets_tensor(val_targets).to(dev), val_targets)

        seed = self.random_state if self.random_state is not None else int(np.random.default_rng().integers(2**62))
        self.history_, best_key, best_state, stale = [], None, None, 0
        # A step of a head this size is well under a millisecond: syncing a second thread costs more
        # than it saves, and on a laptop shared with other work it costs 3-7x (measured on 2 cores,
        # BRSET-shaped 4864-d input: 0.32 s/epoch on 1 thread, 0.97 s on 2). Only huge heads keep all.
        width = self.hidden_dim if self.fusion == "early" else self.late_hidden_dim
        small = self.batch_size * self.n_features_in_ * width < 500_000_000
        with _torch_threads(1 if small else torch.get_num_threads()), torch.random.fork_rng(devices=[]):
            # fork_rng: seed init and dropout without touching the caller's RNG
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)  # shuffling and noise
            if self.learn_lambda:
                self.model_ = self._build_model(gap, inner_mean, inner_scale).to(dev)
                groups = [{"params": self.model_.head.parameters()},
                          {"params": [self.model_.shift.lam], "lr": self.lambda_lr, "weight_decay": 0.0}]
            else:
                self.model_ = self._build_model().to(dev)
                groups = self.model_.parameters()
            # fused: one kernel for all parameters; ~25 % faster per step for heads this small
            opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay, fused=True)
            for epoch in range(1, int(self.epochs) + 1):
                t0 = time.perf_counter()
                row = {"epoch": epoch, "train_loss": self._train_epoch(Xt, Mt, yt, loss_fn, opt, gen, noise_unit)}
                if self.learn_lambda:
                    row["lambda"] = float(self.model_.shift.lam.detach())  # its trajectory, for the plot
                row["val_loss"], row["val_macro_f1"] = self._validate(val, loss_fn) if val else (None, None)
                row["seconds"] = time.perf_counter() - t0
                self.history_.append(row)
                if val is None:
                    continue
                key = (row["val_macro_f1"], -row["val_loss"])
                if best_key is None or key > best_key:
                    best_key, stale, self.best_epoch_ = key, 0, epoch
                    best_state = {k: v.detach().clone() for k, v in self.model_.state_dict().items()}
                else:
                    stale += 1
                    if self.patience is not None and stale >= self.patience:
                        break
        if best_state is None:
            self.best_epoch_ = len(self.history_)
        else:
            self.model_.load_state_dict(best_state)
        self.model_.eval()
        self.n_parameters_ = sum(p.numel() for p in self.model_.parameters())
        self.fit_seconds_ = time.perf_counter() - t_fit
        return self

    def _train_epoch(self, Xt, Mt, yt, loss_fn, opt, gen, noise_unit) -> float:
        # Index tensors held in memory instead of a DataLoader: no per-row collate, no workers.
        self.model_.train()
        n, bs = len(Xt), int(self.batch_size)
        perm = torch.randperm(n, generator=gen).to(Xt.device)
        total, seen = torch.zeros((), device=Xt.device), 0
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            if len(idx) < 2:  # BatchNorm cannot normalise a batch of one row in training
                continue
            xb = Xt.index_select(0, idx)  # 2-5x faster than fancy indexing for a row gather
            if self.noise_std > 0:
                xb = xb + self.noise_std * noise_unit * torch.randn(xb.shape, generator=gen).to(xb.device)
            mb = Mt.index_select(0, idx)
            if self.modality_dropout > 0:  # training only: predict and validation see every present block
                mb = _drop_one_modality(mb, float(self.modality_dropout), gen)
            loss = loss_fn(self.model_(xb, mb), yt.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
            seen += len(idx)
        return float(total) / seen

    @torch.no_grad()
    def _validate(self, val, loss_fn) -> tuple[float, float]:
        from sklearn.metrics import f1_score  # fit only: predict does not pay for sklearn.metrics

        Xv, Mv, yv, targets = val
        self.model_.eval()
        logits = self.model_(Xv, Mv)
        pred = self._index(self._proba(logits))  # the same path as predict, so scores reproduce
        labels = list(range(len(self.classes_)))
        f1 = f1_score(targets.astype(np.int64), pred, average="macro", labels=labels, zero_division=0)
        return float(loss_fn(logits, yv)), float(f1)

    def predict_proba(self, X) -> np.ndarray:
        """Binary (n, 2) [1-p, p]; multiclass softmax (n, k); multilabel sigmoid (n, L)."""
        Xt, Mt = self._model_input(X)
        self.model_.eval()
        with torch.no_grad():
            return self._proba(self.model_(Xt.to(self.device), Mt.to(self.device)))

    def _inputs(self, X) -> np.ndarray:
        """Standardised rows with a missing block's NaN as 0 (the head puts its token or mask there)."""
        return np.nan_to_num(self._standardise(X), copy=False, nan=0.0)

    def _model_input(self, X) -> tuple[torch.Tensor, torch.Tensor]:
        """(standardised X, presence mask) of rows to score; a block the head never saw missing is refused."""
        X = self._check_X(X)
        mask = presence_mask(X, self.modality_dims_)
        for j, learned in enumerate(self.learned_missing_):
            lacking = int((~mask[:, j]).sum())
            if lacking and not learned:
                name = self.modalities_[j] if self.modalities_ else f"modality block {j + 1}"
                raise InvalidInputError(refusal(name, lacking, len(X)))
        return torch.from_numpy(self._inputs(X)), torch.from_numpy(mask)

    def model_bytes(self) -> int:
        """Bytes of the head's parameters and buffers (BatchNorm statistics included)."""
        self._check_fitted()
        tensors = list(self.model_.parameters()) + list(self.model_.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def save(self, folder) -> Path:
        """Write model.safetensors (weights, mean_, scale_) and estimator.json; no pickle."""
        self._check_fitted()
        tensors = {f"model.{k}": v for k, v in self.model_.state_dict().items()}
        tensors["mean_"], tensors["scale_"] = torch.from_numpy(self.mean_), torch.from_numpy(self.scale_)
        meta = {"format": "embedkit.FusionClassifier", "format_version": 2, **self._fitted_meta()}
        meta.update(best_epoch=self.best_epoch_, history=self.history_, loss_weight=self.loss_weight_,
                    missing_rows=self.missing_rows_)
        return _write(folder, tensors, meta)

    @classmethod
    def load(cls, folder, device=None) -> "FusionClassifier":
        """A fitted estimator from save(); device overrides the saved one (e.g. 'cpu')."""
        meta, tensors = _read(folder, "embedkit.FusionClassifier")
        params = dict(cls._params(meta), device=device or _loadable_device(meta["params"]["device"]))
        if params["modality_dims"] is not None:
            params["modality_dims"] = tuple(params["modality_dims"])
        est = cls(**params)
        est._restore_meta(meta)
        est.best_epoch_, est.history_ = meta["best_epoch"], meta["history"]
        # format 1 (before missing modalities): complete rows only, no token
        est.missing_rows_ = [int(v) for v in meta.get("missing_rows", [0] * len(est.modality_dims_))]
        est.loss_weight_ = None if meta["loss_weight"] is None else np.asarray(meta["loss_weight"])
        est.mean_, est.scale_ = tensors.pop("mean_").numpy(), tensors.pop("scale_").numpy()
        with torch.device("meta"):  # the shapes its JSON implies, checked before anything is allocated
            expected = {f"model.{k}": tuple(v.shape) for k, v in est._build_model().state_dict().items()}
        check_same_shapes(expected, {k: tuple(v.shape) for k, v in tensors.items()}, Path(folder))
        est.model_ = est._build_model()
        est.model_.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items()})
        est.model_.to(est.device).eval()
        est.n_parameters_ = sum(p.numel() for p in est.model_.parameters())
        return est


def _drop_one_modality(mask: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """Modality dropout: each complete row, with probability `share`, loses one block chosen at random."""
    n, m = mask.shape
    hit = (torch.rand(n, generator=gen) < share).to(mask.device) & mask.all(dim=1)
    which = torch.randint(m, (n,), generator=gen).to(mask.device)
    return mask & ~(hit[:, None] & (torch.arange(m, device=mask.device)[None, :] == which[:, None]))


class _ShiftThenHead(nn.Module):
    """Learned-lambda gap shift on normalised [image | text], then standardisation, then the head."""

    def __init__(self, head: nn.Module, gap, mean, scale):
        super().__init__()
        from embedkit.fusion.align import LearnedGapShift

        self.head, self.shift = head, LearnedGapShift(gap)
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)).clone())
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, dtype=np.float32)).clone())

    def forward(self, x, mask=None):  # complete rows only (fit refuses others): the mask is all True
        d = x.shape[1] // 2
        image, text = self.shift(x[:, :d], x[:, d:])
        return self.head((torch.cat([image, text], dim=1) - self.mean) / self.scale, mask)


class LogisticBaseline(_EmbeddingClassifier):
    """StandardScaler + LogisticRegression (one-vs-rest for multilabel) on the concatenated blocks.

    The baseline a fusion head has to beat. Predictions come from the stored coef_/intercept_, so
    a loaded model computes exactly what the fitted one did.
    """

    threshold = 0.5  # binary / multilabel decision threshold, as LogisticRegression.predict

    def __init__(self, C=1.0, class_weight="balanced", max_iter=1000, random_state=0):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X, y):
        from sklearn.linear_model import LogisticRegression  # fit only, as the others below
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.preprocessing import StandardScaler

        t_fit = time.perf_counter()
        X, dims, names = _as_matrix(X)
        task, classes, targets = _encode_labels(y)
        if len(targets) != len(X):
            raise InvalidInputError(f"X has {len(X)} rows but y has {len(targets)}")
        self.task_, self.classes_, self.modality_dims_, self.modalities_ = task, classes, dims, names
        self.n_features_in_ = X.shape[1]
        scaler = StandardScaler().fit(X)
        self.mean_, self.scale_ = scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64)
        Xs = self._standardise(X)
        # the regression sees class indices, so a dict keyed by labels is re-keyed by index
        weights = self._class_weights() if isinstance(self.class_weight, dict) else self.class_weight
        lr = LogisticRegression(C=self.C, class_weight=weights, max_iter=self.max_iter, random_state=self.random_state)
        if task == "multilabel":
            constant = [str(c) for c, col in zip(classes, targets.T) if col.min() == col.max()]
            if constant:
                raise InvalidInputError(f"label columns {constant} hold one value only; drop them for LogisticBaseline")
            ovr = OneVsRestClassifier(lr).fit(Xs, targets.astype(np.int64))
            coef = np.vstack([e.coef_ for e in ovr.estimators_])
            intercept = np.concatenate([e.intercept_ for e in ovr.estimators_])
            self.n_iter_ = np.concatenate([e.n_iter_ for e in ovr.estimators_]).astype(np.int32)
        else:
            lr.fit(Xs, targets)
            coef, intercept = lr.coef_, lr.intercept_
            self.n_iter_ = np.asarray(lr.n_iter_, dtype=np.int32)
        # C order, as a loaded model has it: BLAS sums a Fortran-ordered matrix in another order, and the
        # fitted and reloaded models would then differ in the last bit
        self.coef_ = np.ascontiguousarray(coef, dtype=np.float64)
        self.intercept_ = np.ascontiguousarray(intercept, dtype=np.float64)
        self.fit_seconds_ = time.perf_counter() - t_fit
        return self

    def decision_function(self, X) -> np.ndarray:
        """Logits: (n,) for binary as in scikit-learn, else (n, k) or (n, L)."""
        z = self._standardise(self._check_X(X)).astype(np.float64) @ self.coef_.T + self.intercept_
        return z[:, 0] if self.task_ == "binary" else z

    def predict_proba(self, X) -> np.ndarray:
        """Same shapes as FusionClassifier.predict_proba."""
        z = self.decision_function(X)
        if self.task_ == "multiclass":
            return softmax(z, axis=1)
        p = expit(z)
        return np.column_stack([1 - p, p]) if self.task_ == "binary" else p

    def model_bytes(self) -> int:
        """Bytes of the stored weights and standardisation statistics."""
        self._check_fitted()
        return sum(getattr(self, k).nbytes for k in ("coef_", "intercept_", "mean_", "scale_"))

    def save(self, folder) -> Path:
        self._check_fitted()
        names = ("coef_", "intercept_", "mean_", "scale_")
        tensors = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k))) for k in names}
        meta = {"format": "embedkit.LogisticBaseline", "format_version": 1, **self._fitted_meta(),
                "n_iter": self.n_iter_.tolist()}
        return _write(folder, tensors, meta)

    @classmethod
    def load(cls, folder) -> "LogisticBaseline":
        meta, tensors = _read(folder, "embedkit.LogisticBaseline")
        est = cls(**cls._params(meta))
        est._restore_meta(meta)
        est.n_iter_ = np.asarray(meta.get("n_iter", [0]), dtype=np.int32)
        n = est.n_features_in_
        check_same_shapes({"coef_": (tensors["coef_"].shape[0], n), "intercept_": (tensors["coef_"].shape[0],),
                           "mean_": (n,), "scale_": (n,)} if "coef_" in tensors else {"coef_": ()},
                          {k: tuple(v.shape) for k, v in tensors.items()}, Path(folder))
        for k, v in tensors.items():
            setattr(est, k, v.numpy())
        return est
