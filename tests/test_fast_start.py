"""Fast start: `embedkit predict` and `evaluate` import what they need and nothing of training
(benchmarks/fast_start.py measures the wall time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from embedkit.train import TrainConfig, train

from conftest import REPO
from test_train import clinic

# Modules only fitting needs: scikit-learn's estimators, metrics and splitters, scipy's optimiser.
TRAINING_ONLY = ("embedkit.train", "embedkit.costs", "embedkit.leakage", "sklearn.linear_model", "sklearn.metrics",
                 "sklearn.model_selection", "sklearn.multiclass", "sklearn.preprocessing", "matplotlib")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast")
    emb = clinic(tmp, n=120, split=True)
    train(emb, tmp / "model", TrainConfig(labels=["dx"], fusion="late", epochs=2, bootstrap=0, align="center"))
    return emb, tmp / "model"


def _imported(args: list[str]) -> set[str]:
    """Every module loaded by one `embedkit ...` run, as the process saw them at exit."""
    code = ("import atexit, json, sys\n"
            "atexit.register(lambda: print('MODULES ' + json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
            f"sys.argv = ['embedkit', *{args!r}]\n"
            "from embedkit.cli import main\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    return set(json.loads(r.stderr.rsplit("MODULES ", 1)[1]))


def test_predict_imports_nothing_of_training(model, tmp_path):
    emb, folder = model
    imported = _imported(["predict", str(folder), str(emb), "--out", str(tmp_path / "p.parquet")])
    assert {"embedkit.predict", "embedkit.fusion.estimator"} <= imported
    assert not [m for m in imported if m.startswith(TRAINING_ONLY)], sorted(m for m in imported
                                                                             if m.startswith(TRAINING_ONLY))


def test_evaluate_imports_the_metrics_but_not_the_training_code(model):
    emb, folder = model
    imported = _imported(["evaluate", str(folder), str(emb), "--split", "test"])
    assert "sklearn.metrics" in imported  # it computes them
    assert not [m for m in imported if m.startswith(("embedkit.train", "embedkit.leakage", "sklearn.linear_model",
                                                     "matplotlib"))]
