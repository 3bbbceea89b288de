"""Out-of-distribution guard: says when a row is unlike anything the model was trained on.

A clinic will feed cases from another scanner, another body part, or a photo of a screen; the
classifier still returns a confident label. The guard scores each row in the model's input space
(after the saved alignment), per modality, by the cosine distance to the nearest prototype of the
training rows (k-NN on L2-normalised features, Sun et al., ICML 2022). The threshold is a percentile
(default 95) of the validation rows' scores, so about 5 % of cases like the validation rows are
flagged by design. A row's `ood_score` is the largest over its modalities of score / threshold; it is
flagged (`ood`) above 1. The guard never changes a prediction; it says not to trust it.

Prototypes (`prototypes`):
  centroids  (default) k-means centres of the training rows, each the mean of at least
             `min_rows_per_centroid` rows: the model folder holds no single patient's embedding.
  rows       every training row: more sensitive to a subtle shift, but the folder then holds
             each training row's embedding (text embeddings can be inverted towards the text).
Measured against Mahalanobis distance (Lee et al., NeurIPS 2018) in benchmarks/ood_guard.py.

Saved as ood_guard.safetensors (the prototypes) + a JSON entry in embedkit_model.json; `predict`
needs numpy and safetensors only (k-means runs at fit time).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from embedkit.errors import EmbedkitError

GUARD_FILE = "ood_guard.safetensors"
PROTOTYPES = ("centroids", "rows")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


class OODGuard:
    """Distance-to-training guard per modality, thresholded on validation rows.

    fit(train_blocks, val_blocks): dicts modality -> float [n, d] in the model's input space.
    score(blocks, present) -> (ood_score [n], per-modality scores {m: [n]}), NaN where a row lacks m.
    """

    def __init__(self, prototypes: str = "centroids", percentile: float = 95.0, max_centroids: int = 64,
                 rows_per_centroid: int = 4, min_rows_per_centroid: int = 3, random_state: int = 0):
        self.prototypes = prototypes  # centroids | rows (see the module docstring)
        self.percentile = percentile  # of the validation rows' scores: the threshold
        self.max_centroids = max_centroids  # k-means k = min(max_centroids, n_train // rows_per_centroid)
        self.rows_per_centroid = rows_per_centroid
        self.min_rows_per_centroid = min_rows_per_centroid  # smaller clusters are dissolved into their neighbours
        self.random_state = random_state

    def fit(self, train_blocks: dict, val_blocks: dict) -> "OODGuard":
        if self.prototypes not in PROTOTYPES:
            raise EmbedkitError(f"OOD guard prototypes must be one of {', '.join(PROTOTYPES)}, got "
                                f"'{self.prototypes}'")
        if not 50.0 <= float(self.percentile) < 100.0:
            raise EmbedkitError(f"the OOD guard's percentile must be in [50, 100), got {self.percentile}")
        self.prototypes_, self.thresholds_, self.dims_ = {}, {}, {}
        for m, x in train_blocks.items():
            x = _unit(x)
            self.prototypes_[m] = self._prototypes(x)
            self.dims_[m] = int(x.shape[1])
            val = val_blocks.get(m)
            if val is None or not len(val):
                raise EmbedkitError("the OOD guard needs validation rows to set its threshold")
            # a validation score of 0 (a duplicate of a prototype) would make every distance "far": floor it
            self.thresholds_[m] = max(float(np.percentile(self.distance(m, val), self.percentile)), 1e-6)
        return self

    def _prototypes(self, x: np.ndarray) -> np.ndarray:
        k = min(self.max_centroids, len(x) // self.rows_per_centroid)
        if self.prototypes == "rows" or k < 2:
            return x.copy() if self.prototypes == "rows" else _unit(x.mean(axis=0, keepdims=True))
        from sklearn.cluster import KMeans

        labels = KMeans(k, n_init=1, random_state=self.random_state).fit(x).labels_
        counts = np.bincount(labels, minlength=k)
        kept = np.flatnonzero(counts >= self.min_rows_per_centroid)
        centres = _unit(np.stack([x[labels == c].mean(axis=0) for c in kept]))
        # rows of dissolved small clusters join their nearest kept centre; centres are then recomputed once
        nearest = (x @ centres.T).argmax(axis=1)
        return _unit(np.stack([x[nearest == j].mean(axis=0) for j in range(len(kept)) if (nearest == j).any()]))

    def distance(self, modality: str, x: np.ndarray) -> np.ndarray:
        """Cosine distance of each row to its nearest prototype (0 = identical direction, 2 = opposite)."""
        p = self.prototypes_[modality]
        x = _unit(x)
        out = np.empty(len(x), dtype=np.float32)
        for start in range(0, len(x), 1024):  # 1024 x n_prototypes scores at a time
            out[start:start + 1024] = 1.0 - (x[start:start + 1024] @ p.T).max(axis=1)
        return out

    def score(self, blocks: dict, present: dict | None = None) -> tuple[np.ndarray, dict]:
        """ood_score per row: max over the row's present modalities of distance / threshold (> 1: flagged)."""
        n = len(next(iter(blocks.values())))
        per = {}
        for m in self.prototypes_:
            if m not in blocks:
                continue
            s = np.full(n, np.nan, dtype=np.float32)
            rows = np.arange(n) if present is None or m not in present else np.flatnonzero(present[m])
            if len(rows):
                s[rows] = self.distance(m, blocks[m][rows])
            per[m] = s
        if not per:
            raise EmbedkitError(f"the OOD guard was fitted on {', '.join(self.prototypes_)}; these rows have none")
        ratios = np.stack([per[m] / self.thresholds_[m] for m in per], axis=1)
        return np.nanmax(np.where(np.isnan(ratios), -np.inf, ratios), axis=1).astype(np.float32), per

    def to_dict(self) -> dict:
        """What embedkit_model.json keeps (the prototypes go to GUARD_FILE)."""
        return {"method": "cosine distance to the nearest training prototype (k-NN on L2-normalised features)",
                "prototypes": self.prototypes, "percentile": self.percentile,
                "thresholds": {m: round(t, 8) for m, t in self.thresholds_.items()},
                "n_prototypes": {m: int(len(p)) for m, p in self.prototypes_.items()}, "dims": self.dims_,
                "min_rows_per_centroid": self.min_rows_per_centroid if self.prototypes == "centroids" else 1,
                "threshold_rule": f"{self.percentile:g}th percentile of the validation rows' distances",
                "file": GUARD_FILE}

    def save(self, folder) -> dict:
        from safetensors.numpy import save_file

        save_file({m: np.ascontiguousarray(p, dtype=np.float32) for m, p in self.prototypes_.items()},
                  str(Path(folder) / GUARD_FILE))
        return self.to_dict()

    @classmethod
    def load(cls, folder, entry: dict) -> "OODGuard":
        """The guard a model folder describes in `entry` (embedkit_model.json's "ood_guard"), checked."""
        from safetensors.numpy import load_file

        from embedkit.guards import check_finite, check_safetensors, check_same_shapes

        path = Path(folder) / GUARD_FILE
        if not path.is_file():
            raise EmbedkitError(f"{folder} is damaged: embedkit_model.json describes an OOD guard but {GUARD_FILE} "
                                f"is missing; retrain it")
        try:
            guard = cls(prototypes=entry["prototypes"], percentile=float(entry["percentile"]))
            thresholds = {m: float(t) for m, t in entry["thresholds"].items()}
            expected = {m: (int(entry["n_prototypes"][m]), int(entry["dims"][m])) for m in thresholds}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise EmbedkitError(f"{folder}/embedkit_model.json: the OOD guard entry is damaged or was edited; "
                                f"retrain the model") from None
        check_same_shapes(expected, check_safetensors(path), path)
        arrays = load_file(str(path))
        check_finite(arrays, path)
        guard.prototypes_ = {m: arrays[m].astype(np.float32) for m in thresholds}
        guard.thresholds_, guard.dims_ = thresholds, {m: d for m, (_, d) in expected.items()}
        return guard


def split_blocks(x: np.ndarray, modalities: list[str], dims: dict) -> dict:
    """The model's input matrix cut back into its modalities (model_features concatenates them in order)."""
    out, start = {}, 0
    for m in modalities:
        out[m] = x[:, start:start + dims[m]]
        start += dims[m]
    if start != x.shape[1]:
        raise EmbedkitError(f"the OOD guard expects {start} input features, the model gives {x.shape[1]}")
    return out


def ood_summary(flags: np.ndarray) -> dict:
    flags = np.asarray(flags, dtype=bool)
    return {"rows": int(len(flags)), "flagged": int(flags.sum()),
            "share": round(float(flags.mean()), 4) if len(flags) else 0.0}


def ood_columns(score) -> dict:
    """The two columns predict writes per row: ood_score (> 1 means farther than the threshold) and ood."""
    if score is None:
        return {}
    import pyarrow as pa

    score = np.asarray(score, dtype=np.float32)
    return {"ood_score": pa.array(score), "ood": pa.array(score > 1.0)}


def guard_scores(model_dir, info: dict, x: np.ndarray, had: list[str] | None = None):
    """ood_score per row of the model input `x` (None for a model folder without a guard).
    `had`: the modalities each row really has ("image+text", ...); a stood-in modality is not scored."""
    entry = info.get("ood_guard")
    if not entry:
        return None
    guard = OODGuard.load(model_dir, entry)
    blocks = split_blocks(x, info["modalities"], guard.dims_)
    present = None if had is None else {m: np.array([m in h.split("+") for h in had], dtype=bool) for m in blocks}
    return guard.score(blocks, present)[0]


def metrics_by_flag(y, proba, classes, task: str, threshold: float, flags, min_rows: int = 10,
                    all_rows: dict | None = None) -> dict:
    """The metrics of the rows the guard passed and of those it flagged, apart (n and a note when few).
    all_rows: compute_metrics of every row, reused when the guard flagged none."""
    from embedkit.fusion.evaluate import compute_metrics

    flags = np.asarray(flags, dtype=bool)
    out = {}
    for name, rows in (("in_distribution", ~flags), ("flagged", flags)):
        n = int(rows.sum())
        entry: dict = {"n": n}
        if n:
            m = all_rows if all_rows is not None and n == len(flags) else \
                compute_metrics(np.asarray(y)[rows], np.asarray(proba)[rows], classes, task, threshold)
            entry["metrics"] = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if n < min_rows:
            entry["note"] = f"{n} rows: too few to read a metric from" if n else "no rows"
        out[name] = entry
    return out
