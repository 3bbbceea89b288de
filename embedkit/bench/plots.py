"""PNG plots of a bench result (bench.md and the HTML report show them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_plots(r: dict, out: Path) -> list[str]:
    from matplotlib.figure import Figure

    s, written = r["sections"], []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        written.append(name)

    if "images" in s:
        models = s["images"]["models"]
        fig = Figure(figsize=(7, 3.6))
        ax = fig.add_subplot()
        names = list(models)
        xs = np.arange(len(names))
        ax.bar(xs - 0.27, [m["roofline_images_per_second"] for m in models.values()], 0.27, label="fp32 roofline",
               color="#bbbbbb")
        ax.bar(xs, [m["embedkit"]["items_per_second"] for m in models.values()], 0.27, label="embedkit, end to end")
        ax.bar(xs + 0.27, [m.get("pipeline", {}).get("items_per_second", 0) for m in models.values()], 0.27,
               label="per-image pipeline")
        ax.set_xticks(xs, names)
        ax.set_ylabel("images / s")
        ax.legend(fontsize=8)
        ax.set_title("Image extraction on this CPU", fontsize=10)
        save(fig, "throughput.png")
    if "text" in s:
        t = s["text"]
        fig = Figure(figsize=(7, 3.2))
        a1, a2 = fig.subplots(1, 2)
        a1.bar(["sorted", "unsorted"], [t["sorted"]["tokens_per_second"], t["unsorted"]["tokens_per_second"]],
               color=["#1f77b4", "#999999"])
        a1.set_ylabel("real tokens / s")
        a2.bar(["sorted", "unsorted"], [t["sorted"]["padding_fraction"], t["unsorted"]["padding_fraction"]],
               color=["#1f77b4", "#999999"])
        a2.set_ylabel("padding fraction")
        a2.set_ylim(0, 1)
        fig.suptitle(f"Text batching ({t['model']})", fontsize=10)
        save(fig, "text_batching.png")
    if "raw" in s:
        t = s["raw"]
        fig = Figure(figsize=(7, 3.2))
        a1, a2 = fig.subplots(1, 2)
        a1.bar(["raw", "embeddings"], [t["raw"]["epoch_seconds"], t["embeddings"]["epoch_seconds"]],
               color=["#999999", "#1f77b4"])
        a1.set_yscale("log")
        a1.set_ylabel("seconds / epoch (log)")
        a2.bar(["raw", "embeddings"], [t["raw"]["peak_rss_mb"], t["embeddings"]["peak_rss_mb"]],
               color=["#999999", "#1f77b4"], label="peak RSS")
        a2.bar(["raw", "embeddings"], [t["raw"]["baseline_rss_mb"], t["embeddings"]["baseline_rss_mb"]],
               color="#dddddd", label="interpreter + imports")
        a2.set_ylabel("MB")
        a2.legend(fontsize=7)
        fig.suptitle(f"Training on raw data vs stored embeddings ({t['rows']} rows)", fontsize=10)
        save(fig, "raw_vs_embeddings.png")
    if "scaling" in s:
        pts = s["scaling"]["points"]
        n = [pt["n"] for pt in pts]
        fig = Figure(figsize=(7, 3.2))
        a1, a2 = fig.subplots(1, 2)
        a1.plot(n, [pt["extract"]["seconds"] for pt in pts], "o-", label="extract")
        a1.plot(n, [pt["train"]["epoch_seconds"] for pt in pts], "s-", label="train, one epoch")
        a1.set_xscale("log")
        a1.set_yscale("log")
        a1.set_xlabel("rows")
        a1.set_ylabel("seconds")
        a1.legend(fontsize=8)
        a2.plot(n, [pt["extract"]["peak_rss_mb"] for pt in pts], "o-", label="extract")
        a2.plot(n, [pt["train"]["peak_rss_mb"] for pt in pts], "s-", label="train")
        a2.set_xscale("log")
        a2.set_ylim(0, None)
        a2.set_xlabel("rows")
        a2.set_ylabel("peak RSS MB")
        a2.legend(fontsize=8)
        fig.suptitle("Scaling: time grows with N, peak memory stays flat", fontsize=10)
        save(fig, "scaling.png")
    if "train" in s:
        t = s["train"]
        fig = Figure(figsize=(7, 3.2))
        ax = fig.add_subplot()
        labels = ["reference loop\n(batch 64)", "embedkit\n(batch 64)",
                  f"embedkit\n(batch {t['embedkit_big_batch']['batch_size']})", "compute floor\n(full width)",
                  "embedkit, PCA\ninput (batch 64)"]
        vals = [t["reference"]["epoch_seconds"], t["embedkit"]["epoch_seconds"],
                t["embedkit_big_batch"]["epoch_seconds"], t["epoch_floor_seconds"], t["embedkit_pca"]["epoch_seconds"]]
        bars = ax.bar(labels, vals, color=["#999999", "#1f77b4", "#1f77b4", "#dddddd", "#2ca02c"])
        for bar, key in zip(bars, ["reference", "embedkit", "embedkit_big_batch", None, "embedkit_pca"]):
            if key:
                ax.annotate(f"F1 {t[key]['macro_f1']:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("seconds / epoch")
        ax.set_title(f"One training epoch, {t['rows']} rows x {t['dims']['text'] + t['dims']['image']} features",
                     fontsize=10)
        save(fig, "train_speed.png")
    return written
