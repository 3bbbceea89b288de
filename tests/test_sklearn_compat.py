"""FusionClassifier and LogisticBaseline under scikit-learn's own estimator checks and its tools
(Pipeline, cross_val_score, GridSearchCV with groups). The alignment transformers' checks live in
test_align.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import DataConversionWarning
from sklearn.metrics import accuracy_score
from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedGroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from embedkit.errors import EmbedkitError
from embedkit.fusion import FusionClassifier, LogisticBaseline
from embedkit.fusion.align import GapShift

# Small and quick: the checks fit dozens of times on a few hundred rows of 2-20 features.
FAST = dict(epochs=20, lr=1e-2, batch_size=32)
LATE = FusionClassifier(fusion="late", modality_dims=(1, 1), late_hidden_dim=8, **FAST)
# the fusions beyond concatenation (issue 31), two of them trained with modality dropout (masking)
MIXED = [FusionClassifier(fusion="gated", modality_dims=(1, 1), late_hidden_dim=8, **FAST),
         FusionClassifier(fusion="attention", modality_dims=(1, 1), late_hidden_dim=8, modality_dropout=0.2,
                          **{**FAST, "epochs": 10}),
         FusionClassifier(fusion="lowrank", modality_dims=(1, 1), late_hidden_dim=8, modality_dropout=0.2,
                          **{**FAST, "epochs": 10})]

# modality_dims=(1, 1) fixes the input at two one-column blocks; these checks fit on 1, 3, 4, 5, 10
# or 20 columns, which a late-fusion model with declared block widths rightly refuses. The same checks
# pass for the early-fusion instance, whose width follows the data.
_FIXED_WIDTH_CHECKS = (
    "check_fit_score_takes_y", "check_dont_overwrite_parameters", "check_n_features_in_after_fitting",
    "check_positive_only_tag_during_fit", "check_estimators_dtypes", "check_dtype_object",
    "check_pipeline_consistency", "check_estimators_nan_inf", "check_estimators_pickle",
    "check_estimators_pickle(readonly_memmap=True)", "check_f_contiguous_array_estimator",
    "check_classifiers_one_label", "check_classifier_multioutput", "check_classifiers_regression_target",
    "check_supervised_y_2d", "check_methods_sample_order_invariance", "check_methods_subset_invariance",
    "check_fit2d_1sample", "check_fit2d_1feature", "check_dict_unchanged", "check_fit2d_predict1d",
)


def _expected_failures(estimator):
    if estimator is LATE or any(estimator is e for e in MIXED):
        reason = "modality_dims=(1, 1) declares a 2-column input; this check fits on another width"
        return {name: reason for name in _FIXED_WIDTH_CHECKS}
    return {}


@parametrize_with_checks([LogisticBaseline(), FusionClassifier(hidden_dim=16, **FAST), LATE, *MIXED],
                         expected_failed_checks=_expected_failures)
def test_scikit_learn_checks(estimator, check):
    check(estimator)


def two_blocks(n=240, d=6, seed=0, groups_of=3):
    """[image | text] with a modality gap, a 2-class signal, and groups of `groups_of` rows (patients)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    groups = np.arange(n) // groups_of
    center = 2 * rng.normal(size=(2, d))
    image = center[y] + rng.normal(size=(n, d)) + 2.0
    text = center[y] + rng.normal(size=(n, d)) - 2.0
    return np.hstack([image, text]).astype(np.float32), np.array(["benign", "malignant"])[y], groups


def test_pipeline_cross_val_score_matches_the_folds_done_by_hand():
    X, y, groups = two_blocks()
    pipe = make_pipeline(GapShift(lambda_=1.0), FusionClassifier(fusion="late", modality_dims=(6, 6), scale="none",
                                                                late_hidden_dim=8, epochs=10))
    cv = StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=0)
    scores = cross_val_score(pipe, X, y, groups=groups, cv=cv)
    by_hand = []
    for train, test in cv.split(X, y, groups):
        assert not set(groups[train]) & set(groups[test])  # no patient on both sides
        shift = GapShift(lambda_=1.0).fit(X[train])  # the gap comes from the training rows only
        est = FusionClassifier(fusion="late", modality_dims=(6, 6), scale="none", late_hidden_dim=8, epochs=10)
        est.fit(shift.transform(X[train]), y[train])
        by_hand.append(accuracy_score(y[test], est.predict(shift.transform(X[test]))))
    np.testing.assert_allclose(scores, by_hand)
    assert scores.mean() > 0.8


def test_grid_search_with_groups_picks_and_refits():
    X, y, groups = two_blocks(n=180)
    pipe = make_pipeline(GapShift(), FusionClassifier(fusion="late", modality_dims=(6, 6), scale="none", epochs=10,
                                                      lr=1e-2))
    grid = {"gapshift__lambda_": [0.0, 1.0], "fusionclassifier__late_hidden_dim": [4, 16]}
    search = GridSearchCV(pipe, grid, cv=GroupKFold(n_splits=3)).fit(X, y, groups=groups)
    assert set(search.best_params_) == set(grid) and len(search.cv_results_["params"]) == 4
    best = search.best_estimator_[-1]
    assert best.late_hidden_dim == search.best_params_["fusionclassifier__late_hidden_dim"]
    assert best.classes_.tolist() == ["benign", "malignant"] and search.score(X, y) > 0.8

    base = GridSearchCV(LogisticBaseline(), {"C": [0.01, 1.0]}, cv=GroupKFold(n_splits=3)).fit(X, y, groups=groups)
    assert base.best_params_["C"] in (0.01, 1.0) and hasattr(base.best_estimator_, "coef_")


@pytest.mark.parametrize("make", [lambda cw: LogisticBaseline(class_weight=cw),
                                  lambda cw: FusionClassifier(class_weight=cw, **FAST)], ids=["logistic", "fusion"])
def test_class_weight_dict_is_keyed_by_label_and_survives_save(make, tmp_path):
    """{label: weight} with string labels: a heavy 'benign' weight makes the model call almost everything
    benign on noisy data, and a saved model keeps the dict (JSON would turn int keys into text)."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 4)).astype(np.float32)
    y = np.where(X[:, 0] + 3 * rng.normal(size=200) > 0, "malignant", "benign")
    heavy = make({"benign": 1000.0, "malignant": 0.001}).fit(X, y)
    plain = make(None).fit(X, y)
    assert np.mean(heavy.predict(X) == "benign") > 0.9 > np.mean(plain.predict(X) == "benign")
    heavy.save(tmp_path / "m")
    back = type(heavy).load(tmp_path / "m")
    assert back.class_weight == {"benign": 1000.0, "malignant": 0.001}
    np.testing.assert_array_equal(back.predict_proba(X), heavy.predict_proba(X))
    ints = make({0: 5.0, 1: 1.0}).fit(X, (y == "malignant").astype(int))
    ints.save(tmp_path / "i")
    assert type(ints).load(tmp_path / "i").class_weight == {0: 5.0, 1: 1.0}


def test_column_vector_y_warns_like_scikit_learn_and_multilabel_dict_weights_refused():
    X, y, _ = two_blocks(n=60)
    with pytest.warns(DataConversionWarning, match="column-vector y"):
        LogisticBaseline().fit(X, y[:, None])
    Y = np.column_stack([np.arange(60) % 2, np.arange(60) // 30])
    with pytest.raises(EmbedkitError, match="multilabel"):
        FusionClassifier(class_weight={0: 1.0}, epochs=1).fit(X, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 1-D y: no warning
        clone(LogisticBaseline()).fit(X, y)


def test_input_errors_are_embedkit_errors_with_scikit_learns_types():
    X, y, _ = two_blocks(n=60)
    est = LogisticBaseline().fit(X, y)
    cases = [(lambda: est.predict(X[:, :5]), ValueError, "X has 5 features, but LogisticBaseline is expecting 12"),
             (lambda: est.predict(X.astype(complex)), ValueError, "Complex data not supported"),
             (lambda: est.predict(np.array([[{"a": 1}] * 12], dtype=object)), TypeError, "numbers only"),
             (lambda: LogisticBaseline().fit(X, None), ValueError, "requires y to be passed"),
             (lambda: est.predict(X[0]), ValueError, "Reshape your data")]
    for call, kind, words in cases:
        with pytest.raises(EmbedkitError) as e:
            call()
        assert isinstance(e.value, kind) and words in str(e.value) and "\n" not in str(e.value)


def test_projection_holds_out_whole_groups_with_scikit_learns_splitter():
    from embedkit.shared_encoder.project import fit_projection

    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(60, 8)).astype(np.float32), rng.normal(size=(60, 8)).astype(np.float32)
    groups = np.arange(60) // 3  # 20 images, three reports each
    _, m = fit_projection(image, text, dim=4, epochs=1, val_fraction=0.2, groups=groups)
    assert (m["n_train"], m["n_val"]) == (48, 12)  # 4 of 20 groups held out, 3 rows each
    _, m = fit_projection(image, text, dim=4, epochs=1, val_fraction=0.0)
    assert (m["n_train"], m["n_val"]) == (60, 0)
