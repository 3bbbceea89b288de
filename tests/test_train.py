"""train / predict / evaluate: honest splits, alignment fitted on train only, artifacts, refusals, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedkit.errors import EmbedkitError
from embedkit.fusion.align import aligner_from_dict, make_aligner
from embedkit.store import BASE_COLUMNS, PartWriter, build_schema, load_embeddings
from embedkit.train import TrainConfig, evaluate, predict, train

from conftest import REPO


def write_embeddings(out, modality, model, ids, x, columns, revision="r1", dim_name=None):
    """An extract-shaped folder written through the real store (schema, provenance, parts)."""
    prov = {"name": model, "source": f"org/{model}", "family": "clip", "revision": revision, "pooling": "projected",
            "dim": x.shape[1], "preprocess": None, "max_length": 77, "normalize": False, "dtype": "float32",
            "label_columns": [c for c in columns if c != "split"]}
    cols = {k: list(v) for k, v in columns.items() if k not in BASE_COLUMNS}
    w = PartWriter(out / f"{modality}__{dim_name or model}", build_schema(x.shape[1], cols, prov), rows_per_part=50)
    for i in range(0, len(ids), 32):
        sl = slice(i, i + 32)
        # a distinct content hash per row and modality, as extract writes for distinct files
        batch = {"id": list(ids[sl]), "path": [f"{j}.x" for j in ids[sl]],
                 "sha256": [hashlib.sha256(f"{modality}{j}{revision}".encode()).hexdigest() for j in ids[sl]]}
        batch.update({k: list(columns[k][sl]) if k in columns else [None] * len(ids[sl])
                      for k in BASE_COLUMNS if k not in batch and k != "embedding"})
        batch.update({k: v[sl] for k, v in cols.items()})
        w.write(batch, x[sl])
    w.close()


def clinic(tmp_path, n=300, dim=16, seed=0, gap=3.0, split=False, name="emb", prefix="p"):
    """Two modalities in one space with a modality gap; each carries part of a 3-class signal."""
    rng = np.random.default_rng(seed)
    y = np.array(["a", "b", "c"])[np.arange(n) % 3]
    centers = rng.normal(size=(3, dim)) * 1.2
    k = np.arange(n) % 3
    img = centers[k] * (rng.random((n, 1)) < 0.8) + rng.normal(size=(n, dim)) + gap
    txt = centers[k] * (rng.random((n, 1)) < 0.6) + rng.normal(size=(n, dim)) - gap
    ids = np.array([f"{prefix}{i:04d}" for i in range(n)], dtype=object)
    cols = {"dx": y}
    if split:
        cols["split"] = np.array(["train"] * (n - 100) + ["val"] * 50 + ["test"] * 50, dtype=object)
    out = tmp_path / name
    write_embeddings(out, "image", "clipish", ids, img.astype(np.float32), cols)
    write_embeddings(out, "text", "clipish", ids, txt.astype(np.float32), cols)
    return out


FAST = dict(epochs=15)


def test_train_writes_honest_metrics_and_artifacts(tmp_path):
    emb = clinic(tmp_path)
    m = train(emb, tmp_path / "model", TrainConfig(labels=["dx"], fusion="late", seeds=3, **FAST))
    for key in ("accuracy", "macro_f1", "auroc"):
        assert 0.0 <= m["test"][key] <= 1.0 and key in m["val"]
        s = m["spread"]["test"][key]
        assert s["n_runs"] == 3 and s["ci95_low"] <= s["mean"] <= s["ci95_high"]
    assert m["test"]["macro_f1"] > 0.6  # both modalities carry signal
    for key in ("train_seconds", "peak_rss_mb", "predict_seconds", "model_bytes"):
        assert m["costs"][key] > 0
    assert m["data"]["seeds"] == [0, 1, 2]
    saved = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert saved["test"]["macro_f1"] == m["test"]["macro_f1"] and saved["config"]["fusion"] == "late"
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert "model.safetensors" in files and "embedkit_model.json" in files
    assert not any(f.endswith((".pkl", ".pt", ".pth", ".joblib")) for f in files)


def test_fusion_beats_each_modality_on_complementary_signal(tmp_path):
    emb = clinic(tmp_path, n=600)
    f1 = {f: train(emb, tmp_path / f, TrainConfig(labels=["dx"], fusion=f, **FAST))["test"]["macro_f1"]
          for f in ("image", "text", "early")}
    assert f1["early"] > max(f1["image"], f1["text"])


def test_split_column_is_used_and_test_rows_never_train(tmp_path):
    emb = clinic(tmp_path, split=True)
    m = train(emb, tmp_path / "model", TrainConfig(labels=["dx"], fusion="early", **FAST))
    assert m["data"]["split"] == "data's split column"
    assert m["data"]["n"] == {"train": 200, "val": 50, "test": 50}


def test_alignment_is_fitted_on_training_rows_only(tmp_path):
    """Changing every validation and test row must not change the fitted gap."""
    emb = clinic(tmp_path, split=True)
    m1 = train(emb, tmp_path / "m1", TrainConfig(labels=["dx"], fusion="early", align_lambda=1.0, **FAST))
    es = load_embeddings(emb)
    train_rows = np.array([s == "train" for s in es.columns["split"]])
    expected = make_aligner("shift", 1.0).fit({"image": es.embeddings["image"][train_rows],
                                               "text": es.embeddings["text"][train_rows]})
    saved = json.loads((tmp_path / "m1" / "embedkit_model.json").read_text())["alignment"]
    np.testing.assert_allclose(saved["gap"], expected.gap_, atol=1e-6)
    pooled = make_aligner("shift", 1.0).fit({"image": es.embeddings["image"], "text": es.embeddings["text"]})
    assert np.abs(np.asarray(saved["gap"]) - pooled.gap_).max() > 1e-3  # the check can tell the difference
    # now move every val/test row far away: the fitted gap must not move
    emb2 = tmp_path / "emb2"
    img, txt = es.embeddings["image"].copy(), es.embeddings["text"].copy()
    img[~train_rows] += 50.0
    txt[~train_rows] -= 80.0
    cols = {"dx": es.columns["dx"], "split": es.columns["split"]}
    write_embeddings(emb2, "image", "clipish", es.ids, img, cols)
    write_embeddings(emb2, "text", "clipish", es.ids, txt, cols)
    train(emb2, tmp_path / "m2", TrainConfig(labels=["dx"], fusion="early", align_lambda=1.0, **FAST))
    saved2 = json.loads((tmp_path / "m2" / "embedkit_model.json").read_text())["alignment"]
    np.testing.assert_allclose(saved2["gap"], saved["gap"], atol=1e-6)
    assert m1["alignment"]["lambda"] == 1.0
    assert (tmp_path / "m1" / "gap_pca.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_applies_the_saved_alignment(tmp_path):
    emb = clinic(tmp_path)
    train(emb, tmp_path / "model", TrainConfig(labels=["dx"], fusion="early", align_lambda=0.5, **FAST))
    out = tmp_path / "preds.parquet"
    predict(tmp_path / "model", emb, out)
    t = pq.read_table(out).to_pydict()
    assert set(t) == {"id", "group", "split", "true_dx", "modalities", "predicted", "prob_a", "prob_b", "prob_c",
                      "ood_score", "ood"}
    assert set(t["modalities"]) == {"image+text"} and t["true_dx"][:3] == ["a", "b", "c"]
    probs = np.stack([t["prob_a"], t["prob_b"], t["prob_c"]], 1)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # the same numbers by hand: saved gap shift, then the saved estimator
    from embedkit.fusion.calibrate import logits_from_proba, proba_from_logits
    from embedkit.train import load_model

    est, info = load_model(tmp_path / "model")
    es = load_embeddings(emb)
    moved = aligner_from_dict(info["alignment"]).transform({"image": es.embeddings["image"],
                                                            "text": es.embeddings["text"]})
    raw = est.predict_proba(np.concatenate([moved["image"], moved["text"]], 1))
    by_hand = proba_from_logits(logits_from_proba(raw, "multiclass") / info["calibration"]["temperature"], "multiclass")
    np.testing.assert_allclose(by_hand, probs, atol=1e-5)


def test_align_sweep_selects_lambda_on_validation(tmp_path):
    emb = clinic(tmp_path, split=True)
    m = train(emb, tmp_path / "model", TrainConfig(labels=["dx"], fusion="early", align_sweep="0:1:0.5", **FAST))
    curve = m["alignment"]["sweep"]
    assert [r["lambda"] for r in curve] == [0.0, 0.5, 1.0]
    assert not any("test" in k for r in curve for k in r)  # no test score for the candidates
    best = max(curve, key=lambda r: (round(r["val_macro_f1"], 12), -abs(r["lambda"])))
    assert m["alignment"]["lambda"] == best["lambda"]
    assert (tmp_path / "model" / "lambda_curve.png").exists()


def test_cv_reports_spread_over_folds(tmp_path):
    emb = clinic(tmp_path, n=150)
    m = train(emb, tmp_path / "model", TrainConfig(labels=["dx"], fusion="logistic", cv=3))
    assert m["spread"]["over"] == "folds" and m["spread"]["n_runs"] == 3
    assert sum(r["n"]["test"] for r in m["runs"]) == 150  # every row tested exactly once


def test_evaluate_on_another_clinic(tmp_path):
    emb = clinic(tmp_path, seed=0)
    other = clinic(tmp_path, seed=0, name="other", prefix="q")  # same centres, another clinic's ids
    train(emb, tmp_path / "model", TrainConfig(labels=["dx"], fusion="late", **FAST))
    r = evaluate(tmp_path / "model", other, out_path=tmp_path / "eval.json")
    assert r["rows"] == 300 and 0 <= r["eval"]["macro_f1"] <= 1
    assert json.loads((tmp_path / "eval.json").read_text())["eval"]["accuracy"] == r["eval"]["accuracy"]


def test_refusals_have_clear_messages(tmp_path):
    emb = clinic(tmp_path)
    with pytest.raises(EmbedkitError, match="label column 'grade' is not in the embeddings.*dx"):
        train(emb, tmp_path / "m", TrainConfig(labels=["grade"]))
    one = tmp_path / "one"
    ids = np.array([f"i{i}" for i in range(20)], dtype=object)
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    write_embeddings(one, "image", "m", ids, x, {"dx": np.array(["a"] * 20, dtype=object)})
    with pytest.raises(EmbedkitError, match="only one class"):
        train(one, tmp_path / "m", TrainConfig(labels=["dx"], fusion="image"))
    nojoin = tmp_path / "nojoin"
    write_embeddings(nojoin, "image", "m", ids, x, {"dx": np.array(["a", "b"] * 10, dtype=object)})
    other_ids = np.array([f"j{i}" for i in range(20)], dtype=object)
    write_embeddings(nojoin, "text", "m", other_ids, x, {"dx": np.array(["a", "b"] * 10, dtype=object)})
    with pytest.raises(EmbedkitError, match="ids do not join.*image 20.*text 20"):
        train(nojoin, tmp_path / "m", TrainConfig(labels=["dx"], fusion="early"))
    nan = tmp_path / "nan"
    x_nan = x.copy()
    x_nan[3, 1] = np.nan
    write_embeddings(nan, "image", "m", ids, x_nan, {"dx": np.array(["a", "b"] * 10, dtype=object)})
    with pytest.raises(EmbedkitError, match="1 image embedding rows contain NaN"):
        train(nan, tmp_path / "m", TrainConfig(labels=["dx"], fusion="image"))
    mixed = tmp_path / "mixed"
    write_embeddings(mixed, "image", "m", ids[:10], x[:10], {"dx": np.array(["a", "b"] * 5, dtype=object)})
    write_embeddings(mixed, "image", "m", ids[10:], x[10:], {"dx": np.array(["a", "b"] * 5, dtype=object)},
                     revision="r2")
    with pytest.raises(EmbedkitError, match="mixes embeddings from different model configurations.*revision"):
        train(mixed, tmp_path / "m", TrainConfig(labels=["dx"], fusion="image"))


def test_alignment_refuses_different_dimensions(tmp_path):
    ids = np.array([f"i{i}" for i in range(30)], dtype=object)
    rng = np.random.default_rng(0)
    emb = tmp_path / "emb"
    cols = {"dx": np.array(["a", "b", "c"] * 10, dtype=object)}
    write_embeddings(emb, "image", "dino", ids, rng.normal(size=(30, 12)).astype(np.float32), cols)
    write_embeddings(emb, "text", "llm", ids, rng.normal(size=(30, 20)).astype(np.float32), cols)
    with pytest.raises(EmbedkitError, match="shared.*project"):
        train(emb, tmp_path / "m", TrainConfig(labels=["dx"], fusion="early", align_lambda=1.0))


def test_predict_refuses_embeddings_from_another_encoder(tmp_path):
    emb = clinic(tmp_path)
    train(emb, tmp_path / "model", TrainConfig(labels=["dx"], fusion="image", epochs=2))
    es = load_embeddings(emb)
    other = tmp_path / "other"
    write_embeddings(other, "image", "clipish", es.ids, es.embeddings["image"], {"dx": es.columns["dx"]},
                     revision="r2")
    with pytest.raises(EmbedkitError, match="another encoder.*revision"):
        predict(tmp_path / "model", other, tmp_path / "p.parquet")


def test_multilabel_from_several_label_columns(tmp_path):
    rng = np.random.default_rng(0)
    n = 240
    a, b = rng.random(n) < 0.5, rng.random(n) < 0.4
    x = np.stack([a * 2.0, b * 2.0], 1) + rng.normal(size=(n, 2)) * 0.5
    x = np.concatenate([x, rng.normal(size=(n, 6))], 1).astype(np.float32)
    ids = np.array([f"i{i}" for i in range(n)], dtype=object)
    emb = tmp_path / "emb"
    write_embeddings(emb, "image", "m", ids, x, {"effusion": a.astype(int).astype(object),
                                                 "nodule": np.where(b, "yes", "no").astype(object)})
    m = train(emb, tmp_path / "model", TrainConfig(labels=["effusion", "nodule"], fusion="image", **FAST))
    assert m["test"]["macro_f1"] > 0.7
    predict(tmp_path / "model", emb, tmp_path / "p.parquet")
    assert {"pred_effusion", "prob_nodule"} <= set(pq.read_table(tmp_path / "p.parquet").column_names)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def test_cli_train_predict_evaluate(tmp_path):
    emb = clinic(tmp_path, split=True)
    r = _cli("train", emb, "--label", "dx", "--fusion", "early", "--out", tmp_path / "model", "--epochs", "5",
             "--seeds", "2")
    assert r.returncode == 0, r.stderr
    assert "macro_f1" in r.stderr and "95% bootstrap over test rows" in r.stderr
    r = _cli("predict", tmp_path / "model", emb, "--out", tmp_path / "p.parquet")
    assert r.returncode == 0 and pq.read_table(tmp_path / "p.parquet").num_rows == 300
    r = _cli("evaluate", tmp_path / "model", emb)  # the training folder: refused, its rows were fitted on
    assert r.returncode == 2 and "were used to train or select this model" in r.stderr
    r = _cli("evaluate", tmp_path / "model", emb, "--split", "test", "--rows-out", tmp_path / "rows.parquet")
    assert r.returncode == 0 and 0 <= json.loads(r.stdout)["macro_f1"] <= 1, r.stderr
    assert json.loads(r.stdout)["rows_seen_in_training"] == 0
    bad = _cli("train", emb, "--label", "nope", "--out", tmp_path / "m2")
    assert bad.returncode == 2 and "error: label column 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_learned_lambda_trains_lambda_and_round_trips(tmp_path):
    emb = clinic(tmp_path, gap=2.0)
    m = train(emb, tmp_path / "model", TrainConfig(labels=["dx"], fusion="early", learned_lambda=True, epochs=10,
                                                   lr=3e-3))
    assert m["runs"][0]["learned_lambda"] != 0.0  # moved from its initial 0
    a = m["alignment"]  # printed, stored and plotted, not `alignment: null`
    assert a["learned_lambda"] == [m["runs"][0]["learned_lambda"]] and len(a["lambda_trajectory"]) == 10
    assert a["lambda_trajectory"][-1] != a["lambda_trajectory"][0]
    assert (tmp_path / "model" / "lambda_trajectory.png").read_bytes()[:4] == b"\x89PNG"
    predict(tmp_path / "model", emb, tmp_path / "p.parquet")
    from embedkit.train import load_model

    est, info = load_model(tmp_path / "model")
    assert abs(est.learned_lambda_ - m["runs"][0]["learned_lambda"]) < 1e-7
