"""MoMo on unpaired data: does a clinic's pile of never-paired images and reports help a shared encoder?

VQA-RAD (radiology image + a clinician's question as the text). Of the training images, only a
share (default 25 %) keep their questions as pairs; the other images and all of their questions
are given as unpaired items (images without a text, texts without an image). Two runs of the momo
recipe (images -> unpaired images + texts -> pairs), identical but for the unpaired items:
  with     the pairs + the unpaired images and texts
  without  the pairs only (the image and unpaired stages then see the pairs' own halves)
Design, so the comparison is honest:
- Evaluation on held-out IMAGES (seeded, default 20 %), one question per image, so every candidate is
  a distinct image (chance R@1 = 1/n). Every question of a held-out image is passed as a held-back
  row: no unpaired text repeating one (many questions are generic) reaches training.
- Equal settings and seeds; pretrain's own held-out split is switched off (val_fraction 0) so both
  runs train on exactly the same pairs.
- Time per run is the wall clock of pretrain (decode included); peak memory is the process's
  maximum resident set so far (runs are sequential, so the second figure bounds both).

    python examples/momo_unpaired.py                        # a few minutes per run on 2 busy cores
    python examples/momo_unpaired.py --pair-epochs 4 --seeds 1
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from embedkit.encoders.preprocess import preprocess_images
from embedkit.items import Item
from embedkit.shared_encoder import SharedEncoderRunner, pretrain, retrieval_metrics
from embedkit.shared_encoder.pretrain_config import load_preset
from embedkit.shared_encoder.unpaired import Unpaired

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vqa_rad"
KEYS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]


def load_rows(folder: Path) -> list[dict]:
    rows = json.loads((folder / "trainset.json").read_text()) + json.loads((folder / "testset.json").read_text())
    return [r for r in rows if (folder / "images" / r["image_name"]).is_file()]


def build(rows: list[dict], folder: Path, paired_fraction: float, eval_fraction: float, seed: int):
    """-> (pairs, unpaired items, held-back rows, one eval pair per held-out image)."""
    rng = np.random.default_rng(seed)
    images = rng.permutation(sorted({r["image_name"] for r in rows})).tolist()
    n_eval = round(eval_fraction * len(images))
    held, train_images = set(images[:n_eval]), images[n_eval:]
    paired = set(train_images[: round(paired_fraction * len(train_images))])
    path = {name: folder / "images" / name for name in images}
    pairs, lone, held_back, by_image = [], [], [], {}
    for r in rows:
        name, q = r["image_name"], f"q{r['qid']}"
        if name in held:
            held_back.append(Item(id=q, image_path=path[name], text=r["question"], split="test"))
            by_image.setdefault(name, []).append(held_back[-1])
        elif name in paired:
            pairs.append(Item(id=q, image_path=path[name], text=r["question"], group=name))
        else:
            lone.append(Item(id=q, text=r["question"]))
    lone += [Item(id=f"img:{name}", image_path=path[name]) for name in train_images if name not in paired]
    evals = [group[rng.integers(len(group))] for _, group in sorted(by_image.items())]
    return pairs, lone, held_back, evals


def evaluate(out: Path, evals: list[Item]) -> dict:
    runner = SharedEncoderRunner(out)
    img = runner.embed_images(torch.from_numpy(preprocess_images([i.image_path for i in evals], runner.preprocess)))
    txt, _ = runner.embed_texts([i.text for i in evals])
    return retrieval_metrics(img, txt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("runs/momo_unpaired"))
    ap.add_argument("--paired-fraction", type=float, default=0.25, help="share of training images kept as pairs")
    ap.add_argument("--eval-fraction", type=float, default=0.2, help="share of images held out for evaluation")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--image-epochs", type=int, help="default: the momo preset's")
    ap.add_argument("--unpaired-epochs", type=int, help="default: the momo preset's")
    ap.add_argument("--pair-epochs", type=int, help="default: the momo preset's")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small models: 1 is fastest on busy cores)")
    args = ap.parse_args()
    if not (args.data / "trainset.json").is_file():
        sys.exit(f"VQA-RAD not found at {args.data}: pass --data")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(args.data)

    base = load_preset("momo")
    epochs = (args.image_epochs, args.unpaired_epochs, args.pair_epochs)
    recipe = replace(  # the preset as shipped, but for the epochs asked for
        base,
        train=replace(base.train, val_fraction=0.0),
        stages=[s if e is None else replace(s, epochs=e) for s, e in zip(base.stages, epochs)],
    )
    results = []
    for seed in range(args.seeds):
        pairs, lone, held_back, evals = build(rows, args.data, args.paired_fraction, args.eval_fraction, seed)
        print(f"seed {seed}: {len(pairs)} pairs, {sum(i.image_path is not None for i in lone)} unpaired images, "
              f"{sum(i.image_path is None for i in lone)} unpaired texts, {len(evals)} held-out images", file=sys.stderr)
        for name, items in (("with unpaired", lone), ("without", [])):
            out = args.out / f"seed{seed}_{name.split()[0]}"
            run = replace(recipe, train=replace(recipe.train, seed=seed))
            t0 = time.perf_counter()
            m = pretrain(pairs, out, run, resume=False, progress=False, unpaired=Unpaired(items, held_back))
            seconds = time.perf_counter() - t0
            r = evaluate(out, evals)
            results.append({"seed": seed, "run": name, "seconds": round(seconds, 1),
                            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                            "stages": m["stages"], "unpaired": m.get("unpaired"),
                            "final_train_loss": m["train_loss"][-1], **{k: r[k] for k in KEYS},
                            "n_eval": r["n"], "chance_R@1": r["chance_R@1"]})
            print(json.dumps({k: results[-1][k] for k in ("seed", "run", "seconds", *KEYS)}), file=sys.stderr)
    table = summary_table(results, recipe)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "recipe": recipe.to_dict(), "runs": results, "table": table},
                                                      indent=2))
    print(table)


def summary_table(results: list[dict], recipe) -> str:
    """Mean ± std over seeds per run kind, with the items each stage used (seed 0) and time and memory."""
    lines = ["| run | seeds | pairs / unpaired images / unpaired texts | " + " | ".join(KEYS) + " | s/run | peak MB |",
             "|---|---|---|" + "---|" * (len(KEYS) + 2)]
    for name in ("with unpaired", "without"):
        rs = [r for r in results if r["run"] == name]
        u = rs[0]["unpaired"] or {}
        used = f"{rs[0]['stages'][-1]['pairs']} / {u.get('used_images', 0)} / {u.get('used_texts', 0)}"
        cells = [f"{np.mean([r[k] for r in rs]):.3f} ± {np.std([r[k] for r in rs]):.3f}" for k in KEYS]
        lines.append(f"| {name} | {len(rs)} | {used} | " + " | ".join(cells)
                     + f" | {np.mean([r['seconds'] for r in rs]):.0f} | {max(r['peak_rss_mb'] for r in rs)} |")
    n, chance = results[0]["n_eval"], results[0]["chance_R@1"]
    stages = " -> ".join(f"{s.name} {s.epochs} ep ({'+'.join(s.objectives)})" for s in recipe.stages)
    return (f"momo preset as shipped ({stages}); {n} held-out images, one question each (chance R@1 {chance:.3f}, "
            f"R@10 {10 * chance:.3f}); pairs / unpaired counts of seed 0.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
