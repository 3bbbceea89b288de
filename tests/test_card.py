"""The model card and the numbers it and the CLI show, each checked against metrics.json and against a
recomputation from the saved per-row test predictions: the CLI table's columns, the card's YAML (parsed
back by PyYAML and huggingface_hub), the operating point at the saved threshold, prevalence, net benefit,
subgroup and evaluate intervals over groups, the scaler's training rows, the chance banner, the report's
plots on test rows only, and the warnings a run must raise."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.fusion.evaluate import bootstrap_metrics
from embedkit.store import BASE_COLUMNS, PartWriter, build_schema

CARD_TOML = 'intended_use = "Triage research only"\nauthors = ["A. Clinician", "B. Engineer"]\nlicense = "apache-2.0"\n'


def clinic(root, n_groups=90, per_group=3, labels="signal", seed=0, unlabelled=6, shared_images=False, minority=None):
    """Patients of near-identical rows, a site per patient, labels per patient; a few rows without a label."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    group = np.repeat([f"pt{g:03d}" for g in range(n_groups)], per_group).astype(object)
    g_label = rng.integers(0, 2, n_groups) if labels == "random" else np.arange(n_groups) % 2
    if minority is not None:
        g_label = (np.arange(n_groups) < minority).astype(int)
    y = np.repeat(np.array(["neg", "pos"], dtype=object)[g_label], per_group)
    y[:unlabelled] = None
    site = np.repeat(np.array(["north", "south"], dtype=object)[np.arange(n_groups) % 4 // 2], per_group)
    x = np.repeat(rng.normal(size=(n_groups, 8)), per_group, 0) + rng.normal(size=(n, 8)) * 0.3
    x += (0.0 if labels == "random" else 1.2) * np.repeat(g_label, per_group)[:, None]
    ids = np.array([f"r{i:04d}" for i in range(n)], dtype=object)
    sha = [hashlib.sha256(f"img{i}".encode()).hexdigest() for i in range(n)]
    if shared_images:  # one person under two patient ids: pt(2k)'s first image is pt(2k+1)'s too
        for g in range(0, n_groups - 1, 2):
            sha[(g + 1) * per_group] = sha[g * per_group]
    cols = {"dx": y, "group": group, "site": site}
    for modality, block, hashes in (("image", x, sha), ("text", x[:, ::-1] + rng.normal(size=(n, 8)) * 0.3, None)):
        prov = {"name": "clipish", "source": "org/clipish", "family": "clip", "revision": "r1", "pooling": "projected",
                "dim": 8, "preprocess": None, "max_length": 77, "normalize": False, "dtype": "float32",
                "label_columns": ["dx"]}
        extra = {k: list(v) for k, v in cols.items() if k not in BASE_COLUMNS}
        w = PartWriter(root / f"{modality}__clipish", build_schema(8, extra, prov), rows_per_part=100)
        w.write({"id": list(ids), "path": [f"{i}.x" for i in ids], "group": list(group), "split": [None] * n,
                 "sha256": hashes or [hashlib.sha256(f"{modality}{i}".encode()).hexdigest() for i in ids],
                 **extra},
                block.astype(np.float32))
        w.close()
    return root


def close(a: dict, b: dict) -> bool:
    """Same intervals, up to the float32 the per-row predictions are saved in."""
    return all(a[k][f] == pytest.approx(b[k][f], rel=1e-5, abs=1e-6) for k in b for f in ("low", "high", "n_valid"))


def run_cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def signal(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    emb = clinic(root / "emb")
    (root / "card.toml").write_text(CARD_TOML)
    out = run_cli("train", emb, "--label", "dx", "--fusion", "early", "--epochs", "5", "--out", root / "model",
                  "--threshold", "0.4", "--subgroup-col", "site", "--bootstrap", "300", "--calibrate-on", "val",
                  "--class-names", "neg=negative,pos=positive", "--card", root / "card.toml")
    model = root / "model"
    return {"root": root, "emb": emb, "model": model, "out": out,
            "metrics": json.loads((model / "metrics.json").read_text()),
            "info": json.loads((model / "embedkit_model.json").read_text()),
            "rows": pq.read_table(model / "test_predictions.parquet").to_pydict(),
            "card": (model / "model_card.md").read_text()}


def test_cli_table_prints_test_and_validation_from_their_sources(signal):
    m, out = signal["metrics"], signal["out"]
    seen = 0
    for k in ("accuracy", "macro_f1", "weighted_f1", "auroc", "ece"):
        cells = [c.strip() for c in next(line for line in out.splitlines() if re.match(rf"\W*{k}\s", line)).split("│")]
        cells = [c for c in cells if c]
        assert cells[1] == f"{m['test'][k]:.3f}", k  # the test column: the saved model's test value
        # the interval of the bootstrap, marked when it is too wide to tell anything (issue 28)
        low, high = m['bootstrap']['metrics'][k]['low'], m['bootstrap']['metrics'][k]['high']
        assert cells[2] == f"[{low:.3f}, {high:.3f}]" + (" too wide to tell" if high - low > 0.3 else "")
        assert cells[-1] == f"{m['spread']['val'][k]['mean']:.3f}", k
        seen += cells[1] != cells[-1]
    assert seen  # test and validation differ somewhere, so a swapped column would show
    assert "note: 6 of 270 rows have no dx label and are left out" in out  # on screen, not only in metrics.json


def test_card_yaml_parses_and_matches_metrics_json(signal):
    import yaml

    from embedkit.modelcard import parse_front_matter

    m, text = signal["metrics"], signal["card"]
    fm = yaml.safe_load(text.split("---\n")[1])
    assert fm == parse_front_matter(text) and fm["license"] == "apache-2.0" and fm["library_name"] == "embedkit"
    results = fm["model-index"][0]["results"][0]["metrics"]
    by_name = {r["name"]: r for r in results}
    for k in ("accuracy", "macro_f1", "auroc", "ece"):
        r = by_name[f"test {k}"]
        b = m["bootstrap"]["metrics"][k]
        assert r["value"] == round(m["test"][k], 4)
        assert (r["args"]["ci95_low"], r["args"]["ci95_high"]) == (round(b["low"], 4), round(b["high"], 4))
    op = m["clinical"]["operating_point"]["classes"]["pos"]
    assert fm["embedkit"]["operating_point"]["pos"]["sensitivity"] == round(op["sensitivity"], 4)
    assert fm["embedkit"]["classes"] == ["neg (negative)", "pos (positive)"]
    assert "Triage research only" in text and "A. Clinician, B. Engineer" in text
    assert "| out-of-scope" not in text and "To be filled by the authors (card.toml: out_of_scope_use)" in text
    assert text.count("\n| ") >= 27 and "| 27 | Usability in context" in text
    assert f"| pos (positive) | {op['sensitivity']:.3f} [" in text
    try:
        from huggingface_hub import ModelCard
    except ImportError:
        return
    card = ModelCard(text)
    assert card.data.license == "apache-2.0"
    got = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert got["test macro_f1"] == round(m["test"]["macro_f1"], 4)


def test_operating_point_prevalence_and_net_benefit_recomputed_from_saved_predictions(signal):
    m, info, rows = signal["metrics"], signal["info"], signal["rows"]
    thr = info["calibration"]["threshold"]
    p, truth = np.array(rows["prob_pos"]), np.array(rows["true_dx"]) == "pos"
    assert thr == 0.4 and ((p >= 0.4) != (p >= 0.5)).any()  # a rule at 0.5 would give other counts here
    decided = p >= thr
    op = m["clinical"]["operating_point"]["classes"]["pos"]
    want = {"tp": decided & truth, "fp": decided & ~truth, "fn": ~decided & truth, "tn": ~decided & ~truth}
    assert {k: op[k] for k in want} == {k: int(v.sum()) for k, v in want.items()}
    assert op["sensitivity"] == pytest.approx(want["tp"].sum() / truth.sum())
    assert op["npv"] == pytest.approx(want["tn"].sum() / (~decided).sum())
    assert m["clinical"]["prevalence"]["test"]["pos"] == pytest.approx(truth.mean())
    assert m["clinical"]["prevalence"]["test"]["n"] == m["data"]["n"]["test"] == len(p)
    dc = m["clinical"]["decision_curve"]
    i = dc["thresholds"].index(0.2)
    n = len(p)
    nb = ((p >= 0.2) & truth).sum() / n - ((p >= 0.2) & ~truth).sum() / n * 0.2 / 0.8
    assert dc["classes"]["pos"]["model"][i] == pytest.approx(nb, abs=1e-6)
    cal = m["calibration"]
    assert cal["ece_interval"]["test_after"] == m["bootstrap"]["metrics"]["ece"]
    assert cal["calibrated_on"]["fitted_on"] == "validation" and cal["temperature"] != 1.0


def test_subgroup_and_evaluate_intervals_resample_patients(signal):
    from embedkit.predict import evaluate

    m, rows = signal["metrics"], signal["rows"]
    proba = np.column_stack([rows["prob_neg"], rows["prob_pos"]])
    y, groups, thr = np.array(rows["true_dx"], dtype=object), np.array(rows["group"], dtype=object), 0.4
    site = pq.read_table(signal["emb"] / "image__clipish").to_pydict()
    site = dict(zip(site["id"], site["site"]))
    sites = np.array([site[i] for i in rows["id"]], dtype=object)
    for value, entry in m["subgroups"]["site"].items():
        sel = sites == value
        ref = bootstrap_metrics(y[sel], proba[sel], ["neg", "pos"], "binary", thr, groups[sel], n_resamples=300,
                                seed=0)["metrics"]
        assert close(entry["bootstrap"], ref) and entry["n_groups"] == len(set(groups[sel]))
    r = evaluate(signal["model"], signal["emb"], exclude_fitted=True, rows_out=signal["root"] / "ev.parquet")
    ev = pq.read_table(signal["root"] / "ev.parquet").to_pydict()
    assert r["rows"] == m["data"]["n"]["test"] and r["bootstrap"]["unit"] == "group"
    assert r["rows_left_out_as_fitted"] == m["data"]["n"]["train"] + m["data"]["n"]["val"]
    ref = bootstrap_metrics(np.array(ev["true_dx"], dtype=object), np.column_stack([ev["prob_neg"], ev["prob_pos"]]),
                            ["neg", "pos"], "binary", thr, np.array(ev["group"], dtype=object))
    assert close(r["bootstrap"]["metrics"], ref["metrics"])


def test_input_scaling_is_fitted_on_training_rows_only(signal):
    from embedkit.dataset import load_dataset, row_keys
    from embedkit.predict import load_model, model_features

    est, info = load_model(signal["model"])
    ds = load_dataset(signal["emb"], ["dx"], ["image", "text"])
    keys = row_keys(ds, np.arange(len(ds.ids)), info["modalities"])
    train = np.array([k in set(info["fitted_rows"]["train"]) for k in keys])
    val = np.array([k in set(info["fitted_rows"]["val"]) for k in keys])
    x = model_features(info, ds.blocks)
    np.testing.assert_allclose(est.mean_, x[train].mean(0), rtol=1e-5, atol=1e-5)
    assert not np.allclose(est.mean_, x[train | val].mean(0), rtol=1e-5, atol=1e-5)


def test_report_shows_the_card_and_plots_test_rows_only(signal):
    from embedkit.report import build_report

    m = signal["metrics"]
    page = build_report(signal["model"], out=signal["root"] / "r.html").read_text()
    assert "Model card: model" in page and "Triage research only" in page and "pos (positive)" in page
    op = m["clinical"]["operating_point"]["classes"]["pos"]
    assert f"{op['sensitivity']:.3f} [{op['intervals']['sensitivity']['low']:.3f}" in page
    assert f"the model&#x27;s test rows (run 0), {m['data']['n']['test']} labelled" in page
    assert "Cannot tell" not in page  # a model with signal gets no chance banner
    page = build_report(signal["model"], out=signal["root"] / "r2.html", emb=signal["emb"]).read_text()
    left_out = m["data"]["n"]["train"] + m["data"]["n"]["val"]
    assert f"({left_out} fitted or tuning rows left out), {m['data']['rows'] - left_out} labelled" in page
    from embedkit.modelcard import Card, card_html

    assert "pos (sick)" in card_html(Card.from_folder(signal["model"], class_names={"pos": "sick"}))


def test_random_labels_say_cannot_tell_on_screen_in_the_card_and_in_the_report(tmp_path):
    from embedkit.report import build_report

    emb = clinic(tmp_path / "emb", labels="random", seed=3)
    out = run_cli("train", emb, "--label", "dx", "--fusion", "logistic", "--out", tmp_path / "m", "--bootstrap", "300")
    assert "Cannot tell:" in out
    card = (tmp_path / "m" / "model_card.md").read_text()
    assert "> **Cannot tell:**" in card
    limitations = card.split("## Limitations")[1].split("## TRIPOD")[0]
    assert "beats chance is unknown" in limitations
    assert 'class="banner banner-chance"' in build_report(tmp_path / "m").read_text()


def test_warnings_fire_for_shared_images_small_validation_classes_and_no_groups(tmp_path):
    from embedkit.train import TrainConfig, train

    m = train(clinic(tmp_path / "a", shared_images=True), tmp_path / "ma",
              TrainConfig(labels=["dx"], fusion="logistic", bootstrap=0))
    assert m["data"]["test_rows_sharing_inputs_with_train"].get("image", 0) > 0  # with groups on
    assert any("same image as a training row" in w for w in m["warnings"])
    m = train(clinic(tmp_path / "b", minority=8, n_groups=60), tmp_path / "mb",
              TrainConfig(labels=["dx"], fusion="logistic", bootstrap=0))
    assert any(w.startswith("warning: validation has fewer than 5 rows of pos") for w in m["warnings"])
    emb = clinic(tmp_path / "c")
    m = train(emb, tmp_path / "mc", TrainConfig(labels=["dx"], fusion="logistic", bootstrap=0, groups=False))
    rows = pq.read_table(tmp_path / "mc" / "test_predictions.parquet").to_pydict()
    cols = pq.read_table(emb / "image__clipish").to_pydict()
    others = {g for i, g, y in zip(cols["id"], cols["group"], cols["dx"]) if y is not None and i not in set(rows["id"])}
    crossing = sum(g in others for g in rows["group"])
    assert m["data"]["ungrouped"]["test_rows_in_groups_seen_in_training"] == crossing > 0
    assert any("--no-groups" in w and f"{crossing} of" in w for w in m["warnings"])


def contrast(a, b) -> float:
    def lum(rgb):
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_every_count_in_the_confusion_matrix_reads_on_its_cell():
    """WCAG contrast >= 4.5 between each count and its cell, for counts spread over the whole colour map (the
    old rule switched colour at half the largest count, leaving white on near-white cells)."""
    from matplotlib.colors import to_rgb

    from embedkit.report import confusion_figure

    cm = np.array([[100, 62, 55], [48, 41, 30], [20, 8, 0]])
    ax = confusion_figure(cm, ["a", "b", "c"]).axes[0]
    image = ax.images[0]
    for t in ax.texts:
        cell = image.cmap(image.norm(int(t.get_text())))
        assert contrast(to_rgb(t.get_color()), cell) >= 4.5, (t.get_text(), t.get_color())
