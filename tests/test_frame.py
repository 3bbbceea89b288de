"""embedkit.load: an extract folder as a typed pandas DataFrame, and numbers kept as numbers at extract."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import embedkit
from embedkit.errors import EmbedkitError
from embedkit.extract import ExtractConfig, extract
from embedkit.items import SourceOptions
from embedkit.sources import infer_column_types, scan_source
from embedkit.store import load_embeddings

from conftest import REPO, make_image, make_report


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _clinic_table(root, n=30):
    """Images + report text in a CSV whose ids have leading zeros and whose age / label are numbers."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        make_image(root / f"img{i}.png", i, size=(40, 40))
        rows.append({"id": f"{i:06d}", "image": f"img{i}.png", "report": make_report(i),
                     "age": str(40 + i) if i != 3 else "NA", "weight": f"{60 + i}.5", "sex": "FM"[i % 2],
                     "mrn": f"00{i}", "grade": str(i % 3), "split": "train" if i < 20 else "test",
                     "patient": f"P{i // 2}"})
    return _write_csv(root / "meta.csv", rows)


@pytest.fixture
def extracted(tiny_models, tmp_path):
    table = _clinic_table(tmp_path / "data")
    src = SourceOptions(metadata=table, id_col="id", image_col="image", text_col="report", label_cols=["grade"],
                        split_col="split", group_col="patient")
    cfg = ExtractConfig(image_model=str(tiny_models["dinov2"]), text_model=str(tiny_models["bert"]), progress=False)
    extract(tmp_path / "data", tmp_path / "emb", cfg, source=src)
    return tmp_path / "emb"


def test_numeric_columns_are_typed_and_ids_stay_text():
    rows = [{"id": "000123", "age": "65", "w": "65.50", "e": "1e3", "code": "007", "na": "NA", "mix": "3"},
            {"id": "000124", "age": "NA", "w": "70", "e": "2", "code": "8", "na": None, "mix": "x"}]
    assert infer_column_types(rows) == [
        {"id": "000123", "age": 65, "w": 65.5, "e": 1000.0, "code": "007", "na": "NA", "mix": "3"},
        {"id": "000124", "age": None, "w": 70.0, "e": 2.0, "code": "8", "na": None, "mix": "x"}]
    typed = [{"n": 3}, {"n": "4"}]  # a column JSON typed (even partly) is left as it is
    assert infer_column_types(typed) == [{"n": 3}, {"n": "4"}]


def test_extract_stores_numbers_as_numbers_and_text_as_written(tmp_path):
    table = _clinic_table(tmp_path / "data")
    src = SourceOptions(metadata=table, id_col="id", image_col="image", text_template="Aged {age}, weight {weight}.",
                        label_cols=["grade"])
    scan = scan_source(tmp_path / "data", src)
    first = scan.items[0]
    assert first.id == "000000" and first.labels == {"grade": 0}
    assert first.meta["age"] == 40 and first.meta["weight"] == 60.5 and first.meta["mrn"] == "000"
    assert first.text == "Aged 40, weight 60.5."  # the sentence renders from the cells as written
    assert scan.items[3].meta["age"] is None  # "NA" in a numeric column is a missing value


def test_load_gives_a_typed_frame_with_one_embedding_column_per_modality(extracted):
    df = embedkit.load(extracted)
    assert isinstance(df, pd.DataFrame) and len(df) == 30
    assert list(df.columns[:4]) == ["id", "grade", "split", "group"]
    assert {"image_embedding", "text_embedding", "age", "weight", "sex", "mrn"} <= set(df.columns)
    assert df["id"].tolist()[:2] == ["000000", "000001"]  # leading zeros kept
    assert df["mrn"].tolist()[:2] == ["000", "001"]
    assert df["grade"].dtype.kind == "i" and df["weight"].dtype.kind == "f"
    assert df["age"].dtype.kind == "f" and np.isnan(df["age"][3]) and df["age"][4] == 44  # int with a gap: NaN
    assert df["sex"].tolist()[:2] == ["F", "M"]
    # the same types pandas reads from the Parquet parts themselves
    part = next((extracted).glob("image__*/part-*.parquet"))
    raw = pd.read_parquet(part).set_index("id")
    assert df.set_index("id")["weight"].equals(raw["weight"].loc[df["id"]])

    es = load_embeddings(extracted)
    order = {i: n for n, i in enumerate(es.ids)}
    rows = [order[i] for i in df["id"]]
    for m in ("image", "text"):
        X = df.embedkit.matrix(m)
        assert X.dtype == np.float32 and X.shape == es.embeddings[m].shape
        np.testing.assert_array_equal(X, es.embeddings[m][rows])
    assert df.embedkit.modalities == ["image", "text"]
    assert df.embedkit.provenance["image"]["dim"] == es.embeddings["image"].shape[1]
    # after a filter the matrices follow the rows
    test = df[df["split"] == "test"]
    np.testing.assert_array_equal(test.embedkit.matrix("text"), es.embeddings["text"][[order[i] for i in test["id"]]])
    with pytest.raises(ValueError):
        df["image_embedding"][0][0] = 1.0  # a view into the shared matrix is read-only


def test_frame_feeds_the_estimators_and_numeric_labels_train(extracted, tmp_path):
    from embedkit.fusion import LogisticBaseline
    from embedkit.train import TrainConfig, train

    df = embedkit.load(extracted)
    est = LogisticBaseline().fit(df.embedkit.blocks(), df["grade"])
    assert est.classes_.tolist() == [0, 1, 2] and est.modalities_ == ["image", "text"]
    from embedkit.predict import predict

    m = train(extracted, tmp_path / "model", TrainConfig(labels=["grade"], fusion="logistic", bootstrap=0))
    assert m["test"]["n"] == 10
    assert json.loads((tmp_path / "model" / "embedkit_model.json").read_text())["classes"] == [0, 1, 2]
    predict(tmp_path / "model", extracted, tmp_path / "p.parquet")
    t = pq.read_table(tmp_path / "p.parquet")
    assert set(t.column("predicted").to_pylist()) <= {0, 1, 2} and "prob_2" in t.column_names


def test_outer_join_leaves_missing_cells_empty(extracted):
    parts = sorted((extracted).glob("text__*/part-*.parquet"))
    t = pq.read_table(parts[0])
    pq.write_table(t.slice(0, t.num_rows - 2), parts[0])  # two rows lose their text embedding
    df = embedkit.load(extracted, how="outer")
    assert len(df) == 30 and df["text_embedding"].isna().sum() == 2
    with pytest.raises(EmbedkitError, match="2 rows have no text embedding"):
        df.embedkit.matrix("text")
    assert df[df["text_embedding"].notna()].embedkit.matrix("text").shape[0] == 28
    assert len(embedkit.load(extracted)) == 28  # inner join: rows with both


def test_import_embedkit_load_is_lazy():
    code = "import sys, embedkit; assert 'pandas' not in sys.modules; embedkit.load; assert 'pandas' in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
