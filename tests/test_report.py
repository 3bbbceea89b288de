"""embedkit report: one self-contained HTML page for a model folder or a bench folder."""

from __future__ import annotations

import base64
import json
import re
import shutil

import pytest

from embedkit.errors import EmbedkitError
from embedkit.report import build_report, fmt



@pytest.fixture(scope="module")
def model_run(tiny_models, tmp_path_factory):
    """A real extract (tiny CLIP: image and text in one 24-d space) + train with a lambda sweep."""
    from embedkit.bench import quiet as _quiet
    from embedkit.demo import make_synthetic_clinic
    from embedkit.extract import ExtractConfig, extract
    from embedkit.items import SourceOptions
    from embedkit.train import TrainConfig, train

    root = tmp_path_factory.mktemp("report")
    data = make_synthetic_clinic(root / "data", n=36)
    src = SourceOptions(metadata=data / "labels.csv", id_col="id", image_col="image", text_file_col="report",
                        label_cols=["label"])
    clip = str(tiny_models["clip"])
    with _quiet():
        extract(data, root / "emb", ExtractConfig(image_model=clip, text_model=clip, device="cpu", progress=False),
                source=src)
        train(root / "emb", root / "model", TrainConfig(labels=["label"], fusion="early", epochs=4, seeds=2,
                                                        align_sweep="0:1:0.5"))
    return root


def self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)  # no external assets
    assert "url(" not in page  # nor any in the CSS


def test_model_report_is_self_contained_with_metrics_and_plots(model_run):
    model = model_run / "model"
    path = build_report(model, emb=model_run / "emb")
    assert path == model / "report.html"
    page = path.read_text()
    self_contained(page)
    metrics = json.loads((model / "metrics.json").read_text())
    spread = metrics["spread"]["test"]
    for k in ("macro_f1", "accuracy", "ece"):
        assert f"{fmt(spread[k]['mean'])} ± {fmt(spread[k]['std'])}" in page or fmt(spread[k]["mean"]) in page
    assert fmt(metrics["alignment"]["lambda"]) in page
    for name in ("lambda_curve.png", "gap_pca.png"):
        assert base64.b64encode((model / name).read_bytes()).decode() in page  # the file itself, inline
    # confusion matrix heatmap, reliability diagram and learning curve are drawn into the page too
    assert page.count("data:image/png;base64,") >= 5
    assert "Reliability" not in page or "test rows" in page
    cm = metrics["test"]["confusion_matrix"]
    assert all(f"<td>{v}</td>" in page for row in cm for v in row)
    assert fmt(metrics["costs"]["peak_rss_mb"]) in page


def test_model_report_draws_reliability_from_the_saved_test_rows(model_run, tmp_path):
    page = build_report(model_run / "model", out=tmp_path / "r.html").read_text()
    self_contained(page)
    assert 'alt="reliability diagram"' in page and page.count("data:image/png;base64,") >= 4
    assert "bootstrap interval" in page and "temperature" in page
    old = tmp_path / "old_model"  # an older model folder without per-row test predictions: ask for --emb
    shutil.copytree(model_run / "model", old)
    (old / "test_predictions.parquet").unlink()
    page = build_report(old, out=tmp_path / "r2.html").read_text()
    assert "--emb" in page and 'alt="reliability diagram"' not in page


def test_bench_report_embeds_tables_and_plots(tmp_path):
    from embedkit.bench import BenchConfig, run_bench

    r = run_bench(tmp_path / "b", BenchConfig(preset="tiny", sections=("text",)))
    page = build_report(tmp_path / "b").read_text()
    self_contained(page)
    assert base64.b64encode((tmp_path / "b" / "text_batching.png").read_bytes()).decode() in page
    assert fmt(r["sections"]["text"]["sorted"]["padding_fraction"]) in page
    assert "Targets" in page and "length-sorted" in page


def test_report_cli_and_refusal(model_run, tmp_path):
    from typer.testing import CliRunner

    from embedkit.cli import app

    out = tmp_path / "x.html"
    r = CliRunner().invoke(app, ["report", str(model_run / "model"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file()
    with pytest.raises(EmbedkitError, match="neither a model folder"):
        build_report(tmp_path)
