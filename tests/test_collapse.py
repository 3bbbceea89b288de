"""The collapse check after pretrain: a warning for a space that learned nothing, none for one that learned.

Both models are real: trained by pretrain() on the synthetic coloured shapes (8 distinct images and
texts). The collapsed one trains one step at a learning rate too small to move it away from its
initialisation, where images bunch together and retrieval is at chance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedkit.shared_encoder import pretrain
from embedkit.shared_encoder.collapse import collapse_check, mean_pairwise_cosine, warning_line
from test_shared_encoder import make_pairs, one_thread, recipe  # noqa: F401 - one_thread: an autouse fixture


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    items = make_pairs(folder)
    out = {}
    for name, kw in (("learned", dict(epochs=80, lr=5e-4)), ("collapsed", dict(epochs=1, lr=1e-7))):
        path = tmp_path_factory.mktemp(name)
        out[name] = path, kw
    return items, out


def run(runs, name, capsys):
    items, out = runs
    path, kw = out[name]
    metrics = pretrain(items, path, recipe(batch_size=8, weight_decay=0.0, val_fraction=0.0, save_every=100, **kw),
                       resume=False, progress=False)
    return metrics, capsys.readouterr().err, path


def test_collapsed_run_warns_once_and_records_it(runs, capsys):
    metrics, err, path = run(runs, "collapsed", capsys)
    check = metrics["collapse"]
    assert check["collapsed"] and check["on"] == "training" and check["n_images"] == 8
    assert any(r.startswith("retrieval is not clearly above chance") for r in check["reasons"])
    assert check["image_cosine"] > 0.95  # images bunched near one point at initialisation
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: the shared encoder looks collapsed")
    assert "only 8 distinct training images" in warnings[0] and "--set" in warnings[0]
    assert json.loads((path / "metrics.json").read_text())["collapse"] == check


def test_learned_run_does_not_warn(runs, capsys):
    metrics, err, _ = run(runs, "learned", capsys)
    check = metrics["collapse"]
    assert not check["collapsed"] and check["reasons"] == []
    assert check["retrieval"]["i2t_R@1"] == 1.0 and check["image_cosine"] < 0.95
    assert "warning" not in err


def test_retrieval_at_chance_alone_is_collapse():
    # Spread-out but unrelated embeddings: cosines low, retrieval at chance -> collapsed by retrieval.
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(40, 16)), rng.normal(size=(40, 16))
    check = collapse_check(img, txt, np.arange(40))
    assert check["image_cosine"] < 0.2 and check["collapsed"]
    assert check["reasons"] == [r for r in check["reasons"] if r.startswith("retrieval is not clearly above chance")]
    # The same texts as the images (perfect pairs) learned; duplicates of an image count once.
    ok = collapse_check(np.repeat(img, 3, axis=0), np.repeat(img, 3, axis=0), np.repeat(np.arange(40), 3))
    assert not ok["collapsed"] and ok["n_images"] == 40 and ok["retrieval"]["t2i_R@1"] == 1.0


def test_mean_pairwise_cosine_matches_the_full_matrix():
    x = np.random.default_rng(1).normal(size=(7, 5))
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = u @ u.T
    assert mean_pairwise_cosine(x) == pytest.approx(sim[~np.eye(7, dtype=bool)].mean())


def test_warning_names_a_collapse_only_when_the_space_collapsed():
    rng = np.random.default_rng(2)
    point = rng.normal(size=(1, 16))
    img, txt = point + 0.01 * rng.normal(size=(60, 16)), point + 0.01 * rng.normal(size=(60, 16))
    check = collapse_check(img, txt, np.arange(60))
    line = warning_line(check)
    assert check["image_cosine"] > 0.95 and line.startswith("warning: the shared encoder looks collapsed")
    assert "only" not in line  # 60 images: no small-sample note
    # Spread-out embeddings that match nothing: flagged, but said as what they are
    spread = warning_line(collapse_check(rng.normal(size=(60, 16)), rng.normal(size=(60, 16)), np.arange(60)))
    assert spread.startswith("warning: the shared encoder did not learn to match images and texts (its space is "
                             "spread out, not collapsed)")
