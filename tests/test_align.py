"""Modality-gap alignment: formulas on hand-computed numbers, train-only fitting, row-wise transforms,
stand-ins, JSON round trips, scikit-learn's checks, the gap report and the `embedkit gap` command."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from embedkit.errors import EmbedkitError
from embedkit.fusion.align import (
    ALIGN_METHODS,
    GapShift,
    LearnedGapShift,
    ModalityCenter,
    ModalityStandardize,
    aligner_from_dict,
    fit_aligners,
    gap_stats,
    l2_normalize,
    make_aligner,
    plot_gap_pca,
    shift_torch,
)
from embedkit.fusion.gap import gap_report
from embedkit.store import PartWriter, build_schema

from conftest import REPO

# Hand example. image rows normalise to (0.6, 0.8) and (0, 1): mean (0.3, 0.9);
# text rows normalise to (1, 0) and (0, -1): mean (0.5, -0.5); gap = (-0.2, 1.4).
IMAGE = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)
TEXT = np.array([[1.0, 0.0], [0.0, -5.0]], dtype=np.float32)
HAND = {"image": IMAGE, "text": TEXT}
ALIGNERS = (GapShift(1.0), GapShift(0.3), ModalityCenter(), ModalityStandardize())


def cones(n=300, d=32, seed=0, spread=0.3):
    """Paired rows in two narrow cones around different directions, like a contrastive encoder."""
    rng = np.random.default_rng(seed)
    img_dir, txt_dir = rng.normal(size=d), rng.normal(size=d)
    shared = rng.normal(size=(n, d))  # the per-sample content both modalities carry
    image = img_dir + spread * (shared + 0.5 * rng.normal(size=(n, d)))
    text = txt_dir + spread * (shared + 0.5 * rng.normal(size=(n, d)))
    return image.astype(np.float32), text.astype(np.float32)


def translated(n=300, d=16, r=0.6, seed=0, paired=True):
    """Unit rows image = s p + r e, text = s q + r f with e, f orthogonal to p and q (s^2 + r^2 = 1).

    Every image row minus its text partner is s (p - q) when paired (f = e), so the gap is exactly
    s (p - q) and text = norm(image - gap) holds row by row. Unpaired (f drawn like e), the two
    modalities are one distribution translated: identical once each is centred.
    """
    rng = np.random.default_rng(seed)

    def spread():
        g = rng.normal(size=(n, d))
        g[:, :2] = 0
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    e = spread()
    f = e if paired else spread()
    p, q, s = np.eye(d)[0], np.eye(d)[1], np.sqrt(1 - r * r)
    return s * p + r * e, s * q + r * f


def test_l2_normalize_rows_and_zero_rows():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0], [1e30, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], atol=1e-7)
    assert out.dtype == np.float32


def test_shift_formula_on_hand_computed_numbers():
    shift = GapShift(lambda_=1.0).fit(HAND)
    np.testing.assert_allclose(shift.image_mean_, [0.3, 0.9], atol=1e-7)
    np.testing.assert_allclose(shift.text_mean_, [0.5, -0.5], atol=1e-7)
    np.testing.assert_allclose(shift.gap_, [-0.2, 1.4], atol=1e-7)
    assert shift.gap_.dtype == np.float32 and shift.n_fit_rows_ == 2 and shift.n_features_in_ == 4

    out = shift.transform(HAND)
    # image - gap/2 = (0.7, 0.1), (0.1, 0.3); text + gap/2 = (0.9, 0.7), (-0.1, -0.3); then normalised.
    np.testing.assert_allclose(out["image"], [[0.98994949, 0.14142136], [0.31622777, 0.94868330]], atol=1e-6)
    np.testing.assert_allclose(out["text"], [[0.78935222, 0.61394061], [-0.31622777, -0.94868330]], atol=1e-6)

    # lambda = -2: image + gap = (0.4, 2.2), (-0.2, 2.4); text - gap = (1.2, -1.4), (0.2, -2.4).
    wide = shift.with_lambda(-2.0).transform(HAND)
    np.testing.assert_allclose(wide["image"], [[0.17888544, 0.98386991], [-0.08304548, 0.99654576]], atol=1e-6)
    np.testing.assert_allclose(wide["text"], [[0.65079137, -0.75925660], [0.08304548, -0.99654576]], atol=1e-6)


def test_center_and_standardize_formulas_on_hand_computed_numbers():
    center = ModalityCenter().fit(HAND).transform(HAND)
    # image - (0.3, 0.9) = +-(0.3, -0.1) -> +-(3, -1)/sqrt(10); text - (0.5, -0.5) = +-(0.5, 0.5) -> +-(1, 1)/sqrt(2).
    np.testing.assert_allclose(center["image"], np.array([[3, -1], [-3, 1]]) / np.sqrt(10), atol=1e-6)
    np.testing.assert_allclose(center["text"], np.array([[1, 1], [-1, -1]]) / np.sqrt(2), atol=1e-6)

    scaler = ModalityStandardize().fit(HAND)
    # image features: (0.6, 0) -> mean 0.3 std 0.3; (0.8, 1) -> mean 0.9 std 0.1.
    # text features: (1, 0) -> mean 0.5 std 0.5; (0, -1) -> mean -0.5 std 0.5.
    np.testing.assert_allclose(scaler.image_std_, [0.3, 0.1], atol=1e-7)
    np.testing.assert_allclose(scaler.text_std_, [0.5, 0.5], atol=1e-7)
    z = scaler.transform(HAND)
    np.testing.assert_allclose(z["image"], [[1, -1], [-1, 1]], atol=1e-5)
    np.testing.assert_allclose(z["text"], [[1, 1], [-1, -1]], atol=1e-5)
    # z-score transfer: image (0.6, 0.8) has z (1, -1) -> text (0.5 + 0.5, -0.5 - 0.5).
    np.testing.assert_allclose(scaler.stand_in("image", IMAGE[:1]), [[1.0, -1.0]], atol=1e-5)

    # A feature that never varied in training stays 0 for every row, also one that varies later.
    image = np.array([[0.6, 0.8, 0.0], [0.8, 0.6, 0.0]])
    text = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    fitted = ModalityStandardize().fit({"image": image, "text": text})
    new = fitted.transform({"image": np.array([[0.0, 0.0, 1.0], [0.6, 0.0, 0.8]])})["image"]
    assert np.isfinite(new).all() and (new[:, 2] == 0).all()
    assert (fitted.transform({"image": image})["image"][:, 2] == 0).all()


def test_lambda_zero_only_normalises_and_one_modality_alone():
    image, text = cones(50)
    none = make_aligner("none").fit({"image": image, "text": text})
    assert isinstance(none, GapShift) and none.lambda_ == 0.0
    out = none.transform({"image": 5 * image, "text": text})
    np.testing.assert_allclose(out["image"], l2_normalize(image), atol=1e-6)
    np.testing.assert_allclose(out["text"], l2_normalize(text), atol=1e-6)

    for aligner in ALIGNERS:
        fitted = clone(aligner).fit({"image": image, "text": text})
        both = fitted.transform({"image": image, "text": text})
        alone = fitted.transform({"image": image})
        assert list(alone) == ["image"]
        np.testing.assert_array_equal(alone["image"], both["image"])
        np.testing.assert_array_equal(fitted.transform({"text": text, "image": None})["text"], both["text"])


def test_array_form_matches_dict_form_and_keeps_float_dtype():
    image, text = cones(40, d=8)
    for aligner in ALIGNERS:
        from_dict = clone(aligner).fit({"image": image, "text": text})
        from_array = clone(aligner).fit(np.hstack([image, text]))
        np.testing.assert_array_equal(from_array.gap_, from_dict.gap_)
        out = from_dict.transform({"image": image, "text": text})
        np.testing.assert_array_equal(from_array.transform(np.hstack([image, text])),
                                      np.hstack([out["image"], out["text"]]))
        assert out["image"].dtype == np.float32
        assert from_dict.transform({"text": text.astype(np.float64)})["text"].dtype == np.float64
        assert from_array.fit_transform(np.hstack([image, text]).astype(np.float64)).dtype == np.float64


def test_lambda_one_equalises_means_and_closes_the_gap():
    image, text = cones()
    shift = GapShift(1.0).fit({"image": image, "text": text})
    # Before renormalisation the shifted means are both the midpoint of the two means.
    image_pre = l2_normalize(image) - shift.gap_ / 2
    text_pre = l2_normalize(text) + shift.gap_ / 2
    np.testing.assert_allclose(image_pre.mean(0), text_pre.mean(0), atol=1e-6)

    before = gap_stats(image, text)
    assert before["gap_norm"] > 0.5  # the synthetic cones really are apart
    closed = gap_stats(image, text, lambda_=1.0)
    assert closed["after_gap_norm"] < 0.1 * closed["gap_norm"]
    assert closed["after_mean_pair_cosine"] > closed["mean_pair_cosine"]
    half = gap_stats(image, text, lambda_=0.5)
    assert closed["after_gap_norm"] < half["after_gap_norm"] < before["gap_norm"]
    widened = gap_stats(image, text, lambda_=-1.0)
    assert widened["after_gap_norm"] > 1.2 * widened["gap_norm"]
    # gap_stats' after_ rows are exactly what GapShift.transform produces.
    out = shift.transform({"image": image, "text": text})
    assert closed["after_gap_norm"] == pytest.approx(np.linalg.norm(out["image"].mean(0) - out["text"].mean(0)),
                                                     abs=1e-6)


@pytest.mark.parametrize("aligner", ALIGNERS, ids=repr)
def test_fitted_on_the_given_rows_only_and_row_wise(aligner):
    image, text = cones(400)
    train, test = slice(0, 300), slice(300, 400)
    fitted = clone(aligner).fit({"image": image[train], "text": text[train]})
    state = fitted.to_dict()
    train_out = fitted.transform({"image": image[train], "text": text[train]})

    # Move the held-out rows far away and fit on the training rows again: the same fit.
    moved_image, moved_text = image.copy(), text.copy()
    moved_image[test], moved_text[test] = 1e6, -1e6
    assert clone(aligner).fit({"image": moved_image[train], "text": moved_text[train]}).to_dict() == state
    by_rows = fit_aligners(moved_image, moved_text, ["center"], fit_rows=np.arange(300))["center"]
    assert by_rows.to_dict() == ModalityCenter().fit({"image": image[train], "text": text[train]}).to_dict()
    # Pooling would have moved it: the check above can tell the difference.
    pooled = clone(aligner).fit({"image": moved_image, "text": moved_text})
    assert np.abs(pooled.image_mean_ - fitted.image_mean_).max() > 0.1

    # transform is row-wise: train rows transformed beside (huge) held-out rows, reversed, come out the same.
    together = fitted.transform({"image": moved_image[::-1], "text": moved_text[::-1]})
    np.testing.assert_array_equal(together["image"][::-1][train], train_out["image"])
    np.testing.assert_array_equal(together["text"][::-1][train], train_out["text"])
    assert fitted.to_dict() == state  # transform changed nothing fitted

    # The fitted state is a copy: editing the caller's training arrays afterwards leaves it alone.
    train_image = image[train].copy()
    copy = clone(aligner).fit({"image": train_image, "text": text[train]})
    train_image[:] = 7.0
    assert copy.to_dict() == state


@pytest.mark.parametrize("aligner", ALIGNERS, ids=repr)
def test_stand_in_recovers_the_partner_exactly(aligner):
    image, text = translated(200)
    fitted = clone(aligner).fit({"image": image, "text": text})
    gap = np.sqrt(1 - 0.6**2) * (np.eye(16)[0] - np.eye(16)[1])
    np.testing.assert_allclose(text, l2_normalize(image - gap), atol=1e-12)  # as built
    np.testing.assert_allclose(fitted.gap_, gap, atol=1e-6)
    np.testing.assert_allclose(fitted.stand_in("image", image), text, atol=1e-6)
    np.testing.assert_allclose(fitted.stand_in("text", text), image, atol=1e-6)
    # The stand-in is transformed like the real partner would be.
    np.testing.assert_allclose(fitted.transform({"text": fitted.stand_in("image", image)})["text"],
                               fitted.transform({"text": text})["text"], atol=1e-5)
    # Rows are scaled first and each row's stand-in depends on that row alone.
    np.testing.assert_allclose(fitted.stand_in("image", 3 * image[:5]), text[:5], atol=1e-6)


@pytest.mark.parametrize("aligner", ALIGNERS, ids=repr)
def test_json_round_trip_is_exact(aligner):
    image, text = cones(80)
    fitted = clone(aligner).fit({"image": image, "text": text})
    loaded = aligner_from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert type(loaded) is type(fitted) and loaded.get_params() == fitted.get_params()
    assert loaded.to_dict() == fitted.to_dict()
    for name in fitted.to_dict():
        if hasattr(fitted, name + "_") and isinstance(getattr(fitted, name + "_"), np.ndarray):
            assert getattr(loaded, name + "_").dtype == np.float32
            np.testing.assert_array_equal(getattr(loaded, name + "_"), getattr(fitted, name + "_"))
    for a, b in zip(loaded.transform({"image": image, "text": text}).values(),
                    fitted.transform({"image": image, "text": text}).values()):
        np.testing.assert_array_equal(a, b)
    assert loaded.n_fit_rows_ == 80 and loaded.n_features_in_ == 64


def test_saved_state_is_validated_and_old_gap_shifts_load():
    image, text = cones(30, d=4)
    state = ModalityStandardize().fit({"image": image, "text": text}).to_dict()
    broken = {
        "kind": {**state, "kind": "magic"},
        "length": {**state, "gap": state["gap"][:3]},
        "nan": {**state, "text_std": [float("nan")] * 4},
        "negative std": {**state, "text_std": [-1.0] * 4},
        "inconsistent gap": {**state, "gap": [v + 0.5 for v in state["gap"]]},
        "missing vector": {k: v for k, v in state.items() if k != "image_std"},
        "params": {**state, "params": {"lambda_": 1.0}},
        "rows": {**state, "n_fit_rows": 0},
        "not numbers": {**state, "gap": ["a"] * 4},
    }
    for what, d in broken.items():
        with pytest.raises(EmbedkitError) as err:
            aligner_from_dict(d)
        assert "\n" not in str(err.value), what

    # A model folder written before aligners had `params` holds {"kind": "gap_shift", "lambda": ...}.
    shift = GapShift(0.3).fit({"image": image, "text": text})
    old = {"kind": "gap_shift", "lambda": 0.3, "gap": [float(v) for v in shift.gap_],
           "image_mean": [float(v) for v in shift.image_mean_], "text_mean": [float(v) for v in shift.text_mean_],
           "n_fit_rows": 30}
    assert aligner_from_dict(old).to_dict() == shift.to_dict()


def test_different_widths_are_refused_not_interpolated():
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(10, 768)), rng.normal(size=(10, 4096))
    for call in (
        lambda: GapShift(1.0).fit({"image": image, "text": text}),
        lambda: ModalityStandardize().fit({"image": image, "text": text}),
        lambda: gap_stats(image, text, lambda_=1.0),
        lambda: gap_report(image, text),
        lambda: plot_gap_pca(image, text, "unused.png"),
    ):
        with pytest.raises(EmbedkitError) as err:
            call()
        msg = str(err.value)
        assert "shared" in msg and "project" in msg and "768" in msg and "4096" in msg
        assert "\n" not in msg

    for aligner in ALIGNERS:
        fitted = clone(aligner).fit({"image": image, "text": image})
        with pytest.raises(EmbedkitError, match="768"):
            fitted.transform({"text": text})
        with pytest.raises(EmbedkitError, match="768"):
            fitted.stand_in("text", text)
        with pytest.raises(EmbedkitError, match="1536"):
            fitted.transform(np.hstack([image, image])[:, :100])
    with pytest.raises(EmbedkitError, match="even number"):
        GapShift().fit(rng.normal(size=(10, 7)))
    with pytest.raises(EmbedkitError):
        shift_torch(torch.zeros(2, 4096), None, torch.zeros(768), torch.tensor(1.0))


def test_user_errors_are_one_line_embedkit_errors():
    image, text = cones(20)
    both = {"image": image, "text": text}
    for call in (
        lambda: GapShift(1.0).transform(both),  # not fitted
        lambda: ModalityCenter().stand_in("image", image),  # not fitted
        lambda: GapShift(1.0).fit({"image": image, "text": text[:10]}),  # unpaired rows
        lambda: GapShift(1.0).fit({"image": image}),  # one modality
        lambda: GapShift(1.0).fit({"image": image, "txt": text}),  # a typo
        lambda: GapShift(1.0).fit(image, text),  # the old fit(image, text) call
        lambda: GapShift(float("nan")).fit(both),
        lambda: GapShift("big").fit(both),
        lambda: GapShift(1.0).fit({"image": image[0], "text": text[0]}),  # 1-D
        lambda: GapShift(1.0).fit({"image": np.full_like(image, np.nan), "text": text}),
        lambda: ModalityCenter().fit({"image": image, "text": np.full_like(text, np.inf)}),
        lambda: ModalityCenter().fit(both).transform({"image": np.full_like(image, np.nan)}),
        lambda: ModalityCenter().fit(both).stand_in("audio", image),
        lambda: ModalityCenter().fit({"image": [["a"] * 32] * 20, "text": text}),
        lambda: make_aligner("magic"),
        lambda: make_aligner("center", 0.5),  # lambda belongs to the shift
        lambda: fit_aligners(image, text, ["center"], fit_rows=np.zeros(20, bool)),
        lambda: fit_aligners(image, text, ["center"], fit_rows=[25]),
        lambda: aligner_from_dict({"kind": "gap_shift", "lambda": 1.0}),
        lambda: aligner_from_dict("not a dict"),
    ):
        with pytest.raises(EmbedkitError) as err:
            call()
        assert "\n" not in str(err.value)
    assert make_aligner("shift").lambda_ == 1.0 and make_aligner("shift", 0.5).lambda_ == 0.5
    assert make_aligner("none", 0.0).lambda_ == 0.0 and set(ALIGN_METHODS) == {"none", "shift", "center", "standardize"}


# scikit-learn's own checks use 3 or 5 features in these; [image | text] needs two equal halves.
_ODD_WIDTH_CHECKS = (
    "check_fit_score_takes_y", "check_dont_overwrite_parameters", "check_estimators_dtypes",
    "check_pipeline_consistency", "check_estimators_nan_inf", "check_estimators_pickle",
    "check_estimators_pickle(readonly_memmap=True)", "check_f_contiguous_array_estimator",
    "check_transformer_data_not_an_array", "check_transformer_general",
    "check_transformer_general(readonly_memmap=True)", "check_transformer_preserve_dtypes",
    "check_methods_sample_order_invariance", "check_methods_subset_invariance", "check_dict_unchanged",
    "check_fit2d_predict1d",
)


def _expected_failures(estimator):
    reason = "scikit-learn's check data has an odd number of features; [image | text] needs two equal halves"
    return {name: reason for name in _ODD_WIDTH_CHECKS}


@parametrize_with_checks(list(ALIGNERS), expected_failed_checks=_expected_failures)
def test_scikit_learn_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("aligner", ALIGNERS, ids=repr)
def test_what_the_odd_width_checks_cover_holds_on_even_widths(aligner):
    """The properties of the checks listed above, on data of an even width."""
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(30, 6)) + 2, rng.integers(0, 2, 30)
    fitted = clone(aligner).fit(X, y)  # y is accepted and ignored
    assert set(vars(fitted)) - set(vars(clone(aligner))) == {
        k for k in vars(fitted) if k.endswith("_") and k != "lambda_"}  # fit adds only fitted_ attributes
    assert fitted.get_params() == clone(aligner).get_params()
    out = fitted.transform(X)
    for dtype in (np.float32, np.float64):
        assert clone(aligner).fit_transform(X.astype(dtype)).dtype == dtype
    np.testing.assert_allclose(clone(aligner).fit_transform(X), out, atol=1e-12)
    np.testing.assert_allclose(clone(aligner).fit(X.tolist()).transform(np.asfortranarray(X)), out, atol=1e-12)
    order = rng.permutation(30)
    np.testing.assert_array_equal(fitted.transform(X[order]), out[order])
    np.testing.assert_array_equal(fitted.transform(X[:7]), out[:7])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(fitted)).transform(X), out)
    np.testing.assert_allclose(clone(aligner).fit(X).fit(X).transform(X), out, atol=1e-12)  # idempotent fit
    for bad in (X[0], np.where(np.arange(6) == 2, np.nan, X)):
        with pytest.raises(ValueError):
            fitted.transform(bad)
    with pytest.raises(ValueError, match="NaN"):
        clone(aligner).fit(np.where(np.arange(6) == 2, np.inf, X))


def test_gap_report_tells_separated_from_identical_distributions():
    image, text = translated(300, paired=False, seed=3)  # one distribution, translated by the gap
    report = gap_report(image, text)
    none, center, shift = (report["methods"][m] for m in ("none", "center", "shift"))
    assert none["probe_accuracy"] > 0.97 and none["mmd2"] > 0.3 and none["gap_norm"] > 1.0
    assert abs(center["probe_accuracy"] - 0.5) < 0.1 and abs(center["mmd2"]) < 0.01
    assert center["gap_norm"] < 0.05 and center["centroid_distance"] is None  # a mean near 0 has no direction
    assert shift["gap_norm"] < 0.05 and abs(shift["mmd2"]) < 0.01
    assert set(report["explain"]) >= {k for k in none if k not in ("description", "params")}
    assert report["n_fit_rows"] == 300 and report["lambda"] == 1.0 and report["warnings"] == []
    json.dumps(report, allow_nan=False)  # JSON-safe

    # Pairs stay in one fold: here each text is its image's content plus noise, in 64-d, so a probe that
    # saw a pair's image in training would call its text an image in the test fold (accuracy ~0.1).
    rng = np.random.default_rng(0)
    image, _ = translated(100, d=64, seed=1)
    content = (image - image[:, :1] * np.eye(64)[0]) / 0.6 + 0.3 * rng.normal(size=(100, 64)) / 8
    content[:, :2] = 0
    text = 0.8 * np.eye(64)[1] + 0.6 * l2_normalize(content)
    assert abs(gap_report(image, text, methods=["center"])["methods"]["center"]["probe_accuracy"] - 0.5) < 0.1

    # Separated cones: every method but "none" takes the centroids together; the probe still sees the shift.
    sep = gap_report(*cones(200), methods=["none", "shift"], lambda_=1.0)
    assert sep["methods"]["none"]["probe_accuracy"] > 0.97 and list(sep["methods"]) == ["none", "shift"]
    assert sep["methods"]["shift"]["gap_norm"] < 0.1 * sep["methods"]["none"]["gap_norm"]

    # The numbers are those of the transformed rows: geometry vs gap_stats, MMD^2 vs a direct sum.
    image, text = cones(60, d=8)
    report = gap_report(image, text, methods=["none", "shift"], lambda_=0.5)
    after = gap_stats(image, text, lambda_=0.5)
    for key in ("gap_norm", "mean_pair_cosine", "mean_within_image_cosine", "centroid_distance"):
        assert report["methods"]["shift"][key] == pytest.approx(after[f"after_{key}"], abs=1e-6)  # float32 gap_
    a, b = l2_normalize(image).astype(np.float64), l2_normalize(text).astype(np.float64)  # rows as transformed
    z = np.vstack([a, b])
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    k = np.exp(-d2 / (2 * np.median(d2[np.triu_indices(120, 1)])))
    off = ~np.eye(60, dtype=bool)
    mmd2 = k[:60, :60][off].mean() + k[60:, 60:][off].mean() - 2 * k[:60, 60:].mean()
    assert report["methods"]["none"]["mmd2"] == pytest.approx(mmd2, abs=1e-9)


def test_gap_report_fits_on_fit_rows_only():
    image, text = cones(200)
    fit = np.arange(200) < 150
    report = gap_report(image, text, methods=["center"], fit_rows=fit)
    assert report["n_fit_rows"] == 150 and report["n_rows"] == 200 and "150 of 200" in report["fitted_on"]
    moved_image, moved_text = image.copy(), text.copy()
    moved_image[~fit] *= -1  # moves the centroid of all rows, not that of the fit rows
    moved = gap_report(moved_image, moved_text, methods=["center"], fit_rows=fit)
    pooled = gap_report(moved_image, moved_text, methods=["center"])
    reference = ModalityCenter().fit({"image": image[fit], "text": text[fit]}).transform(
        {"image": moved_image, "text": moved_text})
    assert moved["methods"]["center"]["gap_norm"] == pytest.approx(
        np.linalg.norm(reference["image"].mean(0) - reference["text"].mean(0)), abs=1e-6)
    assert abs(moved["methods"]["center"]["gap_norm"] - pooled["methods"]["center"]["gap_norm"]) > 0.05


def test_collapse_warning_fires_on_collapsed_data_only():
    image, text = cones(100, spread=0.01)
    warnings = gap_report(image, text, methods=["none"])["warnings"]
    assert {w["modality"] for w in warnings} == {"image", "text"}
    assert all(w["code"] == "collapsed" and "center" in w["message"] and "\n" not in w["message"]
               for w in warnings)
    spread_image, _ = cones(100, spread=0.3)
    only_text = gap_report(spread_image, text, methods=["center"])["warnings"]  # judged before alignment
    assert [w["modality"] for w in only_text] == ["text"]
    assert gap_report(*cones(100, spread=0.3), methods=["none"])["warnings"] == []
    # At the threshold: within-modality cosine s^2 = 0.985 warns, 0.975 does not.
    near = gap_report(*translated(200, r=np.sqrt(0.015)), methods=["none"])["warnings"]
    assert [w["mean_within_cosine"] for w in near] == pytest.approx([0.985, 0.985], abs=0.002)
    assert gap_report(*translated(200, r=np.sqrt(0.025)), methods=["none"])["warnings"] == []


def test_plot_gap_pca_writes_png(tmp_path):
    image, text = cones(1500)  # 3000 rows in all: the plot subsamples
    for name, kwargs in (("before.png", {}), ("sub/after.png", {"lambda_": 1.0})):
        path = plot_gap_pca(image, text, tmp_path / name, **kwargs)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # The before/after figure is two panels wide.
    assert (tmp_path / "sub/after.png").stat().st_size > (tmp_path / "before.png").stat().st_size
    with pytest.raises(EmbedkitError):
        plot_gap_pca(image, text, tmp_path / "bad.png", lambda_=1.0, gap=np.zeros(3))
    aligners = fit_aligners(image, text, ALIGN_METHODS, fit_rows=np.arange(1000))
    path = plot_gap_pca(image, text, tmp_path / "methods.png", aligners=aligners)
    assert path.stat().st_size > (tmp_path / "sub/after.png").stat().st_size  # four panels


def test_shift_torch_matches_numpy_and_trains_lambda():
    image, text = cones(64)
    shift = GapShift(0.7).fit({"image": image, "text": text})
    out = shift.transform({"image": image, "text": text})
    gap = torch.from_numpy(shift.gap_)
    ti, tt = shift_torch(torch.from_numpy(image), torch.from_numpy(text), gap, torch.tensor(0.7))
    np.testing.assert_allclose(ti.numpy(), out["image"], atol=1e-6)
    np.testing.assert_allclose(tt.numpy(), out["text"], atol=1e-6)

    # Gradient w.r.t. lambda agrees with a central finite difference (float64).
    img64, txt64, gap64 = (torch.from_numpy(a).double() for a in (image, text, shift.gap_))

    def loss(lam):
        a, b = shift_torch(img64, txt64, gap64, lam)
        return (a * b).sum(dim=1).mean()

    lam = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    loss(lam).backward()
    h = 1e-5
    numeric = (loss(torch.tensor(h, dtype=torch.float64)) - loss(torch.tensor(-h, dtype=torch.float64))) / (2 * h)
    assert lam.grad is not None and abs(lam.grad.item()) > 1e-3
    assert lam.grad.item() == pytest.approx(numeric.item(), rel=1e-5)

    module = LearnedGapShift(shift.gap_)
    assert module.lam.item() == 0.0 and [p for p in module.parameters()] == [module.lam]
    assert "gap" in module.state_dict()
    mi, mt = module(torch.from_numpy(image), torch.from_numpy(text))
    np.testing.assert_allclose(mi.detach().numpy(), l2_normalize(image), atol=1e-6)  # lambda 0 = off
    opt = torch.optim.AdamW(module.parameters(), lr=0.1)
    for _ in range(5):  # maximising pair cosine pulls lambda toward closing the gap
        opt.zero_grad()
        a, b = module(torch.from_numpy(image), torch.from_numpy(text))
        (-(a * b).sum(dim=1).mean()).backward()
        opt.step()
    assert module.lam.item() > 0.2
    np.testing.assert_array_equal(module.gap.numpy(), shift.gap_)  # the gap is not trained


def test_gap_stats_on_constructed_data():
    image, _ = cones(100)
    same = gap_stats(image, 3 * image, lambda_=1.0)
    assert same["gap_norm"] == pytest.approx(0.0, abs=1e-6)
    assert same["centroid_distance"] == pytest.approx(0.0, abs=1e-6)
    assert same["mean_pair_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["mean_within_image_cosine"] == pytest.approx(same["mean_within_text_cosine"], abs=1e-6)
    assert same["after_mean_pair_cosine"] == pytest.approx(1.0, abs=1e-6)

    # Hand example: pair cosines 0.6 and -1; the one image pair 0.8; the one text pair 0;
    # mean directions (1, 3)/sqrt(10) and (1, -1)/sqrt(2), cosine -1/sqrt(5).
    hand = gap_stats(IMAGE, TEXT)
    assert hand == pytest.approx(
        {
            "n_rows": 2,
            "gap_norm": np.sqrt(2.0),
            "mean_pair_cosine": -0.2,
            "mean_within_image_cosine": 0.8,
            "mean_within_text_cosine": 0.0,
            "centroid_distance": np.sqrt(2 + 2 / np.sqrt(5)),
        },
        abs=1e-6,
    )

    # The O(rows) within-modality cosine equals the brute-force off-diagonal mean.
    image_n = l2_normalize(image).astype(np.float64)
    sims = image_n @ image_n.T
    brute = (sims.sum() - np.trace(sims)) / (100 * 99)
    assert gap_stats(image, image)["mean_within_image_cosine"] == pytest.approx(brute, abs=1e-9)

    # A given (train-fitted) gap is used instead of the gap of the rows passed.
    zero = gap_stats(*cones(100), lambda_=1.0, gap=np.zeros(32))
    assert zero["after_gap_norm"] == pytest.approx(zero["gap_norm"], abs=1e-6)


# ---------------------------------------------------------------------------------------- CLI


def _write_modality(out, modality, ids, x, splits):
    """One modality of an extract-shaped folder, written through the real store."""
    prov = {"name": "clipish", "source": "org/clipish", "family": "clip", "revision": "r1", "pooling": "projected",
            "dim": x.shape[1], "preprocess": None, "max_length": 77, "normalize": False, "dtype": "float32",
            "label_columns": []}
    writer = PartWriter(out / f"{modality}__clipish", build_schema(x.shape[1], {}, prov), rows_per_part=50)
    writer.write({"id": list(ids), "path": [f"{i}.x" for i in ids], "sha256": ["0" * 64] * len(ids),
                  "split": list(splits)}, x.astype(np.float32))
    writer.close()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def test_gap_command_writes_the_report_fitted_on_a_split(tmp_path):
    image, text = cones(120, d=16)
    ids = [f"p{i:03d}" for i in range(120)]
    splits = ["train"] * 80 + ["test"] * 40
    emb = tmp_path / "emb"
    _write_modality(emb, "image", ids, image, splits)
    _write_modality(emb, "text", ids, text, splits)

    r = _cli("gap", emb, "--split", "train", "--out", tmp_path / "gap")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "gap" / "gap.json").read_text())
    assert (tmp_path / "gap" / "gap_pca.png").read_bytes()[:4] == b"\x89PNG"
    assert list(report["methods"]) == list(ALIGN_METHODS)
    assert "80 of 120 rows" in report["fitted_on"] and "train" in report["fitted_on"]
    reference = gap_report(image, text, fit_rows=np.arange(120) < 80)  # the rows are stored in id order
    for method, row in reference["methods"].items():
        got = dict(report["methods"][method])
        assert got.pop("params") == row.pop("params")
        assert got == pytest.approx(row, abs=1e-6)
    for shown in ("gap norm", "probe acc", "MMD", "center", "standardize", "gap.json", "80 of 120", "narrow cone"):
        assert shown in r.stderr
    assert r.stdout == ""  # messages on stderr, data in files

    # Bad input: exit 2 with a one-line `error:`; widths that differ, a split that is not there, a method.
    _write_modality(tmp_path / "wide", "image", ids, image, splits)
    _write_modality(tmp_path / "wide", "text", ids, np.hstack([text, text]), splits)
    (tmp_path / "solo").mkdir()
    _write_modality(tmp_path / "solo", "image", ids, image, splits)
    for args, says in (((tmp_path / "wide",), "shared"), ((emb, "--split", "val"), "val"),
                       ((emb, "--align", "center,magic"), "--align"), ((tmp_path / "solo",), "text"),
                       ((emb, "--align", "center", "--lambda", "0.5"), "--lambda")):
        r = _cli("gap", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error:") and says in r.stderr and r.stderr.count("\n") <= 3
