"""The numbers a clinic decides with, each against a reference computed another way: the operating point at
the saved threshold, net benefit, chance levels and the banners built on them, stratified group bootstrap
(no resample silently majority-only), ECE intervals, seed spreads clipped to the metric's range, the
leakage scan counting patients."""

from __future__ import annotations

import numpy as np
import pytest

from embedkit.fusion.clinical import (banners, chance_levels, chance_verdict, decision_curve, intervals_disagree,
                                      operating_point)
from embedkit.fusion.evaluate import bootstrap_metrics, compute_metrics, resample_weights, summarize_runs


def scored(n=300, seed=0, k=2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    proba = rng.dirichlet(np.ones(k), n)
    proba[np.arange(n), y] += 0.4
    return y, proba / proba.sum(1, keepdims=True)


def test_operating_point_at_the_saved_threshold_matches_sklearn():
    from sklearn.metrics import confusion_matrix, precision_score, recall_score

    y, proba = scored()
    for thr in (0.3, 0.5, 0.7):
        op = operating_point(y, proba, [0, 1], "binary", thr, n_resamples=200)["classes"]["1"]
        pred = (proba[:, 1] >= thr).astype(int)
        tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
        assert (op["tp"], op["fp"], op["fn"], op["tn"]) == (tp, fp, fn, tn)
        assert op["sensitivity"] == pytest.approx(recall_score(y, pred))
        assert op["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
        assert op["ppv"] == pytest.approx(precision_score(y, pred))
        assert op["npv"] == pytest.approx(precision_score(1 - y, 1 - pred))
        for r, b in op["intervals"].items():
            assert 0 <= b["low"] <= op[r] <= b["high"] <= 1, r


def test_multiclass_operating_point_is_one_vs_rest_of_the_argmax():
    from sklearn.metrics import multilabel_confusion_matrix

    y, proba = scored(k=3)
    op = operating_point(np.array(list("abc"))[y], proba, ["a", "b", "c"], "multiclass", n_resamples=0)
    cms = multilabel_confusion_matrix(y, proba.argmax(1), labels=[0, 1, 2])
    for name, cm in zip("abc", cms):
        (tn, fp), (fn, tp) = cm
        assert [op["classes"][name][k] for k in ("tp", "fp", "fn", "tn")] == [tp, fp, fn, tn]
    assert op["rule"] == "the most probable class"


def test_net_benefit_matches_its_definition():
    y, proba = scored(n=200, seed=3)
    dc = decision_curve(y, proba, [0, 1], "binary", thresholds=[0.1, 0.4, 0.8])
    n, prev = len(y), y.mean()
    for i, pt in enumerate((0.1, 0.4, 0.8)):
        treat = proba[:, 1] >= pt
        tp, fp = (treat & (y == 1)).sum(), (treat & (y == 0)).sum()
        assert dc["classes"]["1"]["model"][i] == pytest.approx(tp / n - fp / n * pt / (1 - pt), abs=1e-6)
        assert dc["classes"]["1"]["treat_all"][i] == pytest.approx(prev - (1 - prev) * pt / (1 - pt), abs=1e-6)


def test_chance_levels_and_banners():
    y = np.array([0] * 70 + [1] * 30)
    c = chance_levels(y, [0, 1], "binary")
    assert c["accuracy"] == pytest.approx(0.7) and c["auroc"] == 0.5
    assert c["macro_f1"] == pytest.approx(0.5)  # guessing at the class shares: F1_c = p_c, averaged
    assert chance_verdict({"low": 0.45, "high": 0.6}, 0.5) == "covers"
    assert chance_verdict({"low": 0.55, "high": 0.7}, 0.5) == "above"
    metrics = {"test": {"macro_f1": 0.49, "auroc": 0.8, "accuracy": 0.75},
               "bootstrap": {"unit": "group", "n_resamples": 1000, "resamples_lacking_a_class": 0, "metrics": {
                   "macro_f1": {"low": 0.40, "high": 0.58}, "auroc": {"low": 0.7, "high": 0.9},
                   "accuracy": {"low": 0.66, "high": 0.84}}},
               "val": {"macro_f1": 0.67}, "bootstrap_val": {"metrics": {"macro_f1": {"low": 0.6, "high": 0.74}}},
               "clinical": {"chance": {"test": c}}}
    got = {b["kind"]: b for b in banners(metrics)}
    assert set(got) == {"chance", "disagree"}
    assert "macro_f1" in got["chance"]["message"] and "auroc" not in got["chance"]["message"]
    assert "accuracy" in got["chance"]["message"]  # [0.66, 0.84] includes the majority baseline 0.70
    # overlapping intervals can still differ: the difference's interval decides, not the overlap
    assert intervals_disagree({"low": 0.41, "high": 0.56}, {"low": 0.55, "high": 0.82})
    assert not intervals_disagree({"low": 0.45, "high": 0.60}, {"low": 0.5, "high": 0.7})
    metrics["bootstrap"]["metrics"]["macro_f1"] = {"low": 0.62, "high": 0.72}
    metrics["bootstrap"]["metrics"]["accuracy"] = {"low": 0.72, "high": 0.84}
    assert banners(metrics) == []


def test_stratified_group_bootstrap_keeps_every_class_and_scores_a_lacking_one_zero():
    """12 test patients, 3 of them the minority class: plain resampling loses the minority in about one
    resample in ten and averages macro-F1 over the majority alone; stratified resampling never does."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    g_label = np.array([1] * 3 + [0] * 9)
    groups = np.repeat(np.arange(12), 4)
    y = np.repeat(g_label, 4)
    p = np.clip(y * 0.3 + rng.random(len(y)) * 0.7, 0, 1)
    proba = np.column_stack([1 - p, p])
    b = bootstrap_metrics(y, proba, [0, 1], "binary", groups=groups, n_resamples=500, seed=0)
    assert b["stratified"] and b["resamples_lacking_a_class"] == 0
    w = next(resample_weights(y, groups, 500, 0))
    assert ((w @ np.eye(2)[y]) > 0).all()  # every resample holds both classes
    # a class whose only rows sit inside other classes' patients can still go missing: counted, and scored 0
    y_mixed = np.zeros_like(y)
    y_mixed[[1, 41]] = 1  # two rows of two majority patients
    b = bootstrap_metrics(y_mixed, proba, [0, 1], "binary", groups=groups, n_resamples=300, seed=2)
    weights = next(resample_weights(y_mixed, groups, 300, 2))
    pred = (p >= 0.5).astype(int)
    ref = [f1_score(y_mixed, pred, labels=[0, 1], average="macro", sample_weight=w_, zero_division=0)
           for w_ in weights]
    lacking = int(((weights @ np.eye(2)[y_mixed]) == 0).any(1).sum())
    assert b["resamples_lacking_a_class"] == lacking > 0
    assert b["metrics"]["macro_f1"]["low"] == pytest.approx(np.quantile(ref, 0.025))
    assert b["metrics"]["macro_f1"]["high"] == pytest.approx(np.quantile(ref, 0.975))


def test_bootstrap_ece_matches_the_metric_on_resampled_rows():
    y, proba = scored(n=120, seed=4)
    b = bootstrap_metrics(y, proba, [0, 1], "binary", 0.4, n_resamples=50, seed=5)
    w = next(resample_weights(y, None, 50, 5))
    ref = [compute_metrics(y[np.repeat(np.arange(120), w_.astype(int))], proba[np.repeat(np.arange(120), w_.astype(int))],
                           [0, 1], "binary", 0.4)["ece"] for w_ in w]
    assert b["metrics"]["ece"]["low"] == pytest.approx(np.quantile(ref, 0.025))
    assert b["metrics"]["ece"]["high"] == pytest.approx(np.quantile(ref, 0.975))


def test_seed_spread_is_clipped_and_counts_the_runs_where_a_metric_is_defined():
    runs = [{"accuracy": 0.99, "auroc": 0.111}, {"accuracy": 0.95, "auroc": float("nan")},
            {"accuracy": 1.0, "auroc": 0.4}, {"accuracy": 0.9, "auroc": float("nan")}]
    s = summarize_runs(runs)
    assert s["accuracy"]["ci95_high"] == 1.0 and s["accuracy"]["clipped"]
    assert 0 <= s["auroc"]["ci95_low"] and s["auroc"]["n_runs"] == 2 and s["auroc"]["of_runs"] == 4


def test_leakage_scan_counts_patients_not_rows():
    """One patient's six notes all name their ward: a row count calls 'ward7' a class-wide leak, a patient
    count sees one patient."""
    from embedkit.leakage import scan_text_leakage

    rng = np.random.default_rng(0)
    words = ["cough", "fever", "chest", "film", "review", "pain", "mild", "acute"]
    texts, y, groups = [], [], []
    for g in range(40):
        label = "pos" if g % 2 else "neg"
        for r in range(6 if g == 1 else 2):
            texts.append(" ".join(rng.choice(words, 4)) + (" ward7" if g == 1 else ""))
            y.append(label)
            groups.append(f"pt{g}")
    by_row = scan_text_leakage(texts, np.array(y, dtype=object), "binary", ["neg", "pos"], min_coverage=0.05)
    by_group = scan_text_leakage(texts, np.array(y, dtype=object), "binary", ["neg", "pos"], min_coverage=0.05,
                                 groups=groups)
    assert [r["token"] for r in by_row["rules"]] == ["ward7"]
    assert by_group["rules"] == [] and by_group["unit"] == "group"
    assert by_group["n_groups_scanned"] == 40 and by_group["n_rows_scanned"] == len(texts)


def test_project_says_which_rows_it_fitted_on():
    from embedkit.shared_encoder.project import fitted_on, projection_rows

    cols = {"split": np.array([None, None, None], dtype=object)}
    assert "all 3 rows" in fitted_on(cols, projection_rows(cols)) and "--split-col" in fitted_on(cols, projection_rows(cols))
    cols = {"split": np.array(["train", "test", "train"], dtype=object)}
    assert fitted_on(cols, projection_rows(cols)).startswith("the 2 training-split rows")
