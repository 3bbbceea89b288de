"""Data efficiency: one shared image+text encoder vs separate encoders with the same budget.

Roy et al. (REFERENCE.md section 2) report that sharing the transformer helps, and the more so
the fewer training pairs. This trains both from scratch on VQA-RAD (radiology image + a
clinician's question as the text) at 10/25/50/100 % of the training pairs, several seeds, and
reports zero-shot retrieval on held-out images.

Design, so the comparison is honest:
- Hold out by IMAGE (seeded per run seed): no image is in both training and evaluation. The
  official VQA-RAD train/test split shares 203 images, so it is not used.
- Evaluation: one question per held-out image (seeded), so every candidate is a distinct image
  and chance R@k = k / n_eval. Questions are weak captions (several per image, many generic,
  "Is this image normal?"), so expect low absolute numbers.
- Subsets are nested (10 % is inside 25 % ...) and identical for both models within a seed.
- Equal compute per run: a fraction f trains round(epochs / f) epochs, so every run takes the
  same number of optimizer steps and only the amount of data differs (--same-epochs turns it off).
- The separate baseline comes from matched_separate_config: total parameters within 5 % by
  default; --match non_embedding leaves the 30522-row token table out of the budget (with
  total matching the table dominates a small model and the baseline keeps nearly full width in
  both stacks, i.e. about twice the transformer parameters).

    python examples/shared_vs_separate.py                      # defaults: < ~10 min on 2 cores
    python examples/shared_vs_separate.py --epochs 2 --seeds 2 # a quicker look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from embedkit.encoders.preprocess import preprocess_images
from embedkit.items import Item
from embedkit.shared_encoder import (
    SharedEncoderConfig,
    SharedEncoderRunner,
    count_parameters,
    matched_separate_config,
    pretrain,
    retrieval_metrics,
)
from embedkit.shared_encoder.pretrain_config import PretrainConfig, PretrainSettings
from embedkit.shared_encoder.runner import load_tokenizer

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vqa_rad"
KEYS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]


def load_vqa_rad(folder: Path) -> list[Item]:
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


def split(items: list[Item], eval_fraction: float, seed: int):
    """-> (training pairs in a seeded order, one eval pair per held-out image)."""
    rng = np.random.default_rng(seed)
    images = sorted({str(i.image_path) for i in items})
    held = set(rng.permutation(images)[: round(eval_fraction * len(images))].tolist())
    train = [i for i in items if str(i.image_path) not in held]
    train = [train[k] for k in rng.permutation(len(train))]  # prefixes of this order are the nested subsets
    by_image: dict[str, list[Item]] = {}
    for i in items:
        if str(i.image_path) in held:
            by_image.setdefault(str(i.image_path), []).append(i)
    evals = [group[rng.integers(len(group))] for _, group in sorted(by_image.items())]
    return train, evals


def evaluate(folder: Path, evals: list[Item], pixels_cache: dict) -> dict:
    runner = SharedEncoderRunner(folder)
    key = runner.cfg.image_size
    if key not in pixels_cache:  # both models see the same pixels: decode once per image size
        pixels_cache[key] = torch.from_numpy(preprocess_images([i.image_path for i in evals], runner.preprocess))
    img = runner.embed_images(pixels_cache[key])
    txt, _ = runner.embed_texts([i.text for i in evals])
    return retrieval_metrics(img, txt)


def fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="VQA-RAD folder (trainset.json, testset.json, images/)")
    ap.add_argument("--fractions", default="0.1,0.25,0.5,1.0", help="comma-separated fractions of the training pairs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="epochs at 100 %%; a fraction f trains epochs/f (equal steps)")
    ap.add_argument("--same-epochs", action="store_true", help="train every fraction for --epochs (fewer steps on less data)")
    ap.add_argument("--eval-fraction", type=float, default=0.2, help="share of IMAGES held out for evaluation")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--match", choices=["total", "non_embedding"], default="total",
                    help="parameter budget the separate baseline matches: all parameters, or all but the token table")
    # One thread by default: these models are small, and on 2 busy cores OpenMP threads spin-waiting
    # for each other made runs ~10x slower here. Pass --threads 2 on an otherwise idle machine.
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("runs/shared_vs_separate"))
    args = ap.parse_args()
    if not (args.data / "trainset.json").is_file():
        sys.exit(f"VQA-RAD not found at {args.data}: pass --data")
    if args.threads:
        torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",")]

    items = load_vqa_rad(args.data)
    shared = SharedEncoderConfig(
        width=args.width, depth=args.depth, heads=4, image_size=args.image_size, patch_size=args.patch_size,
        max_text_len=32, embed_dim=128, vocab_size=len(load_tokenizer("minilm")),  # questions are ~7 words
    )
    models = {"shared": shared, "separate": matched_separate_config(shared, args.match == "non_embedding")}
    params = {name: count_parameters(cfg) for name, cfg in models.items()}
    print(
        f"{len(items)} pairs, {len({str(i.image_path) for i in items})} images; "
        + ", ".join(f"{n}: width {c.width} depth {c.depth}, {params[n] / 1e6:.2f} M params" for n, c in models.items()),
        file=sys.stderr,
    )

    runs, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            train, evals = split(items, args.eval_fraction, seed)
            pixels_cache: dict = {}
            for frac in fractions:
                subset = train[: max(2, round(frac * len(train)))]
                epochs = args.epochs if args.same_epochs else max(1, round(args.epochs / frac))
                for name, cfg in models.items():
                    folder = Path(tmp) / f"{name}-{seed}-{frac}"
                    settings = PretrainSettings(epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                                                val_fraction=0.0, save_every=epochs)
                    m = pretrain(subset, folder, PretrainConfig(model=cfg, train=settings), resume=False, progress=False)
                    r = evaluate(folder, evals, pixels_cache)
                    runs.append({
                        "seed": seed, "fraction": frac, "model": name, "n_train_pairs": len(subset),
                        "n_eval": r["n"], "epochs": epochs, "final_train_loss": m["train_loss"][-1],
                        "train_s": m["timings"]["train_s"], **{k: r[k] for k in KEYS},
                    })
                    print(
                        f"seed {seed} frac {frac:.2f} {name:8s} pairs {len(subset):5d} loss {m['train_loss'][-1]:.3f} "
                        + " ".join(f"{k} {r[k]:.3f}" for k in KEYS) + f"  [{time.perf_counter() - t0:.0f} s]",
                        file=sys.stderr,
                    )

    # Aggregate: mean ± std over seeds, and the paired difference shared - separate.
    table, summary = [], []
    n_eval = runs[0]["n_eval"]
    header = "| fraction | train pairs (mean) | model | " + " | ".join(KEYS) + " |"
    table += [header, "|" + "---|" * (3 + len(KEYS))]
    for frac in fractions:
        for name in models:
            rs = [r for r in runs if r["fraction"] == frac and r["model"] == name]
            row = {"fraction": frac, "model": name, "n_train_pairs": round(np.mean([r["n_train_pairs"] for r in rs]))}
            row.update({k: {"mean": float(np.mean([r[k] for r in rs])), "std": float(np.std([r[k] for r in rs]))} for k in KEYS})
            summary.append(row)
            table.append(f"| {frac:g} | {row['n_train_pairs']} | {name} | " + " | ".join(fmt([r[k] for r in rs]) for k in KEYS) + " |")
    diffs = []
    for frac in fractions:
        d = [
            np.mean([a[k] - b[k] for k in ("i2t_R@1", "t2i_R@1")])
            for a in runs if a["fraction"] == frac and a["model"] == "shared"
            for b in runs if b["fraction"] == frac and b["model"] == "separate" and b["seed"] == a["seed"]
        ]
        diffs.append(f"{frac:g}: {fmt(d)}")
    chance = ", ".join(f"R@{k} {k / n_eval:.3f}" for k in (1, 5, 10))
    text = "\n".join(
        [
            f"Zero-shot retrieval on {n_eval} held-out VQA-RAD images (one question each), mean ± std over "
            f"{args.seeds} seeds; chance: {chance}.",
            f"Models: shared width {shared.width} depth {shared.depth} ({params['shared'] / 1e6:.2f} M params), "
            f"separate width {models['separate'].width} depth {models['separate'].depth} ({params['separate'] / 1e6:.2f} M); "
            f"budget matched on {args.match} parameters; {args.epochs} epochs at 100 % ({'same epochs' if args.same_epochs else 'equal steps'} per fraction), "
            f"{args.image_size} px, patch {args.patch_size}.",
            "",
            *table,
            "",
            "Paired difference shared - separate in mean R@1 of both directions, per fraction: " + "; ".join(diffs),
            f"Total time {time.perf_counter() - t0:.0f} s.",
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "params": params, "runs": runs, "summary": summary}, indent=2) + "\n")
    print(text)
    print(f"\nwritten: {args.out / 'results.md'}, {args.out / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
