"""VQA-RAD end to end: closed clinician questions about radiology images, image + question -> yes/no.

    python examples/vqa_rad.py --data ../shared/data/vqa_rad --out runs/vqa_rad --seeds 5

Extracts with the offline default encoders (EfficientNet-Lite0 images, MiniLM questions) through the
shipped data manifest, then trains every fusion on the official train/test files (validation carved
out of train, seeded) and prints test metrics as mean +- std over seeds. Caveat printed with the
table: the same image is asked about in train and test questions (see the manifest's leakage notes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from embedkit.extract import ExtractConfig, extract
from embedkit.manifests import find_manifest
from embedkit.train import TrainConfig, train

FUSIONS = ("logistic", "image", "text", "early", "late")


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
        m = train(emb, args.out / "models" / fusion, TrainConfig(labels=[args.label], fusion=fusion,
                                                                  seeds=args.seeds, epochs=args.epochs))
        s = m["spread"]["test"]
        rows.append({"fusion": fusion, **{k: (s[k]["mean"], s[k]["std"]) for k in ("accuracy", "macro_f1", "auroc")},
                     "n": m["data"]["n"], "train_seconds": m["costs"]["train_seconds"]})
    lines = [f"VQA-RAD closed questions, label `{args.label}`, official test file, "
             f"{args.seeds} seeds (mean ± std)", "",
             "| fusion | accuracy | macro-F1 | AUROC | train s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fusion']} | " + " | ".join(f"{r[k][0]:.3f} ± {r[k][1]:.3f}"
                                                          for k in ("accuracy", "macro_f1", "auroc"))
                     + f" | {r['train_seconds']:.2f} |")
    n = rows[0]["n"]
    lines += ["", f"rows: train {n['train']}, val {n['val']}, test {n['test']}; extraction: "
              + ", ".join(f"{m} {r.rows_total} rows ({r.rows_embedded} embedded now, {r.rows_reused} reused)"
                          for m, r in ex.modalities.items()),
              "caveat: the same images appear in train and test questions (manifest leakage notes)."]
    text = "\n".join(lines)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
