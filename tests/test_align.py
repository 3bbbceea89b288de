"""Modality-gap alignment: the formula on hand-computed numbers, train-only fitting, refusals."""

import json

import numpy as np
import pytest
import torch

from embedkit.errors import EmbedkitError
from embedkit.fusion.align import (
    GapShift,
    LearnedGapShift,
    gap_stats,
    l2_normalize,
    plot_gap_pca,
    shift_torch,
)

# Hand example. image rows normalise to (0.6, 0.8) and (0, 1): mean (0.3, 0.9);
# text rows normalise to (1, 0) and (0, -1): mean (0.5, -0.5); gap = (-0.2, 1.4).
IMAGE = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)
TEXT = np.array([[1.0, 0.0], [0.0, -5.0]], dtype=np.float32)


def cones(n=300, d=32, seed=0, spread=0.3):
    """Paired rows in two narrow cones around different directions, like a contrastive encoder."""
    rng = np.random.default_rng(seed)
    img_dir, txt_dir = rng.normal(size=d), rng.normal(size=d)
    shared = rng.normal(size=(n, d))  # the per-sample content both modalities carry
    image = img_dir + spread * (shared + 0.5 * rng.normal(size=(n, d)))
    text = txt_dir + spread * (shared + 0.5 * rng.normal(size=(n, d)))
    return image.astype(np.float32), text.astype(np.float32)


def test_l2_normalize_rows_and_zero_rows():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0], [1e30, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], atol=1e-7)
    assert out.dtype == np.float32


def test_formula_on_hand_computed_numbers():
    shift = GapShift(lambda_=1.0).fit(IMAGE, TEXT)
    np.testing.assert_allclose(shift.image_mean_, [0.3, 0.9], atol=1e-7)
    np.testing.assert_allclose(shift.text_mean_, [0.5, -0.5], atol=1e-7)
    np.testing.assert_allclose(shift.gap_, [-0.2, 1.4], atol=1e-7)
    assert shift.gap_.dtype == np.float32 and shift.n_fit_rows_ == 2

    image_s, text_s = shift.transform(IMAGE, TEXT)
    # image - gap/2 = (0.7, 0.1), (0.1, 0.3); text + gap/2 = (0.9, 0.7), (-0.1, -0.3); then normalised.
    np.testing.assert_allclose(image_s, [[0.98994949, 0.14142136], [0.31622777, 0.94868330]], atol=1e-6)
    np.testing.assert_allclose(text_s, [[0.78935222, 0.61394061], [-0.31622777, -0.94868330]], atol=1e-6)

    # lambda = -2: image + gap = (0.4, 2.2), (-0.2, 2.4); text - gap = (1.2, -1.4), (0.2, -2.4).
    image_w, text_w = shift.with_lambda(-2.0).transform(IMAGE, TEXT)
    np.testing.assert_allclose(image_w, [[0.17888544, 0.98386991], [-0.08304548, 0.99654576]], atol=1e-6)
    np.testing.assert_allclose(text_w, [[0.65079137, -0.75925660], [0.08304548, -0.99654576]], atol=1e-6)


def test_lambda_zero_only_normalises_and_one_modality_alone():
    image, text = cones(50)
    shift = GapShift(0.0).fit(image, text)
    image_s, text_s = shift.transform(5 * image, text)
    np.testing.assert_allclose(image_s, l2_normalize(image), atol=1e-6)
    np.testing.assert_allclose(text_s, l2_normalize(text), atol=1e-6)

    both = shift.with_lambda(0.7).transform(image, text)
    assert shift.with_lambda(0.7).transform(image, None)[1] is None
    np.testing.assert_array_equal(shift.with_lambda(0.7).transform(image, None)[0], both[0])
    np.testing.assert_array_equal(shift.with_lambda(0.7).transform(None, text)[1], both[1])


def test_lambda_one_equalises_means_and_closes_the_gap():
    image, text = cones()
    shift = GapShift(1.0).fit(image, text)
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
    image_s, text_s = shift.transform(image, text)
    assert closed["after_gap_norm"] == pytest.approx(np.linalg.norm(image_s.mean(0) - text_s.mean(0)), abs=1e-6)


def test_gap_is_fitted_on_train_rows_only():
    image, text = cones(400)
    train, test = slice(0, 300), slice(300, 400)
    shift = GapShift(1.0).fit(image[train], text[train])
    gap = shift.gap_.copy()
    train_out = shift.transform(image[train], text[train])

    # Replace the held-out rows by huge values and refit from the training split: same gap.
    image[test], text[test] = 1e6, -1e6
    refit = GapShift(1.0).fit(image[train], text[train])
    np.testing.assert_array_equal(refit.gap_, gap)
    # Pooling would have moved it: the check above can tell the difference.
    assert np.abs(GapShift(1.0).fit(image, text).gap_ - gap).max() > 0.1

    # transform is row-wise: shifting train rows alongside (huge) test rows changes nothing for them.
    image_all, text_all = shift.transform(image, text)
    np.testing.assert_array_equal(image_all[train], train_out[0])
    np.testing.assert_array_equal(text_all[train], train_out[1])
    np.testing.assert_array_equal(shift.gap_, gap)

    # The fitted state is a copy: editing the caller's training arrays afterwards leaves it alone.
    train_image = image[train].copy()
    shift2 = GapShift(1.0).fit(train_image, text[train])
    train_image[:] = 7.0
    np.testing.assert_array_equal(shift2.gap_, gap)


def test_different_widths_are_refused_not_interpolated():
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(10, 768)), rng.normal(size=(10, 4096))
    for call in (
        lambda: GapShift(1.0).fit(image, text),
        lambda: gap_stats(image, text, lambda_=1.0),
        lambda: plot_gap_pca(image, text, "unused.png"),
    ):
        with pytest.raises(EmbedkitError) as err:
            call()
        msg = str(err.value)
        assert "shared" in msg and "project" in msg and "768" in msg and "4096" in msg
        assert "\n" not in msg

    shift = GapShift(1.0).fit(image, image)
    with pytest.raises(EmbedkitError, match="768"):
        shift.transform(None, text)
    with pytest.raises(EmbedkitError):
        shift_torch(torch.zeros(2, 4096), None, torch.as_tensor(shift.gap_), torch.tensor(1.0))


def test_user_errors_are_one_line_embedkit_errors():
    image, text = cones(20)
    for call in (
        lambda: GapShift(1.0).transform(image, text),  # not fitted
        lambda: GapShift(1.0).fit(image, text[:10]),  # unpaired rows
        lambda: GapShift(float("nan")).fit(image, text),
        lambda: GapShift(1.0).fit(image[0], text[0]),  # 1-D
        lambda: GapShift(1.0).fit(np.full_like(image, np.nan), text),
        lambda: GapShift.from_dict({"kind": "gap_shift", "lambda": 1.0}),
    ):
        with pytest.raises(EmbedkitError) as err:
            call()
        assert "\n" not in str(err.value)


def test_to_dict_round_trip_is_exact_and_with_lambda_copies():
    image, text = cones(80)
    shift = GapShift(0.3).fit(image, text)
    loaded = GapShift.from_dict(json.loads(json.dumps(shift.to_dict())))
    for name in ("gap_", "image_mean_", "text_mean_"):
        assert getattr(loaded, name).dtype == np.float32
        np.testing.assert_array_equal(getattr(loaded, name), getattr(shift, name))
    assert loaded.lambda_ == 0.3 and loaded.n_fit_rows_ == 80
    for a, b in zip(loaded.transform(image, text), shift.transform(image, text)):
        np.testing.assert_array_equal(a, b)

    other = shift.with_lambda(-0.5)
    assert other.lambda_ == -0.5 and shift.lambda_ == 0.3
    np.testing.assert_array_equal(other.gap_, shift.gap_)
    other.gap_[:] = 0  # a copy, not a view of the original's state
    assert np.abs(shift.gap_).max() > 0


def test_shift_torch_matches_numpy_and_trains_lambda():
    image, text = cones(64)
    shift = GapShift(0.7).fit(image, text)
    image_s, text_s = shift.transform(image, text)
    gap = torch.from_numpy(shift.gap_)
    ti, tt = shift_torch(torch.from_numpy(image), torch.from_numpy(text), gap, torch.tensor(0.7))
    np.testing.assert_allclose(ti.numpy(), image_s, atol=1e-6)
    np.testing.assert_allclose(tt.numpy(), text_s, atol=1e-6)

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
