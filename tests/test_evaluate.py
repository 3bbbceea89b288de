"""Metrics against scikit-learn and hand computations; splits' invariants."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from embedkit.errors import EmbedkitError
from embedkit.fusion import (
    compute_metrics,
    detect_task,
    expected_calibration_error,
    kfold_indices,
    split_indices,
    summarize_runs,
)


def test_detect_task():
    assert detect_task([0, 1, 1]) == "binary"
    assert detect_task(["a", "b", "c"]) == "multiclass"
    assert detect_task([[0, 1], [1, 1]]) == "multilabel"
    assert detect_task([[3], [4]]) == "binary"  # a single column is 1-D labels
    with pytest.raises(EmbedkitError):
        detect_task([[0, 2], [1, 1]])


def test_binary_metrics_match_sklearn_and_auroc_uses_probabilities():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.3 * y + 0.7 * rng.random(60), 0, 1)
    classes = np.array(["no", "yes"])
    m = compute_metrics(classes[y], np.column_stack([1 - p, p]), classes, "binary")
    pred = (p >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["auroc"] != pytest.approx(roc_auc_score(y, pred))  # not from hard labels
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred)
    assert m["per_class"]["yes"] == pytest.approx({"precision": prec[1], "recall": rec[1], "f1": f1[1], "support": sup[1]})
    assert m["n"] == 60 and "auroc_note" not in m
    # the positive-class column alone gives the same result
    assert compute_metrics(classes[y], p, classes, "binary")["auroc"] == m["auroc"]


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 90)
    logits = rng.normal(size=(90, 3)) + 1.5 * np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = compute_metrics(y + 10, proba, np.array([10, 11, 12]), "multiclass")
    pred = proba.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert set(m["per_class"]) == {"10", "11", "12"}
    assert m["per_class"]["11"]["support"] == int((y == 1).sum())


def test_multilabel_metrics_match_sklearn():
    rng = np.random.default_rng(2)
    Y = (rng.random((80, 3)) < 0.4).astype(int)
    proba = np.clip(0.5 * Y + 0.6 * rng.random((80, 3)), 0, 1)
    m = compute_metrics(Y, proba, ["dr", "amd", "glaucoma"], "multilabel")
    pred = (proba >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(Y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(Y, pred, average="macro"))
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, proba, average="macro"))
    assert m["confusion_matrix"] == multilabel_confusion_matrix(Y, pred).tolist()
    assert m["per_class"]["amd"]["support"] == int(Y[:, 1].sum())


def test_auroc_is_nan_with_a_note_when_a_class_is_absent():
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    m = compute_metrics([0, 1, 0], proba, [0, 1, 2], "multiclass")
    assert math.isnan(m["auroc"]) and "[2]" in m["auroc_note"]
    assert m["accuracy"] == 1.0


def test_ece_matches_hand_computation():
    # binary: predicted class [1, 1, 0, 1], its confidence [.95, .92, .75, .62], right [1, 0, 1, 1]
    # bins (0.9,1]: 2/4 * |0.5 - 0.935|; (0.7,0.8]: 1/4 * |1 - 0.75|; (0.6,0.7]: 1/4 * |1 - 0.62|
    p = np.array([0.95, 0.92, 0.25, 0.62])
    m = compute_metrics([1, 0, 0, 1], p, [0, 1], "binary")
    assert m["ece"] == pytest.approx(0.5 * 0.435 + 0.25 * 0.25 + 0.25 * 0.38)
    # multiclass: confidence [.72, .55, .45], right [1, 0, 1], one row per bin
    proba = np.array([[0.72, 0.18, 0.10], [0.10, 0.55, 0.35], [0.30, 0.25, 0.45]])
    m = compute_metrics([0, 2, 2], proba, [0, 1, 2], "multiclass")
    assert m["ece"] == pytest.approx((0.28 + 0.55 + 0.55) / 3)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0  # both ends land in a bin


def test_summarize_runs_matches_numpy_and_scipy():
    runs = [
        {"macro_f1": 0.70, "accuracy": 0.80, "auroc": 0.9, "per_class": {}, "auroc_note": "x"},
        {"macro_f1": 0.74, "accuracy": 0.82, "auroc": float("nan")},
        {"macro_f1": 0.69, "accuracy": 0.85, "auroc": 0.8},
    ]
    s = summarize_runs(runs)
    assert set(s) == {"macro_f1", "accuracy", "auroc"}
    v = np.array([0.70, 0.74, 0.69])
    half = stats.t.ppf(0.975, 2) * v.std(ddof=1) / np.sqrt(3)
    assert s["macro_f1"]["mean"] == pytest.approx(v.mean())
    assert s["macro_f1"]["std"] == pytest.approx(v.std(ddof=1))
    assert s["macro_f1"]["ci95_low"] == pytest.approx(v.mean() - half)
    assert s["macro_f1"]["ci95_high"] == pytest.approx(v.mean() + half)
    assert s["macro_f1"]["n_runs"] == 3
    assert s["auroc"]["n_runs"] == 2 and s["auroc"]["mean"] == pytest.approx(0.85)  # NaN left out


def test_split_indices_disjoint_complete_stratified_deterministic():
    y = np.array(["dr"] * 600 + ["none"] * 300 + ["amd"] * 100)
    s = split_indices(y, val_fraction=0.15, test_fraction=0.15, seed=0)
    parts = [s["train"], s["val"], s["test"]]
    assert sum(len(p) for p in parts) == len(y)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))  # disjoint and complete
    assert len(s["test"]) == 150 and len(s["val"]) == 150
    for part, frac in [(s["train"], 0.7), (s["val"], 0.15), (s["test"], 0.15)]:
        for c, n_c in [("dr", 600), ("none", 300), ("amd", 100)]:
            assert abs((y[part] == c).sum() - frac * n_c) <= 1
    again = split_indices(y, seed=0)
    assert all(np.array_equal(again[k], s[k]) for k in s)
    assert not np.array_equal(split_indices(y, seed=1)["test"], s["test"])


def test_split_keeps_a_single_row_class_in_train_and_handles_multilabel():
    y = np.array([0] * 50 + [1] * 30 + [2])
    with pytest.warns(UserWarning, match="single row"):
        s = split_indices(y, seed=0)
    assert 80 in s["train"]
    Y = (np.random.default_rng(0).random((200, 3)) < 0.3).astype(int)
    with pytest.warns(UserWarning, match="single row"):  # one label set occurs once
        s = split_indices(Y, seed=0)
    assert np.array_equal(np.sort(np.concatenate(list(s.values()))), np.arange(200))
    for part in s.values():  # label-powerset strata keep each label's rate
        assert abs(Y[part].mean(0) - Y.mean(0)).max() < 0.05
    with pytest.raises(EmbedkitError):
        split_indices(y, val_fraction=0.5, test_fraction=0.5)


def test_kfold_indices_cover_each_row_once_stratified():
    y = np.array([0] * 50 + [1] * 25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folds = kfold_indices(y, k=5, seed=0)
    tests = np.concatenate([te for _, te in folds])
    assert len(folds) == 5 and np.array_equal(np.sort(tests), np.arange(75))
    for tr, te in folds:
        assert not set(tr) & set(te) and len(tr) + len(te) == 75
        assert (y[te] == 1).sum() == 5
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, kfold_indices(y, k=5, seed=0)))
