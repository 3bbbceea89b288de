"""CPU backends (ONNX Runtime, OpenVINO): parity with the torch path, the export cache, choice, refusal.

Parity is checked on inputs the calibration batch never saw (generated JPEG/PNG files through the
real decode path, and report sentences), against embedkit's own torch fp32 encoder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedkit.encoders import create_encoder, resolve_spec
from embedkit.encoders import backend_choice, backends
from embedkit.encoders.preprocess import preprocess_images
from embedkit.errors import EmbedkitError
from embedkit.extract import ExtractConfig, extract
from embedkit.store import part_files, read_embedding_table

from conftest import REPO, make_image, make_report

pytest.importorskip("onnxruntime", reason="pip install 'embedkit[onnx]'")
pytest.importorskip("openvino", reason="pip install 'embedkit[openvino]'")

TEXTS = [make_report(i) for i in range(6)] + ["a very long report about the left lower lobe " * 40]


@pytest.fixture(autouse=True, scope="module")
def cache(tmp_path_factory):
    """One export cache for the module: each (model, backend, precision) is exported once."""
    folder = tmp_path_factory.mktemp("export_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDKIT_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(5):
        p = folder / f"img{i}.{'jpg' if i % 2 else 'png'}"
        make_image(p, 100 + i, size=(80 + 10 * i, 60))
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def shared_model(tmp_path_factory) -> Path:
    import torch

    from embedkit.shared_encoder import SharedEncoderConfig
    from embedkit.shared_encoder.model import SharedEncoder
    from embedkit.shared_encoder.runner import load_tokenizer, save_shared_encoder

    tok = load_tokenizer("minilm")
    cfg = SharedEncoderConfig(width=64, depth=2, heads=2, image_size=32, patch_size=8, max_text_len=16, embed_dim=32,
                              modality_dim=4, vocab_size=len(tok))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("shared")
    save_shared_encoder(SharedEncoder(cfg).eval(), tok, folder)
    return folder


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def embed(encoder, modality: str, images: list[Path]):
    if modality == "image":
        return encoder.embed(preprocess_images(images, encoder.preprocess))
    return encoder.embed(TEXTS)


def _name(tiny_models, shared_model, model: str) -> str:
    return f"shared:{shared_model}" if model == "shared" else str(tiny_models[model])


# ------------------------------------------------------------------ parity, every family


@pytest.mark.parametrize("model,modality", [("dinov2", "image"), ("clip", "image"), ("clip", "text"),
                                            ("bert", "text"), ("shared", "image"), ("shared", "text")])
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fp32_backends_match_the_torch_path_on_unseen_inputs(tiny_models, shared_model, images, model, modality,
                                                            backend):
    spec = resolve_spec(_name(tiny_models, shared_model, model), modality)
    torch_enc = create_encoder(spec, modality, device="cpu")
    enc = create_encoder(spec, modality, backend=backend, precision="fp32")
    ref, out = embed(torch_enc, modality, images), embed(enc, modality, images)
    if modality == "text":  # the same texts are counted as truncated on both paths
        assert out[1] == ref[1]
        ref, out = ref[0], out[0]
    assert out.shape == ref.shape and out.dtype == np.float32
    assert cosines(ref, out).min() >= 0.9999
    np.testing.assert_allclose(out, ref, atol=2e-4)
    prov = enc.provenance()
    assert prov["backend"] == backend and prov["precision"] == "fp32" and prov["dim"] == ref.shape[1]
    assert prov["parity_min_cosine"] >= 0.9999 and prov["parity_inputs"] >= 16


def test_llms_are_not_exported_and_say_why(tiny_models):
    spec = resolve_spec(str(tiny_models["llama"]), "text")
    with pytest.raises(EmbedkitError, match="llm models are not exported to onnxruntime.*--backend torch"):
        create_encoder(spec, "text", backend="onnxruntime")
    assert ("onnxruntime", "fp32") not in backends.candidates(spec, "text")


@pytest.mark.slow
def test_real_efficientnet_on_every_backend(images):
    spec = resolve_spec("efficientnet-lite0", "image")
    ref = embed(create_encoder(spec, "image", device="cpu"), "image", images)
    for backend, precision, floor in [("onnxruntime", "fp32", 0.9999), ("openvino", "fp32", 0.9999),
                                      ("openvino", "bf16", 0.98)]:
        if precision == "bf16" and backends.backend_module(backend).precision_problem(precision):
            continue  # this CPU has no bf16 instructions
        enc = create_encoder(spec, "image", backend=backend, precision=precision, parity_floor=floor)
        assert cosines(ref, embed(enc, "image", images)).min() >= floor, (backend, precision)


@pytest.mark.slow
def test_real_minilm_fp32_and_per_channel_int8():
    spec = resolve_spec("minilm", "text")
    ref, _ = create_encoder(spec, "text", device="cpu").embed(TEXTS)
    out, _ = create_encoder(spec, "text", backend="openvino", precision="fp32").embed(TEXTS)
    assert cosines(ref, out).min() >= 0.9999
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)  # minilm's normalisation is in the graph
    int8 = create_encoder(spec, "text", backend="onnxruntime", precision="int8", parity_floor=0.9)
    measured = int8.provenance()["parity_min_cosine"]
    assert 0.9 <= measured < 0.99999  # quantised: close, not equal, and the number says so
    assert cosines(ref, int8.embed(TEXTS)[0]).min() >= 0.9
    # torch --precision int8 is per output channel too, and closer to fp32 than the per-tensor --quantize int8
    per_channel = create_encoder(spec, "text", backend="torch", precision="int8", parity_floor=-1)
    assert per_channel.provenance()["quantize"] == "int8-channel" and per_channel.provenance()["precision"] == "int8"
    per_tensor = create_encoder(spec, "text", device="cpu", quantize="int8")
    assert cosines(ref, per_channel.embed(TEXTS)[0]).min() > cosines(ref, per_tensor.embed(TEXTS)[0]).min()


# ------------------------------------------------------------------ refusal below the floor


def test_a_backend_below_the_parity_floor_is_refused_naming_the_better_choice(tiny_models):
    spec = resolve_spec(str(tiny_models["bert"]), "text")
    enc = create_encoder(spec, "text", backend="onnxruntime", precision="int8", parity_floor=-1)
    measured = enc.provenance()["parity_min_cosine"]
    assert measured < 1.0
    with pytest.raises(EmbedkitError, match=r"below the parity floor .*--precision fp32"):
        create_encoder(spec, "text", backend="onnxruntime", precision="int8", parity_floor=min(1.0, measured + 1e-4))


def test_impossible_requests_fail_before_any_model_loads(tiny_models):
    spec = resolve_spec(str(tiny_models["bert"]), "text")
    for kw, message in [(dict(backend="onnxruntime", precision="bf16"), "no bf16 kernels"),
                        (dict(backend="openvino", precision="int8"), "NNCF"),
                        (dict(backend="tensorrt"), "unknown backend"),
                        (dict(backend="openvino", precision="fp8"), "unknown precision"),
                        (dict(backend="openvino", device="cuda"), "runs on CPU")]:
        with pytest.raises(EmbedkitError, match=message):
            backends.check_request(spec, "text", kw["backend"], kw.get("precision"), kw.get("device", "auto"))
    with pytest.raises(EmbedkitError, match="replace --dtype"):
        create_encoder(spec, "text", backend="openvino", dtype="bfloat16")


# ------------------------------------------------------------------ the export cache


def test_cache_is_reused_rebuilt_when_stale_and_refused_when_corrupt(tiny_models, tmp_path, monkeypatch):
    import shutil

    import torch
    from transformers import Dinov2Model

    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["dinov2"], folder)
    spec = resolve_spec(str(folder), "image")
    entry, meta, built = backends.load_entry(spec, "image", "onnxruntime", "fp32")
    assert built and (entry / "model.onnx").is_file() and meta["export_seconds"] > 0
    stamp = (entry / "model.onnx").stat().st_mtime_ns
    _, again, built = backends.load_entry(spec, "image", "onnxruntime", "fp32")
    assert not built and again["key"] == meta["key"] and (entry / "model.onnx").stat().st_mtime_ns == stamp

    # new weights in the same folder: the entry is stale, rebuilt, and embeds with the new weights
    model = Dinov2Model.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(folder)
    _, fresh, built = backends.load_entry(spec, "image", "onnxruntime", "fp32")
    assert built and fresh["key"] != meta["key"]
    x = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
    new_torch = create_encoder(spec, "image", device="cpu").embed(x)
    assert cosines(new_torch, create_encoder(spec, "image", backend="onnxruntime").embed(x)).min() > 0.9999

    # a changed byte in the exported model: refused, never run
    with open(entry / "model.onnx", "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(EmbedkitError, match="corrupt .*changed since it was exported"):
        create_encoder(spec, "image", backend="onnxruntime")
    (entry / "entry.json").write_text("{not json")
    with pytest.raises(EmbedkitError, match="corrupt"):
        backends.load_entry(spec, "image", "onnxruntime", "fp32")


# ------------------------------------------------------------------ --backend auto


def test_auto_picks_the_fastest_candidate_that_passes_and_caches_the_measurement(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path / "cache"))
    spec = resolve_spec(str(tiny_models["bert"]), "text")
    chosen = backend_choice.choose_backend(spec, "text", threads=1)
    path = next((tmp_path / "cache").rglob("auto-text-*.json"))
    rows = json.loads(path.read_text())["candidates"]
    passing = [r for r in rows if r.get("items_per_second") and (r["parity"] is None or r["parity"]["min_cosine"]
                                                                 >= backends.DEFAULT_PARITY_FLOOR)]
    best = max(passing, key=lambda r: r["items_per_second"])
    assert chosen == (best["backend"], best["precision"])
    assert {(r["backend"], r["precision"]) for r in rows} >= {("torch", "fp32"), ("onnxruntime", "fp32"),
                                                              ("openvino", "fp32"), ("onnxruntime", "int8")}

    # the cached measurement decides next time; a rigged one shows the floor is applied to it
    for r in rows:
        r["items_per_second"] = {("onnxruntime", "int8"): 1000.0, ("openvino", "fp32"): 500.0}.get(
            (r["backend"], r["precision"]), 1.0)
        if (r["backend"], r["precision"]) == ("onnxruntime", "int8"):
            r["parity"] = {"min_cosine": 0.5, "mean_cosine": 0.7, "inputs": 24}
    path.write_text(json.dumps({"candidates": rows}))
    monkeypatch.setattr(backend_choice, "measure_candidates", lambda *a, **k: pytest.fail("measured again"))
    assert backend_choice.choose_backend(spec, "text", threads=1) == ("openvino", "fp32")
    assert backend_choice.choose_backend(spec, "text", threads=1, floor=0.4) == ("onnxruntime", "int8")


def _table(path: Path, spec, modality: str, torch_ips: float, rows: list[dict], **rates) -> Path:
    path.write_text(json.dumps({"format": 1, "families": {backend_choice.cpu_family(): {"models": {
        f"{spec.name}/{modality}": {"torch_fp32_items_per_second": torch_ips, "candidates": rows,
                                    "measured_on": {"cpu": "test"}, **rates}}}}}))
    return path


def _exports(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


def test_auto_for_a_small_run_stays_on_torch_and_measures_nothing(tiny_models, tmp_path, monkeypatch):
    """A first run pays for a sweep only where the work at hand can repay it."""
    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path / "cache"))
    spec = resolve_spec(str(tiny_models["bert"]), "text")
    said = []
    no_table = tmp_path / "absent.json"
    assert backend_choice.auto_for_run(spec, "text", 300, table=no_table, log=said.append) == [("torch", "fp32")]
    assert len(said) == 1 and said[0].startswith("auto: torch fp32 for ") and "models check" in said[0]
    assert _exports(tmp_path / "cache") == []  # nothing exported, nothing timed

    big = backend_choice.SWEEP_MIN_ITEMS
    ranked = backend_choice.auto_for_run(spec, "text", big, table=no_table, log=said.append)
    assert next((tmp_path / "cache").rglob("auto-text-*.json"))  # large enough: measured once, cached
    assert ranked == backend_choice.rank_backends(spec, "text")
    # once measured on this machine, the measurement decides whatever the size
    assert backend_choice.auto_for_run(spec, "text", 10, table=no_table) == ranked
    # `embedkit models check` (every backend) is such a measurement: the message's advice holds
    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path / "cache2"))
    backend_choice.check_backends(str(tiny_models["bert"]), "text")
    monkeypatch.setattr(backend_choice, "measure_candidates", lambda *a, **k: pytest.fail("measured again"))
    assert backend_choice.auto_for_run(spec, "text", 10, table=no_table) == backend_choice.rank_backends(spec, "text")


def test_auto_weighs_the_shipped_table_against_the_run_size(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path / "cache"))
    spec = resolve_spec(str(tiny_models["bert"]), "text")
    table = _table(tmp_path / "speeds.json", spec, "text", 100.0, [
        {"backend": "onnxruntime", "precision": "fp32", "speedup": 4.0, "min_cosine": 0.99999, "extra_seconds": 10},
        {"backend": "onnxruntime", "precision": "int8", "speedup": 8.0, "min_cosine": 0.5, "extra_seconds": 5}])
    said = []
    # 300 texts: 3 s on torch, 2.25 s to save for 10 s of export and checks
    assert backend_choice.auto_for_run(spec, "text", 300, table=table, log=said.append) == [("torch", "fp32")]
    assert "would save about 2 s for about 10 s" in said[-1]
    # 10,000 texts: 100 s on torch, 75 s to save; int8 is faster but below the parity floor
    assert backend_choice.auto_for_run(spec, "text", 10_000, table=table, log=said.append) == [
        ("onnxruntime", "fp32"), ("torch", "fp32")]
    assert said[-1].startswith("auto: onnxruntime fp32 for ") and "saves about 75 s for about 10 s" in said[-1]
    assert backend_choice.auto_for_run(spec, "text", 10_000, floor=0.4, table=table)[0] == ("onnxruntime", "int8")
    # a saving that only covers its cost once is not taken: the table was measured on another machine
    assert backend_choice.auto_for_run(spec, "text", 1_800, table=table) == [("torch", "fp32")]
    assert backend_choice.auto_for_run(spec, "text", 2_700, table=table)[0] == ("onnxruntime", "fp32")
    # texts are weighed by their characters where the table has torch's rate: 10,000 one-word notes are quick
    by_chars = _table(tmp_path / "chars.json", spec, "text", 100.0, json.loads(table.read_text())["families"][
        backend_choice.cpu_family()]["models"][f"{spec.name}/text"]["candidates"], torch_fp32_chars_per_second=1000.0)
    assert backend_choice.auto_for_run(spec, "text", 10_000, table=by_chars, text_chars=3_000) == [("torch", "fp32")]
    assert backend_choice.auto_for_run(spec, "text", 300, table=by_chars, text_chars=100_000)[0] == (
        "onnxruntime", "fp32")
    cap = backend_choice.CHARS_PER_TOKEN * (spec.max_length or 512)
    assert backend_choice.text_work(spec, [10, 10 ** 6]) == 10 + cap
    assert _exports(tmp_path / "cache") == []  # the table decided: nothing timed
    other = _table(tmp_path / "other.json", spec, "image", 100.0, [])  # another model's entry does not answer
    assert backend_choice.auto_for_run(spec, "text", 300, table=other) == [("torch", "fp32")]


def test_extract_auto_on_a_small_folder_is_torch_with_its_reason(tiny_models, paired_folder, tmp_path):
    cache = tmp_path / "cache"
    run = _cli("extract", paired_folder, "--out", tmp_path / "a", "--image-model", tiny_models["dinov2"],
               "--text-model", "none", "--backend", "auto", "--no-progress", cache=cache)
    assert run.returncode == 0, run.output
    assert "auto: torch fp32 for " in run.output and "images)" in run.output
    assert read_embedding_table(tmp_path / "a" / "image__tiny-dinov2").provenance["backend"] == "torch"
    assert _exports(cache) == []


# ------------------------------------------------------------------ extraction: provenance, no mixing


def _cfg(tiny_models, **kw) -> ExtractConfig:
    kw.setdefault("image_model", str(tiny_models["dinov2"]))
    kw.setdefault("text_model", str(tiny_models["bert"]))
    return ExtractConfig(progress=False, batch_size=3, **kw)


def test_extract_with_a_backend_records_it_and_never_mixes_backends_in_one_table(tiny_models, paired_folder,
                                                                                 tmp_path):
    out = tmp_path / "emb"
    res = extract(paired_folder, out, _cfg(tiny_models, backend="openvino", precision="fp32"))
    assert res.modalities["image"].rows_embedded == 8
    for modality in ("image", "text"):
        prov = res.modalities[modality].provenance
        assert prov["backend"] == "openvino" and prov["precision"] == "fp32"
        assert prov["parity_min_cosine"] >= 0.9999 and prov["parity_mean_cosine"] >= prov["parity_min_cosine"]
        assert prov["parity_run_inputs"] == 8 and prov["parity_run_min_cosine"] >= 0.9999  # this run's own inputs
    torch_out = tmp_path / "torch"
    extract(paired_folder, torch_out, _cfg(tiny_models))
    for name in ("image__tiny-dinov2", "text__tiny-bert"):
        a, b = read_embedding_table(out / name), read_embedding_table(torch_out / name)
        assert a.ids == b.ids and cosines(a.embeddings, b.embeddings).min() >= 0.9999
        assert read_embedding_table(torch_out / name).provenance["backend"] == "torch"

    make_image(paired_folder / "new.png", 50)
    with pytest.raises(EmbedkitError, match=r"another configuration \(backend openvino -> torch"):
        extract(paired_folder, out, _cfg(tiny_models, text_model=None))  # torch onto an openvino table
    with pytest.raises(EmbedkitError, match=r"\(backend openvino -> onnxruntime; precision fp32 -> int8"):
        extract(paired_folder, out, _cfg(tiny_models, text_model=None, backend="onnxruntime", precision="int8",
                                         parity_floor=-1))
    res = extract(paired_folder, out, _cfg(tiny_models, text_model=None, backend="openvino", precision="fp32"))
    assert res.modalities["image"].rows_embedded == 1 and res.modalities["image"].rows_reused == 8


def test_tables_written_before_backends_existed_resume_with_torch(tiny_models, paired_folder, tmp_path):
    out = tmp_path / "emb"
    extract(paired_folder, out, _cfg(tiny_models, text_model=None))
    for p in part_files(out / "image__tiny-dinov2"):  # strip what older embedkit never wrote
        t = pq.read_table(p)
        prov = json.loads(t.schema.metadata[b"embedkit"])
        for k in ("backend", "precision"):
            prov.pop(k)
        pq.write_table(t.replace_schema_metadata({b"embedkit": json.dumps(prov).encode()}), p)
    make_image(paired_folder / "new.png", 50)
    assert extract(paired_folder, out, _cfg(tiny_models, text_model=None)).modalities["image"].rows_embedded == 1
    make_image(paired_folder / "newer.png", 51)
    with pytest.raises(EmbedkitError, match=r"another configuration \(backend torch -> onnxruntime"):
        extract(paired_folder, out, _cfg(tiny_models, text_model=None, backend="onnxruntime"))


# ------------------------------------------------------------------ the CLI


def _cli(*args, cache: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "EMBEDKIT_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)
    proc.output = proc.stdout + proc.stderr  # the console writes errors and notes to stderr
    return proc


def test_cli_backend_options_and_exit_codes(tiny_models, paired_folder, tmp_path, cache):
    bert, dinov2 = tiny_models["bert"], tiny_models["dinov2"]
    ok = _cli("extract", paired_folder, "--out", tmp_path / "a", "--image-model", dinov2, "--text-model", bert,
              "--backend", "onnxruntime", "--precision", "fp32", "--threads", "1", "--no-progress", cache=cache)
    assert ok.returncode == 0, ok.output
    assert read_embedding_table(tmp_path / "a" / "text__tiny-bert").provenance["backend"] == "onnxruntime"

    bad = _cli("extract", paired_folder, "--out", tmp_path / "b", "--text-model", bert, "--image-model", "none",
               "--backend", "onnxruntime", "--precision", "bf16", cache=cache)
    assert bad.returncode == 2 and "error: ONNX Runtime has no bf16 kernels" in bad.output
    assert not (tmp_path / "b").exists()  # refused before any work

    refused = _cli("extract", paired_folder, "--out", tmp_path / "c", "--text-model", bert, "--image-model", "none",
                   "--backend", "onnxruntime", "--precision", "int8", "--parity-floor", "1.0", cache=cache)
    assert refused.returncode == 2 and "below the parity floor 1" in refused.output
    assert "--precision fp32" in refused.output and "Traceback" not in refused.output

    check = _cli("models", "check", bert, "--backend", "onnxruntime", "--precision", "fp32", cache=cache)
    assert check.returncode == 0, check.output
    assert "onnxruntime" in check.output and "passes" in check.output
    failing = _cli("models", "check", bert, "--backend", "onnxruntime", "--precision", "int8", "--parity-floor",
                   "1.0", cache=cache)
    assert failing.returncode == 2 and "below" in failing.output
    listing = _cli("models", cache=cache)
    assert listing.returncode == 0 and "efficientnet-lite0" in listing.output


def test_the_run_checks_its_own_first_inputs_and_auto_falls_back(tiny_models, paired_folder, tmp_path, monkeypatch):
    """The calibration batch is generated; a backend that passes it can still fail on a clinic's images."""
    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path / "cache"))
    real = backends.parity_on_inputs

    def int8_fails_on_these_inputs(spec, modality, encoder, inputs, threads=None):
        measured = real(spec, modality, encoder, inputs, threads)
        return {**measured, "min_cosine": 0.5} if encoder.provenance()["precision"] == "int8" else measured

    monkeypatch.setattr(backends, "parity_on_inputs", int8_fails_on_these_inputs)
    with pytest.raises(EmbedkitError, match="this run's first 8 images at cosine min 0.5000.*--precision fp32"):
        extract(paired_folder, tmp_path / "a", _cfg(tiny_models, text_model=None, backend="onnxruntime",
                                                    precision="int8", parity_floor=0.9))
    spec = resolve_spec(str(tiny_models["dinov2"]), "image")
    backend_choice.choose_backend(spec, "image")  # measure, then rig: int8 the fastest, openvino fp32 next
    path = next((tmp_path / "cache").rglob("auto-image-*.json"))
    rows = json.loads(path.read_text())["candidates"]
    for r in rows:
        r["items_per_second"] = {("onnxruntime", "int8"): 1000.0, ("openvino", "fp32"): 500.0}.get(
            (r["backend"], r["precision"]), 1.0)
    path.write_text(json.dumps({"candidates": rows}))
    res = extract(paired_folder, tmp_path / "b", _cfg(tiny_models, text_model=None, backend="auto", parity_floor=0.9))
    prov = res.modalities["image"].provenance
    assert (prov["backend"], prov["precision"]) == ("openvino", "fp32") and prov["parity_run_min_cosine"] >= 0.9999
