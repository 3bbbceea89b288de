"""What every comparison shares: the machine (matmul rate, load, memory), timing side by side, one
quiet extract() run, and worker processes (each configuration's peak memory is its process's own)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from embedkit.costs import load_average  # noqa: F401  (the bench's machine record uses it)
from embedkit.errors import EmbedkitError


@dataclass
class Context:
    """One bench run, as each section's `run(ctx)` sees it."""

    work: Path  # scratch folder, deleted after the run
    models: Any  # data.RandomModels: random-weight model folders, built on first use
    preset: Any  # config.Preset
    config: Any  # config.BenchConfig
    log: Callable[[str], None] = field(default=lambda msg: None)


# ---------------------------------------------------------------------------------------------
# the machine


def matmul_gflops(n: int = 2048, repeats: int = 5, seconds: float | None = None) -> float:
    """This machine's fp32 matmul rate (GFLOP/s, torch's threads): the best of `repeats` single
    products, or with `seconds` the mean over products run back to back for that long, which is
    what a long model run can get from a machine that other work shares."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # first call sets up the BLAS kernels
    if seconds:
        t0, done = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            a @ b
            done += 1
        return 2 * n**3 * done / (time.perf_counter() - t0) / 1e9
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


@contextmanager
def torch_threads(n: int | None):
    """Run with n torch threads (None: leave as is), then restore."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def machine_info() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform()}




def rss_mb() -> float:
    from embedkit.costs import current_rss_mb

    return current_rss_mb()


def peak_rss_mb() -> float:
    from embedkit.costs import peak_rss_mb as peak

    return peak()


# ---------------------------------------------------------------------------------------------
# measuring


def alternate(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Call every runner `repeats` times in turn, so a burst of other work hits every side alike;
    seconds per call."""
    seconds = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            seconds[k].append(time.perf_counter() - t0)
    return seconds


@contextmanager
def quiet():
    """extract() and train() narrate to the console; inside a benchmark that is noise."""
    from embedkit.console import console

    old, console.quiet = console.quiet, True
    try:
        yield
    finally:
        console.quiet = old


def run_extract(data: Path, rows: list[dict] | None, out: Path, image_model: str | None,
                text_model: str | None = None, batch_size: int = 32, quantize: str | None = None,
                metadata: Path | None = None, labels: bool = True):
    """One extract() run from scratch (overwrite), quiet; returns the ExtractResult.
    Rows (or the `metadata` table) have columns id, image, report (texts) and label."""
    from embedkit.extract import ExtractConfig, extract
    from embedkit.items import SourceOptions

    src = SourceOptions(metadata=metadata, id_col="id", image_col="image" if image_model else None,
                        text_file_col="report" if text_model else None, label_cols=["label"] if labels else [])
    cfg = ExtractConfig(image_model=image_model, text_model=text_model, device="cpu", batch_size=batch_size,
                        overwrite=True, progress=False, quantize=quantize)
    with quiet():
        return extract(data, out, cfg, source=src, rows=rows)


def timing(result, modality: str) -> dict:
    """Throughput of one extraction: end to end (hash, decode, preprocess, model, write; the one-off
    model load left out) and of the model stage alone."""
    r = result.modalities[modality]
    st = r.costs["stage_seconds"]
    e2e = r.costs["wall_seconds"] - st.get("load_model", 0.0)
    return {"items": r.rows_embedded, "seconds": round(e2e, 3), "items_per_second": r.costs["end_to_end_items_per_second"],
            "model_items_per_second": r.costs.get("items_per_second"), "load_model_seconds": st.get("load_model"),
            "stage_seconds": st, "stored_bytes": r.bytes, "n_parameters": r.provenance.get("n_parameters"),
            "model_bytes": r.provenance.get("model_bytes"), "dim": r.provenance.get("dim")}


def run_worker(kind: str, threads: int | None = None, timeout: float = 1800, **kw) -> dict:
    """Run one configuration (embedkit/bench/worker.py) in a fresh interpreter; its ru_maxrss is then
    this configuration's alone."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    spec = json.dumps({"threads": threads, **kw}, default=str)
    proc = subprocess.run([sys.executable, "-m", "embedkit.bench", kind, spec], capture_output=True, text=True,
                          env=env, timeout=timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise EmbedkitError(f"bench worker '{kind}' failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return json.loads(lines[-1])


def ratio(a: float | None, b: float | None) -> float | None:
    return sig(a / b) if a and b else None


def sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits: ratios span 0.004 to 3000 here."""
    return float(f"{x:.{digits}g}")


def finite(v):
    """NaN (a spread over one seed, say) becomes null: bench.json stays strict JSON."""
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v
