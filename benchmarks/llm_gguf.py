"""LLM report embeddings on a small machine: transformers fp32 against GGUF f16 / q8_0 / q4_K_M (llama.cpp).
(Not named gguf.py: run as a script, that name would shadow the `gguf` package it imports.)

    python benchmarks/llm_gguf.py                      # a 0.44B Llama shape, 32 reports, 2 threads
    python benchmarks/llm_gguf.py --layers 8 --texts 16 --threads 1   # a smaller look, one thread

The first took 12 minutes on the shared 2-core development machine at load average 7 to 8
(other developers' jobs on the same cores), the second 2.

One random-weight Llama shaped like a real small LLM (hidden 1024, 32 layers, 16 heads with 8
KV heads, MLP 2816, LLaMA-2's vocabulary of 32,000; 0.44B parameters) is saved with
save_pretrained, written as an f16 GGUF by embedkit's converter, and quantised to q8_0 and
q4_K_M by llama.cpp's own quantiser (`llama_model_quantize`). Every format then embeds the same
reports through embedkit's own encoders (`create_encoder`: the transformers path `llama2-7b`
takes, and the llama.cpp path `llama2-7b-q8` takes), mean pooling, max_length 512, batches of 32
sorted by length as `extract` sorts them, each in its own process so that peak RSS (VmHWM) is
that format's alone. The formats alternate and each keeps its best tokens/s of `--repeats`.

Measured per format: tokens/s (model stage; also per CPU-second of the process, which other work on a
shared machine disturbs less), peak RSS, weights in memory (model_bytes), bytes
per parameter, cosine of each report's vector to the fp32 transformers vector. From bytes per
parameter and the measured runtime overhead, the README extrapolates what a 7B model needs.
Random weights say nothing about how well a quantised model ranks reports; real-model cosines
need real weights. Writes benchmarks/results/llm_gguf.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMATS = ("fp32", "f16", "q8_0", "q4_k_m")
_WORDS = ("opacity effusion normal consolidation nodule clear lobe left right mild moderate severe pleural "
          "cardiomegaly atelectasis pneumothorax edema infiltrate mass lesion calcified granuloma fracture rib "
          "spine aorta tortuous hilar mediastinal widening silhouette diaphragm costophrenic angle blunting "
          "interstitial markings bilateral unilateral upper lower middle basal apical prior comparison stable "
          "unchanged increased decreased new resolved tube catheter line tip projects port device sternotomy "
          "wires surgical clips no acute cardiopulmonary process findings impression recommend follow-up ct "
          "clinical correlation patient aged years male female history of smoking cough fever dyspnea").split()


def reports(n: int, seed: int = 0) -> list[str]:
    """Radiology-report-like texts of 20 to 120 words (lognormal), as in the paper's sentence template."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(35), 0.5, n).round().astype(int), 20, 120)
    return [f"Patient aged {rng.integers(18, 90)}. Findings: " + " ".join(rng.choice(_WORDS, k)) + "."
            for k in lengths]


def build(work: Path, args) -> dict[str, Path]:
    from embedkit.encoders.gguf_convert import convert_llama_to_gguf, quantize_gguf, random_llama_folder

    folder = work / "llama-0.4b"
    t0 = time.perf_counter()
    random_llama_folder(folder, reports(2000, seed=1), tokenizer_vocab=2000, vocab_size=32000, hidden_size=1024,
                        intermediate_size=2816, num_hidden_layers=args.layers, num_attention_heads=16,
                        num_key_value_heads=8, max_position_embeddings=2048)
    paths = {"fp32": folder, "f16": convert_llama_to_gguf(folder, work / "model-f16.gguf", "f16")}
    for q in ("q8_0", "q4_k_m"):
        paths[q] = quantize_gguf(paths["f16"], work / f"model-{q}.gguf", q, threads=args.threads)
    print(f"built and converted in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return paths


def worker(fmt: str, path: str, texts_file: str, out_npy: str, threads: int) -> dict:
    """One format in this process: load, embed the reports in extract's order and batches, report."""
    from embedkit.costs import peak_rss_mb
    from embedkit.encoders import create_encoder, resolve_spec

    texts = json.loads(Path(texts_file).read_text())
    name = path if fmt == "fp32" else f"gguf:{path}"
    t0 = time.perf_counter()
    enc = create_encoder(resolve_spec(name, "text", max_length=512), "text", device="cpu", threads=threads)
    load_s = time.perf_counter() - t0
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # plan.make_plan: longest first
    vectors = np.zeros((len(texts), enc.dim), dtype=np.float32)
    tokens = sum(enc.count_tokens(texts))
    t0, cpu0 = time.perf_counter(), time.process_time()
    for start in range(0, len(order), 32):
        idx = order[start:start + 32]
        vectors[idx], _ = enc.embed([texts[i] for i in idx])
    model_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    np.save(out_npy, vectors)
    p = enc.provenance()
    return {"format": fmt, "load_s": round(load_s, 2), "model_s": round(model_s, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / model_s, 1),
            # CPU seconds of all this process's threads: less sensitive than wall time to other work on the cores
            "tokens_per_cpu_s": round(tokens / cpu_s, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "model_bytes": p["model_bytes"], "n_parameters": p["n_parameters"],
            "file_type": p.get("quantize") or "F32 (torch)", "file_bytes": _size(path)}


def _size(path: str) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) if p.is_dir() else p.stat().st_size


def _run_worker(fmt: str, path: Path, texts_file: Path, out_npy: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", fmt, str(path), str(texts_file), str(out_npy), str(threads)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{fmt} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llm_gguf.json")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fmt, path, texts_file, out_npy, threads = args.worker
        print(json.dumps(worker(fmt, path, texts_file, out_npy, int(threads))))
        return

    from embedkit.bench import load_average, machine_info

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = build(work, args)
        texts_file = work / "texts.json"
        texts_file.write_text(json.dumps(reports(args.texts)))
        runs: dict[str, dict] = {}
        vectors: dict[str, np.ndarray] = {}
        for rep in range(args.repeats):
            for fmt in FORMATS:  # alternating, so a busy moment on a shared machine hurts every format alike
                r = _run_worker(fmt, paths[fmt], texts_file, work / f"{fmt}.npy", args.threads)
                print(f"run {rep + 1}: {fmt} {r['tokens_per_s']} tokens/s, peak {r['peak_rss_mb']:.0f} MB",
                      file=sys.stderr)
                best = runs.get(fmt)
                for key in ("tokens_per_s", "tokens_per_cpu_s"):
                    r[f"{key}_runs"] = (best or {}).get(f"{key}_runs", []) + [r[key]]
                    r[key] = max(r[f"{key}_runs"])
                r["peak_rss_mb"] = max(r["peak_rss_mb"], (best or {}).get("peak_rss_mb", 0))
                runs[fmt] = r
                vectors[fmt] = np.load(work / f"{fmt}.npy")
    reference = vectors["fp32"]
    for fmt, r in runs.items():
        cos = cosine_rows(vectors[fmt], reference)
        r["cosine_to_fp32"] = {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6)}
        r["bytes_per_parameter"] = round(r["model_bytes"] / r["n_parameters"], 4)
        r["speed_vs_fp32"] = round(r["tokens_per_s"] / runs["fp32"]["tokens_per_s"], 2)
        r["cpu_speed_vs_fp32"] = round(r["tokens_per_cpu_s"] / runs["fp32"]["tokens_per_cpu_s"], 2)
    result = {"model": {"layers": args.layers, "hidden": 1024, "mlp": 2816, "heads": 16, "kv_heads": 8,
                        "vocab": 32000, "n_parameters": runs["fp32"]["n_parameters"]},
              "texts": args.texts, "threads": args.threads, "repeats": args.repeats, "formats": runs,
              "seven_b": seven_b(runs), "machine": machine_info(), "load_average": load_average(),
              "wall_seconds": round(time.perf_counter() - t_start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result))


# A 7B Llama (LLaMA-2 7B: 6.74e9 parameters, 32 layers, hidden 4096) at max_length 512: the llama.cpp
# KV cache is 2 x 32 x 4096 x 512 x 2 bytes (f16) = 256 MiB, more than this model's, so it is added.
SEVEN_B_PARAMS = 6.74e9
SEVEN_B_KV_MB = 2 * 32 * 4096 * 512 * 2 / 2**20


def seven_b(runs: dict) -> dict:
    """Weights of a 7B model per format, from the measured bytes per parameter, plus the measured runtime
    overhead of this run (peak RSS above the weights), plus the KV cache a 7B model adds."""
    out = {}
    for fmt, r in runs.items():
        weights_gb = SEVEN_B_PARAMS * r["bytes_per_parameter"] / 2**30
        overhead_mb = r["peak_rss_mb"] - r["model_bytes"] / 2**20
        kv = SEVEN_B_KV_MB if fmt != "fp32" else 0  # transformers keeps no cache for one forward
        out[fmt] = {"weights_gb": round(weights_gb, 2), "overhead_mb": round(overhead_mb),
                    "estimated_peak_gb": round(weights_gb + (overhead_mb + kv) / 1024, 2)}
    return out


def markdown(r: dict) -> str:
    n = r["formats"]["f16"]["n_parameters"]  # the GGUF count: with the output head transformers leaves out
    lines = [f"Llama shape {n / 1e9:.2f}B ({r['model']['layers']} layers), {r['texts']} "
             f"reports, {r['threads']} threads, best of {r['repeats']}; load average {r['load_average']}",
             "", "| format | tokens/s | vs fp32 | tokens/CPU-s | vs fp32 | peak RSS MB | weights MB | bytes/param "
             "| cosine to fp32 (mean / min) | 7B weights GB | 7B est. peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for fmt, f in r["formats"].items():
        s = r["seven_b"][fmt]
        lines.append(f"| {fmt} ({f['file_type']}) | {f['tokens_per_s']:.0f} | {f['speed_vs_fp32']:.2f}x | "
                     f"{f['tokens_per_cpu_s']:.0f} | {f['cpu_speed_vs_fp32']:.2f}x | "
                     f"{f['peak_rss_mb']:.0f} | {f['model_bytes'] / 2**20:.0f} | {f['bytes_per_parameter']:.3f} | "
                     f"{f['cosine_to_fp32']['mean']:.4f} / {f['cosine_to_fp32']['min']:.4f} | {s['weights_gb']:.1f} | "
                     f"{s['estimated_peak_gb']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
