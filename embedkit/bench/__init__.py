"""`embedkit bench`: side-by-side evidence for embedkit's speed and memory claims, on this machine.

Sections, one module each (`run(ctx)` returns a dict; `run_bench` runs the chosen ones and writes
bench.json, bench.md and PNG plots):

  images    end-to-end image extraction (decode included) through extract(), against this
            machine's measured fp32 matmul roofline and a per-image transformers pipeline loop
  text      length-sorted batching against unsorted, on reports with skewed lengths
  raw       a frozen-backbone head fed raw images + text against the same head fed stored
            embeddings: time per epoch and peak memory, one subprocess per configuration
  scaling   extraction and training time and peak memory at growing N, one subprocess each
  train     FusionClassifier against a reference-style DataLoader loop (as published by
            Restrepo et al.) on a BRSET-shaped set, with macro-F1 on a held-out split
  quantize  int8 dynamic quantisation: speed-up and downstream macro-F1
  backends  ONNX Runtime and OpenVINO against torch, per encoder

Beside them: config.py (presets), harness.py (machine, timing, worker processes), data.py (inputs,
random-weight models), tables.py (targets, tables, README blocks), plots.py, worker.py.

Random-weight models of the real architectures (transformers configs with the real sizes,
saved with save_pretrained) stand in where no weights install offline: speed depends on the
architecture, not on the weight values. A shared laptop is noisy, so every comparison runs
side by side in one run, alternating, best of `repeats`; the load average is recorded with it.
Peak memory is a process high-water mark (ru_maxrss), so each memory figure comes from its own
subprocess (`python -m embedkit.bench WORKER JSON`).
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from embedkit.bench.config import PRESETS, SECTIONS, BenchConfig, Preset
from embedkit.bench.harness import Context, load_average, machine_info, matmul_gflops, quiet
from embedkit.bench.train import train_speed
from embedkit.errors import EmbedkitError

__all__ = ["PRESETS", "SECTIONS", "BenchConfig", "Preset", "load_average", "machine_info", "matmul_gflops", "quiet",
           "run_bench", "train_speed"]


def run_bench(out: str | Path, config: BenchConfig | None = None, log=None, progress: bool = False) -> dict:
    """Run the chosen sections and write bench.json, bench.md and PNG plots into `out`.

    progress: a bar over the sections, each weighted by the seconds it took in the preset's reference run, so
    that its time estimate is that run's remaining time scaled by how fast this one goes."""
    import torch

    from embedkit.bench.data import RandomModels
    from embedkit.bench.harness import finite
    from embedkit.bench.plots import write_plots
    from embedkit.bench.tables import tables, targets

    cfg = config or BenchConfig()
    p = cfg.sizes()
    if cfg.sections is None:
        cfg = replace(cfg, sections=p.sections)
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        raise EmbedkitError(f"unknown bench section(s) {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = log or (lambda msg: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result = {"embedkit_bench": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "preset": cfg.preset,
              "config": {**asdict(cfg), "images": str(cfg.images) if cfg.images else None},
              "sizes": asdict(p), "machine": {**machine_info(), "load_average_start": load_average()},
              "sections": {}, "section_seconds": {}, "load_average": {}}
    log(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, load "
        f"{result['machine']['load_average_start']}")
    result["machine"]["matmul_gflops"] = round(matmul_gflops(p.matmul_n), 1)
    from embedkit.console import progress_bar

    chosen = [name for name in SECTIONS if name in cfg.sections]  # each section is the module of its name
    reference = dict(p.reference_seconds)
    weight = {name: reference.get(name, sum(reference.values()) / len(reference) if reference else 1.0)
              for name in chosen}
    with tempfile.TemporaryDirectory(prefix="embedkit-bench-") as tmp, progress_bar(progress) as bar:
        work = Path(tmp)
        ctx = Context(work=work, models=RandomModels(work / "models"), preset=p, config=cfg, log=log)
        task = bar.add_task("bench", total=sum(weight.values()), rate="")
        for k, name in enumerate(chosen):
            bar.update(task, description=f"bench {name} ({k + 1}/{len(chosen)})")
            log(f"{name}: running (load average {load_average()})")
            t0 = time.perf_counter()
            result["sections"][name] = importlib.import_module(f"embedkit.bench.{name}").run(ctx)
            result["section_seconds"][name] = round(time.perf_counter() - t0, 1)
            result["load_average"][name] = load_average()
            log(f"{name}: {result['section_seconds'][name]} s")
            bar.advance(task, weight[name])
    result["machine"]["load_average_end"] = load_average()
    result["targets"] = targets(result)
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    result["plots"] = write_plots(result, out)
    result["tables"] = tables(result)
    result = finite(result)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    from embedkit.report import bench_markdown

    (out / "bench.md").write_text(bench_markdown(result))
    return result
