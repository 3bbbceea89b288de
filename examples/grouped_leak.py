"""Why grouped splits matter: 150 patients x 3 near-identical images, labels random per patient.

    python examples/grouped_leak.py --out runs/grouped_leak

The honest accuracy is 0.5: a patient's label is a coin flip that no image can predict. Each
patient has three images that differ only by a little pixel noise (say, three views taken
seconds apart). The images are embedded with the offline EfficientNet-Lite0 through
`embedkit extract --group-col patient`, then one image-only classifier is trained twice:
  --no-groups  rows treated as independent: a patient's other images sit in training, and the
               model recognises the patient, not the disease;
  (default)    grouped by patient: no patient on both sides of any split.
Test accuracy and macro-F1 over 5 seeds, with the bootstrap interval of run 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from embedkit.extract import ExtractConfig, extract
from embedkit.items import SourceOptions
from embedkit.train import TrainConfig, train


def make_data(root: Path, patients: int = 150, views: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["id,image,patient,label"]
    for p in range(patients):
        base = rng.integers(0, 255, (12, 12, 3)).astype(np.float32)  # a patient's own anatomy
        label = int(rng.integers(0, 2))  # a coin flip: nothing in the image predicts it
        for v in range(views):
            pixels = np.clip(np.kron(base, np.ones((16, 16, 1))) + rng.normal(0, 6, (192, 192, 3)), 0, 255)
            name = f"p{p:03d}_v{v}"
            Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / f"{name}.jpg", quality=92)
            lines.append(f"{name},images/{name}.jpg,pt{p:03d},{label}")
    (root / "table.csv").write_text("\n".join(lines) + "\n")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/grouped_leak"))
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    data = make_data(args.out / "data")
    emb = args.out / "emb"
    extract(data, emb, ExtractConfig(text_model=None, progress=False),
            source=SourceOptions(metadata=data / "table.csv", id_col="id", image_col="image", label_cols=["label"],
                                 group_col="patient"))
    rows = {}
    for name, kw in (("rows independent (--no-groups)", dict(groups=False)), ("grouped by patient", {})):
        m = train(emb, args.out / name.split()[0], TrainConfig(labels=["label"], fusion="image", seeds=args.seeds,
                                                               **kw))
        s, b = m["spread"]["test"], m["bootstrap"]["metrics"]
        rows[name] = {k: {"mean": s[k]["mean"], "std": s[k]["std"], "run0": m["test"][k],
                          "bootstrap": [b[k]["low"], b[k]["high"]]} for k in ("accuracy", "macro_f1")}
        rows[name]["unit"] = m["bootstrap"]["unit"]
    lines = ["150 patients x 3 near-identical images, label random per patient (honest accuracy 0.5); image-only "
             f"classifier, {args.seeds} seeds", "", "| split | accuracy | macro-F1 | run 0 accuracy [95% bootstrap] |",
             "|---|---|---|---|"]
    for name, r in rows.items():
        a, f = r["accuracy"], r["macro_f1"]
        lines.append(f"| {name} | {a['mean']:.3f} ± {a['std']:.3f} | {f['mean']:.3f} ± {f['std']:.3f} | "
                     f"{a['run0']:.3f} [{a['bootstrap'][0]:.3f}, {a['bootstrap'][1]:.3f}] by {r['unit']} |")
    text = "\n".join(lines)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
