"""Fusion beyond concatenation with modalities missing (issue 31): the gated, attention and low-rank heads,
the presence mask every fusion takes, modality dropout (masking), refusals, per-combination temperatures and
metrics, and the `evaluate --drop-modality` robustness curve."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embedkit.errors import EmbedkitError
from embedkit.fusion import FusionClassifier, LogisticBaseline
from embedkit.fusion import models as heads
from embedkit.fusion.calibrate import TemperatureScaler
from embedkit.fusion.evaluate import compute_metrics
from embedkit.fusion.missing import combinations, mask_share
from embedkit.train import TrainConfig, evaluate, predict, train

from test_train import write_embeddings

FUSIONS = ("early", "late", "gated", "attention", "lowrank")
HEAD = {"early": heads.EarlyFusionHead, "late": heads.LateFusionHead, "gated": heads.GatedFusionHead,
        "attention": heads.AttentionFusionHead, "lowrank": heads.LowRankFusionHead}


def blocks(n=400, d=6, seed=0, missing=0.0):
    """[image | text] of a 2-class signal in both blocks; a share of rows lacks text (NaN block)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = np.hstack([rng.normal(size=(n, d)) + 1.2 * y[:, None], rng.normal(size=(n, d)) + 1.2 * y[:, None]])
    X = X.astype(np.float32)
    X[rng.random(n) < missing, d:] = np.nan
    return X, y


@pytest.fixture(scope="module")
def fitted():
    """Each fusion trained on rows of which 30 % lack text (so each learned to take a missing text)."""
    X, y = blocks(n=300, missing=0.3)
    return {f: FusionClassifier(fusion=f, modality_dims=(6, 6), epochs=6, late_hidden_dim=16, hidden_dim=16).fit(X, y)
            for f in FUSIONS}


def test_documented_parameter_counts_are_the_heads():
    """The counts in fusion/models.py's docstring are what the heads hold (two 512-d blocks, one output)."""
    doc = dict(re.findall(r"^\s+(early|late|gated|attention|lowrank)\s.*?([\d,]+)$", heads.__doc__, re.M))
    widths = {"early": 128}
    assert set(doc) == set(FUSIONS)
    for f in FUSIONS:
        head = HEAD[f]([512, 512], widths.get(f, 64), 0.0, 1)
        assert sum(p.numel() for p in head.parameters()) == int(doc[f].replace(",", "")), f


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_takes_the_mask(fitted, fusion):
    """A masked block's values never reach the output (token or mask), masking changes the output, and the
    estimator passes the mask on: its missing rows are not scored as mean-imputed rows."""
    est = fitted[fusion]
    X, _ = blocks(n=50, seed=1)
    x = torch.from_numpy(est._inputs(X))
    mask = torch.ones(len(X), 2, dtype=torch.bool)
    mask[:, 1] = False
    junk = x.clone()
    junk[:, 6:] = torch.randn(len(X), 6) * 5
    with torch.no_grad():
        masked, masked_junk, full = est.model_(x, mask), est.model_(junk, mask), est.model_(x, None)
    torch.testing.assert_close(masked, masked_junk)  # the missing block's values are not read
    assert not torch.allclose(masked, full)
    lacking = X.copy()
    lacking[:, 6:] = np.nan
    mean_imputed = X.copy()
    mean_imputed[:, 6:] = est.mean_[6:]  # what a fusion that ignored the mask would see: zeros after scaling
    p_missing, p_imputed = est.predict_proba(lacking), est.predict_proba(mean_imputed)
    assert np.abs(p_missing - p_imputed).max() > 1e-4
    np.testing.assert_array_equal(p_missing, est._proba(masked))
    if fusion in ("early", "late", "lowrank"):  # a learned missing token, moved off its zero start
        assert est.model_.missing is not None and float(est.model_.missing.detach().abs().max()) > 1e-3


def test_modality_dropout_is_training_only_and_saves_exactly(tmp_path):
    """Trained on complete rows with modality dropout: predict masks nothing (repeatable, the full mask), takes a
    missing text, and a saved model gives the same probabilities bit for bit."""
    X, y = blocks()
    est = FusionClassifier(fusion="attention", modality_dims=(6, 6), epochs=5, late_hidden_dim=16,
                           modality_dropout=0.9).fit(X, y)
    assert est.missing_rows_ == [0, 0] and est.learned_missing_ == (True, True)
    p = est.predict_proba(X)
    with torch.no_grad():
        full = est._proba(est.model_(torch.from_numpy(est._inputs(X)), torch.ones(len(X), 2, dtype=torch.bool)))
    np.testing.assert_array_equal(p, full)
    np.testing.assert_array_equal(p, est.predict_proba(X))
    lacking = X.copy()
    lacking[::2, :6] = np.nan
    est.save(tmp_path / "m")
    back = FusionClassifier.load(tmp_path / "m")
    np.testing.assert_array_equal(back.predict_proba(lacking), est.predict_proba(lacking))
    assert back.n_parameters_ == est.n_parameters_ and back.learned_missing_ == (True, True)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_dropout_is_training_only_in_every_head(fusion):
    """With --dropout above 0, predict is the same call after call: no head leaves a dropout layer on."""
    X, y = blocks(n=120, missing=0.3)
    est = FusionClassifier(fusion=fusion, modality_dims=(6, 6), epochs=2, late_hidden_dim=16, hidden_dim=16,
                           dropout=0.5).fit(X, y)
    first = est.predict_proba(X)
    for _ in range(3):
        np.testing.assert_array_equal(est.predict_proba(X), first)


@pytest.mark.parametrize("fusion", ["gated", "lowrank"])
def test_new_fusions_save_and_load_exactly(fitted, fusion, tmp_path):
    X, _ = blocks(n=60, seed=3, missing=0.5)
    fitted[fusion].save(tmp_path / fusion)
    np.testing.assert_array_equal(FusionClassifier.load(tmp_path / fusion).predict_proba(X),
                                  fitted[fusion].predict_proba(X))


def test_a_model_that_never_saw_a_modality_missing_refuses_it_in_one_line(tmp_path):
    X, y = blocks()
    est = FusionClassifier(fusion="gated", modality_dims=(6, 6), epochs=2, late_hidden_dim=8).fit(X, y)
    lacking = X.copy()
    lacking[:3, 6:] = np.nan
    cases = [(lambda: est.predict(lacking), "3 of 400 rows lack modality block 2"),
             (lambda: est.fit(X, y, eval_set=(lacking, y)), "rows lack modality block 2"),
             (lambda: est.predict(np.where(np.eye(400, 12, 8, dtype=bool), np.nan, X)), "a whole block of NaN"),
             (lambda: est.fit(np.full_like(X, np.nan), y), "no modality present"),
             (lambda: LogisticBaseline().fit(lacking, y), "3 of 400 rows with NaN"),
             (lambda: FusionClassifier(modality_dropout=0.2, epochs=1).fit(X, y), "two modality blocks")]
    for call, words in cases:
        with pytest.raises(EmbedkitError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value)
    # a folder written before issue 31 (format 1: no missing_rows) loads as a complete-rows model
    est.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "estimator.json").read_text())
    del meta["missing_rows"]
    (tmp_path / "old" / "estimator.json").write_text(json.dumps({**meta, "format_version": 1}))
    old = FusionClassifier.load(tmp_path / "old")
    np.testing.assert_array_equal(old.predict_proba(X), est.predict_proba(X))
    with pytest.raises(EmbedkitError, match="lack modality block 2"):
        old.predict(lacking)


# ---------------------------------------------------------------- train / predict / evaluate


def clinic_with_gaps(tmp_path, n=360, seed=0, name="emb", flip_test=False):
    """Image and text of a 2-class signal; a data split; 25 % of rows lack text and 20 % lack the image."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    img = rng.normal(size=(n, 8)) + 1.0 * y[:, None]
    txt = rng.normal(size=(n, 8)) + 1.0 * y[:, None]
    ids = np.array([f"c{i:04d}" for i in range(n)], dtype=object)
    split = np.array(["train"] * (n - 160) + ["val"] * 80 + ["test"] * 80, dtype=object)
    label = np.array(["neg", "pos"])[y].astype(object)
    if flip_test:  # the test rows' labels changed: nothing fitted may notice
        label[split == "test"] = np.array(["neg", "pos"])[1 - y[split == "test"]]
    u = rng.random(n)
    has_text, has_image = u >= 0.25, (u < 0.25) | (u >= 0.45)
    cols = {"dx": label, "split": split}
    out = tmp_path / name
    write_embeddings(out, "image", "clipish", ids[has_image], img[has_image].astype(np.float32),
                     {k: v[has_image] for k, v in cols.items()})
    write_embeddings(out, "text", "clipish", ids[has_text], txt[has_text].astype(np.float32),
                     {k: v[has_text] for k, v in cols.items()})
    return out, {"image": has_image, "text": has_text, "split": split}


@pytest.fixture(scope="module")
def gated_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gated")
    emb, has = clinic_with_gaps(tmp)
    cfg = TrainConfig(labels=["dx"], fusion="gated", epochs=6, calibrate_on="val", bootstrap=50, ood_guard="none")
    metrics = train(emb, tmp / "model", cfg)
    return tmp, emb, has, cfg, metrics


def test_train_keeps_rows_lacking_a_modality_and_predict_reproduces_them(gated_model):
    tmp, emb, has, _, m = gated_model
    assert m["data"]["rows"] == 360  # none dropped: the inner join would keep 200
    counts = m["data"]["combinations"]
    assert {c: sum(v.get(c, 0) for v in counts.values()) for c in ("image+text", "image", "text")} == {
        "image+text": int((has["image"] & has["text"]).sum()), "image": int((has["image"] & ~has["text"]).sum()),
        "text": int((~has["image"] & has["text"]).sum())}
    assert set(m["by_combination"]) == {"image+text", "image", "text"}
    for c, e in m["by_combination"].items():
        assert e["n"] == counts["test"][c]
        assert sum(b["n"] for b in e["calibration"]["reliability"]) == e["n"]
    card = (tmp / "model" / "model_card.md").read_text()
    assert "## By modality combination" in card and "| text-only" in card and "rows lacking a modality" in card
    saved = pq.read_table(tmp / "model" / "test_predictions.parquet").to_pydict()
    r = predict(tmp / "model", emb, tmp / "all.parquet")
    assert r["modalities"] == {c: sum(v.get(c, 0) for v in counts.values()) for c in ("image", "image+text", "text")}
    again = pq.read_table(tmp / "all.parquet").to_pydict()
    pos = {i: k for k, i in enumerate(again["id"])}
    rows = [pos[i] for i in saved["id"]]
    assert [again["modalities"][k] for k in rows] == saved["modalities"]
    # exactly the training run's probabilities, per-combination temperature included
    np.testing.assert_array_equal(np.asarray(again["prob_pos"])[rows], saved["prob_pos"])


def test_per_combination_temperatures_are_fitted_on_validation_rows_only(gated_model):
    """Each combination's temperature is TemperatureScaler on that combination's validation rows (a reference
    computation), and relabelling the test rows changes none of them."""
    from embedkit.predict import load_model, model_features
    from embedkit.store import load_embeddings

    tmp, emb, has, cfg, m = gated_model
    est, info = load_model(tmp / "model")
    by = info["calibration"]["by_combination"]
    assert set(by) == {"image+text", "image", "text"}
    es = load_embeddings(emb, how="outer")
    val = np.flatnonzero(es.columns["split"] == "val")
    sub = {k: v[val] for k, v in es.embeddings.items()}
    raw, combos = est.predict_proba(model_features(info, sub)), combinations(sub)
    truth = (es.columns["dx"][val] == "pos").astype(int)
    for c, t in by.items():
        assert t == pytest.approx(TemperatureScaler().fit(raw[combos == c], truth[combos == c], "binary").temperature_)
    flipped, _ = clinic_with_gaps(tmp, name="flipped", flip_test=True)
    m2 = train(flipped, tmp / "flipped_model", cfg)
    assert m2["calibration"]["by_combination"] == m["calibration"]["by_combination"]
    assert m2["test"]["macro_f1"] < 0.5 < m["test"]["macro_f1"]  # the flip reached the test score only


def test_too_few_rows_per_combination_share_the_temperature_with_a_warning(gated_model):
    """By issue 25's rule (auto: >= 200 rows) no combination here has enough rows: one shared temperature."""
    tmp, emb, *_ = gated_model
    m = train(emb, tmp / "auto", TrainConfig(labels=["dx"], fusion="gated", epochs=3, bootstrap=0, ood_guard="none"))
    assert m["calibration"]["by_combination"] == {}
    assert sorted(m["calibration"]["shared_for"]) == ["image", "image+text", "text"]
    assert any("calibrated with the shared temperature" in w for w in m["warnings"])
    assert {e["calibration"]["temperature_source"] for e in m["by_combination"].values()} == {"shared"}


def test_robustness_curve_masks_nested_shares_and_refuses_what_the_model_never_learned(gated_model):
    tmp, emb, has, cfg, _ = gated_model
    curve = evaluate(tmp / "model", emb, split="test", drop_modality="text", rates=[0, 0.5, 1])["robustness"]
    paired = int((has["image"] & has["text"] & (has["split"] == "test")).sum())
    assert curve["eligible_rows"] == paired
    assert [p["rows_masked"] for p in curve["points"]] == [0, round(paired / 2), paired]
    plain = evaluate(tmp / "model", emb, split="test")
    assert curve["points"][0]["macro_f1"] == plain["eval"]["macro_f1"]
    # reference: the test rows with text removed from every paired row, through predict's own path
    from embedkit.predict import apply_calibration, load_model, model_features
    from embedkit.store import load_embeddings

    est, info = load_model(tmp / "model")
    es = load_embeddings(emb, how="outer")
    test = np.flatnonzero(es.columns["split"] == "test")
    sub = {k: v[test] for k, v in es.embeddings.items()}
    no_text = {**sub, "text": sub["text"].copy()}
    no_text["text"][np.isfinite(sub["image"]).all(1)] = np.nan  # every row that has an image loses its text
    proba = apply_calibration(est.predict_proba(model_features(info, no_text)), info["calibration"], "binary",
                              combinations(no_text))
    want = compute_metrics(es.columns["dx"][test], proba, est.classes_, "binary", info["calibration"]["threshold"])
    assert curve["points"][-1]["macro_f1"] == pytest.approx(want["macro_f1"])
    iv = curve["points"][-1]["intervals"]["macro_f1"]
    assert iv["low"] <= curve["points"][-1]["macro_f1"] <= iv["high"]
    # nested: each rate masks the rows of the lower rates and more, the curve's points differ by masking only
    from embedkit.fusion.robustness import robustness_curve

    seen = []

    def score(b):
        seen.append(set(np.flatnonzero(~np.isfinite(b["text"]).all(1)).tolist()))
        return proba

    robustness_curve(score, sub, es.columns["dx"][test], est.classes_, "binary", 0.5, "text", [0, 0.25, 0.5, 1],
                     n_resamples=0)
    assert seen[0] < seen[1] < seen[2] < seen[3]


def test_evaluate_cli_draws_the_curve_and_a_complete_rows_model_refuses(tmp_path):
    emb, _ = clinic_with_gaps(tmp_path, n=240)
    complete = tmp_path / "complete"
    # a logistic model joins complete rows only: it never saw a modality missing
    train(emb, complete, TrainConfig(labels=["dx"], fusion="logistic", bootstrap=0, ood_guard="none"))
    from typer.testing import CliRunner

    from embedkit.cli import app
    from embedkit.fusion.robustness import parse_rates

    run = CliRunner().invoke(app, ["evaluate", str(complete), str(emb), "--split", "test", "--drop-modality", "image",
                                   "--rates", "0,1"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["rows_left_out_missing_modality"] > 0 and "left out of this evaluation" in run.output
    first, last = out["robustness"]["points"]
    assert first["rate"] == 0 and "macro_f1" in first and len(first["macro_f1_95"]) == 2
    assert last["rate"] == 1 and last["refused"].endswith("or with --align for a stand-in")
    assert "lack image" in last["refused"] and "presence mask" in last["refused"]
    with pytest.raises(EmbedkitError, match="shares in"):
        parse_rates("0,2")
    with pytest.raises(EmbedkitError, match="rows lack (image|text), and this model saw no row"):  # predict refuses
        predict(complete, emb, tmp_path / "p.parquet")
