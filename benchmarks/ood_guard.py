"""Which OOD score to ship: share of generated non-medical images flagged vs share of held-out real images.

    python benchmarks/ood_guard.py --data ../shared/data/vqa_rad --work /tmp/ood

In-distribution: the 314 labelled VQA-RAD images (EfficientNet-Lite0 through extract()), split by
image 60/20/20 (train / validation / held-out test), 5 random splits. Out of distribution: 140
generated images (RGB and grey noise, flat colours, rendered text in black on white and white on
black, gradients and checkerboards). A harder shift: the guard fitted on two body regions (e.g. head
+ chest) and shown the third. Every score is thresholded at a percentile (95 and 99) of the
validation rows' scores; goal: >= 80 % of generated images flagged, <= 20 % of held-out real ones.

Scores compared (the model's input space is the embedding itself for an image-only model):
  knn-rows       cosine distance to the nearest training row (OODGuard prototypes="rows")
  knn-centroids  cosine distance to the nearest k-means centre of >= 3 training rows (the default)
  mahalanobis    Mahalanobis distance on standardised features, Ledoit-Wolf shrunk covariance
Writes benchmarks/results/ood_guard.json.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from embedkit.extract import ExtractConfig, extract
from embedkit.fusion.ood import OODGuard
from embedkit.items import SourceOptions
from embedkit.store import load_embeddings


def generated_images(root: Path, seed: int = 0, size: int = 384) -> Path:
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = [("id", "image", "kind")]

    def add(im, name, kind):
        im.save(root / "img" / f"{name}.png")
        rows.append((name, f"img/{name}.png", kind))

    for i in range(25):
        add(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), f"noise_rgb{i}", "noise")
        grey = np.clip(rng.normal(128, 20 + 4 * i, (size, size)), 0, 255).astype(np.uint8)
        add(Image.fromarray(grey).convert("RGB"), f"noise_grey{i}", "noise")
    for i in range(30):
        colour = [(0, 0, 0), (255, 255, 255), (128, 128, 128)][i] if i < 3 else tuple(int(v) for v in
                                                                                      rng.integers(0, 256, 3))
        add(Image.new("RGB", (size, size), colour), f"flat{i}", "flat colour")
    words = ("the quick brown fox jumps over the lazy dog invoice total amount due meeting agenda lorem ipsum "
             "dolor sit amet").split()
    for i in range(30):
        bg, fg = ((255, 255, 255), (0, 0, 0)) if i % 2 == 0 else ((0, 0, 0), (255, 255, 255))
        im = Image.new("RGB", (size, size), bg)
        draw, px = ImageDraw.Draw(im), int(rng.integers(14, 40))
        font = ImageFont.load_default(size=px)
        for y in range(5, size - px, int(px * 1.4)):
            draw.text((5, y), " ".join(rng.choice(words, 6)), fill=fg, font=font)
        add(im, f"text{i}", "rendered text")
    for i in range(15):
        ramp = np.outer(np.linspace(0, 255, size) if i % 2 else np.full(size, 128.0), np.ones(size)).astype(np.uint8)
        add(Image.fromarray(np.stack([ramp, ramp.T, np.full_like(ramp, int(rng.integers(0, 256)))], -1)),
            f"gradient{i}", "pattern")
        k = int(rng.integers(8, 64))
        board = ((np.indices((size, size)) // k).sum(0) % 2 * 255).astype(np.uint8)
        add(Image.fromarray(board).convert("RGB"), f"checker{i}", "pattern")
    with open(root / "table.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root / "table.csv"


class Mahalanobis:
    def fit(self, x):
        from sklearn.covariance import LedoitWolf

        self.mean_, self.std_ = x.mean(0), x.std(0) + 1e-6
        self.lw_ = LedoitWolf().fit((x - self.mean_) / self.std_)
        return self

    def score(self, x):
        z = (x - self.mean_) / self.std_ - self.lw_.location_
        return np.sqrt(np.einsum("ij,jk,ik->i", z, self.lw_.precision_, z))


def scores(train, val, method: str, seed: int):
    if method == "mahalanobis":
        m = Mahalanobis().fit(train)
        return m.score, m.score(val)
    g = OODGuard(prototypes="rows" if method == "knn-rows" else "centroids", random_state=seed)
    g.fit({"image": train}, {"image": val})
    return (lambda q: g.distance("image", q)), g.distance("image", val)


def evaluate(x, organ, ood, splits: int, held_out: str | None = None) -> dict:
    rng = np.random.default_rng(0)
    out: dict = {}
    pool = np.flatnonzero(organ != held_out) if held_out else np.arange(len(x))
    shifted = x[organ == held_out] if held_out else ood
    for s in range(splits):
        perm = rng.permutation(pool)
        n = len(perm)
        tr, va, te = perm[:int(0.6 * n)], perm[int(0.6 * n):int(0.8 * n)], perm[int(0.8 * n):]
        for method in ("knn-rows", "knn-centroids", "mahalanobis"):
            f, val = scores(x[tr], x[va], method, s)
            for pct in (95, 99):
                t = np.percentile(val, pct)
                cell = out.setdefault(method, {}).setdefault(f"p{pct}", {"test": [], "shifted": []})
                cell["test"].append(float((f(x[te]) > t).mean()))
                cell["shifted"].append(float((f(shifted) > t).mean()))
    for method in out.values():
        for pct, cell in method.items():
            method[pct] = {k: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4)}
                           for k, v in cell.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa_rad")
    ap.add_argument("--work", type=Path, default=Path("/tmp/embedkit_ood"))
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ood_guard.json")
    args = ap.parse_args()
    organ = {}
    for name in ("trainset.json", "testset.json"):
        for r in json.loads((args.data / name).read_text()):
            organ[r["image_name"]] = r["image_organ"].strip()
    (args.work).mkdir(parents=True, exist_ok=True)
    with open(args.work / "real.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("id", "image", "organ")] + [(Path(k).stem, f"images/{k}", v)
                                                               for k, v in sorted(organ.items())])
    cfg = ExtractConfig(text_model=None, progress=False)
    extract(args.data, args.work / "real_emb", cfg,
            source=SourceOptions(metadata=args.work / "real.csv", id_col="id", image_col="image",
                                 label_cols=["organ"]))
    table = generated_images(args.work / "generated")
    extract(args.work / "generated", args.work / "gen_emb", cfg,
            source=SourceOptions(metadata=table, id_col="id", image_col="image", label_cols=["kind"]))
    real = load_embeddings(args.work / "real_emb")
    gen = load_embeddings(args.work / "gen_emb")
    x, org = real.embeddings["image"], np.asarray(real.columns["organ"], dtype=object)
    result = {"real_images": int(len(x)), "generated_images": int(len(gen.ids)), "splits": args.splits,
              "generated_kinds": {k: int(v) for k, v in zip(*np.unique(gen.columns["kind"], return_counts=True))},
              "generated_vs_real": evaluate(x, org, gen.embeddings["image"], args.splits),
              "held_out_region": {r: evaluate(x, org, None, args.splits, held_out=r) for r in ("ABD", "CHEST", "HEAD")},
              "goal": ">= 0.80 of generated images flagged, <= 0.20 of held-out real images"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, block in (("generated", result["generated_vs_real"]),
                        *((f"held-out {r}", v) for r, v in result["held_out_region"].items())):
        for method, pcts in block.items():
            print(name, method, {p: (c["test"]["mean"], c["shifted"]["mean"]) for p, c in pcts.items()})


if __name__ == "__main__":
    main()
