"""`scaling`: extraction and training time and peak memory at growing N, one worker process each."""

from __future__ import annotations

import csv

from embedkit.bench.data import small_images
from embedkit.bench.harness import Context, run_worker, sig

def run(ctx: Context) -> dict:
    work, models, p, cfg = ctx.work, ctx.models, ctx.preset, ctx.config
    root = small_images(work / "scaling", max(p.scaling))
    folder = models["dinov2-tiny"]
    with open(root / "rows.csv") as f:
        all_rows = list(csv.DictReader(f))
    points = []
    for n in p.scaling:
        table = root / f"rows_{n}.csv"
        table.write_text("id,image,label\n" + "".join(f"{r['id']},{r['image']},{r['label']}\n" for r in all_rows[:n]))
        emb = work / f"emb_scaling_{n}"
        ex = run_worker("extract", data=str(root), metadata=str(table), out=str(emb), image_model=str(folder),
                        threads=cfg.threads, batch_size=cfg.batch_size)
        tr = run_worker("train_emb", emb=str(emb), modalities=["image"], epochs=3, threads=cfg.threads,
                        batch_size=64)
        points.append({"n": n, "extract": ex, "train": tr})
    lo, hi = points[0], points[-1]
    per_row = [pt["extract"]["seconds"] / pt["n"] for pt in points]
    return {"encoder": "dinov2-tiny (random weights: hidden 64, 4 layers, 56 px input), image only, "
                       f"{64}-px JPEGs", "points": points,
            "extract_seconds_per_1k_rows": [round(1000 * s, 3) for s in per_row],
            "extract_time_linearity": sig(per_row[-1] / per_row[0]),  # 1.0 = exactly linear
            "train_epoch_seconds_per_1k_rows": [round(1000 * pt["train"]["epoch_seconds"] / pt["n"], 4)
                                                for pt in points],
            "n_ratio": hi["n"] / lo["n"],
            "extract_peak_ratio": sig(hi["extract"]["peak_rss_mb"] / lo["extract"]["peak_rss_mb"]),
            "train_peak_ratio": sig(hi["train"]["peak_rss_mb"] / lo["train"]["peak_rss_mb"])}
