"""FusionClassifier / LogisticBaseline on small synthetic embeddings: real fits, no mocks."""

import json

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, recall_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from embedkit.errors import EmbedkitError
from embedkit.fusion import EarlyFusionHead, FusionClassifier, LateFusionHead, LogisticBaseline

DIMS = (16, 8)


def make_data(task, n=400, dims=DIMS, seed=0, signal=1.0):
    """Two embedding blocks, each a noisy linear image of the labels, so both carry signal."""
    rng = np.random.default_rng(seed)
    if task == "multilabel":
        Y = (rng.random((n, 3)) < 0.4).astype(int)
        y = Y
    else:
        k = 2 if task == "binary" else 3
        y = rng.integers(0, k, n)
        Y = np.eye(k)[y]
    blocks = [signal * Y @ rng.normal(size=(Y.shape[1], d)) + rng.normal(size=(n, d)) for d in dims]
    return np.hstack(blocks).astype(np.float32), y


def macro_f1(y, pred):
    return f1_score(y, pred, average="macro")


@pytest.mark.parametrize("fusion", ["early", "late"])
@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_learns_each_task_on_held_out_rows(task, fusion):
    X, y = make_data(task)
    est = FusionClassifier(fusion=fusion, modality_dims=DIMS).fit(X[:300], y[:300])
    proba, pred = est.predict_proba(X[300:]), est.predict(X[300:])
    assert est.task_ == task
    assert macro_f1(y[300:], pred) > 0.85  # chance is 0.5 / 0.33 / ~0.4
    n_out = {"binary": 2, "multiclass": 3, "multilabel": 3}[task]
    assert proba.shape == (100, n_out) and pred.shape == y[300:].shape
    if task != "multilabel":
        np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-12)
        np.testing.assert_array_equal(pred, est.classes_[proba.argmax(1)])  # threshold 0.5 == argmax


def test_string_labels_and_dict_blocks():
    X, y = make_data("multiclass")
    labels = np.array(["mel", "nevus", "bcc"])[y]
    blocks = {"image": X[:, :16], "text": X[:, 16:]}
    est = FusionClassifier(fusion="late").fit({k: v[:300] for k, v in blocks.items()}, labels[:300])
    assert est.modalities_ == ["image", "text"] and est.modality_dims_ == DIMS
    assert list(est.classes_) == ["bcc", "mel", "nevus"]
    pred = est.predict({k: v[300:] for k, v in blocks.items()})
    assert pred.dtype.kind == "U" and macro_f1(labels[300:], pred) > 0.85
    # a dict is matched by name, not by key order; the concatenated matrix gives the same answer
    swapped = {"text": X[300:, 16:], "image": X[300:, :16]}
    np.testing.assert_array_equal(est.predict_proba(swapped), est.predict_proba(X[300:]))


def test_sklearn_api_clone_params_fit_returns_self():
    est = FusionClassifier(fusion="late", modality_dims=DIMS, epochs=3, dropout=0.1)
    assert set(vars(est)) == set(est.get_params())  # the constructor only stores its arguments
    copy = clone(est)
    assert copy.get_params() == est.get_params() and copy is not est
    assert copy.set_params(epochs=2) is copy and copy.epochs == 2 and est.epochs == 3
    X, y = make_data("binary", n=100)
    assert est.fit(X, y) is est
    assert len(est.history_) == 3 and est.best_epoch_ == 3 and est.fit_seconds_ > 0
    assert not hasattr(clone(est), "model_")  # a clone is unfitted
    with pytest.raises(NotFittedError):
        clone(est).predict(X)


def test_same_seed_same_weights_other_seed_differs_and_global_rng_untouched():
    X, y = make_data("multiclass", n=200)
    rng_before = torch.get_rng_state()
    a = FusionClassifier(dropout=0.2, epochs=5, random_state=7).fit(X, y)
    assert torch.equal(torch.get_rng_state(), rng_before)
    b = FusionClassifier(dropout=0.2, epochs=5, random_state=7).fit(X, y)
    c = FusionClassifier(dropout=0.2, epochs=5, random_state=8).fit(X, y)
    for k, v in a.model_.state_dict().items():
        assert torch.equal(v, b.model_.state_dict()[k]), k
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert not np.allclose(a.predict_proba(X), c.predict_proba(X))


def test_eval_set_keeps_and_restores_the_best_epoch():
    # Few noisy rows and a high learning rate, so validation macro-F1 moves from epoch to epoch.
    X, y = make_data("multiclass", n=240, signal=0.25, seed=3)
    tr, va = slice(0, 120), slice(120, 240)
    est = FusionClassifier(epochs=25, lr=0.05, random_state=0).fit(X[tr], y[tr], eval_set=(X[va], y[va]))
    h = est.history_
    assert [r["epoch"] for r in h] == list(range(1, 26))
    keys = [(r["val_macro_f1"], -r["val_loss"]) for r in h]
    assert est.best_epoch_ == 1 + max(range(len(h)), key=lambda i: keys[i])
    best = h[est.best_epoch_ - 1]
    assert est.best_epoch_ < 25 and h[-1]["val_macro_f1"] < best["val_macro_f1"]  # restoring matters here
    assert macro_f1(y[va], est.predict(X[va])) == pytest.approx(best["val_macro_f1"], abs=1e-12)

    stopped = FusionClassifier(epochs=25, lr=0.05, patience=2).fit(X[tr], y[tr], eval_set=(X[va], y[va]))
    assert len(stopped.history_) == stopped.best_epoch_ + 2 < 25


def test_balanced_pos_weight_changes_binary_training():
    # 10 % positives and a weak signal: unweighted BCE leans to the majority class.
    rng = np.random.default_rng(1)
    n = 1000
    y = (rng.random(n) < 0.1).astype(int)
    X = (0.3 * y[:, None] * rng.normal(size=(1, 24)) + rng.normal(size=(n, 24))).astype(np.float32)
    kw = dict(modality_dims=DIMS, epochs=10, random_state=0)
    plain = FusionClassifier(class_weight=None, **kw).fit(X[:700], y[:700])
    weighted = FusionClassifier(class_weight="balanced", **kw).fit(X[:700], y[:700])
    n_pos = y[:700].sum()
    np.testing.assert_allclose(weighted.loss_weight_, [(700 - n_pos) / n_pos])
    assert plain.loss_weight_ is None
    assert weighted.history_[0]["train_loss"] != pytest.approx(plain.history_[0]["train_loss"], rel=0.05)
    r_plain = recall_score(y[700:], plain.predict(X[700:]))
    r_weighted = recall_score(y[700:], weighted.predict(X[700:]))
    assert r_weighted > r_plain + 0.2


def test_noise_changes_training_but_not_prediction():
    X, y = make_data("binary", n=200)
    clean = FusionClassifier(modality_dims=DIMS, epochs=5).fit(X, y)
    noisy = FusionClassifier(modality_dims=DIMS, epochs=5, noise_std=0.5).fit(X, y)
    again = FusionClassifier(modality_dims=DIMS, epochs=5, noise_std=0.5).fit(X, y)
    assert not np.allclose(clean.predict_proba(X), noisy.predict_proba(X))
    np.testing.assert_array_equal(noisy.predict_proba(X), noisy.predict_proba(X))  # no noise at predict
    np.testing.assert_array_equal(noisy.predict_proba(X), again.predict_proba(X))  # noise is seeded


@pytest.mark.parametrize(
    "task,labels,fusion",
    [
        ("binary", None, "early"),
        ("binary", np.array([False, True]), "late"),
        ("multiclass", np.array(["a", "b", "c"]), "early"),
        ("multiclass", np.array([10, 20, 30]), "late"),
        ("multilabel", None, "early"),
    ],
)
def test_save_load_round_trip_without_pickle(tmp_path, task, labels, fusion):
    X, y = make_data(task, n=200)
    if labels is not None:
        y = labels[y]
    est = FusionClassifier(fusion=fusion, modality_dims=DIMS, epochs=4, dropout=0.1)
    est.fit(X[:150], y[:150], eval_set=(X[150:], y[150:]))
    est.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["estimator.json", "model.safetensors"]
    assert json.loads((tmp_path / "m" / "estimator.json").read_text())["task"] == task
    back = FusionClassifier.load(tmp_path / "m")
    np.testing.assert_array_equal(back.predict_proba(X), est.predict_proba(X))
    assert back.predict(X).dtype == est.predict(X).dtype
    np.testing.assert_array_equal(back.predict(X), est.predict(X))
    assert back.classes_.dtype == est.classes_.dtype and list(back.classes_) == list(est.classes_)
    assert back.get_params() == est.get_params()
    assert back.history_ == est.history_ and back.best_epoch_ == est.best_epoch_
    np.testing.assert_array_equal(back.mean_, est.mean_)


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_logistic_baseline_learns_matches_sklearn_and_round_trips(tmp_path, task):
    X, y = make_data(task)
    base = LogisticBaseline().fit(X[:300], y[:300])
    proba = base.predict_proba(X[300:])
    assert macro_f1(y[300:], base.predict(X[300:])) > 0.85
    if task != "multilabel":
        ref = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000))
        np.testing.assert_allclose(proba, ref.fit(X[:300], y[:300]).predict_proba(X[300:]), atol=1e-4)
    else:
        assert proba.shape == (100, 3)
    base.save(tmp_path / "lr")
    assert not list(tmp_path.glob("lr/*.pkl")) and not list(tmp_path.glob("lr/*.pt"))
    back = LogisticBaseline.load(tmp_path / "lr")
    np.testing.assert_array_equal(back.predict_proba(X[300:]), proba)
    np.testing.assert_array_equal(back.predict(X[300:]), base.predict(X[300:]))


def test_user_errors_are_one_line_embedkit_errors():
    X, y = make_data("binary", n=100)
    est = FusionClassifier(modality_dims=DIMS, epochs=1)
    with pytest.raises(NotFittedError):
        est.predict(X)
    bad = X.copy()
    bad[3, 2], bad[7, 0] = np.nan, np.inf
    cases = [
        (lambda: est.fit(bad, y), "2 of 100 rows"),
        (lambda: est.fit(X, np.zeros(100, int)), "class"),
        (lambda: est.fit(X, np.full(100, "a")), "class"),
        (lambda: FusionClassifier(fusion="late").fit(X, y), "two modality blocks"),
        (lambda: FusionClassifier(modality_dims=(10, 10)).fit(X, y), "modality_dims"),
        (lambda: est.fit(X, y).predict(X[:, :20]), "columns"),
        (lambda: est.fit(X, y).predict(bad), "2 of 100 rows"),
        (lambda: est.fit(X, y, eval_set=(X, np.full(100, 5))), "not seen in fit"),
        (lambda: LogisticBaseline().fit(bad, y), "2 of 100 rows"),
    ]
    for call, words in cases:
        with pytest.raises(EmbedkitError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value)


def test_trailing_batch_of_one_row_is_dropped():
    X, y = make_data("binary", n=65)  # 64 + 1: BatchNorm would fail on the last batch
    est = FusionClassifier(modality_dims=DIMS, epochs=2, batch_size=64).fit(X, y)
    assert np.isfinite(est.history_[-1]["train_loss"])


def test_heads_shapes_and_sizes():
    x = torch.randn(5, 24)
    early, late = EarlyFusionHead([16, 8], 128, 0.0, 3), LateFusionHead([16, 8], 64, 0.0, 3)
    early.eval(), late.eval()
    assert early(x).shape == (5, 3) and late(x).shape == (5, 3)
    assert torch.equal(late([x[:, :16], x[:, 16:]]), late(x))  # blocks as a list or side by side
    with pytest.raises(ValueError):
        LateFusionHead([24])
    est = FusionClassifier(modality_dims=DIMS, epochs=1).fit(*make_data("multiclass", n=100))
    n_params = (24 * 128 + 128) + 2 * 128 + (128 * 3 + 3)  # linear, BatchNorm affine, linear
    assert est.n_parameters_ == n_params
    assert est.model_bytes() == 4 * (n_params + 2 * 128) + 8  # + running mean/var, int64 counter


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_balanced_weights_reach_the_loss_for_multiclass_and_multilabel(task):
    """Minority classes (labels) are recalled better with 'balanced' weights, and the weights are the
    documented n / (k * count) and n_neg / n_pos."""
    rng = np.random.default_rng(2)
    n = 1200
    if task == "multiclass":
        y = rng.choice(3, n, p=[0.85, 0.1, 0.05])
        Y = np.eye(3)[y]
    else:
        Y = (rng.random((n, 2)) < [0.5, 0.08]).astype(int)
        y = Y
    X = (0.4 * Y @ rng.normal(size=(Y.shape[1], 24)) + rng.normal(size=(n, 24))).astype(np.float32)
    kw = dict(modality_dims=DIMS, epochs=10, random_state=0)
    plain = FusionClassifier(class_weight=None, **kw).fit(X[:900], y[:900])
    weighted = FusionClassifier(class_weight="balanced", **kw).fit(X[:900], y[:900])
    if task == "multiclass":
        counts = np.bincount(y[:900], minlength=3)
        np.testing.assert_allclose(weighted.loss_weight_, 900 / (3 * counts))
        rare = lambda est: recall_score(y[900:], est.predict(X[900:]), labels=[1, 2], average="macro")  # noqa: E731
    else:
        pos = Y[:900].sum(0)
        np.testing.assert_allclose(weighted.loss_weight_, (900 - pos) / pos)
        rare = lambda est: recall_score(Y[900:, 1], est.predict(X[900:])[:, 1])  # noqa: E731
    assert rare(weighted) > rare(plain) + 0.1


@pytest.mark.parametrize("path", ["standard", "none", "learn_lambda"])
def test_noise_is_in_units_of_each_feature_training_std_on_every_path(path, monkeypatch):
    """Rows take two values only (one per class), so what the head receives in training minus the
    clean row is exactly the injected noise: its per-feature std must be noise_std times that
    feature's training std, whatever the input scaling (unit-length rows have a spread of a few
    hundredths, so absolute noise would be tens of times too strong)."""
    rng = np.random.default_rng(3)
    d, n = 8, 512
    a, b = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 2 * d)))
    y = np.arange(n) % 2
    X = np.where(y[:, None] == 1, b, a).astype(np.float32)
    seen = []
    build = FusionClassifier._build_model

    def recording_build(self, *args, **kwargs):
        model = build(self, *args, **kwargs)
        model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()) if m.training else None)
        return model

    monkeypatch.setattr(FusionClassifier, "_build_model", recording_build)
    kw = dict(modality_dims=(d, d), epochs=4, random_state=0, noise_std=0.1, batch_size=128)
    if path == "learn_lambda":
        est = FusionClassifier(learn_lambda=True, **kw).fit(X, y, gap=(a[:d] - a[d:]).astype(np.float32))
    else:
        est = FusionClassifier(scale=path, **kw).fit(X, y)
    fed = torch.cat(seen).numpy()
    clean = est._standardise(X[:2])  # the two distinct rows as the head sees them without noise
    nearest = np.argmin(((fed[:, None, :] - clean[None]) ** 2).sum(-1), axis=1)
    noise = fed - clean[nearest]
    unit = np.ones(2 * d) if path == "standard" else X.std(0)
    np.testing.assert_allclose(noise.std(0) / unit, 0.1, rtol=0.15)
    np.testing.assert_array_equal(est.predict_proba(X), est.predict_proba(X))  # none at predict


def test_scale_none_feeds_rows_unchanged():
    X, y = make_data("binary", n=200)
    est = FusionClassifier(modality_dims=DIMS, epochs=2, scale="none").fit(X, y)
    np.testing.assert_array_equal(est.mean_, 0) and np.testing.assert_array_equal(est.scale_, 1)
    std = FusionClassifier(modality_dims=DIMS, epochs=2).fit(X, y)
    np.testing.assert_allclose(std.mean_, X.mean(0), atol=1e-5)
    with pytest.raises(EmbedkitError, match="scale"):
        FusionClassifier(modality_dims=DIMS, scale="minmax").fit(X, y)
