"""`embedkit compare`: every configuration on the same test rows, paired intervals that mean what they say,
baselines, label efficiency, budget, resume after a kill, bad input, and the page in a real browser.

Embedding folders are written through the real store (tests/test_train.py: write_embeddings); one test runs
the whole path from a data folder with the offline EfficientNet-Lite0 and MiniLM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import f1_score

from conftest import REPO, make_image
from embedkit.comparison import CompareConfig, compare
from embedkit.comparison.curve import fit_power_law, groups_for_error, nested_subsets, summarise_curve
from embedkit.comparison.estimate import drop_to_budget
from embedkit.errors import EmbedkitError
from embedkit.fusion.paired import holm, paired_difference, paired_resamples
from test_train import write_embeddings

SCORE_COLUMNS = ["config", "status", "macro_f1", "macro_f1_low", "macro_f1_high", "delta_vs_best", "delta_low",
                 "delta_high", "verdict", "vs_chance"]


def clinic_folder(folder, n=240, seed=0):
    """Two rows per patient; one image encoder carries the label (img-good), a byte-identical copy of it
    (img-copy), one carries nothing (img-noise), and the text is noise (txt-noise)."""
    rng = np.random.default_rng(seed)
    patients = np.arange(n) // 2
    y = rng.integers(0, 2, n // 2)[patients]
    ids = np.array([f"r{i:04d}" for i in range(n)], dtype=object)
    cols = {"dx": np.array(["no", "yes"], dtype=object)[y], "group": np.array([f"p{p}" for p in patients], dtype=object)}
    good = rng.normal(size=(n, 16)).astype(np.float32)
    good[:, :4] += 1.5 * (2 * y[:, None] - 1)
    write_embeddings(folder, "image", "img-good", ids, good, cols)
    write_embeddings(folder, "image", "img-copy", ids, good.copy(), cols)
    write_embeddings(folder, "image", "img-noise", ids, rng.normal(size=(n, 16)).astype(np.float32), cols)
    write_embeddings(folder, "text", "txt-noise", ids, rng.normal(size=(n, 12)).astype(np.float32), cols)
    return folder


def quick(**kw) -> CompareConfig:
    base = dict(label="dx", fusions=["image", "text", "early", "logistic"], align=["none"], seeds=2, epochs=8,
                bootstrap=200, curve=False, progress=False)
    return CompareConfig(**(base | kw))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    emb = clinic_folder(root / "emb")
    board = compare(emb, root / "out", quick(curve=True, curve_top=1, curve_seeds=2))
    return emb, root / "out", board


def image_note_folder(data, n: int, note, size):
    """n generated images with a note each (note(i)), label dx alternating no/yes, two rows per patient: t.csv."""
    data.mkdir()
    rows = ["id,image,note,dx,patient"]
    for i in range(n):
        make_image(data / f"c{i}.png", seed=i, size=size)
        rows.append(f"c{i},c{i}.png,{note(i)},{'yes' if i % 2 else 'no'},p{i // 2}")
    (data / "t.csv").write_text("\n".join(rows) + "\n")
    return data


def _predictions(out, slug):
    return pq.read_table(out / "configs" / slug / "predictions.parquet").to_pandas()


def test_every_configuration_is_scored_on_the_same_test_rows(run):
    _, out, board = run
    splits = pq.read_table(out / "splits.parquet").to_pandas()
    ids = sorted(set(splits["id"]))
    groups = {}
    for slug in sorted(p.name for p in (out / "configs").iterdir()):
        preds = _predictions(out, slug)
        if len(preds):
            groups.setdefault("rows", []).append((slug, {k: sorted(v) for k, v in preds.groupby("run")["row"]}))
    assert len(groups["rows"]) >= 8  # baselines, 3 image, 1 text, 3 early, 3 logistic
    first = groups["rows"][0][1]
    for slug, rows in groups["rows"]:
        assert rows == first, slug
    for run_k, rows in first.items():  # and they are the test rows of the shared split file
        test_ids = sorted(splits[(splits["run"] == run_k) & (splits["split"] == "test")]["id"])
        assert [ids[i] for i in rows] == test_ids
    # grouped: no patient on both sides of any run's split
    for run_k, part in splits.groupby("run"):
        side = {}
        for i, s in zip(part["id"], part["split"]):
            p = int(i[1:]) // 2
            assert side.setdefault(p, s) == s


def test_scores_recomputed_from_the_saved_predictions(run):
    emb, out, board = run
    splits = pq.read_table(out / "splits.parquet").to_pandas()
    ids = sorted(set(splits["id"]))
    from embedkit.store import read_embedding_table

    t = read_embedding_table(emb / "image__img-good")
    truth = dict(zip(t.ids, t.columns["dx"]))
    for _, row in board[board["status"] == "ok"].iterrows():
        result = json.loads((out / "configs" / _slug(row) / "result.json").read_text())
        preds = _predictions(out, _slug(row))
        scores = []
        for k, part in preds.groupby("run"):
            r = result["runs"][k]
            p = part[[c for c in part.columns if c.startswith("p")]].to_numpy()
            classes = np.array(r["classes"], dtype=object)
            pred = classes[(p[:, 1] >= r["threshold"]).astype(int)]
            y = np.array([truth[ids[i]] for i in part["row"]], dtype=object)
            scores.append(f1_score(y, pred, average="macro", labels=sorted(set(y))))
        assert row["macro_f1"] == pytest.approx(np.mean(scores), abs=1e-9), row["config"]


def _slug(row):
    from embedkit.comparison.grid import Configuration, Encoder
    from pathlib import Path

    enc = lambda m, name: Encoder(m, name, Path("."), 0, "") if isinstance(name, str) else None  # noqa: E731
    return Configuration(row["fusion"], enc("image", row["image_model"]), enc("text", row["text_model"]),
                         row["align"]).slug


def test_image_signal_ranks_above_noise_with_a_paired_interval_excluding_zero(run):
    _, _, board = run
    ok = board.set_index("config")
    good = ok.loc["img-good · image"]
    assert good["vs_chance"] == "above chance" and good["macro_f1_low"] > 0.6
    for name in ("txt-noise · text", "img-noise · image"):
        r = ok.loc[name]
        assert r["verdict"] == "worse" and r["delta_high"] < 0, name
        assert r["vs_chance"] == "cannot tell", name  # noise is not distinguishable from a blind guess
    assert ok.loc["no input · majority"]["rank"] > ok.loc["img-good · image"]["rank"]
    best = board.iloc[0]
    assert best["verdict"] == "best" and "good" in best["config"] or "copy" in best["config"]


def test_identical_predictions_differ_by_exactly_zero_because_the_bootstrap_is_paired(run):
    _, out, board = run
    a, b = (_predictions(out, f"{m}__-__image__none") for m in ("img-good", "img-copy"))
    assert a.equals(b)  # same inputs, same seeds: the same model twice
    ok = board.set_index("config")
    good, copy = ok.loc["img-good · image"], ok.loc["img-copy · image"]
    # scored on the same resamples, two identical models get identical intervals and differences to the best to
    # the last digit; resampled separately (unpaired) they would not
    for col in ("macro_f1_low", "macro_f1_high", "delta_vs_best", "delta_low", "delta_high", "p_vs_best"):
        assert good[col] == copy[col], col
    assert good["delta_low"] < good["delta_high"]  # not trivially equal: the resamples do vary


def test_the_interval_is_the_metric_on_group_resamples(run):
    """Reference: scikit-learn's f1_score with the resample's row weights, on the saved predictions."""
    emb, out, board = run
    cfg = json.loads((out / "compare.json").read_text())["config"]
    splits = pq.read_table(out / "splits.parquet").to_pandas()
    ids = sorted(set(splits["id"]))
    from embedkit.store import read_embedding_table

    t = read_embedding_table(emb / "image__img-noise")
    truth, group = dict(zip(t.ids, t.columns["dx"])), dict(zip(t.ids, t.columns["group"]))
    result = json.loads((out / "configs" / "img-noise__-__image__none" / "result.json").read_text())
    preds = _predictions(out, "img-noise__-__image__none")
    per_run = []
    for k, part in preds.groupby("run"):
        r = result["runs"][k]
        rows = part["row"].to_numpy()
        y = np.array([truth[ids[i]] for i in rows], dtype=object)
        w = paired_resamples(y, np.array([group[ids[i]] for i in rows], dtype=object), cfg["bootstrap"],
                             cfg["seed"] + 1009 * k)
        pred = np.array(r["classes"], dtype=object)[(part["p1"].to_numpy() >= r["threshold"]).astype(int)]
        # macro-F1 over the classes of the test rows (one a resample lacks scores 0, as scikit-learn counts it)
        per_run.append([f1_score(y, pred, average="macro", sample_weight=wb, labels=sorted(set(y)), zero_division=0)
                        for wb in w])
    reps = np.mean(per_run, axis=0)
    row = board.set_index("config").loc["img-noise · image"]
    assert row["macro_f1_low"] == pytest.approx(np.quantile(reps, 0.025), abs=1e-9)
    assert row["macro_f1_high"] == pytest.approx(np.quantile(reps, 0.975), abs=1e-9)


def test_resamples_draw_whole_groups_per_class():
    y = np.array(["a", "a", "a", "b", "b", "b", "a"], dtype=object)
    groups = np.array(["g1", "g1", "g2", "g3", "g3", "g4", None], dtype=object)
    w = paired_resamples(y, groups, 500, 0)
    assert w.shape == (500, 7)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 4]).all()  # a group's rows are drawn together
    assert not (w[:, 2] == w[:, 6]).all()  # a row without a group is a group of its own
    # stratified: each class keeps its number of groups (a: g1, g2 and the lone row; b: g3, g4)
    assert (w[:, [0, 2, 6]].sum(1) == 3).all() and (w[:, [3, 5]].sum(1) == 2).all()


def test_paired_difference_verdicts_and_holm():
    rng = np.random.default_rng(0)
    base = rng.normal(0.6, 0.05, 1000)
    assert paired_difference(base + 0.1, base, 0.7, 0.6)["verdict"] == "better"
    assert paired_difference(base - 0.1, base, 0.5, 0.6)["verdict"] == "worse"
    d = paired_difference(base + rng.normal(0, 0.05, 1000), base, 0.6, 0.6)
    assert d["verdict"] == "indistinguishable" and d["low"] < 0 < d["high"]
    # Holm by hand: sorted 0.01, 0.02, 0.04 -> 3*0.01, max(.., 2*0.02), max(.., 1*0.04)
    assert holm([0.04, 0.01, 0.02, np.nan]).tolist()[:3] == pytest.approx([0.04, 0.03, 0.04])
    # step-down: an adjusted p-value never falls below a smaller raw p-value's (3*0.01 > 2*0.011 > 1*0.012)
    assert holm([0.012, 0.011, 0.01]) == pytest.approx([0.03, 0.03, 0.03])
    assert np.isnan(holm([0.04, 0.01, 0.02, np.nan])[3])


def test_baselines_and_the_answer_in_words(run):
    _, out, board = run
    names = set(board["config"])
    assert {"no input · majority", "no input · chance"} <= names
    result = json.loads((out / "compare.json").read_text())
    lines = result["lines"]
    assert any("configurations compared" in x and "optimistic" in x and "Holm" in x for x in lines)
    assert result["summary"]["comparisons_with_best"] == int(board["verdict"].isin(["worse", "indistinguishable"])
                                                              .sum() - board["fusion"].isin(["majority", "chance"])
                                                              .sum())
    from embedkit.comparison.report import rewrite_report  # `embedkit report CMP` renders it again

    again = rewrite_report(out, out / "again.html").read_text()
    assert "Leaderboard" in again and "img-good · image" in again
    for col in ("config", "image_model", "text_model", "fusion", "align", "macro_f1", "macro_f1_low", "macro_f1_high",
                "delta_vs_best", "delta_low", "delta_high", "verdict", "train_s", "extract_s_per_item",
                "peak_rss_mb"):
        assert col in pd.read_csv(out / "leaderboard.csv").columns, col


def test_noise_only_says_cannot_tell(tmp_path):
    emb = clinic_folder(tmp_path / "emb")
    board = compare(emb, tmp_path / "out", quick(image_models=["img-noise"], fusions=["image"], seeds=1))
    lines = board.attrs["lines"]
    assert board.set_index("config").loc["img-noise · image", "verdict"] == "best"
    assert any(x.startswith("CANNOT TELL") for x in lines), lines
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Cannot tell." in page


def test_label_efficiency_curve(run):
    _, out, _ = run
    curve = json.loads((out / "compare.json").read_text())["curve"]
    assert [p["fraction"] for p in curve["configs"][0]["points"]] == [0.1, 0.25, 0.5, 1.0]
    groups = [p["groups"] for p in curve["configs"][0]["points"]]
    assert groups == sorted(groups) and groups[-1] == curve["groups"][-1]
    assert curve["verdict"].startswith(("cannot tell", "about", "the fitted curve"))


def test_nested_subsets_keep_groups_whole_and_every_class():
    y = np.array(["a"] * 40 + ["b"] * 8, dtype=object)
    groups = np.array([f"g{i // 2}" for i in range(48)], dtype=object)
    rows = np.arange(48)
    subsets = nested_subsets(y, groups, rows, [0.1, 0.5, 1.0], seed=3)
    assert [set(s) <= set(t) for s, t in zip(subsets, subsets[1:])] == [True, True]
    assert len(subsets[-1]) == 48
    for s in subsets:
        assert set(y[s]) == {"a", "b"}
        kept = set(groups[s])
        assert all(set(np.flatnonzero(np.isin(groups, [g]))) <= set(s) for g in kept)


def test_power_law_fit_and_its_extrapolation():
    n = np.repeat([10, 25, 50, 100], 3).astype(float)
    err = 0.8 * n ** -0.5 + 0.1
    fit = fit_power_law(n, err)
    assert fit["a"] == pytest.approx(0.8, rel=1e-3) and fit["b"] == pytest.approx(0.5, rel=1e-3)
    assert fit["c"] == pytest.approx(0.1, abs=1e-4) and fit["r2"] > 0.999
    assert groups_for_error(fit, 0.8 * 400 ** -0.5 + 0.1) == pytest.approx(400, rel=1e-2)
    assert groups_for_error(fit, 0.05) == float("inf")  # below the plateau: not reachable


def _points(scores_by_fraction, groups, noise=0.001):
    points, reps = [], {}
    for f, g, scores in zip([0.1, 0.25, 0.5, 1.0], groups, scores_by_fraction):
        for k, s in enumerate(scores):
            points.append({"fraction": f, "seed": k, "groups": g, "score": s})
            reps[(f, k)] = np.full(200, s) + np.random.default_rng(k).normal(0, noise, 200)
    return points, reps


def test_flat_curve_is_cannot_tell_and_a_rising_one_extrapolates():
    groups = [10, 25, 50, 100]
    flat = _points([[0.6, 0.6]] * 4, groups)
    out = summarise_curve("x", *flat, [0.1, 0.25, 0.5, 1.0], groups, 2, 0.8, "macro_f1")
    assert out["verdict"].startswith("cannot tell")
    rising = _points([[1 - (0.8 * g ** -0.5 + 0.1)] * 2 for g in groups], groups)
    out = summarise_curve("x", *rising, [0.1, 0.25, 0.5, 1.0], groups, 2, 0.86, "macro_f1")
    assert out["verdict"].startswith("about") and "extrapolation" in out["verdict"]
    assert out["fit"]["n_target"] == pytest.approx(400, rel=0.15)
    assert out["fit"]["n_target_low"] < 400 < out["fit"]["n_target_high"]
    # the same curve seen through a test set too small to pin its plateau: the refits cannot bound the answer
    noisy = _points([[1 - (0.8 * g ** -0.5 + 0.1)] * 2 for g in groups], groups, noise=0.03)
    out = summarise_curve("x", *noisy, [0.1, 0.25, 0.5, 1.0], groups, 2, 0.86, "macro_f1")
    assert out["verdict"].startswith("cannot tell how many") and out["fit"]["n_target_high"] is None


def test_budget_drops_the_most_expensive_first():
    train = {"cheap": 1.0, "mid": 5.0, "big": 50.0, "base": 0.0}
    extract = {"encA": 10.0, "encB": 100.0}
    uses = {"cheap": ["encA"], "mid": ["encA"], "big": ["encB"], "base": []}
    assert drop_to_budget(train, extract, uses.get, 0.0, 30.0, keep=["base"]) == ["big"]
    assert drop_to_budget(train, extract, uses.get, 0.0, 1e9) == []
    assert drop_to_budget(train, extract, uses.get, 0.0, 0.5, keep=["base"]) == ["big", "mid", "cheap"]


def test_a_killed_compare_resumes_and_ends_with_the_same_leaderboard(run, tmp_path):
    emb, done, board = run
    out = tmp_path / "resumed"
    args = [sys.executable, "-m", "embedkit.cli", "compare", str(emb), "--label", "dx", "--out", str(out),
            "--fusion", "image,text,early,logistic", "--align", "none", "--seeds", "2", "--epochs", "8",
            "--bootstrap", "200", "--curve-top", "1", "--curve-seeds", "2", "--no-progress"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        finished = [p for p in out.glob("configs/*/result.json") if "majority" not in p.parent.name
                    and "chance" not in p.parent.name]
        if finished:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "leaderboard.csv").exists()  # killed mid-run
    before = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("configs/*/result.json")}
    assert before
    again = compare(emb, out, quick(curve=True, curve_top=1, curve_seeds=2))
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("configs/*/result.json")}
    assert all(after[k] == v for k, v in before.items())  # finished configurations were not redone
    pd.testing.assert_frame_equal(again[SCORE_COLUMNS].reset_index(drop=True),
                                  board[SCORE_COLUMNS].reset_index(drop=True))


def test_bad_input(run, tmp_path):
    emb, _, _ = run
    with pytest.raises(EmbedkitError, match="unknown image encoder 'nope'.*available: img-copy, img-good, img-noise"):
        compare(emb, tmp_path / "a", quick(image_models=["nope"]))
    with pytest.raises(EmbedkitError, match="unknown fusion 'fancy'"):
        compare(emb, tmp_path / "b", quick(fusions=["fancy"]))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(EmbedkitError, match="did not write"):
        compare(emb, mine, quick())
    # an image-only folder: text and early fusion cannot run; they are rows with their reason, the rest go on
    only = tmp_path / "only_images"
    only.mkdir()
    (only / "image__img-good").symlink_to(emb / "image__img-good", target_is_directory=True)
    board = compare(only, tmp_path / "c", quick(fusions=["image", "text", "early"]))
    reasons = board.set_index("fusion")["reason"]
    assert "no text embeddings" in reasons["text"] and "needs image and text" in reasons["early"]
    assert board.set_index("fusion").loc["image", "status"] == "ok"


def test_cli_from_a_data_folder_with_the_offline_encoders(tmp_path):
    """Extraction, the leaderboard and the files, as a user runs it; and an unknown encoder's one line."""
    # the note gives the label away on odd rows: the scan must say so before any training
    data = image_note_folder(tmp_path / "data", 24, lambda i: f"routine review {i}{' positive' if i % 2 else ''}",
                             size=(48, 48))
    base = [sys.executable, "-m", "embedkit.cli", "compare", str(data), "--metadata", str(data / "t.csv"),
            "--id-col", "id", "--image-col", "image", "--text-col", "note", "--label", "dx"]
    bad = subprocess.run(base + ["--out", str(tmp_path / "bad"), "--image-models", "dinov9-nope"], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert bad.returncode == 2 and "available here: efficientnet-lite0" in bad.stderr
    assert bad.stderr.count("\n") <= 2 and "Traceback" not in bad.stderr
    r = subprocess.run(base + ["--out", str(tmp_path / "out"), "--fusion", "image,early", "--align", "none",
                               "--seeds", "1", "--epochs", "3", "--no-curve", "--no-progress"],
                       cwd=REPO, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "estimated time" in r.stderr and "best:" in r.stderr and r.stdout == ""
    assert "leakage? token 'positive' -> class yes" in r.stderr
    board = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    ok = board[board["status"] == "ok"]
    assert set(ok["fusion"]) == {"image", "early", "majority", "chance"}
    assert (ok[ok["fusion"] != "majority"]["n_test"] == ok["n_test"].iloc[0]).all()
    assert (ok[ok["fusion"] == "image"]["extract_s_per_item"] > 0).all()
    assert (tmp_path / "out" / "report.html").is_file()


HOSTILE = "enc<img src=x onerror=alert(1)>"


def test_report_in_a_real_browser(tmp_path):
    """The page opens in headless Chromium: no console errors, every plot loads, names shown as text, and it
    reads on a 390 px phone."""
    from test_report_browser import CHROMIUM, DevTools, evaluate, open_page, problems

    if CHROMIUM is None:
        pytest.skip("no Chromium here: apt-get install chromium (.ci/run does)")
    rng = np.random.default_rng(1)
    n = 120
    y = np.arange(n) % 2
    ids = np.array([f"r{i}" for i in range(n)], dtype=object)
    cols = {"dx": np.array(["no", "yes"], dtype=object)[y]}
    x = rng.normal(size=(n, 8)).astype(np.float32)
    x[:, 0] += 2 * y
    write_embeddings(tmp_path / "emb", "image", HOSTILE, ids, x, cols, dim_name="hostile")
    compare(tmp_path / "emb", tmp_path / "out", quick(fusions=["image", "logistic"], curve=True, curve_top=1,
                                                      curve_seeds=2, seeds=1))
    page = tmp_path / "out" / "report.html"
    dt = DevTools(tmp_path / "profile")
    try:
        session, _ = open_page(dt, page.as_uri(), 1280, 900, mobile=False)
        assert problems(dt, session) == []
        images = json.loads(evaluate(dt, session, "JSON.stringify([...document.images].map(i => "
                                                  "[i.complete, i.naturalWidth, i.getAttribute('src').slice(0, 10)]))"))
        assert len(images) == 3 and all(done and w > 0 for done, w, _ in images), images  # forest, cost, curve
        assert HOSTILE + " · image" in evaluate(dt, session, "document.body.innerText")
        session, _ = open_page(dt, page.as_uri(), 390, 844, mobile=True)
        width = json.loads(evaluate(dt, session, "JSON.stringify([document.documentElement.scrollWidth, "
                                                 "window.innerWidth])"))
        assert width[0] <= width[1] == 390
    finally:
        dt.close()


def test_a_rerun_reuses_only_results_made_from_the_same_inputs(tmp_path):
    emb = clinic_folder(tmp_path / "emb", n=80)
    cfg = quick(image_models=["img-good"], fusions=["image"], seeds=1)
    out = tmp_path / "out"
    compare(emb, out, cfg)
    stamp = lambda: {p.parent.name: p.stat().st_mtime_ns for p in out.glob("configs/*/result.json")}  # noqa: E731
    first = stamp()
    compare(emb, out, cfg)
    assert stamp() == first  # nothing changed: everything reused
    compare(emb, out, quick(image_models=["img-good"], fusions=["image"], seeds=1, epochs=9))
    second = stamp()
    assert second["img-good__-__image__none"] != first["img-good__-__image__none"]  # another recipe: retrained
    # the same recipe on relabelled rows: a stored result would be stale
    from embedkit.store import read_embedding_table

    t = read_embedding_table(emb / "image__img-good")
    ids = np.array(t.ids, dtype=object)
    flipped = np.array(["yes" if v == "no" else "no" for v in t.columns["dx"]], dtype=object)
    import shutil

    shutil.rmtree(emb / "image__img-good")
    write_embeddings(emb, "image", "img-good", ids, t.embeddings, {"dx": flipped, "group": np.array(t.columns["group"],
                                                                                                  dtype=object)})
    compare(emb, out, quick(image_models=["img-good"], fusions=["image"], seeds=1, epochs=9))
    assert stamp()["img-good__-__image__none"] != second["img-good__-__image__none"]


def test_a_budget_drops_configurations_and_says_which(tmp_path, capsys):
    emb = clinic_folder(tmp_path / "emb", n=80)
    with pytest.raises(EmbedkitError, match="nothing to compare: every configuration was dropped"):
        compare(emb, tmp_path / "none", quick(curve=True, budget_minutes=1e-6))
    err = capsys.readouterr().err
    assert "budget: curve step dropped" in err and "budget: dropped img-good · image" in err


def test_cross_validation_folds_are_shared_and_cover_every_row_once(tmp_path):
    emb = clinic_folder(tmp_path / "emb", n=90)
    board = compare(emb, tmp_path / "out", quick(image_models=["img-good"], fusions=["image"], cv=3))
    splits = pq.read_table(tmp_path / "out" / "splits.parquet").to_pandas()
    test = splits[splits["split"] == "test"]
    assert sorted(test["run"].unique()) == [0, 1, 2] and test["id"].is_unique and len(test) == 90
    assert (board[board["status"] == "ok"]["n_runs"] == 3).all()


def test_robustness_of_the_top_configurations_as_a_modality_goes_missing(tmp_path):
    emb = clinic_folder(tmp_path / "emb", n=120)
    compare(emb, tmp_path / "out", quick(image_models=["img-good"], fusions=["early"], seeds=1, curve_top=1))
    compare(emb, tmp_path / "drop", quick(image_models=["img-good"], fusions=["early"], seeds=1, curve_top=1,
                                          modality_dropout=0.3))
    plain, dropped = (json.loads((tmp_path / d / "compare.json").read_text())["robustness"] for d in ("out", "drop"))
    name = "img-good + txt-noise · early"
    # trained on complete rows only, the model refuses rows that lack a modality: said, never a number
    assert all("refused" in p for p in plain[name]["image"]["points"] if p["rate"] > 0)
    points = dropped[name]["image"]["points"]
    assert [p["rate"] for p in points] == [0.0, 0.25, 0.5, 0.75, 1.0] and not any("refused" in p for p in points)
    assert points[0]["macro_f1"] > points[-1]["macro_f1"]  # the image carries the label: losing it costs
    assert "When a modality is missing" in (tmp_path / "drop" / "report.html").read_text()


def test_raw_models_frozen_and_fine_tuned_beside_the_embeddings(tiny_models, tmp_path):
    """`--raw`: the same head fed raw images and texts through the frozen backbones, then fine-tuned end to end,
    scored on run 0's test rows and paired with the embedding model; epochs chosen on validation."""
    data = image_note_folder(tmp_path / "data", 60, lambda i: f"note {i % 7} of case {i}", size=(40, 40))
    r = subprocess.run([sys.executable, "-m", "embedkit.cli", "compare", str(data), "--metadata", str(data / "t.csv"),
                        "--id-col", "id", "--image-col", "image", "--text-col", "note", "--label", "dx",
                        "--group-col", "patient", "--image-models", str(tiny_models["dinov2"]), "--text-models",
                        str(tiny_models["bert"]), "--fusion", "early", "--align", "none", "--seeds", "1", "--epochs",
                        "3", "--no-curve", "--raw", "--raw-epochs", "4", "--raw-rows", "30", "--no-progress",
                        "--out", str(tmp_path / "out")],
                       cwd=REPO, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    raw = result["raw"]
    assert raw["train_rows"] == 30 and raw["reference"].endswith("· early")
    frozen, tuned = raw["rows"]
    assert (frozen["finetuned"], tuned["finetuned"]) == (False, True)
    assert tuned["trainable_parameters"] > frozen["trainable_parameters"]  # the backbones learn too
    n_test = int(pd.read_csv(tmp_path / "out" / "leaderboard.csv").query("status == 'ok'")["n_test"].iloc[0])
    for row in (frozen, tuned):
        assert [h["epoch"] for h in row["history"]] == [1, 2, 3, 4] and row["best_epoch"] in (1, 2, 3, 4)
        # the epoch kept is the first best on validation: never chosen on test rows, nor simply the last
        val = [h["val_macro_f1"] for h in row["history"]]
        assert row["best_epoch"] == 1 + val.index(max(val)), val
        assert row["macro_f1_low"] <= row["macro_f1"] <= row["macro_f1_high"]
        assert row["low"] <= row["delta"] <= row["high"] and row["verdict"]
        assert row["epoch_s"] > 0 and row["peak_rss_mb"] > 0
        # paired with the input-blind predictors too: an embedding model at chance is a low bar to beat
        assert row["vs_chance"] in ("above chance", "below chance", "cannot tell")
        said = next(line for line in result["lines"] if line.startswith(row["name"]))
        assert f"against the embedding model {row['verdict']}" in said and said.endswith(row["vs_chance"])
        assert " ".join(said.split()) in " ".join(r.stderr.split())  # the CLI says it too
    assert n_test > 0 and "raw" in (tmp_path / "out" / "report.html").read_text()
