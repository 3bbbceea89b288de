"""`embedkit compare` on a generated task where the image carries the label and the text is noise.

Each case is a noisy grey picture; positives carry a faint bright disc somewhere (visible in about 4 of 5
positives), and the report is random words that say nothing about the label. A comparison should rank
every configuration that sees the image above the text-only one, with a paired interval that excludes 0,
and call the text-only configuration indistinguishable from chance.

    python examples/compare_synthetic.py --out runs/compare_synthetic [--n 300] [--seeds 3]

Writes the generated data under OUT/data, the comparison under OUT/compare, and copies compare.json to
benchmarks/results/compare/synthetic_image_signal.json with --save.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WORDS = ["routine", "review", "follow", "up", "cough", "pain", "chest", "fever", "history", "stable", "noted",
         "previous", "study", "compared", "clinic", "referral"]


def generate(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["id,image,report,label,patient"]
    for i in range(n):
        label = int(rng.random() < 0.5)
        img = Image.fromarray(rng.normal(90, 35, (128, 128)).clip(0, 255).astype(np.uint8))
        if label and rng.random() < 0.8:
            d = ImageDraw.Draw(img)
            cx, cy, r = rng.integers(30, 98), rng.integers(30, 98), int(rng.integers(10, 20))
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=int(rng.integers(150, 200)))
        img.filter(ImageFilter.GaussianBlur(1.5)).convert("RGB").save(root / "images" / f"c{i:04d}.jpg", quality=90)
        report = " ".join(rng.choice(WORDS, int(rng.integers(6, 14))))
        rows.append(f"c{i:04d},images/c{i:04d}.jpg,{report},{'yes' if label else 'no'},p{i // 2}")
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/compare_synthetic"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--save", action="store_true", help="copy compare.json into benchmarks/results/compare/")
    a = ap.parse_args()
    from embedkit.comparison import CompareConfig, compare
    from embedkit.items import SourceOptions

    data = generate(a.out / "data", a.n)
    src = SourceOptions(metadata=data / "cases.csv", id_col="id", image_col="image", text_col="report",
                        label_cols=["label"], group_col="patient")
    t0 = time.perf_counter()
    board = compare(data, a.out / "compare", CompareConfig(label="label", seeds=a.seeds), source=src)
    print(f"compare: {time.perf_counter() - t0:.0f} s")
    ok = board.set_index("config")
    text = ok.loc["minilm · text"]
    for name, r in ok.iterrows():
        if r["status"] == "ok" and r["image_model"] == r["image_model"] and r["fusion"] != "majority":
            print(f"{name}: macro-F1 {r['macro_f1']:.3f} [{r['macro_f1_low']:.3f}, {r['macro_f1_high']:.3f}]")
    print(f"text only: macro-F1 {text['macro_f1']:.3f}, {text['verdict']} than the best "
          f"({text['delta_vs_best']:+.3f} [{text['delta_low']:+.3f}, {text['delta_high']:+.3f}]), vs chance: "
          f"{text['vs_chance']}")
    if a.save:
        dest = Path("benchmarks/results/compare/synthetic_image_signal.json")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(a.out / "compare" / "compare.json", dest)
        print(f"saved {dest}")
    print(json.dumps(board.attrs["lines"], indent=1))


if __name__ == "__main__":
    main()
