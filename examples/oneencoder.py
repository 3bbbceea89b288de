"""OneEncoder on VQA-RAD: the universal projection (`project --arch up`) vs one linear head per modality.

    python examples/oneencoder.py --seeds 3

Frozen offline encoders (EfficientNet-Lite0 images, MiniLM questions), extracted once through the shipped
data manifest (reused when --emb exists). Each arch and seed runs `project_embeddings` as the CLI does:
fitted on training-split questions whose image has no test question, with a grouped (by image) held-out
share of them. Reported, both ways (image->question, question->image), recall@1/5/10:
  held-out   the fit's held-out images (one question per image), never fitted on
  test       the official test split (one question per image), never fitted on
Mean ± std over seeds, and the seconds of each `project` run. JSON goes to OUT/oneencoder.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from embedkit.shared_encoder.project import project_embeddings
from embedkit.shared_encoder.retrieval import retrieval_metrics
from embedkit.store import load_embeddings

ARCHS = ("linear", "up")
KEYS = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


def test_retrieval(projected: Path) -> dict:
    """Official test rows, the first question of each image: retrieval among distinct images."""
    es = load_embeddings(projected, modalities=["image", "text"])
    split, group = es.columns["split"], es.columns["group"]
    _, first = np.unique(group, return_index=True)
    rows = np.array(sorted(i for i in first if split[i] == "test"))
    return retrieval_metrics(es.embeddings["image"][rows], es.embeddings["text"][rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa_rad")
    ap.add_argument("--emb", type=Path, default=Path("runs/vqa_emb"))
    ap.add_argument("--out", type=Path, default=Path("runs/oneencoder"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 was fastest on a busy 2-core machine)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if not args.emb.exists():
        from embedkit.extract import ExtractConfig, extract
        from embedkit.manifests import find_manifest

        manifest = find_manifest("vqa_rad")
        extract(args.data, args.emb, ExtractConfig(), source=manifest.source_options(), rows=manifest.load_rows(args.data))
    runs = []
    for arch in ARCHS:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            r = project_embeddings(args.emb, args.out / f"{arch}_seed{seed}", arch=arch, seed=seed, epochs=args.epochs)
            seconds = time.perf_counter() - t0
            fit = r["fit"]
            runs.append({"arch": arch, "seed": seed, "seconds": round(seconds, 2), "fit_seconds": fit["seconds"],
                         "n_train": fit["n_train"], "n_val": fit["n_val"],
                         "held_out": fit.get("val_retrieval_distinct", fit["val_retrieval"]),
                         "test": test_retrieval(args.out / f"{arch}_seed{seed}"), "config": fit["config"],
                         # runs share one process: its peak so far bounds this run's (linear runs first)
                         "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
            print(f"{arch} seed {seed}: {seconds:.1f} s", flush=True)

    lines = [f"VQA-RAD closed questions, frozen EfficientNet-Lite0 + MiniLM, {args.seeds} seeds, {args.epochs} epochs; "
             f"retrieval among distinct images (one question per image), mean ± std; peak MB: the process's maximum "
             f"resident set after the arch's runs (one process, linear first)", "",
             "| arch | rows | " + " | ".join(KEYS) + " | seconds | peak MB |", "|---|---|" + "---|" * (len(KEYS) + 2)]
    for arch in ARCHS:
        mine = [r for r in runs if r["arch"] == arch]
        for where in ("held_out", "test"):
            cells = [f"{np.mean([r[where][k] for r in mine]):.3f} ± {np.std([r[where][k] for r in mine]):.3f}"
                     for k in KEYS]
            n = sorted({r[where]["n"] for r in mine})  # held-out images differ by seed
            lines.append(f"| {arch} | {where} (n {'/'.join(map(str, n))}, chance R@1 {1 / n[0]:.3f}) | " +
                         " | ".join(cells) +
                         f" | {np.mean([r['seconds'] for r in mine]):.1f} | {max(r['peak_rss_mb'] for r in mine)} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "oneencoder.json").write_text(json.dumps({"runs": runs, "table": table}, indent=2, default=str))


if __name__ == "__main__":
    main()
