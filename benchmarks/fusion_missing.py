"""Fusion beyond concatenation when a modality is often missing (issue 31): the evidence.

    python benchmarks/fusion_missing.py generated --work /tmp/fm
    python benchmarks/fusion_missing.py vqa-rad --emb /tmp/i31/emb --work /tmp/fm

generated: two generated image/text embedding tasks written through the real store and trained with
  `embedkit.train` (official split, 3 seeds), every fusion (early, late, gated, attention, lowrank):
  - interaction: the label is the sign of a product of one latent of the image and one of the text,
    so neither modality alone nor an additive (late) fusion can tell it;
  - half-missing: each modality carries an additive share of the signal and half the rows lack one
    (a quarter no image, a quarter no text); the rows are kept and the heads take the presence mask.
    Calibration per combination before and after per-combination temperatures (6,000 rows, so that
    every combination has >= 200 validation rows: issue 25's rule).
  Reported per fusion: test macro-F1 of run 0 with its 95% bootstrap interval, mean +- std over 3
  seeds, training seconds and parameters (the head's, missing token included).
vqa-rad: VQA-RAD closed questions (label answer_yes), already extracted with `embedkit extract DATA
  --manifest vqa_rad --out EMB` (EfficientNet-Lite0 images, MiniLM questions: two spaces, so there is
  no aligner stand-in), a fresh 70/15/15 split grouped by image (--no-data-split: with the official
  test file every fusion is at chance, README), seeded. Every fusion trained without and with
  --modality-dropout 0.3, then `evaluate --drop-modality text|image` on the rows the model was neither
  fitted nor tuned on (its test rows) at rates 0, 0.25, 0.5, 0.75, 1: macro-F1 with intervals over
  test images at each rate (0.5 = half of the questions or images removed), or the model's one-line
  refusal.
Writes benchmarks/results/fusion_missing_generated.json and fusion_missing_vqa_rad.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from embedkit.predict import evaluate
from embedkit.store import BASE_COLUMNS, PartWriter, build_schema
from embedkit.train import TrainConfig, train

FUSIONS = ("early", "late", "gated", "attention", "lowrank")
RATES = (0.0, 0.25, 0.5, 0.75, 1.0)
RESULTS = Path(__file__).resolve().parent / "results"


def write_modality(out: Path, modality: str, ids, x, columns: dict) -> None:
    """An extract-shaped folder through the real store (schema, provenance, parts), as tests/test_train.py."""
    prov = {"name": "generated", "source": "generated", "family": "generated", "revision": "1", "pooling": "none",
            "dim": x.shape[1], "preprocess": None, "max_length": None, "normalize": False, "dtype": "float32",
            "label_columns": ["y"]}
    w = PartWriter(out / f"{modality}__generated", build_schema(x.shape[1], {k: list(v) for k, v in columns.items()},
                                                                prov), rows_per_part=2000)
    for i in range(0, len(ids), 1000):
        sl = slice(i, i + 1000)
        batch = {"id": list(ids[sl]), "path": [f"{j}.{modality}" for j in ids[sl]],
                 "sha256": [hashlib.sha256(f"{modality}{j}".encode()).hexdigest() for j in ids[sl]]}
        batch.update({k: [None] * len(ids[sl]) for k in BASE_COLUMNS if k not in batch and k != "embedding"})
        batch.update({k: list(v[sl]) for k, v in columns.items()})
        w.write(batch, x[sl])
    w.close()


def generated_task(out: Path, kind: str, n: int, d: int = 32, seed: int = 0) -> dict:
    """Embeddings of one task: image = latent a (+ noise), text = latent b (+ noise), each rotated into d dims."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
    if kind == "interaction":
        y = (a[:, 0] * b[:, 0] > 0).astype(int)
    else:  # additive: each modality alone tells part of it
        y = (a[:, 0] + b[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)
    image = np.hstack([a, rng.normal(size=(n, d - 4))]) @ np.linalg.qr(rng.normal(size=(d, d)))[0]
    text = np.hstack([b, rng.normal(size=(n, d - 4))]) @ np.linalg.qr(rng.normal(size=(d, d)))[0]
    ids = np.array([f"g{i:05d}" for i in range(n)], dtype=object)
    split = np.array(["train"] * int(0.7 * n) + ["val"] * int(0.15 * n), dtype=object)
    split = np.concatenate([split, np.array(["test"] * (n - len(split)), dtype=object)])
    has_image, has_text = np.ones(n, bool), np.ones(n, bool)
    if kind == "half-missing":
        u = rng.random(n)
        has_image[u < 0.25], has_text[(u >= 0.25) & (u < 0.5)] = False, False
    cols = {"y": np.array(["neg", "pos"])[y].astype(object), "split": split}
    shutil.rmtree(out, ignore_errors=True)
    write_modality(out, "image", ids[has_image], image[has_image].astype(np.float32),
                   {k: v[has_image] for k, v in cols.items()})
    write_modality(out, "text", ids[has_text], text[has_text].astype(np.float32), {k: v[has_text] for k, v in cols.items()})
    return {"rows": n, "dims": [d, d], "lacking_image": int((~has_image).sum()), "lacking_text": int((~has_text).sum())}


def summary(m: dict) -> dict:
    b, s = m["bootstrap"]["metrics"]["macro_f1"], m["spread"]["test"]["macro_f1"]
    out = {"macro_f1": round(m["test"]["macro_f1"], 4), "macro_f1_95": [round(b["low"], 4), round(b["high"], 4)],
           "seeds_mean_std": [round(s["mean"], 4), round(s["std"], 4)], "train_seconds": m["costs"]["train_seconds"],
           "parameters": m["costs"]["parameters"], "best_epoch": m["runs"][0].get("best_epoch")}
    if m.get("by_combination") and len(m["by_combination"]) > 1:
        out["by_combination"] = {
            c: {"n": e["n"], "macro_f1": round(e["metrics"]["macro_f1"], 4),
                "macro_f1_95": [round(e["bootstrap"]["macro_f1"]["low"], 4), round(e["bootstrap"]["macro_f1"]["high"], 4)],
                **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in e["calibration"].items()
                   if k != "reliability"}}
            for c, e in m["by_combination"].items()}
        out["temperature_shared"] = m["calibration"]["temperature"]
        out["calibration_fit"] = m["calibration"].get("by_combination_fit")
    return out


def run_generated(work: Path, epochs: int) -> dict:
    result = {}
    for kind, n in (("interaction", 3000), ("half-missing", 6000)):
        emb = work / kind / "emb"
        task = generated_task(emb, kind, n)
        rows = {}
        for fusion in FUSIONS:
            m = train(emb, work / kind / fusion, TrainConfig(labels=["y"], fusion=fusion, epochs=epochs, patience=8,
                                                             seeds=3, bootstrap=1000, ood_guard="none"))
            rows[fusion] = summary(m)
            print(kind, fusion, rows[fusion]["macro_f1"], rows[fusion]["macro_f1_95"], rows[fusion]["train_seconds"],
                  flush=True)
        result[kind] = {"task": task, "fusions": rows}
    return result


def run_vqa_rad(emb: Path, work: Path, epochs: int) -> dict:
    result = {}
    for fusion in FUSIONS:
        for dropout in (0.0, 0.3):
            name = f"{fusion}_dropout{dropout:g}"
            m = train(emb, work / name, TrainConfig(labels=["answer_yes"], fusion=fusion, epochs=epochs, patience=8,
                                                    modality_dropout=dropout, data_split=False, bootstrap=1000,
                                                    ood_guard="none"))
            entry = {"test": summary(m), "curves": {}}
            for drop in ("text", "image"):
                curve = evaluate(work / name, emb, exclude_fitted=True, drop_modality=drop,
                                 rates=list(RATES))["robustness"]
                entry["curves"][drop] = [
                    {"rate": p["rate"], "rows_masked": p["rows_masked"]}
                    | ({"refused": p["refused"]} if "refused" in p else
                       {"macro_f1": round(p["macro_f1"], 4), "ece": round(p["ece"], 4),
                        "macro_f1_95": [round(p["intervals"]["macro_f1"]["low"], 4),
                                        round(p["intervals"]["macro_f1"]["high"], 4)]})
                    for p in curve["points"]]
            result[name] = entry
            half = {d: next(p for p in entry["curves"][d] if p["rate"] == 0.5) for d in ("text", "image")}
            print(name, entry["test"]["macro_f1"], {d: h.get("macro_f1", "refused") for d, h in half.items()}, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("generated", "vqa-rad"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/fusion_missing"))
    ap.add_argument("--emb", type=Path, help="VQA-RAD embeddings from `embedkit extract ... --manifest vqa_rad`")
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    load_start = [round(v, 2) for v in os.getloadavg()]  # a shared machine: seconds are only as good as this
    if args.what == "generated":
        out = {"what": "generated interaction and half-missing tasks, every fusion; embedkit.train, 3 seeds",
               **run_generated(args.work, args.epochs)}
        path = RESULTS / "fusion_missing_generated.json"
    else:
        out = {"what": "VQA-RAD closed questions, answer_yes, fresh 70/15/15 split grouped by image; robustness "
                       "curves of `evaluate --drop-modality` on the test rows", "rates": list(RATES),
               "fusions": run_vqa_rad(args.emb, args.work, args.epochs)}
        path = RESULTS / "fusion_missing_vqa_rad.json"
    out["load_average"] = {"start": load_start, "end": [round(v, 2) for v in os.getloadavg()], "cores": os.cpu_count()}
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
