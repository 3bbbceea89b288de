"""The OOD guard: fitted on training rows, threshold on validation rows, saved with the model; predict flags
rows unlike the training data and never changes a prediction; evaluate scores flagged rows apart."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedkit.errors import EmbedkitError
from embedkit.fusion.ood import GUARD_FILE, OODGuard
from embedkit.train import TrainConfig, evaluate, predict, train

from test_train import clinic, write_embeddings


def test_guard_threshold_is_the_validation_percentile_of_the_nearest_training_row():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 12)) * 3
    tr = centres[np.arange(200) % 4] + rng.normal(size=(200, 12))
    va = centres[np.arange(60) % 4] + rng.normal(size=(60, 12))
    g = OODGuard(prototypes="rows", percentile=90).fit({"image": tr}, {"image": va})
    u = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    dist = 1 - (u(va) @ u(tr).T).max(axis=1)  # by hand: cosine distance to the nearest training row
    assert g.thresholds_["image"] == pytest.approx(np.percentile(dist, 90), rel=1e-5)
    score, per = g.score({"image": va})
    assert np.mean(score > 1) == pytest.approx(0.1, abs=1 / 60)  # 10 % of validation rows flagged, by design
    far = rng.normal(size=(30, 12)) * 3  # directions no training row points to
    assert (g.score({"image": far})[0] > 1).mean() >= 0.9
    # centroids: each stored vector is the mean of >= 3 training rows, none is a training row
    c = OODGuard(percentile=90).fit({"image": tr}, {"image": va})
    assert 2 <= len(c.prototypes_["image"]) <= 50
    assert (u(tr) @ c.prototypes_["image"].T).max() < 0.9999
    assert (c.score({"image": far})[0] > 1).mean() >= 0.9


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ood")
    emb = clinic(tmp, n=240, split=True)
    m = train(emb, tmp / "model", TrainConfig(labels=["dx"], fusion="early", epochs=4, bootstrap=0))
    return tmp, emb, m


def test_train_saves_the_guard_and_reports_test_rows_apart(model):
    tmp, emb, m = model
    info = json.loads((tmp / "model" / "embedkit_model.json").read_text())
    g = info["ood_guard"]
    assert g["prototypes"] == "centroids" and g["percentile"] == 95 and set(g["thresholds"]) == {"image", "text"}
    assert (tmp / "model" / GUARD_FILE).is_file()
    assert not any(p.suffix in (".pkl", ".pt", ".joblib") for p in (tmp / "model").iterdir())
    by = m["ood"]["test_by_ood"]
    assert by["in_distribution"]["n"] + by["flagged"]["n"] == m["data"]["n"]["test"] == m["ood"]["test"]["rows"]
    t = pq.read_table(tmp / "model" / "test_predictions.parquet").to_pydict()
    assert sum(t["ood"]) == m["ood"]["test"]["flagged"] and all((s > 1) == f for s, f in zip(t["ood_score"], t["ood"]))


def test_predict_flags_shifted_rows_and_never_changes_a_prediction(model):
    tmp, emb, _ = model
    rng = np.random.default_rng(1)
    n = 60
    ids = np.array([f"new{i:03d}" for i in range(n)], dtype=object)
    # 30 rows like the training data (a copy of its generator), 30 pointing elsewhere (another scanner)
    inside = clinic(tmp, n=n, seed=0, name="inside", prefix="new")
    shifted = tmp / "shifted"
    from embedkit.store import load_embeddings

    es = load_embeddings(inside)
    img, txt = es.embeddings["image"].copy(), es.embeddings["text"].copy()
    img[30:] = rng.normal(size=(30, img.shape[1])) * 6
    txt[30:] = rng.normal(size=(30, txt.shape[1])) * 6
    write_embeddings(shifted, "image", "clipish", ids, img, {"dx": es.columns["dx"]})
    write_embeddings(shifted, "text", "clipish", ids, txt, {"dx": es.columns["dx"]})
    r = predict(tmp / "model", shifted, tmp / "p.parquet")
    t = pq.read_table(tmp / "p.parquet").to_pydict()
    flags = np.array(t["ood"])
    assert flags[30:].mean() >= 0.9 and flags[:30].mean() <= 0.2
    assert r["ood"] == {"rows": n, "flagged": int(flags.sum()), "share": round(float(flags.mean()), 4)}
    # the same folder without its guard gives the same predictions and probabilities, and no ood columns
    bare = tmp / "bare"
    import shutil

    shutil.copytree(tmp / "model", bare)
    info = json.loads((bare / "embedkit_model.json").read_text())
    del info["ood_guard"]
    (bare / "embedkit_model.json").write_text(json.dumps(info))
    (bare / GUARD_FILE).unlink()
    r2 = predict(bare, shifted, tmp / "p2.parquet")
    t2 = pq.read_table(tmp / "p2.parquet").to_pydict()
    assert r2["ood"] is None and "ood" not in t2
    assert t2["predicted"] == t["predicted"] and t2["prob_a"] == t["prob_a"]


def test_evaluate_reports_flagged_and_in_distribution_rows_apart(model, tmp_path):
    from embedkit.fusion.evaluate import compute_metrics

    tmp, emb, _ = model
    r = evaluate(tmp / "model", emb, split="test", rows_out=tmp_path / "rows.parquet")
    by = r["ood"]["by_ood"]
    t = pq.read_table(tmp_path / "rows.parquet").to_pydict()
    flags = np.array(t["ood"])
    assert by["flagged"]["n"] == flags.sum() == r["ood"]["flagged"] and by["in_distribution"]["n"] == (~flags).sum()
    # the in-distribution metrics are those of exactly those rows (a reference computation)
    proba = np.stack([t["prob_a"], t["prob_b"], t["prob_c"]], 1)
    ref = compute_metrics(np.array(t["true_dx"])[~flags], proba[~flags], ["a", "b", "c"], "multiclass")
    assert by["in_distribution"]["metrics"]["macro_f1"] == pytest.approx(ref["macro_f1"], abs=1e-6)


def test_a_damaged_guard_is_refused(model, tmp_path):
    import shutil

    tmp, emb, _ = model
    folder = tmp_path / "m"
    shutil.copytree(tmp / "model", folder)
    info = json.loads((folder / "embedkit_model.json").read_text())
    info["ood_guard"]["dims"]["image"] += 1
    (folder / "embedkit_model.json").write_text(json.dumps(info))
    with pytest.raises(EmbedkitError, match="damaged or was edited"):
        predict(folder, emb, tmp_path / "p.parquet")
    with pytest.raises(EmbedkitError, match="percentile"):
        OODGuard(percentile=100).fit({"image": np.ones((4, 2))}, {"image": np.ones((2, 2))})
