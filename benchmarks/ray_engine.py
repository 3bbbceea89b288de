"""The Ray engine against the local engine on one machine: throughput with 1 and 2 actors, and overhead.

    python benchmarks/ray_engine.py                       # 256 VQA-RAD images, efficientnet-lite0
    python benchmarks/ray_engine.py --images 64 --model PATH_TO/dinov2-base

Images come from ../shared/data/vqa_rad/images (real radiology JPEGs); where that folder is
absent, random 512x512 JPEGs are generated instead (and the JSON says so). Every run embeds the
same folder from scratch into its own output; the Ray runs share one local Ray started first,
whose start-up is reported on its own line. Both engines are timed at the same point of the
shared pipeline: when the driver hands a batch of vectors to the Parquet writer. Per run:
  wall s          extract() from call to return, what a user waits (Ray: actor start-up included)
  first batch s   from the call to the first batch written (model load, Ray actors' start-up,
                  first-inference warm-up; the driver has imported torch beforehand, the actors have not)
  img/s           images / wall
  steady img/s    images after the first batch / time from the first batch to the last
  max abs diff    largest embedding difference against the local engine's output (same ids checked)
A second table sets each Ray run with one actor against the local engine with the same torch
threads: the engine's own overhead, start-up and per image. Prints markdown, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embedkit.extract import ExtractConfig, extract  # noqa: E402
from embedkit.store import PartWriter, read_embedding_table  # noqa: E402

VQA_RAD = Path(os.environ.get("EMBEDKIT_SHARED_DATA", REPO.parent / "shared" / "data")) / "vqa_rad" / "images"


def make_data(folder: Path, n: int) -> str:
    folder.mkdir(parents=True)
    real = sorted(VQA_RAD.glob("*.jpg")) if VQA_RAD.is_dir() else []
    if len(real) >= n:
        for p in real[:n]:
            shutil.copy(p, folder / p.name)
        return f"VQA-RAD, {n} JPEGs from {VQA_RAD}"
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.jpg")
    return f"{n} random 512x512 JPEGs ({VQA_RAD} not found)"


WRITES: list[tuple[float, int]] = []  # (time, rows) of every batch the driver writes


def _timed_write(self, columns, embeddings, _write=PartWriter.write):
    WRITES.append((time.perf_counter(), len(embeddings)))
    return _write(self, columns, embeddings)


PartWriter.write = _timed_write  # a benchmark-only probe, shared by both engines


def run(name: str, data: Path, out: Path, config: ExtractConfig, n: int) -> dict:
    WRITES.clear()
    t0 = time.perf_counter()
    res = extract(data, out, config).modalities["image"]
    wall = time.perf_counter() - t0
    (t_first, n_first), t_last = WRITES[0], WRITES[-1][0]
    threads = config.threads if config.engine == "local" else int(config.ray_cpus_per_actor)  # per process
    row = {"run": name, "engine": config.engine, "threads": threads, "actors": config.ray_actors,
           "cpus_per_actor": config.ray_cpus_per_actor,
           "rows": res.rows_embedded, "wall_s": round(wall, 2), "first_batch_s": round(t_first - t0, 2),
           "img_per_s": round(n / wall, 2), "steady_img_per_s": round((n - n_first) / max(t_last - t_first, 1e-9), 2),
           "stage_seconds": res.costs["stage_seconds"], "peak_rss_mb_driver": res.costs["peak_rss_mb"],
           "dataset": res.dataset}
    print(f"  {name}: {row['wall_s']} s", file=sys.stderr, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--model", default="efficientnet-lite0", help="registry name or a model folder")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None, help="default: ray_engine.json in the work folder")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load = [os.getloadavg()[0]]  # other users' work on a shared machine moves every figure
    work = args.workdir or Path(tempfile.mkdtemp(prefix="embedkit_ray_bench_"))
    data = work / "data"
    source = make_data(data, args.images)
    for p in data.iterdir():  # warm the page cache so the first run is not the only one reading from disk
        p.read_bytes()
    cores = os.cpu_count()
    base = dict(image_model=args.model, text_model=None, batch_size=args.batch_size, progress=False)
    import embedkit.encoders.models  # noqa: F401  torch + transformers imported once, before any local run is timed

    rows = [run(f"local {t} thread{'s' if t > 1 else ''}", data, work / f"out_local_{t}",
                ExtractConfig(**base, threads=t), args.images) for t in (cores, 1)]
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False)
    ray_start = time.perf_counter() - t0
    # the whole machine with one actor (as many torch threads as the local engine), then split in two
    for actors, cpus in ((1, float(cores)), (1, 1.0), (2, cores / 2)):
        name = f"ray {actors} actor{'s' if actors > 1 else ''} x {cpus:g} CPU"
        cfg = ExtractConfig(**base, engine="ray", ray_actors=actors, ray_cpus_per_actor=cpus)
        rows.append(run(name, data, work / f"out_ray_{actors}x{cpus:g}", cfg, args.images))
    ray.shutdown()

    ref = read_embedding_table(rows[0]["dataset"])
    for row in rows:
        t = read_embedding_table(row["dataset"])
        assert t.ids == ref.ids, f"{row['run']}: ids differ from the local engine's"
        row["max_abs_diff_vs_local"] = float(np.abs(t.embeddings - ref.embeddings).max())

    load.append(os.getloadavg()[0])
    local = rows[0]
    same = [(r, next(x for x in rows if x["engine"] == "local" and x["threads"] == r["threads"])) for r in rows
            if r["engine"] == "ray" and r["actors"] == 1]
    print(f"\n{source}; model {args.model}; batch {args.batch_size}; {cores} cores; "
          f"load average {load[0]:.1f} -> {load[1]:.1f}; local Ray start-up {ray_start:.1f} s (once)\n")
    print("| run | wall s | first batch s | img/s | steady img/s | steady vs local | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['wall_s']:.1f} | {r['first_batch_s']:.1f} | {r['img_per_s']:.1f} | "
              f"{r['steady_img_per_s']:.1f} | {r['steady_img_per_s'] / local['steady_img_per_s']:.2f}x | "
              f"{r['max_abs_diff_vs_local']:.1e} |")
    print("\n| same torch threads | local steady img/s | Ray 1 actor steady img/s | Ray / local | "
          "extra s to first batch |")
    print("|---|---:|---:|---:|---:|")
    for r, loc in same:
        print(f"| {r['threads']} | {loc['steady_img_per_s']:.1f} | {r['steady_img_per_s']:.1f} | "
              f"{r['steady_img_per_s'] / loc['steady_img_per_s']:.2f}x | "
              f"{r['first_batch_s'] - loc['first_batch_s']:+.1f} |")
    result = {"source": source, "model": args.model, "images": args.images, "batch_size": args.batch_size,
              "cores": cores, "load_average_1m_start_end": load, "ray_start_s": round(ray_start, 2),
              "platform": platform.platform(), "versions": _versions(), "runs": rows}
    path = args.json or work / "ray_engine.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nJSON: {path}")


def _versions() -> dict:
    import ray
    import torch

    return {"ray": ray.__version__, "torch": torch.__version__, "python": platform.python_version()}


if __name__ == "__main__":
    main()
