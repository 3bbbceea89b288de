"""embedkit zeroshot on embeddings of the tiny CLIP: prompts through the same text tower, gap correction
fitted on training rows, numbers against a computation done here by hand, refusals, the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedkit.errors import EmbedkitError
from embedkit.extract import ExtractConfig, extract
from embedkit.fusion.evaluate import compute_metrics
from embedkit.items import SourceOptions
from embedkit.store import load_embeddings
from embedkit.zeroshot import ZeroShotConfig, parse_prompts, zeroshot

from conftest import REPO, make_image, make_report

PROMPTS = {"effusion": ["a chest x-ray with a pleural effusion", "fluid in the pleural space"],
           "normal": ["a normal chest x-ray"], "nodule": ["a lung nodule"]}


def _table(root, n=36):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        make_image(root / f"c{i}.png", i, size=(36, 36))
        rows.append({"id": f"c{i:03d}", "image": f"c{i}.png", "report": make_report(i, 6),
                     "dx": list(PROMPTS)[i % 3], "split": "train" if i < 24 else "test", "patient": f"P{i // 2}"})
    with open(root / "meta.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "meta.csv"


def _extract(tiny_models, tmp_path, image_model="clip", text_model="clip", name="emb"):
    table = _table(tmp_path / "data")
    src = SourceOptions(metadata=table, id_col="id", image_col="image", text_col="report", label_cols=["dx"],
                        split_col="split", group_col="patient")
    cfg = ExtractConfig(image_model=str(tiny_models[image_model]), text_model=str(tiny_models[text_model]),
                        progress=False)
    extract(tmp_path / "data", tmp_path / name, cfg, source=src)
    return tmp_path / name


@pytest.fixture
def clip_emb(tiny_models, tmp_path):
    return _extract(tiny_models, tmp_path)


def _prompt_vectors_by_hand(model_dir, prompts):
    """The tiny CLIP's text tower called directly through transformers, not through embedkit."""
    import torch
    from transformers import AutoTokenizer, CLIPModel

    model, tok = CLIPModel.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    out = []
    for texts in prompts.values():
        enc = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():
            f = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        f = (f if isinstance(f, torch.Tensor) else f.pooler_output).numpy().astype(np.float64)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        m = f.mean(0)
        out.append(m / np.linalg.norm(m))
    return np.stack(out)


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_zero_shot_matches_a_computation_by_hand(clip_emb, tiny_models):
    r = zeroshot(clip_emb, ZeroShotConfig(prompts=PROMPTS, bootstrap=200))
    report, pred = r["report"], r["predictions"]
    assert report["text_model"] == str(tiny_models["clip"]) and report["label_column"] == "dx"
    assert report["encoder_check"]["rows"] == 8 and report["encoder_check"]["min_cosine"] >= 0.999

    es = load_embeddings(clip_emb, modalities=["image", "text"])
    train = np.array([s == "train" for s in es.columns["split"]])
    test = ~train
    # ModalityCenter by hand: each modality's mean of unit training rows removed, then renormalised
    img_mean, txt_mean = _unit(es.embeddings["image"][train]).mean(0), _unit(es.embeddings["text"][train]).mean(0)
    labels = _prompt_vectors_by_hand(tiny_models["clip"], PROMPTS)
    cos = _unit(_unit(es.embeddings["image"]) - img_mean) @ _unit(_unit(labels) - txt_mean).T
    proba = np.exp((cos - cos.max(1, keepdims=True)) / 0.01)
    proba /= proba.sum(1, keepdims=True)
    np.testing.assert_allclose(pred["proba"], proba, atol=1e-4)
    assert report["predicted_with"] == "zero-shot + center"

    ev = report["evaluation"]
    assert ev["rows"] == 12 and ev["evaluated_on"] == "split 'test'"
    y = es.columns["dx"][test]
    ref = compute_metrics(y, proba[test], list(PROMPTS), "multiclass")
    got = ev["methods"]["zero-shot + center"]
    assert got["accuracy"] == pytest.approx(ref["accuracy"]) and got["macro_f1"] == pytest.approx(ref["macro_f1"])
    assert got["bootstrap"]["unit"] == "group"  # patients resampled, not rows
    # uncorrected zero-shot: plain cosine of unit vectors
    raw = _unit(es.embeddings["image"]) @ labels.T
    acc = np.mean(np.array(list(PROMPTS))[raw[test].argmax(1)] == y)
    assert ev["methods"]["zero-shot"]["accuracy"] == pytest.approx(acc)
    probe = ev["methods"]["linear probe (all training rows)"]
    assert probe["train_rows"] == 24 and 0 <= probe["accuracy"] <= 1


def test_the_gap_correction_sees_training_rows_only(clip_emb):
    """Moving the test rows' text embeddings must not change a single prediction."""
    cfg = ZeroShotConfig(prompts=PROMPTS, bootstrap=0)
    before = zeroshot(clip_emb, cfg)["predictions"]["proba"]
    import pyarrow as pa

    for part in clip_emb.glob("text__*/part-*.parquet"):
        t = pq.read_table(part)
        test = np.array([s == "test" for s in t.column("split").to_pylist()])
        emb = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        emb[test] = emb[test] * 3 + 5  # far away; a transductive fit would move its means
        flat = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
        pq.write_table(t.set_column(t.column_names.index("embedding"), t.schema.field("embedding"), flat), part)
    cfg_unchecked = ZeroShotConfig(prompts=PROMPTS, bootstrap=0)
    import embedkit.zeroshot as z

    check, z.VERIFY_ROWS = z.VERIFY_ROWS, 0  # the stored test texts no longer match their vectors
    try:
        after = zeroshot(clip_emb, cfg_unchecked)["predictions"]["proba"]
    finally:
        z.VERIFY_ROWS = check
    np.testing.assert_allclose(after, before, atol=1e-9)


def test_few_shot_probe_and_labels_without_prompts(clip_emb):
    r = zeroshot(clip_emb, ZeroShotConfig(prompts=PROMPTS, shots=2, bootstrap=0))
    assert r["report"]["evaluation"]["methods"]["linear probe (2 per class training rows)"]["train_rows"] == 6
    two = {k: PROMPTS[k] for k in ("effusion", "normal")}
    with pytest.raises(EmbedkitError, match="labels without a prompt: nodule"):
        zeroshot(clip_emb, ZeroShotConfig(prompts=two, bootstrap=0))


def test_another_text_encoder_is_refused(clip_emb, tiny_models, tmp_path):
    """A CLIP of the same shape but other weights would put the prompts in another space."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(7)
    other = CLIPModel(CLIPModel.from_pretrained(tiny_models["clip"]).config)
    other.save_pretrained(tmp_path / "other-clip")
    for f in tiny_models["clip"].iterdir():
        if "token" in f.name or f.name in ("vocab.txt", "preprocessor_config.json"):
            (tmp_path / "other-clip" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(EmbedkitError, match="does not reproduce the stored text embeddings"):
        zeroshot(clip_emb, ZeroShotConfig(prompts=PROMPTS, text_model=str(tmp_path / "other-clip"), bootstrap=0))


def test_two_unrelated_encoders_are_not_one_space(tiny_models, tmp_path):
    emb = _extract(tiny_models, tmp_path, image_model="dinov2", text_model="bert")
    with pytest.raises(EmbedkitError, match="not in one space"):
        zeroshot(emb, ZeroShotConfig(prompts=PROMPTS, bootstrap=0))


def test_prompt_parsing(tmp_path):
    (tmp_path / "p.txt").write_text("# findings\nnormal = a normal chest x-ray\neffusion=an effusion\n\n")
    (tmp_path / "p.json").write_text(json.dumps({"a": "one", "b": ["two", "three"]}))
    assert parse_prompts(["effusion=fluid"], tmp_path / "p.txt") == \
        {"effusion": ["fluid", "an effusion"], "normal": ["a normal chest x-ray"]}
    assert parse_prompts([], tmp_path / "p.json") == {"a": ["one"], "b": ["two", "three"]}
    for bad in (["no equals sign", "b=x"], ["a=x"], ["=x", "b=y"]):
        with pytest.raises(EmbedkitError):
            parse_prompts(bad)


def test_cli_prints_the_table_and_writes_predictions(clip_emb, tmp_path):
    r = subprocess.run([sys.executable, "-m", "embedkit.cli", "zeroshot", str(clip_emb), "--prompt",
                        "effusion=a chest x-ray with a pleural effusion", "--prompt", "normal=a normal chest x-ray",
                        "--prompt", "nodule=a lung nodule", "--bootstrap", "100", "--out", str(tmp_path / "zs")],
                       env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for words in ("zero-shot + center", "linear probe", "split 'test'", "reproduces the stored text embeddings"):
        assert words in r.stderr + r.stdout
    t = pq.read_table(tmp_path / "zs" / "zeroshot_predictions.parquet")
    assert t.num_rows == 36 and {"prob_effusion", "prob_normal", "prob_nodule", "true_dx"} <= set(t.column_names)
    assert json.loads((tmp_path / "zs" / "zeroshot.json").read_text())["evaluation"]["rows"] == 12
    bad = subprocess.run([sys.executable, "-m", "embedkit.cli", "zeroshot", str(clip_emb), "--prompt", "a=x"],
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert bad.returncode == 2 and "at least two labels" in bad.stderr + bad.stdout


def test_a_projected_space_embeds_prompts_through_the_encoder_and_the_heads(tiny_models, tmp_path):
    """DINOv2 + BERT never shared a space; `embedkit project` gives them one, and the prompts must pass
    through BERT and then the same text head."""
    from embedkit.shared_encoder.project import project_embeddings

    emb = _extract(tiny_models, tmp_path, image_model="dinov2", text_model="bert")
    project_embeddings(emb, tmp_path / "proj", dim=8, epochs=3)
    r = zeroshot(tmp_path / "proj", ZeroShotConfig(prompts=PROMPTS, bootstrap=0))
    assert r["report"]["encoder_check"]["min_cosine"] >= 0.999 and r["report"]["text_model"] == str(tiny_models["bert"])
    assert r["predictions"]["proba"].shape == (36, 3)
    (tmp_path / "proj" / "projection" / "projection.safetensors").write_bytes(b"changed")
    with pytest.raises(EmbedkitError, match="changed since these embeddings were made"):
        zeroshot(tmp_path / "proj", ZeroShotConfig(prompts=PROMPTS, bootstrap=0))
