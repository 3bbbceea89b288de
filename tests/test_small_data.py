"""Too little data, said out loud (issue 28): a 10-row run warns about each split, shows no `nan`, calls its
degenerate intervals what they are, and says when the model has more parameters than training rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from embedkit.fusion.adequacy import MIN_TEST_ROWS, TOO_WIDE, findings, interval, number, parameters_finding
from test_train import write_embeddings


@pytest.fixture(scope="module")
def ten_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("ten")
    rng = np.random.default_rng(0)
    y = np.array(["a", "b"] * 5, dtype=object)
    x = rng.normal(size=(10, 8)).astype(np.float32)
    x[:, 0] += 3 * (y == "b")
    write_embeddings(root / "emb", "image", "img", np.array([f"r{i}" for i in range(10)], dtype=object), x, {"dx": y})
    r = subprocess.run([sys.executable, "-m", "embedkit.cli", "train", str(root / "emb"), "--label", "dx", "--fusion",
                        "image", "--out", str(root / "model")], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "120"})
    return root, r


def test_a_ten_row_run_says_how_little_it_can_tell(ten_rows):
    root, r = ten_rows
    assert r.returncode == 0, r.stderr  # it ran; it must not look confident
    err = " ".join(r.stderr.split())  # the table wraps its cells at the terminal's width
    assert "warning: only 2 test rows (fewer than 30)" in err
    for split in ("training", "validation", "test"):
        assert f"warning: {split} has fewer than 5 rows of" in err, split
    assert "parameters and was trained on 7 rows" in err
    assert "nan" not in err.lower().replace("nan)", "")  # never a bare nan
    assert "test set (2 rows: too few to tell anything, under 30;" in err and "n/a (" in err
    flat = " ".join(err.split())  # beside each interval, not only in the title: the table may wrap or go vertical
    assert flat.count("too few rows to tell (2)") >= 3, flat
    m = json.loads((root / "model" / "metrics.json").read_text())
    kinds = [f["kind"] for f in m["small_data"]]
    assert kinds.count("small_class") == 3 and "small_test" in kinds and "more_parameters_than_rows" in kinds
    card = (root / "model" / "model_card.md").read_text()
    assert "too few rows to tell" in card and " nan" not in card
    assert "cannot tell" not in card.split("## Evaluation")[1].split("##")[0] or "too few rows to tell" in card


def test_interval_and_number_words():
    assert interval(0.2, 0.6) == f"[0.200, 0.600] too wide to tell" and 0.6 - 0.2 > TOO_WIDE
    assert interval(0.5, 0.7) == "[0.500, 0.700]"
    assert interval(0.5, 0.7, n_rows=MIN_TEST_ROWS - 1).endswith(f"too few rows to tell ({MIN_TEST_ROWS - 1})")
    assert interval(float("nan"), float("nan")).startswith("n/a (")
    assert number(float("nan"), "one class") == "n/a (one class)" and number(0.25) == "0.250"


def test_findings_count_every_split_and_class():
    y = np.array(["a"] * 40 + ["b"] * 4, dtype=object)
    idx = {"train": np.arange(0, 30), "val": np.arange(30, 36), "test": np.r_[36:40, 40:44]}
    found = findings(y, idx)
    small = {f["split"]: f["classes"] for f in found if f["kind"] == "small_class"}
    assert small == {"train": {"b": 0}, "val": {"b": 0}, "test": {"a": 4, "b": 4}}  # an absent class counts 0
    assert any(f["kind"] == "small_test" for f in found)
    assert parameters_finding(100, 200) is None and parameters_finding(300, 200)["kind"] == "more_parameters_than_rows"
