"""`raw`: a frozen-backbone head fed raw images + text against the same head fed stored embeddings:
time per epoch and peak memory, one worker process per configuration."""

from __future__ import annotations

import time

from embedkit.bench.data import clinic_rows
from embedkit.bench.harness import Context, ratio, run_extract, run_worker, sig

def run(ctx: Context) -> dict:
    work, p, cfg = ctx.work, ctx.preset, ctx.config
    data = work / "clinic"
    rows = clinic_rows(data, p.raw_rows)
    emb = work / "emb_raw"
    image_model = ctx.models.path(p.raw_image_model)
    t0 = time.perf_counter()
    ex = run_extract(data, rows, emb, image_model, cfg.text_model, batch_size=cfg.batch_size)
    extract_s = time.perf_counter() - t0
    common = dict(threads=cfg.threads, batch_size=cfg.batch_size)
    raw = run_worker("train_raw", data=str(data), rows=rows, image_model=image_model, text_model=cfg.text_model,
                     epochs=1, **common)
    embs = run_worker("train_emb", emb=str(emb), modalities=["image", "text"], epochs=p.raw_emb_epochs, **common)
    return {
        "rows": len(rows), "encoders": {"image": p.raw_image_model, "text": cfg.text_model},
        "head": "early fusion (Linear 128, ReLU, Dropout, BatchNorm, Linear), AdamW, batch "
                f"{cfg.batch_size}; backbones frozen",
        "extract_seconds": round(extract_s, 2),
        "stored_bytes": sum(r.bytes for r in ex.modalities.values()), "raw": raw, "embeddings": embs,
        "epoch_speedup": ratio(raw["epoch_seconds"], embs["epoch_seconds"]),
        "peak_memory_reduction": sig(1 - embs["peak_rss_mb"] / raw["peak_rss_mb"]),
        "peak_memory_above_baseline_reduction":
            sig(1 - embs["above_baseline_mb"] / max(raw["above_baseline_mb"], 1e-9)),
        "break_even_epochs": sig(extract_s / max(raw["epoch_seconds"] - embs["epoch_seconds"], 1e-9)),
    }
