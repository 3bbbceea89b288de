"""embedkit bench: one tiny run of every section, checked for the files it writes and for numbers that
must agree with each other (not for timings, which depend on the machine); int8 quantisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedkit.bench import SECTIONS, BenchConfig, run_bench
from embedkit.errors import EmbedkitError


PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:  # the backends section exports into a cache of its own
        mp.setenv("EMBEDKIT_CACHE", str(tmp_path_factory.mktemp("export_cache")))
        return out, run_bench(out, BenchConfig(preset="tiny"))


def close(a, b, rel=0.02):
    return abs(a - b) <= rel * max(abs(a), abs(b))


def test_writes_json_markdown_and_plots(bench):
    out, r = bench
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(r, default=str))
    assert set(r["sections"]) == set(SECTIONS)
    md = (out / "bench.md").read_text()
    assert "## Targets" in md and "Training speed" in md
    assert set(r["plots"]) == {"throughput.png", "text_batching.png", "raw_vs_embeddings.png", "scaling.png",
                               "train_speed.png"}
    for name in r["plots"]:
        assert (out / name).read_bytes().startswith(PNG) and f"]({name})" in md
    m = r["machine"]
    assert len(m["load_average_start"]) == 3 and len(m["load_average_end"]) == 3 and m["matmul_gflops"] > 0
    assert all(len(v) == 3 for v in r["load_average"].values())
    for t in r["targets"]:
        assert set(t) == {"target", "measured", "goal", "met", "note"} and t["met"] in (True, False, None)


def test_image_throughput_numbers_agree(bench):
    m = bench[1]["sections"]["images"]["models"]["dinov2-tiny"]
    e = m["embedkit"]
    assert e["items"] == 8 and e["dim"] == 64 and e["model_bytes"] >= 4 * e["n_parameters"] > 0
    assert {"hash", "decode", "preprocess", "model", "write"} <= set(e["stage_seconds"])
    assert close(e["items_per_second"], e["items"] / e["seconds"])
    assert 0 < m["roofline_fraction"] < 1.5 and 0 < m["model_roofline_fraction"] < 1.5
    assert close(m["roofline_fraction"], e["items_per_second"] / m["roofline_images_per_second"])
    assert m["gflops_per_image"] > 0 and m["pipeline"]["items"] == 3 and "pipeline" in m["pipeline"]["how"]
    assert close(m["speedup_vs_pipeline"], e["items_per_second"] / m["pipeline"]["items_per_second"])


def test_sorted_batches_pad_less(bench):
    t = bench[1]["sections"]["text"]
    s, u = t["sorted"], t["unsorted"]
    assert s["real_tokens"] == u["real_tokens"] > 0  # same texts, different order
    assert s["padding_fraction"] < u["padding_fraction"] < 1
    assert s["padded_tokens"] < u["padded_tokens"]
    assert close(s["tokens_per_second"], s["real_tokens"] / s["seconds"])
    assert close(t["speedup"], s["tokens_per_second"] / u["tokens_per_second"])


def test_raw_and_embedding_runs_measured_in_their_own_processes(bench):
    t = bench[1]["sections"]["raw"]
    for k in ("raw", "embeddings"):
        w = t[k]
        assert w["rows"] == t["rows"] == 12 and w["epoch_seconds"] > 0 and w["peak_rss_mb"] >= w["baseline_rss_mb"] > 0
        assert close(w["above_baseline_mb"], w["peak_rss_mb"] - w["baseline_rss_mb"], rel=0.01)
    # a fresh interpreter: its own peak, not the parent's (ru_maxrss would carry the parent's across exec, and
    # this test process, which ran the whole bench, has held more than either worker); the two workers' peaks
    # are close at this size (both import torch), so comparing them with each other was a coin toss
    from embedkit.costs import peak_rss_mb

    assert max(t["raw"]["peak_rss_mb"], t["embeddings"]["peak_rss_mb"]) < peak_rss_mb()
    assert close(t["epoch_speedup"], t["raw"]["epoch_seconds"] / t["embeddings"]["epoch_seconds"])
    assert t["stored_bytes"] > 0 and t["break_even_epochs"] > 0


def test_scaling_points(bench):
    t = bench[1]["sections"]["scaling"]
    assert [pt["n"] for pt in t["points"]] == [16, 64] and t["n_ratio"] == 4
    for pt in t["points"]:
        assert pt["extract"]["items"] == pt["train"]["rows"] == pt["n"]
        assert pt["extract"]["peak_rss_mb"] > 0 and pt["train"]["peak_rss_mb"] > 0
    peaks = [pt["extract"]["peak_rss_mb"] for pt in t["points"]]
    assert close(t["extract_peak_ratio"], peaks[1] / peaks[0])


def test_training_speed_same_split_and_held_out_f1(bench):
    t = bench[1]["sections"]["train"]
    assert sum(t["split"].values()) == t["rows"] == 200 and t["dims"] == {"text": 4096, "image": 768}
    for k in ("reference", "embedkit", "embedkit_big_batch", "embedkit_pca"):
        assert 0 <= t[k]["macro_f1"] <= 1 and t[k]["epoch_seconds"] == min(t[k]["epochs"]) > 0
    assert t["reference"]["batch_size"] == t["embedkit"]["batch_size"] == 64
    assert close(t["speedup"], t["reference"]["epoch_seconds"] / t["embedkit"]["epoch_seconds"])
    assert 0 < t["epoch_floor_seconds"] and t["one_thread"]["speedup"] > 0


def test_quantize_section(bench):
    t = bench[1]["sections"]["quantize"]
    assert t["int8"]["model_bytes"] < t["float32"]["model_bytes"]
    assert 0.8 < t["cosine_float32_int8"]["mean"] <= 1.0001
    assert 0 <= t["int8"]["macro_f1"] <= 1 and 0 <= t["float32"]["macro_f1"] <= 1


def test_cli_bench_section_subset_and_bad_section(tmp_path):
    from typer.testing import CliRunner

    from embedkit.cli import app

    ok = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--sections", "text", "--out", str(tmp_path / "b")])
    assert ok.exit_code == 0, ok.output
    assert set(json.loads((tmp_path / "b" / "bench.json").read_text())["sections"]) == {"text"}
    with pytest.raises(EmbedkitError, match="unknown bench section"):
        run_bench(tmp_path / "c", BenchConfig(preset="tiny", sections=("nope",)))


# ---------------------------------------------------------------------------------------------
# int8 dynamic quantisation (extract --quantize int8)


def test_quantize_int8_in_extract_and_provenance(tiny_models, paired_folder, tmp_path):
    from embedkit.extract import ExtractConfig, extract
    from embedkit.store import load_embeddings

    base = dict(image_model=None, text_model=str(tiny_models["bert"]), device="cpu", progress=False)
    fp = extract(paired_folder, tmp_path / "fp", ExtractConfig(**base))
    q = extract(paired_folder, tmp_path / "q", ExtractConfig(**base, quantize="int8"))
    pf, pq_ = fp.modalities["text"].provenance, q.modalities["text"].provenance
    assert pf["quantize"] is None and pq_["quantize"] == "int8"
    assert pq_["n_parameters"] == pf["n_parameters"]  # the packed int8 weights are still counted
    assert pq_["model_bytes"] < pf["model_bytes"]
    a, b = load_embeddings(tmp_path / "fp").embeddings["text"], load_embeddings(tmp_path / "q").embeddings["text"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.9 and not np.allclose(a, b)  # close, not identical


def test_quantize_refusals(tiny_models):
    from embedkit.encoders import create_encoder, resolve_spec

    with pytest.raises(EmbedkitError, match="unknown quantisation"):
        create_encoder(resolve_spec(str(tiny_models["bert"]), "text"), "text", device="cpu", quantize="int4")
    with pytest.raises(EmbedkitError, match="float32 only"):
        create_encoder(resolve_spec(str(tiny_models["bert"]), "text"), "text", device="cpu", dtype="bfloat16",
                       quantize="int8")
    with pytest.raises(EmbedkitError, match="Linear layers"):
        create_encoder(resolve_spec("efficientnet-lite0", "image"), "image", device="cpu", quantize="int8")


def test_backends_section_compares_every_backend_to_torch(bench):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    b = bench[1]["sections"]["backends"]
    for m in [*b["images"]["models"].values(), b["text"]]:
        stage = m["model_stage"]
        assert stage["torch fp32"]["ratio"] == 1.0 and stage["torch fp32"]["cosine"]["min"] >= 0.99999
        for name in ("onnxruntime fp32", "openvino fp32"):
            assert stage[name]["cosine"]["min"] >= 0.9999  # measured on every input, not assumed
            assert close(stage[name]["ratio"], stage[name]["items_per_second"] / stage["torch fp32"]["items_per_second"])
            assert m["end_to_end"][name]["items_per_second"] > 0
        best = m["best_at_0.9999"]
        assert stage[best["config"]]["cosine"]["min"] >= 0.9999
        assert all(stage[best["config"]]["items_per_second"] >= v["items_per_second"] for k, v in stage.items()
                   if k in ("torch fp32", "onnxruntime fp32", "openvino fp32") or
                   (v.get("cosine") and v["cosine"]["min"] >= 0.9999 and not k.startswith("sentence")))
    assert "sentence-transformers torch" in b["text"]["model_stage"]
    md = (bench[0] / "bench.md").read_text()
    assert "CPU backends against embedkit's torch fp32" in md and "| minilm, model stage" in md
