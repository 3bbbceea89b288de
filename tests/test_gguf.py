"""GGUF models through llama.cpp: the vectors equal a transformers forward of the same weights.

A tiny Llama with a byte-level BPE tokenizer is built with transformers, written as GGUF here
(f32, and q8_0 by two quantisers: gguf's numpy one and llama.cpp's own), and embedded by
llama.cpp. References: the transformers forward of the original folder, and of the GGUF file
read back by transformers (`gguf_file=`, its own dequantiser), on the token ids of the original
tokenizer, pooled the same way. Only the llama.cpp tests skip, and only without llama-cpp-python.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from embedkit.encoders import create_encoder, resolve_spec
from embedkit.errors import EmbedkitError
from embedkit.extract import ExtractConfig, extract
from embedkit.items import SourceOptions
from embedkit.store import read_embedding_table

from conftest import REPO, REPORT_WORDS, make_image, make_report

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (pip install 'embedkit[gguf]')")

# clinical-style text with punctuation, digits, an accent and a long run, so the BPE merges, the
# GPT-2 split and truncation all get exercised; lengths differ so a llama.cpp batch packs several
TEXTS = ["Findings: mild opacity in the left lower lobe.",
         "No effusion.",
         "Impression: 12 mm nodule, right upper lobe; follow-up CT in 3 months (Fleischner).",
         "Pleural thickening, état post-op, unchanged since 2019-04-01.",
         " ".join(["consolidation"] * 30) + " with air bronchograms."]


def _corpus() -> list[str]:
    return [make_report(i) for i in range(300)] + TEXTS


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> dict:
    """A tiny random Llama folder and its GGUF files."""
    pytest.importorskip("gguf")
    from embedkit.encoders.gguf_convert import convert_llama_to_gguf, random_llama_folder

    root = tmp_path_factory.mktemp("gguf")
    # vocab_size above the BPE's 300 tokens: the converter pads the file's vocabulary to the embedding's rows
    folder = random_llama_folder(root / "tiny-llama", _corpus(), tokenizer_vocab=300, vocab_size=384, hidden_size=64,
                                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=512)
    files = {t: convert_llama_to_gguf(folder, root / f"tiny-{t}.gguf", t) for t in ("f32", "q8_0")}
    return {"folder": folder, "root": root, **files}


def _reference(folder, texts: list[str], pooling: str, max_length: int | None = None, gguf_file: str | None = None):
    """transformers: tokenizer of the folder, forward of the folder (or of a GGUF file read back), pooled."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(folder)
    model = (AutoModel.from_pretrained(folder, gguf_file=gguf_file) if gguf_file else AutoModel.from_pretrained(folder))
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"][:, :max_length]
            hidden = model.eval()(input_ids=ids).last_hidden_state[0]
            out.append(hidden[-1] if pooling == "last" else hidden.mean(0))
    return torch.stack(out).numpy()


def _encoder(path, pooling="mean", **kw):
    return create_encoder(resolve_spec(f"gguf:{path}", "text", pooling=pooling, **kw), "text", threads=2)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@needs_llama_cpp
def test_llama_cpp_tokenises_as_the_original_tokenizer(tiny_gguf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gguf["folder"])
    enc = _encoder(tiny_gguf["f32"])
    for text in TEXTS:
        assert enc.llm.tokenize(text.encode()) == tok(text)["input_ids"], text
    assert tok(TEXTS[0])["input_ids"][0] == tok.bos_token_id  # BOS added on both sides, as the file says


@needs_llama_cpp
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_f32_file_equals_the_transformers_forward(tiny_gguf, pooling):
    enc = _encoder(tiny_gguf["f32"], pooling)
    vectors, n_truncated = enc.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), 64) and vectors.dtype == np.float32 and n_truncated == 0
    expected = _reference(tiny_gguf["folder"], TEXTS, pooling)
    np.testing.assert_allclose(vectors, expected, atol=1e-4, rtol=0)
    # the same file read back by transformers' own GGUF loader (Q/K rows permuted back) agrees too
    read_back = _reference(tiny_gguf["folder"], TEXTS, pooling, gguf_file=str(tiny_gguf["f32"]))
    np.testing.assert_allclose(vectors, read_back, atol=1e-4, rtol=0)


@needs_llama_cpp
def test_q8_0_files_stay_close_to_the_float32_forward(tiny_gguf):
    from embedkit.encoders.gguf_convert import quantize_gguf
    from embedkit.encoders.gguf_files import read_header

    expected = _reference(tiny_gguf["folder"], TEXTS, "mean")
    by_llama_cpp = quantize_gguf(tiny_gguf["f32"], tiny_gguf["root"] / "tiny-q8-llamacpp.gguf", "q8_0")
    for path in (tiny_gguf["q8_0"], by_llama_cpp):
        header = read_header(path)
        # every matrix (14 in the blocks, the embeddings, the head) in Q8_0; the 5 norms stay F32
        assert header.file_type == "Q8_0" and header.tensor_types == {"Q8_0": 16, "F32": 5}, header.tensor_types
        vectors, _ = _encoder(path).embed(TEXTS)
        assert _cos(vectors, expected).min() >= 0.99
        assert np.abs(vectors - expected).max() > 1e-5  # quantised: close, yet not the f32 numbers
        # against transformers running the dequantised q8_0 weights, only llama.cpp's 8-bit activations differ
        dequantised = _reference(tiny_gguf["folder"], TEXTS, "mean", gguf_file=str(path))
        assert _cos(vectors, dequantised).min() >= 0.999
    assert read_header(tiny_gguf["q8_0"]).tensor_bytes < read_header(tiny_gguf["f32"]).tensor_bytes / 3


@needs_llama_cpp
def test_packed_batches_equal_one_text_at_a_time(tiny_gguf):
    enc = _encoder(tiny_gguf["f32"])
    batched, _ = enc.embed(TEXTS)
    singles = np.concatenate([enc.embed([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batched, singles, atol=1e-5, rtol=0)


@needs_llama_cpp
def test_truncation_is_counted_and_cuts_where_transformers_would(tiny_gguf):
    enc = _encoder(tiny_gguf["f32"], max_length=12)
    lengths = enc.count_tokens(TEXTS)
    vectors, n_truncated = enc.embed(TEXTS)
    assert n_truncated == sum(n > 12 for n in lengths) and 0 < n_truncated < len(TEXTS)
    np.testing.assert_allclose(vectors, _reference(tiny_gguf["folder"], TEXTS, "mean", max_length=12),
                               atol=1e-4, rtol=0)


@needs_llama_cpp
def test_normalize_gives_unit_vectors_in_the_same_direction(tiny_gguf):
    raw, _ = _encoder(tiny_gguf["f32"]).embed(TEXTS)
    unit, _ = _encoder(tiny_gguf["f32"], normalize=True).embed(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


@needs_llama_cpp
def test_provenance_names_the_file_its_quantisation_and_llama_cpp(tiny_gguf):
    import llama_cpp
    from safetensors.numpy import load_file

    enc = _encoder(tiny_gguf["q8_0"], pooling="last")
    p = enc.provenance()
    sha = hashlib.sha256(tiny_gguf["q8_0"].read_bytes()).hexdigest()
    assert p["revision"] == f"sha256:{sha}" and p["gguf"]["sha256"] == sha
    assert p["family"] == "gguf" and p["quantize"] == "Q8_0" and p["pooling"] == "last" and p["dim"] == 64
    assert p["gguf"]["context_length"] == 512 and p["gguf"]["context_length_used"] == 512 == p["max_length"]
    assert p["gguf"]["llama_cpp_python"] == llama_cpp.__version__ and p["gguf"]["system_info"]
    n_params = sum(v.size for v in load_file(tiny_gguf["folder"] / "model.safetensors").values())
    assert p["n_parameters"] == n_params  # embeddings, blocks, norms and the untied head
    assert 0 < p["model_bytes"] <= tiny_gguf["q8_0"].stat().st_size
    json.dumps(p)  # goes into Parquet metadata as JSON


@needs_llama_cpp
def test_options_a_gguf_file_fixes_are_refused(tiny_gguf):
    spec = resolve_spec(f"gguf:{tiny_gguf['q8_0']}", "text")
    for kw, says in ((dict(dtype="bfloat16"), "--dtype"), (dict(quantize="int8"), "--quantize"),
                     (dict(device="tpu"), "unknown device")):
        with pytest.raises(EmbedkitError, match=says):
            create_encoder(spec, "text", **kw)
    with pytest.raises(EmbedkitError, match="not image"):
        resolve_spec(f"gguf:{tiny_gguf['q8_0']}", "image")
    with pytest.raises(EmbedkitError, match="pooling 'cls'"):
        resolve_spec(f"gguf:{tiny_gguf['q8_0']}", "text", pooling="cls")
    with pytest.raises(EmbedkitError, match="does not exist"):
        resolve_spec(f"gguf:{tiny_gguf['root']}/nothing.gguf", "text")
    with pytest.raises(EmbedkitError, match="trained on"):
        create_encoder(resolve_spec(f"gguf:{tiny_gguf['q8_0']}", "text", max_length=1024), "text")


@needs_llama_cpp
def test_a_file_llama_cpp_cannot_load_is_one_line_and_loading_is_quiet(tiny_gguf, tmp_path, capfd):
    _encoder(tiny_gguf["q8_0"]).embed(TEXTS[:1])
    assert capfd.readouterr().err == ""  # llama.cpp's note that an LLM's default pooling is not ours stays out
    broken = tmp_path / "broken.gguf"  # a readable header naming a tensor llama.cpp will not find
    broken.write_bytes(tiny_gguf["f32"].read_bytes().replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_uq.weight", 1))
    with pytest.raises(EmbedkitError, match=r"llama.cpp could not load .*broken.gguf' \(llama, F32\)"):
        _encoder(broken)


# ---------------------------------------------------------------- named specs


def test_named_gguf_spec_missing_is_one_line_with_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDKIT_GGUF_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(EmbedkitError) as e:
        resolve_spec("llama2-7b-q8", "text")
    msg = str(e.value)
    assert "\n" not in msg and "not on this machine" in msg
    assert "hf download TheBloke/Llama-2-7B-GGUF llama-2-7b.Q8_0.gguf" in msg and "gguf:PATH" in msg
    data, _ = _clinic(tmp_path / "clinic", n=2)
    r = _cli("extract", data, "--out", tmp_path / "out", "--metadata", data / "meta.csv", "--text-col", "report",
             "--image-model", "none", "--text-model", "qwen2.5-0.5b-q8",
             env={"EMBEDKIT_GGUF_DIR": str(tmp_path / "empty"), "HF_HUB_CACHE": str(tmp_path / "hub"),
                  "HOME": str(tmp_path / "home")})
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(error) == 1 and "Traceback" not in r.stderr, r.stderr
    assert error[0].startswith("error: model 'qwen2.5-0.5b-q8' (Qwen2.5-0.5B.Q8_0.gguf) is not on this machine")
    assert "hf download mradermacher/Qwen2.5-0.5B-GGUF Qwen2.5-0.5B.Q8_0.gguf" in error[0]


@needs_llama_cpp
def test_named_gguf_spec_found_in_the_gguf_dir_and_checked(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDKIT_GGUF_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    shutil.copy(tiny_gguf["q8_0"], tmp_path / "Qwen2.5-0.5B.Q8_0.gguf")
    spec = resolve_spec("qwen2.5-0.5b-q8", "text")
    enc = create_encoder(spec, "text")
    assert enc.provenance()["source"] == "mradermacher/Qwen2.5-0.5B-GGUF/Qwen2.5-0.5B.Q8_0.gguf"  # stable name
    assert enc.provenance()["gguf"]["path"] == str((tmp_path / "Qwen2.5-0.5B.Q8_0.gguf").resolve())
    # the LLaMA-2 file's published sha256 is pinned: a file of that name but other bytes is refused
    shutil.copy(tiny_gguf["q8_0"], tmp_path / "llama-2-7b.Q8_0.gguf")
    with pytest.raises(EmbedkitError, match="not the published file"):
        create_encoder(resolve_spec("llama2-7b-q8", "text"), "text")
    r = _cli("models", env={"EMBEDKIT_GGUF_DIR": str(tmp_path), "HOME": str(tmp_path / "home")}, columns=400)
    assert r.returncode == 0, r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") > 3}
    assert "yes" in rows["qwen2.5-0.5b-q8"] and "no" in rows["llama3.2-1b-q8"]
    where = {line.split()[0]: line for line in r.stdout.splitlines() if line.startswith("  ")}  # below the table
    assert "Qwen2.5-0.5B.Q8_0.gguf" in where["qwen2.5-0.5b-q8"]
    assert "hf download mradermacher/Llama-3.2-1B-GGUF" in where["llama3.2-1b-q8"]


# ---------------------------------------------------------------- end to end


def _cli(*args, env=None, columns=None):
    extra = {"COLUMNS": str(columns)} if columns else {}
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **extra, **(env or {})}, timeout=300)


def _clinic(root, n=48) -> tuple:
    """n image + report rows, two classes, the class named by a word in the report; a metadata CSV."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        dx = "effusion" if i % 2 else "normal"
        make_image(root / f"c{i:03d}.png", i)
        words = np.random.default_rng(i).choice(REPORT_WORDS, 6)
        rows.append({"id": f"c{i:03d}", "image": f"c{i:03d}.png", "report": f"{dx}: " + " ".join(words), "dx": dx})
    with open(root / "meta.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root, rows


@needs_llama_cpp
def test_extract_train_predict_and_gap_refusal_end_to_end(tiny_gguf, tiny_models, tmp_path):
    data, rows = _clinic(tmp_path / "clinic")
    emb = tmp_path / "emb"
    r = _cli("extract", data, "--out", emb, "--metadata", data / "meta.csv", "--id-col", "id", "--image-col", "image",
             "--text-col", "report", "--label-col", "dx", "--image-model", tiny_models["dinov2"],
             "--text-model", f"gguf:{tiny_gguf['q8_0']}", "--text-pooling", "last", "--threads", "2",
             "--batch-size", "8", "--no-progress", columns=250)
    assert r.returncode == 0, r.stderr
    assert "text · gguf:" in r.stderr and "model MB" in r.stderr and "peak MB" in r.stderr
    text_dir = emb / "text__tiny-q8_0.gguf"
    table = read_embedding_table(text_dir)
    p = table.provenance
    assert p["family"] == "gguf" and p["quantize"] == "Q8_0" and p["pooling"] == "last" and p["dim"] == 64
    summary_row = next(line for line in r.stderr.splitlines() if "text · gguf:" in line)
    assert f"{p['model_bytes'] / 2**20:.2f}" in summary_row  # the weights' size, beside peak memory
    assert p["gguf"]["sha256"] == hashlib.sha256(tiny_gguf["q8_0"].read_bytes()).hexdigest()
    assert table.embeddings.shape == (48, 64) and pq.read_metadata(next(text_dir.glob("*.parquet"))).num_rows
    # the stored vectors are the encoder's, row for row (extract sorts by length and batches by 8)
    by_id = {row["id"]: row["report"] for row in rows}
    direct, _ = _encoder(tiny_gguf["q8_0"], "last").embed([by_id[i] for i in table.ids])
    np.testing.assert_allclose(table.embeddings, direct, atol=1e-5, rtol=0)
    assert table.columns["text"] == [by_id[i] for i in table.ids]

    r = _cli("train", emb, "--label", "dx", "--fusion", "early", "--out", tmp_path / "model", "--epochs", "3",
             "--bootstrap", "0", "--no-calibrate")
    assert r.returncode == 0, r.stderr
    r = _cli("predict", tmp_path / "model", emb, "--out", tmp_path / "p.parquet")
    assert r.returncode == 0 and pq.read_table(tmp_path / "p.parquet").num_rows == 48, r.stderr
    r = _cli("gap", emb, "--out", tmp_path / "gap")  # 32-d images, 64-d texts: no shared space to measure
    assert r.returncode == 2 and r.stderr.startswith("error:") and "shared" in r.stderr, r.stderr


@needs_llama_cpp
def test_resume_and_another_file_never_joins_an_existing_table(tiny_gguf, tmp_path):
    data, _ = _clinic(tmp_path / "clinic", n=6)
    model = tmp_path / "model.gguf"
    shutil.copy(tiny_gguf["q8_0"], model)
    cfg = dict(image_model=None, text_model=f"gguf:{model}", progress=False, threads=2)
    opts = SourceOptions(metadata=data / "meta.csv", id_col="id", text_col="report", label_cols=["dx"])
    extract(data, tmp_path / "emb", ExtractConfig(**cfg), source=opts)
    again = extract(data, tmp_path / "emb", ExtractConfig(**cfg), source=opts).modalities["text"]
    assert (again.rows_reused, again.rows_embedded) == (6, 0)  # resumed: same file, same texts, nothing to do
    (data / "meta.csv").write_text((data / "meta.csv").read_text() + "c999,c000.png,normal: new report,normal\n")
    shutil.copy(tiny_gguf["f32"], model)  # same path, other weights
    with pytest.raises(EmbedkitError, match="revision"):
        extract(data, tmp_path / "emb", ExtractConfig(**cfg), source=opts)
