"""extract: layouts, bad inputs, resume after kill -9, Parquet contract, CLI exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedkit.errors import EmbedkitError
from embedkit.extract import ExtractConfig, extract
from embedkit.items import SourceOptions
from embedkit.sources import scan_source
from embedkit.store import load_embeddings, part_files, read_embedding_table

from conftest import REPO, make_image, make_report


def _cfg(tiny_models, **kw) -> ExtractConfig:
    kw.setdefault("image_model", str(tiny_models["dinov2"]))
    kw.setdefault("text_model", str(tiny_models["bert"]))
    return ExtractConfig(progress=False, **kw)


def _errors(out) -> list[dict]:
    return pq.read_table(out / "errors.parquet").to_pylist()


# ---------------------------------------------------------------- layouts


def test_paired_folder_any_depth(tiny_models, paired_folder, tmp_path):
    out = tmp_path / "emb"
    res = extract(paired_folder, out, _cfg(tiny_models))
    assert res.layout.startswith("folder: images + same-stem reports")
    s = load_embeddings(out)
    assert len(s.ids) == 8 and set(s.embeddings) == {"image", "text"}
    assert "ward_a/cases/case01" in set(s.ids)  # id = relative path without extension
    assert s.embeddings["image"].shape == (8, 32) and s.embeddings["text"].shape == (8, 32)
    schema = pq.read_schema(part_files(out / "image__tiny-dinov2")[0])
    assert pa.types.is_fixed_size_list(schema.field("embedding").type)
    assert schema.field("embedding").type.value_type == pa.float32()
    prov = json.loads(schema.metadata[b"embedkit"])
    for key in ("family", "pooling", "preprocess", "dtype", "device", "dim", "versions", "revision"):
        assert key in prov
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modalities"]["image"]["provenance"]["dim"] == 32
    assert manifest["counts"]["pairs"] == 8
    assert "stage_seconds" in manifest["modalities"]["image"]["costs"]


def test_class_subfolders_become_labels(tiny_models, tmp_path):
    root = tmp_path / "derm"
    for cls in ("benign", "malignant"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            make_image(root / cls / f"{cls}{i}.jpg", i + (10 if cls == "benign" else 0))
    out = tmp_path / "emb"
    res = extract(root, out, _cfg(tiny_models))
    assert res.layout.startswith("class sub-folders")
    s = load_embeddings(out)
    assert sorted(set(s.columns["label"])) == ["benign", "malignant"]
    assert list(s.embeddings) == ["image"]  # images only is a valid one-modality run


def test_csv_manifest_with_template_labels_split(tiny_models, tmp_path):
    root = tmp_path / "ham"
    (root / "imgs").mkdir(parents=True)
    rows = ["image_id,path,age,sex,localization,dx,split"]
    for i in range(6):
        make_image(root / "imgs" / f"ISIC_{i}.jpg", i)
        age = "" if i == 2 else str(30 + i)
        rows.append(f"ISIC_{i},imgs/ISIC_{i}.jpg,{age},{'male' if i % 2 else 'female'},back,{'nv' if i % 2 else 'mel'},"
                    f"{'test' if i == 5 else 'train'}")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "emb"
    src = SourceOptions(metadata=root / "meta.csv", id_col="image_id", image_col="path",
                        text_template="Patient[ aged {age}], {sex}, lesion on {localization}.",
                        label_cols=["dx"], split_col="split")
    res = extract(root, out, _cfg(tiny_models), source=src)
    assert res.layout == "table meta.csv"
    s = load_embeddings(out)
    assert list(s.ids) == [f"ISIC_{i}" for i in range(6)]
    assert list(s.columns["dx"]) == ["mel", "nv", "mel", "nv", "mel", "nv"]
    assert list(s.columns["split"]).count("test") == 1
    scan = scan_source(root, src)
    texts = {it.id: it.text for it in scan.items}
    assert texts["ISIC_0"] == "Patient aged 30, female, lesion on back."
    assert texts["ISIC_2"] == "Patient, female, lesion on back."  # no "nan years"


def test_template_naming_the_label_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("id,dx,txt\n1,mel,a\n")
    src = SourceOptions(metadata=tmp_path / "m.csv", id_col="id", text_template="Diagnosis {dx}.", label_cols=["dx"])
    with pytest.raises(EmbedkitError, match="names the label column"):
        scan_source(tmp_path, src)


def test_jsonl_manifest_missing_column_is_a_clear_error(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": 1, "report": "x"}\n')
    with pytest.raises(EmbedkitError, match="column 'text' .*--text-col.* columns are: id, report"):
        scan_source(tmp_path, SourceOptions(metadata=tmp_path / "m.jsonl", text_col="text"))


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_are_recorded_and_the_run_continues(tiny_models, paired_folder, tmp_path):
    d = paired_folder / "ward_a" / "cases"
    (d / "empty.jpg").write_bytes(b"")
    (d / "notimage.png").write_text("hello")
    good = (d / "case01.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (d / "truncated.txt").write_text("report for a truncated image")
    (d / "blank.txt").write_text("   \n")
    (d / "latin1.txt").write_bytes("Jane Roe fi\xe8vre".encode("latin-1"))
    (d / "case01.png").write_bytes((d / "case05.jpg").read_bytes())  # same stem as case01.jpg
    (d / "scan.pdf").write_bytes(b"%PDF-1.4")
    make_image(d / "lonely.jpg", 99)
    out = tmp_path / "emb"
    extract(paired_folder, out, _cfg(tiny_models))
    errs = {(e["path"].split("/")[-1], e["stage"]) for e in _errors(out)}
    assert ("empty.jpg", "decode") in errs and ("notimage.png", "decode") in errs
    assert ("truncated.jpg", "decode") in errs
    assert ("blank.txt", "read") in errs and ("latin1.txt", "read") in errs
    assert ("case01.png", "scan") in errs and ("scan.pdf", "read") in errs  # a report now, unreadable
    assert ("lonely.jpg", "pair") in errs
    s = load_embeddings(out, modalities=["image"])
    assert "ward_a/cases/lonely" in set(s.ids)  # unpaired still embedded for its modality
    assert "ward_a/cases/truncated" not in set(s.ids)
    t = load_embeddings(out, modalities=["text"])
    assert "ward_a/cases/truncated" in set(t.ids)  # its report is fine
    reasons = " ".join(e["reason"] for e in _errors(out))
    assert "Jane" not in reasons  # never echo report text


def test_strict_fails_on_first_bad_input(tiny_models, paired_folder, tmp_path):
    (paired_folder / "ward_a" / "cases" / "bad.jpg").write_text("nope")
    with pytest.raises(EmbedkitError, match="--strict"):
        extract(paired_folder, tmp_path / "emb", _cfg(tiny_models, strict=True))


def test_duplicate_ids_in_a_table_are_recorded(tiny_models, tmp_path):
    (tmp_path / "m.csv").write_text("id,text\na,first\nb,second\na,third\n")
    out = tmp_path / "emb"
    extract(tmp_path, out, _cfg(tiny_models), source=SourceOptions(metadata=tmp_path / "m.csv", id_col="id",
                                                                   text_col="text"))
    assert sorted(load_embeddings(out).ids) == ["a", "b"]
    assert [e["reason"] for e in _errors(out)] == ["duplicate id (first seen in row 1)"]


def test_nothing_usable_is_an_error(tiny_models, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jpg").write_text("not an image")
    with pytest.raises(EmbedkitError, match="nothing could be embedded"):
        extract(tmp_path / "data", tmp_path / "emb", _cfg(tiny_models))
    assert (tmp_path / "emb" / "errors.parquet").exists()  # the reason is still on disk
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbedkitError, match="nothing to embed"):
        extract(tmp_path / "empty", tmp_path / "emb2", _cfg(tiny_models))


# ---------------------------------------------------------------- resume


def test_resume_embeds_only_missing_or_changed(tiny_models, paired_folder, tmp_path):
    out = tmp_path / "emb"
    cfg = _cfg(tiny_models)
    first = extract(paired_folder, out, cfg)
    assert first.modalities["image"].rows_embedded == 8
    again = extract(paired_folder, out, cfg)
    assert again.modalities["image"].rows_embedded == 0 and again.modalities["image"].rows_reused == 8
    d = paired_folder / "ward_a" / "cases"
    (d / "case01.txt").write_text("an edited report")
    make_image(d / "case09.jpg", 42)
    (d / "case09.txt").write_text(make_report(42))
    (paired_folder / "ward_b" / "cases" / "case00.txt").unlink()
    third = extract(paired_folder, out, cfg)
    assert third.modalities["text"].rows_embedded == 2  # case01 changed, case09 new
    assert third.modalities["text"].rows_dropped == 2  # old case01 row, vanished case00
    assert third.modalities["image"].rows_embedded == 1
    t = read_embedding_table(out / "text__tiny-bert")
    assert len(t.ids) == len(set(t.ids)) == 8
    fresh = tmp_path / "fresh"
    extract(paired_folder, fresh, cfg)
    a, b = load_embeddings(out), load_embeddings(fresh)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.embeddings["text"], b.embeddings["text"], atol=1e-6)


def test_overwrite_and_config_mismatch(tiny_models, paired_folder, tmp_path):
    out = tmp_path / "emb"
    extract(paired_folder, out, _cfg(tiny_models, text_model=None))
    (paired_folder / "ward_a" / "cases" / "case01.jpg").unlink()
    (paired_folder / "ward_a" / "cases" / "case01.txt").unlink()
    make_image(paired_folder / "new.jpg", 5)
    with pytest.raises(EmbedkitError, match="another configuration .*pooling"):
        extract(paired_folder, out, _cfg(tiny_models, text_model=None, image_pooling="mean"))
    res = extract(paired_folder, out, _cfg(tiny_models, text_model=None, image_pooling="mean", overwrite=True))
    assert res.modalities["image"].rows_embedded == 8


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from embedkit import store
    from embedkit.extract import ExtractConfig, extract
    calls = {"n": 0}
    kill_at, where = int(sys.argv[3]), sys.argv[4]
    original = getattr(store.PartWriter, where)
    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9, at a chosen moment
        return original(self, *a, **k)
    setattr(store.PartWriter, where, dying)
    extract(sys.argv[1], sys.argv[2], ExtractConfig(image_model=sys.argv[5], text_model=None, batch_size=2,
            rows_per_part=4, progress=False))
""")


@pytest.mark.parametrize("kill_at,where", [(1, "write"), (3, "write"), (2, "_close_part"), (3, "_flush")])
def test_kill_9_then_resume_leaves_complete_files_without_duplicates(tiny_models, paired_folder, tmp_path,
                                                                    kill_at, where):
    for i in range(10, 20):
        make_image(paired_folder / f"extra{i}.png", i)
    out = tmp_path / "emb"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(paired_folder), str(out), str(kill_at), where,
                           str(tiny_models["dinov2"])], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    directory = out / "image__tiny-dinov2"
    for p in part_files(directory):  # whatever survived is complete and readable
        pq.read_table(p)
    survived = sum(pq.read_metadata(p).num_rows for p in part_files(directory)) if directory.exists() else 0
    res = extract(paired_folder, out, ExtractConfig(image_model=str(tiny_models["dinov2"]), text_model=None,
                                                    batch_size=2, rows_per_part=4, progress=False))
    assert res.modalities["image"].rows_reused == survived
    t = read_embedding_table(directory)
    assert len(t.ids) == len(set(t.ids)) == 18
    assert not list(directory.glob("*.tmp"))


# ---------------------------------------------------------------- CLI


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300)


def test_cli_extract_exit_codes_and_streams(tiny_models, paired_folder, tmp_path):
    out = tmp_path / "emb"
    ok = _cli("extract", paired_folder, "--out", out, "--image-model", tiny_models["clip"], "--text-model",
              tiny_models["clip"], "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == ""  # data goes to files, messages to stderr
    assert "layout" in ok.stderr and "rows" in ok.stderr
    s = load_embeddings(out)
    assert s.embeddings["image"].shape[1] == s.embeddings["text"].shape[1] == 24  # CLIP: one space
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = _cli("extract", empty, "--out", tmp_path / "e2", "--no-progress")
    assert bad.returncode == 2 and "error: nothing to embed" in bad.stderr and "Traceback" not in bad.stderr
    missing = _cli("extract", paired_folder, "--out", tmp_path / "e3", "--image-model", "facebook/dinov2-small",
                   "--text-model", "none", env={"HF_HUB_OFFLINE": "1"})
    assert missing.returncode == 2
    assert "facebook/dinov2-small" in missing.stderr and "save_pretrained" in missing.stderr
    assert len([line for line in missing.stderr.splitlines() if line.startswith("error")]) == 1


def test_cli_models_lists_offline_availability():
    r = _cli("models")
    assert r.returncode == 0
    assert "efficientnet-lite0" in r.stdout and "minilm" in r.stdout and "dinov2-base" in r.stdout  # a listing
