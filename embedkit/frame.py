"""An extract folder as a pandas DataFrame: one row per sample, every carried column with its type.

    df = embedkit.load("emb")                 # id, labels, split, group, metadata, ..., image_embedding
    X = df.embedkit.matrix("image")           # float32 (rows, dim), for scikit-learn or numpy
    blocks = df.embedkit.blocks()             # {"image": ..., "text": ...}, for FusionClassifier

Each `<modality>_embedding` cell holds that row's vector (a read-only view into one matrix, so the
frame costs no copy). Numbers stored by extract come back as numbers (age 65, not "65"); an integer
column with missing cells reads as float with NaN, as `pandas.read_parquet` gives it. The frame
keeps the encoders' provenance in `df.attrs["embedkit"]`.

Hugging Face `datasets`: `datasets.Dataset.from_pandas(df)` turns the frame into a dataset (the
vectors become a list-of-float32 feature), and each `<modality>__<model>/part-*.parquet` is plain
Parquet that `datasets.load_dataset("parquet", data_files=...)` reads directly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from embedkit.errors import EmbedkitError
from embedkit.store import load_embeddings

SUFFIX = "_embedding"
_AFTER_LABELS = ("split", "group")  # column order: id, labels, these, metadata, the rest, embeddings


def load(emb, modalities: list[str] | None = None, models: dict[str, str] | None = None,
         how: str = "inner") -> pd.DataFrame:
    """Read an `embedkit extract` folder into a DataFrame joined on id across modalities.

    modalities: which embeddings (default: all found); models: pick one model per modality when several
    were extracted, e.g. {"image": "dinov2-small"}; how="outer" keeps rows lacking a modality (their
    `<modality>_embedding` cell is None).
    """
    if how not in ("inner", "outer"):
        raise EmbedkitError(f"how must be 'inner' or 'outer', got '{how}'")
    es = load_embeddings(emb, modalities=modalities, models=models, how=how)
    first = next(iter(es.provenance.values()), {})
    labels = [c for c in first.get("label_columns", []) if c in es.columns]
    metadata = [c for c in first.get("metadata_columns", []) if c in es.columns]
    order = [*labels, *[c for c in _AFTER_LABELS if c in es.columns], *metadata]
    order += sorted(c for c in es.columns if c not in order)
    data = {"id": _typed(es.ids)}
    for name in order:
        data[name] = _typed(es.columns[name])
    for m, matrix in es.embeddings.items():
        matrix.setflags(write=False)  # cells are views: an edit in one cell must not reach the others
        cells = np.empty(len(matrix), dtype=object)
        for i in np.flatnonzero(es.present[m]):  # one view per row; absent rows stay None
            cells[i] = matrix[i]
        data[m + SUFFIX] = pd.Series(cells, dtype=object)
    df = pd.DataFrame(data)
    df.attrs["embedkit"] = {"modalities": list(es.embeddings), "provenance": es.provenance,
                            "unmatched_rows": es.unmatched, "source": str(emb)}
    return df


def _typed(values: np.ndarray) -> pd.Series:
    """An object column as pandas reads the same Parquet column: numbers as numbers, text as text."""
    try:
        return pa.array(values.tolist(), from_pandas=True).to_pandas()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return pd.Series(values, dtype=object)  # mixed types: as stored


@pd.api.extensions.register_dataframe_accessor("embedkit")
class EmbeddingsAccessor:
    """`df.embedkit`: the embedding matrices of a frame from `embedkit.load` (also after filtering rows)."""

    def __init__(self, df: pd.DataFrame):
        self._df = df

    @property
    def modalities(self) -> list[str]:
        """Modalities with an embedding column in this frame."""
        return [c.removesuffix(SUFFIX) for c in self._df.columns if str(c).endswith(SUFFIX)]

    def matrix(self, modality: str) -> np.ndarray:
        """float32 (rows, dim) of one modality, in the frame's current row order."""
        column = modality + SUFFIX
        if column not in self._df.columns:
            raise EmbedkitError(f"no '{column}' column; this frame has embeddings for "
                                f"{', '.join(self.modalities) or 'no modality'}")
        cells = self._df[column].to_numpy()
        missing = int(sum(c is None for c in cells))
        if missing:
            raise EmbedkitError(f"{missing} rows have no {modality} embedding (an outer join): select rows with "
                                f"df[df['{column}'].notna()] first")
        if not len(cells):
            dim = (self._df.attrs.get("embedkit", {}).get("provenance", {}).get(modality, {}).get("dim") or 0)
            return np.zeros((0, int(dim)), dtype=np.float32)
        return np.stack(cells).astype(np.float32, copy=False)

    def blocks(self, modalities: list[str] | None = None) -> dict[str, np.ndarray]:
        """{modality: matrix}: the dict X that FusionClassifier and LogisticBaseline accept."""
        return {m: self.matrix(m) for m in (modalities or self.modalities)}

    @property
    def provenance(self) -> dict:
        """modality -> the encoder spec and fingerprint the embeddings were made with."""
        return self._df.attrs.get("embedkit", {}).get("provenance", {})
