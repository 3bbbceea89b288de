"""VQA-RAD end to end: closed clinician questions about radiology images, image + question -> yes/no.

    python examples/vqa_rad.py --data ../shared/data/vqa_rad --out runs/vqa_rad --seeds 5

Extracts with the offline default encoders (EfficientNet-Lite0 images, MiniLM questions) through the
shipped data manifest (rows grouped by image_name), then trains every fusion three ways and prints
test macro-F1 as mean +- std over seeds with the saved model's bootstrap interval:
  rows      the official train/test files, rows treated as independent (--no-groups): the old default;
            the same image is asked about in train and test questions, so this is optimistic
  official  the official files, grouped: test stays test, training questions about a test image are
            left out (purged), validation carved out of train by image
  grouped   a fresh stratified split by image (--no-data-split), 70/15/15, seeded
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from embedkit.extract import ExtractConfig, extract
from embedkit.manifests import find_manifest
from embedkit.train import TrainConfig, train

FUSIONS = ("logistic", "image", "text", "early", "late")
SETTINGS = {"rows": dict(groups=False), "official": dict(), "grouped": dict(data_split=False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa_rad")
    ap.add_argument("--out", type=Path, default=Path("runs/vqa_rad"))
    ap.add_argument("--label", default="answer_yes")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()

    manifest = find_manifest("vqa_rad")
    emb = args.out / "emb"
    ex = extract(args.data, emb, ExtractConfig(), source=manifest.source_options(), rows=manifest.load_rows(args.data))
    rows = []
    for fusion in FUSIONS:
        for setting, kw in SETTINGS.items():
            m = train(emb, args.out / "models" / f"{fusion}_{setting}",
                      TrainConfig(labels=[args.label], fusion=fusion, seeds=args.seeds, epochs=args.epochs, **kw))
            s, b = m["spread"]["test"]["macro_f1"], m["bootstrap"]["metrics"]["macro_f1"]
            rows.append({"fusion": fusion, "setting": setting, "macro_f1": [s["mean"], s["std"]],
                         "bootstrap_run0": [m["test"]["macro_f1"], b["low"], b["high"]], "unit": m["bootstrap"]["unit"],
                         "n": m["data"]["n"], "groups_per_split": m["data"]["groups_per_split"],
                         "purged": m["data"]["purged_rows"], "train_seconds": m["costs"]["train_seconds"]})
    lines = [f"VQA-RAD closed questions, label `{args.label}`: test macro-F1, mean ± std over {args.seeds} seeds; "
             "run 0 with its 95% bootstrap interval (resampling images when grouped)", "",
             "| fusion | " + " | ".join(SETTINGS) + " |", "|---|" + "---|" * len(SETTINGS)]
    for fusion in FUSIONS:
        cells = []
        for setting in SETTINGS:
            r = next(r for r in rows if r["fusion"] == fusion and r["setting"] == setting)
            cells.append(f"{r['macro_f1'][0]:.3f} ± {r['macro_f1'][1]:.3f} (run 0: {r['bootstrap_run0'][0]:.3f} "
                         f"[{r['bootstrap_run0'][1]:.3f}, {r['bootstrap_run0'][2]:.3f}])")
        lines.append(f"| {fusion} | " + " | ".join(cells) + " |")
    lines.append("")
    for setting in SETTINGS:
        r = next(r for r in rows if r["setting"] == setting)
        lines.append(f"- {setting}: rows train/val/test {r['n']['train']}/{r['n']['val']}/{r['n']['test']}, "
                     f"groups {r['groups_per_split']['train']}/{r['groups_per_split']['val']}/"
                     f"{r['groups_per_split']['test']}, purged train rows {r['purged']['train']}")
    lines.append("- extraction: " + ", ".join(f"{m} {r.rows_total} rows ({r.rows_embedded} embedded now, "
                                               f"{r.rows_reused} reused)" for m, r in ex.modalities.items()))
    text = "\n".join(lines)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
