"""Roy et al.'s low-data experiment at laptop scale, for every preset of the shared-encoder family.

Roy et al. (REFERENCE.md section 2) report that sharing one transformer between images and text
beats separate encoders, the more so the fewer training pairs. This trains each preset
(`embedkit pretrain --preset NAME`: shared-encoder, separate, ms-clip, ...) from scratch on VQA-RAD
(a radiology image + a clinician's question as its text) at 10/25/50/100 % of the training pairs,
several seeds, and reports zero-shot retrieval on held-out images, time and peak memory per run.

Design, so the comparison is honest:
- Hold out by IMAGE (seeded per run seed): no image is in both training and evaluation. The
  official VQA-RAD train/test split shares 203 images, so it is not used.
- Evaluation: one question per held-out image (seeded), so every candidate is a distinct image
  and chance R@k = k / n_eval. Questions are weak captions (several per image, many generic,
  "Is this image normal?"), so expect low absolute numbers.
- Subsets are nested (10 % is inside 25 % ...) and identical for every preset within a seed.
- Equal compute per run: a fraction f trains round(epochs / f) epochs, so every run takes the
  same number of optimizer steps and only the amount of data differs (--same-epochs turns it off).
- Every preset gets the same --set overrides (sizes, schedule); `separate` sizes itself to the
  shared model's parameter budget, as `embedkit pretrain --preset separate` does.
- Each run is its own process, so its peak memory (max RSS) is its own.

    python examples/shared_family.py --workers 2                       # ~25 min on 2 cores
    python examples/shared_family.py --seeds 1 --fractions 0.25,1.0    # a quicker look
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vqa_rad"
KEYS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
# Every preset runs at its own (shipped) sizes; the script holds images out itself, so pretrain does not.
DEFAULT_SETS = ["val_fraction=0"]


def load_vqa_rad(folder: Path):
    from embedkit.items import Item

    rows = []
    for name in ("trainset.json", "testset.json"):
        rows += json.loads((folder / name).read_text())
    items = [
        Item(id=f"q{r['qid']}", image_path=folder / "images" / r["image_name"], text=r["question"])
        for r in rows
        if (folder / "images" / r["image_name"]).is_file()
    ]
    if len(items) < len(rows):
        print(f"note: {len(rows) - len(items)} rows name a missing image and are left out", file=sys.stderr)
    return items


def split(items, eval_fraction: float, seed: int):
    """-> (training pairs in a seeded order, one eval pair per held-out image)."""
    rng = np.random.default_rng(seed)
    images = sorted({str(i.image_path) for i in items})
    held = set(rng.permutation(images)[: round(eval_fraction * len(images))].tolist())
    train = [i for i in items if str(i.image_path) not in held]
    train = [train[k] for k in rng.permutation(len(train))]  # prefixes of this order are the nested subsets
    by_image: dict[str, list] = {}
    for i in items:
        if str(i.image_path) in held:
            by_image.setdefault(str(i.image_path), []).append(i)
    evals = [group[rng.integers(len(group))] for _, group in sorted(by_image.items())]
    return train, evals


def one_run(job: dict) -> dict:
    """Pretrain one preset on one subset and score it on the held-out images (runs in a fresh process)."""
    import torch

    from embedkit.encoders.preprocess import preprocess_images
    from embedkit.shared_encoder import SharedEncoderRunner, count_parameters, pretrain, retrieval_metrics
    from embedkit.shared_encoder.pretrain_config import resolve_pretrain_config

    torch.set_num_threads(job["threads"])
    recipe = resolve_pretrain_config(job["preset"], sets=job["sets"])
    t0 = time.perf_counter()
    m = pretrain(job["train"], job["folder"], recipe, resume=False, progress=False)
    seconds = time.perf_counter() - t0
    runner = SharedEncoderRunner(job["folder"])
    evals = job["evals"]
    img = runner.embed_images(torch.from_numpy(preprocess_images([i.image_path for i in evals], runner.preprocess)))
    txt, _ = runner.embed_texts([i.text for i in evals])
    r = retrieval_metrics(img, txt)
    folder_mb = sum(p.stat().st_size for p in Path(job["folder"]).rglob("*") if p.is_file()) / 2**20
    return {
        "n_eval": r["n"], **{k: r[k] for k in KEYS},
        "final_train_loss": m["train_loss"][-1], "train_s": m["timings"]["train_s"], "run_s": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params": count_parameters(runner.cfg), "width": runner.cfg.width, "depth": runner.cfg.depth,
        "model_mb": round(folder_mb, 2), "collapse": m.get("collapse"),
    }


def fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="VQA-RAD folder (trainset.json, testset.json, images/)")
    ap.add_argument("--presets", default="shared-encoder,separate,ms-clip", help="comma-separated preset names")
    ap.add_argument("--fractions", default="0.1,0.25,0.5,1.0", help="comma-separated fractions of the training pairs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20, help="epochs at 100 %% (the presets' own); a fraction f trains "
                    "epochs/f (equal steps)")
    ap.add_argument("--same-epochs", action="store_true", help="train every fraction for --epochs (fewer steps on less data)")
    ap.add_argument("--eval-fraction", type=float, default=0.2, help="share of IMAGES held out for evaluation")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override for every preset, after the defaults {' '.join(DEFAULT_SETS)}")
    # One thread by default: these models are small, and on 2 busy cores OpenMP threads spin-waiting
    # for each other made runs ~10x slower here. Pass --threads 2 on an otherwise idle machine.
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process (cores / threads)")
    ap.add_argument("--out", type=Path, default=Path("runs/shared_family"))
    args = ap.parse_args()
    if not (args.data / "trainset.json").is_file():
        sys.exit(f"VQA-RAD not found at {args.data}: pass --data")
    presets = args.presets.split(",")
    fractions = [float(f) for f in args.fractions.split(",")]
    items = load_vqa_rad(args.data)
    print(f"{len(items)} pairs, {len({str(i.image_path) for i in items})} images; presets {', '.join(presets)}",
          file=sys.stderr)

    runs, t0 = [], time.perf_counter()
    # A fresh process per run (max_tasks_per_child=1): each run's peak memory is its own.
    pool = ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn"), max_tasks_per_child=1)
    with tempfile.TemporaryDirectory() as tmp, pool:
        submitted = []
        for seed in range(args.seeds):
            train, evals = split(items, args.eval_fraction, seed)
            for frac in fractions:
                subset = train[: max(2, round(frac * len(train)))]
                epochs = args.epochs if args.same_epochs else max(1, round(args.epochs / frac))
                for preset in presets:
                    sets = [*DEFAULT_SETS, *args.sets, f"epochs={epochs}", f"seed={seed}", f"save_every={epochs}"]
                    job = {"preset": preset, "sets": sets, "train": subset, "evals": evals, "threads": args.threads,
                           "folder": str(Path(tmp) / f"{preset}-{seed}-{frac}")}
                    key = {"seed": seed, "fraction": frac, "preset": preset, "n_train_pairs": len(subset),
                           "epochs": epochs}
                    submitted.append((key, pool.submit(one_run, job)))
        for key, future in submitted:
            r = future.result()
            runs.append({**key, **r})
            print(f"seed {key['seed']} frac {key['fraction']:.2f} {key['preset']:14s} pairs {key['n_train_pairs']:5d} "
                  f"loss {r['final_train_loss']:.3f} " + " ".join(f"{k} {r[k]:.3f}" for k in KEYS)
                  + f" {r['run_s']:.0f} s {r['peak_rss_mb']:.0f} MB  [{time.perf_counter() - t0:.0f} s]",
                  file=sys.stderr)
    text, summary = summarise(runs, presets, fractions, args, time.perf_counter() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "default_sets": DEFAULT_SETS, "runs": runs,
                                                        "summary": summary, "table": text}, indent=2, default=str) + "\n")
    print(text)
    print(f"\nwritten: {args.out / 'results.md'}, {args.out / 'results.json'}", file=sys.stderr)


def summarise(runs: list[dict], presets: list[str], fractions: list[float], args, total_s: float):
    """Mean ± std over seeds per (fraction, preset); paired differences against the first preset."""
    table, summary = [], []
    n_eval = runs[0]["n_eval"]
    table += ["| fraction | train pairs | preset | params (M) | " + " | ".join(KEYS) + " | s/run | peak MB |",
              "|" + "---|" * (6 + len(KEYS))]
    for frac in fractions:
        for preset in presets:
            rs = [r for r in runs if r["fraction"] == frac and r["preset"] == preset]
            row = {"fraction": frac, "preset": preset, "n_train_pairs": round(np.mean([r["n_train_pairs"] for r in rs])),
                   "params": rs[0]["params"], "run_s": float(np.mean([r["run_s"] for r in rs])),
                   "peak_rss_mb": float(np.max([r["peak_rss_mb"] for r in rs]))}
            row.update({k: {"mean": float(np.mean([r[k] for r in rs])), "std": float(np.std([r[k] for r in rs]))}
                        for k in KEYS})
            summary.append(row)
            table.append(f"| {frac:g} | {row['n_train_pairs']} | {preset} | {row['params'] / 1e6:.2f} | "
                         + " | ".join(fmt([r[k] for r in rs]) for k in KEYS)
                         + f" | {row['run_s']:.0f} | {row['peak_rss_mb']:.0f} |")
    base, diffs = presets[0], []
    for other in presets[1:]:
        per_frac = []
        for frac in fractions:
            d = [np.mean([a[k] - b[k] for k in ("i2t_R@1", "t2i_R@1")])
                 for a in runs if a["fraction"] == frac and a["preset"] == base
                 for b in runs if b["fraction"] == frac and b["preset"] == other and b["seed"] == a["seed"]]
            per_frac.append(f"{frac:g}: {fmt(d)}")
        diffs.append(f"{base} - {other}: " + "; ".join(per_frac))
    chance = ", ".join(f"R@{k} {k / n_eval:.3f}" for k in (1, 5, 10))
    text = "\n".join([
        f"Zero-shot retrieval on {n_eval} held-out VQA-RAD images (one question each), mean ± std over "
        f"{args.seeds} seed(s); chance: {chance}.",
        f"Every preset with {' '.join(DEFAULT_SETS + args.sets)}; {args.epochs} epochs at 100 % "
        f"({'same epochs' if args.same_epochs else 'equal steps'} per fraction); {args.threads} thread(s) per run; "
        "peak MB = max RSS of the run's own process.",
        "",
        *table,
        "",
        "Paired difference in mean R@1 of both directions, per fraction: " + " | ".join(diffs),
        f"Total time {total_s:.0f} s.",
    ])
    return text, summary


if __name__ == "__main__":
    main()
