"""The rules that protect a result, each checked by watching which rows reach each step.

Every embedding row carries its row number in feature 0 of the image block (a marker), and
`embedkit.train.model_features` - through which every row set passes on its way to a fit, a
validation score or the test score - is wrapped to record the rows of each call, in order.
From that log: test rows never reach a fit or a choice, each run scores its test rows once,
after all its fits, and no group sits on two sides.
"""

from __future__ import annotations

import numpy as np
import pytest

import embedkit.train as train_module
from embedkit.errors import EmbedkitError
from embedkit.fusion.evaluate import bootstrap_metrics, compute_metrics
from embedkit.train import TrainConfig, evaluate, train

from test_train import write_embeddings

MARK = 1e-4  # feature 0 of the image block = row number * MARK


def marked_clinic(tmp_path, n_groups=60, per_group=3, split=None, seed=0, labels="signal", name="emb", dim=8):
    """Groups (patients) of near-identical rows; labels per group; image feature 0 = row marker."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    group = np.repeat([f"pt{g:03d}" for g in range(n_groups)], per_group).astype(object)
    g_label = rng.integers(0, 2, n_groups) if labels == "random" else np.arange(n_groups) % 2
    y = np.repeat(np.array(["neg", "pos"])[g_label], per_group).astype(object)
    centre = rng.normal(size=(n_groups, dim))
    signal = 0.0 if labels == "random" else 1.5
    img = np.repeat(centre, per_group, 0) + rng.normal(size=(n, dim)) * 0.05
    img += signal * np.repeat(g_label, per_group)[:, None]
    txt = img[:, ::-1] + rng.normal(size=(n, dim)) * 0.05
    img[:, 0] = np.arange(n) * MARK
    cols = {"dx": y, "group": group}
    if split is not None:
        cols["split"] = split(group)
    ids = np.array([f"r{i:04d}" for i in range(n)], dtype=object)
    out = tmp_path / name
    write_embeddings(out, "image", "clipish", ids, img.astype(np.float32), cols)
    write_embeddings(out, "text", "clipish", ids, txt.astype(np.float32), cols)
    return out, group


@pytest.fixture
def calls(monkeypatch):
    """Rows (by marker) of every model_features call in train, in order."""
    log = []
    original = train_module.model_features

    def recording(info, blocks):
        log.append(set(np.rint(blocks["image"][:, 0] / MARK).astype(int).tolist()) if "image" in blocks else set())
        return original(info, blocks)

    monkeypatch.setattr(train_module, "model_features", recording)
    return log


def runs_of(m):
    return m["runs"]


def test_test_rows_never_reach_a_fit_and_are_scored_once_per_run(tmp_path, calls):
    emb, group = marked_clinic(tmp_path)
    m = train(emb, tmp_path / "m", TrainConfig(labels=["dx"], fusion="early", epochs=3, seeds=2,
                                               align_sweep="none,center,shift:0:1:0.5"))
    splits = [train_module.split_for_run(train_module.load_dataset(emb, ["dx"], ["image", "text"]),
                                         TrainConfig(labels=["dx"]), s, group) for s in (0, 1)]
    # per run: 5 candidates x (training rows, validation rows) + the test call
    assert len(m["alignment"]["sweep"]) == 5
    per_run = 5 * 2 + 1
    assert len(calls) == 2 * per_run
    for r, idx in enumerate(splits):
        log = calls[r * per_run:(r + 1) * per_run]
        test = set(idx["test"].tolist())
        assert log[-1] == test  # the test rows, once, after every fit and choice of the run
        assert all(not (c & test) for c in log[:-1])  # no fit, no validation score, no choice saw a test row
        fits = log[0:-1:2]
        assert all(c == set(idx["train"].tolist()) for c in fits)
        # groups: none on two sides
        sides = {k: set(group[idx[k]].tolist()) for k in ("train", "val", "test")}
        assert not (sides["train"] & sides["test"]) and not (sides["val"] & sides["test"])
        assert not (sides["train"] & sides["val"])
    assert m["data"]["groups"].startswith("column")
    assert m["data"]["groups_per_split"]["test"] == len(set(group[splits[0]["test"]]))


def test_grouped_split_reports_chance_on_random_labels_per_group(tmp_path):
    """150 patients x 3 near-duplicate rows, labels random per patient: the honest answer is chance."""
    emb, _ = marked_clinic(tmp_path, n_groups=150, labels="random", dim=64)
    # calibrate_on="val": this test is about splits; out-of-fold calibration (issue 25) would refit each run
    # three more times on these 450 rows (+5 s) without changing what is checked here
    cfg = dict(labels=["dx"], fusion="early", seeds=3, epochs=40, calibrate_on="val")
    grouped = train(emb, tmp_path / "g", TrainConfig(**cfg))
    rows = train(emb, tmp_path / "r", TrainConfig(**cfg, groups=False))
    acc_grouped = grouped["spread"]["test"]["accuracy"]["mean"]
    acc_rows = rows["spread"]["test"]["accuracy"]["mean"]
    assert acc_rows > 0.85  # near-duplicates of training rows in test: memorised
    assert acc_grouped < 0.65  # patients never seen: chance
    assert grouped["bootstrap"]["unit"] == "group" and rows["bootstrap"]["unit"] == "row"


def test_official_split_keeps_test_and_purges_groups_that_cross_it(tmp_path, calls):
    def split(group):  # the data's split puts patient pt000's rows on both sides
        s = np.where(np.array([int(g[2:]) for g in group]) < 45, "train", "test").astype(object)
        s[1] = "test"
        return s

    emb, group = marked_clinic(tmp_path, split=split)
    m = train(emb, tmp_path / "m", TrainConfig(labels=["dx"], fusion="early", epochs=3))
    test_rows = {i for i in range(len(group)) if int(group[i][2:]) >= 45} | {1}
    assert calls[-1] == test_rows  # the official test rows, untouched
    assert all(not ({0, 2} & c) for c in calls[:-1])  # pt000's other rows left out of train and validation
    assert m["data"]["purged_rows"] == {"train": 2, "val": 0}


def test_cv_keeps_the_official_test_split_out_of_the_folds(tmp_path, calls):
    emb, group = marked_clinic(tmp_path, split=lambda g: np.where(np.arange(len(g)) >= 150, "test", "train")
                               .astype(object))
    m = train(emb, tmp_path / "m", TrainConfig(labels=["dx"], fusion="early", epochs=2, cv=3))
    official = set(range(150, 180))
    tests = calls[2::3]  # per fold: train, validation, test
    assert len(calls) == 9 and all(t == official for t in tests)
    for k in range(3):
        fit, val = calls[3 * k], calls[3 * k + 1]
        assert not (fit & official) and not (val & official) and not (fit & val)
        assert not (set(group[list(fit)]) & set(group[list(val)]))  # folds grouped too
    assert m["spread"]["over"] == "folds" and "official test" in m["data"]["split"]


def test_threshold_and_temperature_are_fitted_on_validation_only(tmp_path, monkeypatch):
    """Rule changed in issue 25: the threshold is chosen on validation; the temperature is fitted on validation
    only when it has enough rows (or when asked: calibrate_on="val"), else on out-of-fold training rows, else
    not at all. What reaches each fit is compared with the saved model's own predictions of those rows, so a
    reordering that fits either on the test rows fails here even when the row counts agree."""
    from embedkit.dataset import row_keys
    from embedkit.fusion import calibrate
    from embedkit.predict import apply_calibration, load_model

    emb, _ = marked_clinic(tmp_path)
    seen = []
    real_fit, real_choose = calibrate.TemperatureScaler.fit, calibrate.choose_threshold

    def fit(self, proba, targets, task):
        seen.append(("temperature", np.asarray(proba).copy(), np.asarray(targets).copy()))
        return real_fit(self, proba, targets, task)

    def choose(p, targets, rule):
        seen.append(("threshold", np.asarray(p).copy(), np.asarray(targets).copy()))
        return real_choose(p, targets, rule)

    monkeypatch.setattr(calibrate.TemperatureScaler, "fit", fit)
    monkeypatch.setattr(calibrate, "choose_threshold", choose)
    m = train(emb, tmp_path / "auto", TrainConfig(labels=["dx"], fusion="early", epochs=3))
    assert [s[0] for s in seen] == ["threshold"]  # 27 validation and 126 training rows: too few for a temperature
    assert m["calibration"]["temperature"] == 1.0 and "no temperature scaling" in m["calibration"]["calibrated_on"]["note"]
    seen.clear()
    m = train(emb, tmp_path / "m", TrainConfig(labels=["dx"], fusion="early", epochs=3, calibrate_on="val"))
    assert [s[0] for s in seen] == ["temperature", "threshold"]
    # the rows each choice saw are the validation rows, as the saved model predicts them
    ds = train_module.load_dataset(emb, ["dx"], ["image", "text"])
    est, info = load_model(tmp_path / "m")
    fitted_val = set(info["fitted_rows"]["val"])
    val = np.array([i for i, k in enumerate(row_keys(ds, np.arange(len(ds.ids)), ["image", "text"])) if k in fitted_val])
    assert len(val) == m["data"]["n"]["val"]
    raw = est.predict_proba(train_module.model_features(info, {k: b[val] for k, b in ds.blocks.items()}))
    targets = (ds.y[val] == "pos").astype(int)
    for what, proba, y in seen:
        assert np.array_equal(y, targets)
        got = proba[:, 1] if proba.ndim == 2 else proba
        want = raw[:, 1] if what == "temperature" else apply_calibration(raw, info["calibration"], "binary")[:, 1]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    cal = m["calibration"]
    assert cal["threshold_rule"] == "val-f1" and 0 < cal["threshold"] < 1 and cal["temperature"] > 0
    assert cal["calibrated_on"]["fitted_on"] == "validation"


def test_out_of_fold_temperature_sees_training_rows_only(tmp_path, calls):
    emb, group = marked_clinic(tmp_path)
    m = train(emb, tmp_path / "m", TrainConfig(labels=["dx"], fusion="early", epochs=2, calibrate_on="oof"))
    idx = train_module.split_for_run(train_module.load_dataset(emb, ["dx"], ["image", "text"]),
                                     TrainConfig(labels=["dx"]), 0, group)
    train_rows, test = set(idx["train"].tolist()), set(idx["test"].tolist())
    # train, validation, then per fold: fit rows, validation rows, held-out fold; then the test rows, once
    k_folds = 3  # calibrate.CALIBRATION_FOLDS
    assert calls[-1] == test and len(calls) == 2 + 3 * k_folds + 1
    folds = calls[2:-1]
    held = [folds[3 * k + 2] for k in range(k_folds)]
    assert set().union(*held) == train_rows and sum(len(h) for h in held) == len(train_rows)  # each once
    assert all(folds[3 * k] | folds[3 * k + 2] == train_rows for k in range(k_folds))
    assert all(not (c & test) for c in calls[:-1])
    assert m["calibration"]["calibrated_on"]["fitted_on"] == "out-of-fold"
    assert m["calibration"]["calibrated_on"]["rows"] == len(train_rows)


def test_evaluate_refuses_rows_the_model_was_fitted_on(tmp_path):
    emb, _ = marked_clinic(tmp_path, split=lambda g: np.where(np.arange(len(g)) >= 150, "test", "train")
                           .astype(object))
    train(emb, tmp_path / "m", TrainConfig(labels=["dx"], fusion="logistic"))
    with pytest.raises(EmbedkitError, match="were used to train or select"):
        evaluate(tmp_path / "m", emb)
    r = evaluate(tmp_path / "m", emb, split="test")
    assert r["rows"] == 30 and r["rows_seen_in_training"] == 0
    flagged = evaluate(tmp_path / "m", emb, allow_overlap=True)
    assert flagged["rows_seen_in_training"] == 150


def test_bootstrap_matches_weighted_reference_and_groups_widen_it():
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    from embedkit.fusion.evaluate import _weighted_metrics  # the vectorised core, checked once by hand

    rng = np.random.default_rng(0)
    for task, k in (("binary", 2), ("multiclass", 3)):
        y = rng.integers(0, k, 200)
        proba = rng.dirichlet(np.ones(k), 200)
        proba[np.arange(200), y] += 0.3
        proba /= proba.sum(1, keepdims=True)
        w = rng.integers(0, 3, (4, 200)).astype(float)
        pred = (proba[:, 1] >= 0.5).astype(int) if task == "binary" else proba.argmax(1)
        got = _weighted_metrics(y, pred, proba, task, w)
        for b in range(4):
            assert got["accuracy"][b] == pytest.approx(accuracy_score(y, pred, sample_weight=w[b]))
            assert got["macro_f1"][b] == pytest.approx(f1_score(y, pred, average="macro", sample_weight=w[b]))
            ref = roc_auc_score(y, proba[:, 1], sample_weight=w[b]) if task == "binary" else \
                np.mean([roc_auc_score(y == j, proba[:, j], sample_weight=w[b]) for j in range(k)])
            assert got["auroc"][b] == pytest.approx(ref)
    # 40 patients x 5 identical rows: resampling rows pretends there are 200 independent cases
    y = np.repeat(rng.integers(0, 2, 40), 5)
    p = np.repeat(np.clip(y[::5] * 0.3 + rng.random(40) * 0.7, 0, 1), 5)
    proba = np.column_stack([1 - p, p])
    groups = np.repeat(np.arange(40), 5)
    by_row = bootstrap_metrics(y, proba, [0, 1], "binary", groups=None, seed=1)["metrics"]["accuracy"]
    by_group = bootstrap_metrics(y, proba, [0, 1], "binary", groups=groups, seed=1)["metrics"]["accuracy"]
    assert by_group["high"] - by_group["low"] > 1.5 * (by_row["high"] - by_row["low"])
    assert 0 <= by_group["low"] <= compute_metrics(y, proba, [0, 1], "binary")["accuracy"] <= by_group["high"] <= 1


def test_absent_test_class_is_named_not_averaged_as_zero():
    y = np.array(["a", "a", "b", "b"])
    proba = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])
    m = compute_metrics(y, proba, ["a", "b", "c"], "multiclass")
    assert m["absent_classes"] == ["c"]
    assert m["macro_f1"] == pytest.approx((1.0 + 2 / 3) / 2)  # over a and b only


def test_subgroups_reported_with_intervals(tmp_path):
    emb, group = marked_clinic(tmp_path)
    m = train(emb, tmp_path / "m", TrainConfig(labels=["dx"], fusion="logistic", subgroups=["group"], bootstrap=200))
    sub = m["subgroups"]["group"]
    assert sum(e["n"] for e in sub.values()) == m["data"]["n"]["test"]
    assert all(e["small"] for e in sub.values())  # 3 rows each
    assert all(0 <= e["bootstrap"]["accuracy"]["low"] <= e["bootstrap"]["accuracy"]["high"] <= 1 for e in sub.values())


def test_leakage_scan_reads_training_texts_only(tmp_path):
    """Half the 'pos' notes say 'died'; the scan names the token, from training rows only."""
    rng = np.random.default_rng(0)
    n = 240
    y = np.array(["neg", "pos"] * (n // 2), dtype=object)
    words = np.array(["cough", "fever", "chest", "film", "review", "pain"])
    texts = [" ".join(rng.choice(words, 5)) + (" patient died" if y[i] == "pos" and i % 4 == 1 else "")
             for i in range(n)]
    x = rng.normal(size=(n, 8)).astype(np.float32)
    ids = np.array([f"r{i:04d}" for i in range(n)], dtype=object)
    emb = tmp_path / "emb"
    write_embeddings(emb, "text", "minilm", ids, x, {"dx": y, "text": np.array(texts, dtype=object)})
    m = train(emb, tmp_path / "m", TrainConfig(labels=["dx"], fusion="text", epochs=2))
    rules = m["leakage"]["rules"]
    assert rules and rules[0]["token"] == "died" and rules[0]["class"] == "pos"
    assert m["leakage"]["n_rows_scanned"] == m["data"]["n"]["train"]
    assert "patient died" not in str(m["leakage"])  # tokens only, never a note


def shared_space(tmp_path, n=300, name="emb", drop=None):
    """Image and text rows of one latent (the class) in one space, offset by a modality gap."""
    rng = np.random.default_rng(0)
    y = np.array(["a", "b"] * (n // 2), dtype=object)
    centres = rng.normal(size=(2, 16)) * 1.5
    z = centres[(y == "b").astype(int)] + rng.normal(size=(n, 16))
    img = z + 4.0 + rng.normal(size=(n, 16)) * 0.3
    txt = z - 4.0 + rng.normal(size=(n, 16)) * 0.3
    ids = np.array([f"r{i:04d}" for i in range(n)], dtype=object)
    out = tmp_path / name
    keep = np.ones(n, bool) if drop is None else drop
    cols = {"dx": y}
    write_embeddings(out, "image", "clipish", ids, img.astype(np.float32), cols)
    if drop is not None:
        cols = {"dx": y[keep]}
        write_embeddings(out, "text", "clipish", ids[keep], txt[keep].astype(np.float32), cols)
    else:
        write_embeddings(out, "text", "clipish", ids, txt.astype(np.float32), cols)
    return out, y


def test_lambda_changes_what_the_classifier_sees_and_predicts(tmp_path):
    from embedkit.predict import load_model, model_features
    from embedkit.store import load_embeddings

    emb, _ = shared_space(tmp_path)
    es = load_embeddings(emb)
    fed, preds = [], []
    for lam in (0.0, 1.0):
        m = train(emb, tmp_path / f"m{lam}", TrainConfig(labels=["dx"], fusion="early", epochs=5, align_lambda=lam))
        assert m["alignment"]["scale"] == "none"  # the default when aligning: the shift survives
        _, info = load_model(tmp_path / f"m{lam}")
        fed.append(model_features(info, es.embeddings))
        preds.append(np.array(__import__("pyarrow.parquet").parquet.read_table(
            tmp_path / f"m{lam}" / "test_predictions.parquet").column("prob_b").to_pylist()))
    assert np.abs(fed[0] - fed[1]).max() > 0.1
    assert np.abs(preds[0] - preds[1]).max() > 0.01


def test_missing_modality_is_stood_in_for_across_the_gap(tmp_path):
    import pyarrow.parquet as pq

    from embedkit.train import predict

    emb, y = shared_space(tmp_path)
    train(emb, tmp_path / "aligned", TrainConfig(labels=["dx"], fusion="early", epochs=10, align="center"))
    train(emb, tmp_path / "raw", TrainConfig(labels=["dx"], fusion="early", epochs=10))
    drop = np.arange(300) % 3 != 0  # a third of the rows have no report
    partial, _ = shared_space(tmp_path, name="partial", drop=drop)
    r = predict(tmp_path / "aligned", partial, tmp_path / "p.parquet")
    assert r["modalities"] == {"image": 100, "image+text": 200}
    t = pq.read_table(tmp_path / "p.parquet").to_pydict()
    only_image = np.array(t["modalities"]) == "image"
    acc = (np.array(t["predicted"])[only_image] == np.array(t["true_dx"])[only_image]).mean()
    assert acc > 0.85  # the image moved across the gap stands in for the report
    with pytest.raises(EmbedkitError, match="without --align"):
        predict(tmp_path / "raw", partial, tmp_path / "q.parquet")
    # cross-modal transfer: a text-only model applied to images through the same stand-in
    train(emb, tmp_path / "text_only", TrainConfig(labels=["dx"], fusion="text", epochs=10, align="center"))
    with pytest.raises(EmbedkitError, match="were used to train or select"):  # keyed on the model's own modality
        evaluate(tmp_path / "text_only", emb)
    images = tmp_path / "images_only"
    write_embeddings(images, "image", "clipish", *_image_block(emb))
    r = predict(tmp_path / "text_only", images, tmp_path / "t.parquet")
    t = pq.read_table(tmp_path / "t.parquet").to_pydict()
    assert set(t["modalities"]) == {"image"}
    assert (np.array(t["predicted"]) == np.array(t["true_dx"])).mean() > 0.85


def _image_block(emb):
    from embedkit.store import load_embeddings

    es = load_embeddings(emb, modalities=["image"])
    return es.ids, es.embeddings["image"], {"dx": es.columns["dx"]}


def test_modality_dropout_needs_an_aligner(tmp_path):
    emb, _ = shared_space(tmp_path)
    with pytest.raises(EmbedkitError, match="modality-dropout needs --align"):
        train(emb, tmp_path / "m", TrainConfig(labels=["dx"], fusion="early", modality_dropout=0.3))
    m = train(emb, tmp_path / "ok", TrainConfig(labels=["dx"], fusion="early", epochs=3, align="center",
                                                modality_dropout=0.3))
    assert m["alignment"]["modality_dropout"] == 0.3


def test_cv_without_an_official_test_split_validates_inside_the_other_folds(tmp_path, calls):
    emb, group = marked_clinic(tmp_path)
    train(emb, tmp_path / "m", TrainConfig(labels=["dx"], fusion="early", epochs=2, cv=3))
    folds = [calls[3 * k:3 * k + 3] for k in range(3)]  # per fold: train, validation, test
    assert len(calls) == 9
    tested = [t for _, _, t in folds]
    assert sorted(i for t in tested for i in t) == list(range(len(group)))  # each row tested once
    for fit, val, test in folds:
        assert not (fit & test) and not (val & test) and not (fit & val)
        sides = [set(group[list(s)]) for s in (fit, val, test)]
        assert not (sides[0] & sides[2]) and not (sides[1] & sides[2]) and not (sides[0] & sides[1])
