"""Modality-gap alignment, side by side, and what it does for a missing modality.

    python examples/alignment.py runs/vqa_rad/emb --label answer_yes --project --seeds 5 --out runs/alignment

EMB is an extract folder. Image and text must share a space (CLIP, `shared:PATH`); with
`--project` a light contrastive projection is fitted first on the training split (`embedkit
project`), which also works for encoders that never shared a space. Every variant is early fusion
on L2-normalised rows (input scale none, as the published method), same seeds and splits; each
aligner is fitted on training rows only; shift lambda is chosen on validation inside each run.

Second table: the saved model (run 0) scores its own test rows with one modality removed. With an
aligner the missing modality is stood in for by the present one moved across the training gap;
"mean fill" replaces it by its training mean instead (what a model without alignment can do).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from embedkit.dataset import load_dataset
from embedkit.fusion.align import aligner_from_dict, l2_normalize
from embedkit.fusion.evaluate import bootstrap_metrics, compute_metrics
from embedkit.fusion.gap import gap_report
from embedkit.predict import apply_calibration, load_model, model_features
from embedkit.train import TrainConfig, train

VARIANTS = {"none": dict(align="none"), "shift": dict(align_sweep="shift:-1:1:0.25"),
            "center": dict(align="center"), "noise": dict(align="none", noise_std=0.1),
            "shift + noise": dict(align_sweep="shift:-1:1:0.25", noise_std=0.1),
            "center + noise": dict(align="center", noise_std=0.1),
            "center + modality dropout": dict(align="center", modality_dropout=0.3)}


def missing_modality(model_dir: Path, emb: Path, label: str) -> dict:
    """macro-F1 of the saved model on its test rows with text or image removed."""
    est, info = load_model(model_dir)
    ds = load_dataset(emb, [label], ["image", "text"])
    test_ids = set(pq.read_table(model_dir / "test_predictions.parquet", columns=["id"]).column("id").to_pylist())
    rows = np.array([i in test_ids for i in ds.ids])
    y = ds.y[rows]
    blocks = {m: ds.blocks[m][rows] for m in ("image", "text")}
    aligner = aligner_from_dict(info["alignment"])
    out = {}
    for present, missing in (("image", "text"), ("text", "image")):
        for how in ("stand-in", "mean fill"):
            if how == "stand-in":
                x = model_features(info, {present: blocks[present]})
            else:
                mean = getattr(aligner, f"{missing}_mean_")
                filled = {present: blocks[present], missing: np.repeat(l2_normalize(mean[None]), len(y), 0)}
                x = model_features(info, filled)
            proba = apply_calibration(est.predict_proba(x), info["calibration"], info["task"])
            thr = info["calibration"]["threshold"]
            m = compute_metrics(y, proba, est.classes_, info["task"], thr)
            b = bootstrap_metrics(y, proba, est.classes_, info["task"], thr)["metrics"]["macro_f1"]
            out[f"{present} only, {how}"] = [m["macro_f1"], b["low"], b["high"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("emb", type=Path)
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/alignment"))
    ap.add_argument("--project", action="store_true", help="fit a projection into one space first")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()

    emb = args.emb
    if args.project:
        from embedkit.shared_encoder.project import project_embeddings

        emb = args.out / "projected"
        project_embeddings(args.emb, emb)
    ds = load_dataset(emb, [args.label], ["image", "text"])
    fit_rows = None if ds.split is None else ds.split == "train"
    stats = gap_report(ds.blocks["image"], ds.blocks["text"], methods=["none", "shift", "center", "standardize"],
                       fit_rows=fit_rows)
    rows = []
    for name, kw in VARIANTS.items():
        folder = args.out / name.replace(" + ", "_").replace(" ", "_")
        m = train(emb, folder, TrainConfig(labels=[args.label], fusion="early", seeds=args.seeds, epochs=args.epochs,
                                           **kw))
        s, b = m["spread"]["test"]["macro_f1"], m["bootstrap"]["metrics"]["macro_f1"]
        chosen = [r["lambda"] for r in m["alignment"]["chosen_per_run"]]
        rows.append({"variant": name, "chosen_lambda": chosen, "macro_f1": [s["mean"], s["std"]],
                     "run0": [m["test"]["macro_f1"], b["low"], b["high"]], "groups": m["data"]["groups"],
                     "missing": missing_modality(folder, emb, args.label)})
    lines = [f"Alignment on {emb} (label `{args.label}`, early fusion, {args.seeds} seeds; groups: {rows[0]['groups']})",
             "", f"Gap diagnostics (aligners fitted on {stats['fitted_on']}; probe accuracy 0.5 = the modalities "
             "cannot be told apart):", "", "| method | gap norm | pair cosine | probe accuracy | MMD^2 |",
             "|---|---|---|---|---|"]
    for name, g in stats["methods"].items():
        lines.append(f"| {name} | {g['gap_norm']:.3f} | {g['mean_pair_cosine']:.3f} | {g['probe_accuracy']:.3f} | "
                     f"{g['mmd2']:.4f} |")
    lines += ["",
              "| variant | lambda per run (val) | macro-F1 mean ± std | run 0 [95% bootstrap] |", "|---|---|---|---|"]
    for r in rows:
        lam = ", ".join("-" if v is None else f"{v:g}" for v in r["chosen_lambda"])
        lines.append(f"| {r['variant']} | {lam} | {r['macro_f1'][0]:.3f} ± {r['macro_f1'][1]:.3f} | "
                     f"{r['run0'][0]:.3f} [{r['run0'][1]:.3f}, {r['run0'][2]:.3f}] |")
    keys = list(rows[0]["missing"])
    lines += ["", "Missing modality at test time (run 0's test rows), macro-F1 [95% bootstrap]:", "",
              "| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"
                                                          for v in r["missing"].values()) + " |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"gap": stats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
