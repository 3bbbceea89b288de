"""Near-duplicate thresholds, calibrated on real data, and what they catch.

    python benchmarks/near_duplicates.py --data ../shared/data/vqa_rad --work /tmp/nd

1. Calibration (images): every VQA-RAD image and 7 copies of it (JPEG q60 re-encode, greyscale PNG,
   1/2 and 1/4 size, 5 % and 10 % crop a side, and 1/2 size + q50 + 3 % crop), embedded with the
   offline EfficientNet-Lite0 through extract(). For each cosine threshold: the share of each kind of
   copy whose cosine to its original reaches it, and the false pairs among the 315 distinct originals
   (49,455 pairs) and among any two copies of different images. The threshold shipped
   (near_duplicates.CALIBRATED) is the lowest with no false pair among the originals, rounded up.
2. Calibration (texts): VQA-RAD's distinct questions (case and punctuation folded) and 5 edits of 300
   of them (upper case, punctuation dropped, one typo, a word dropped, a "Question:" prefix), MiniLM.
   Distinct questions are often paraphrases ("Is there a pneumothorax?" / "Is a pneumothorax
   present?"): pairs above the threshold are listed for reading, not all counted as false.
3. Planted duplicates: 60 originals get one copy (re-encoded or 1/2 size) under a new id on the other
   side of a 70/30 split: found vs missed by `audit`, and false pairs among the distinct images.
4. The effect on a metric: a label that is a coin flip per image (honest macro-F1 0.5) and the organ
   label, image-only classifier, the same split with the planted copies, 5 seeds: test macro-F1 with
   and without --group-near-dups.
Writes benchmarks/results/near_duplicates.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from embedkit.audit import AuditConfig, audit_dataset
from embedkit.extract import ExtractConfig, extract
from embedkit.items import SourceOptions
from embedkit.near_duplicates import CALIBRATED
from embedkit.store import BASE_COLUMNS, PartWriter, build_schema, load_embeddings
from embedkit.train import TrainConfig, train

THRESHOLDS = (0.90, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98)


def image_variants(im: Image.Image) -> dict:
    w, h = im.size
    crop = lambda a, f: a.crop((int(a.width * f), int(a.height * f), a.width - int(a.width * f),  # noqa: E731
                                a.height - int(a.height * f)))
    half = im.resize((w // 2, h // 2), Image.BICUBIC)
    return {"jpeg60": (im, 60), "grey_png": (ImageOps.grayscale(im).convert("RGB"), None), "half": (half, 90),
            "quarter": (im.resize((max(w // 4, 32), max(h // 4, 32)), Image.BICUBIC), 90),
            "crop5": (crop(im, 0.05), 90), "crop10": (crop(im, 0.10), 90), "half_q50_crop3": (crop(half, 0.03), 50)}


def make_images(src: Path, root: Path) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = [("id", "image", "source", "variant")]
    for f in sorted(src.glob("*.jpg")):
        im = Image.open(f).convert("RGB")
        (root / "img" / f"{f.stem}__orig.jpg").write_bytes(f.read_bytes())
        rows.append((f"{f.stem}__orig", f"img/{f.stem}__orig.jpg", f.stem, "orig"))
        for v, (copy, q) in image_variants(im).items():
            name = f"{f.stem}__{v}." + ("png" if q is None else "jpg")
            copy.save(root / "img" / name, **({"quality": q} if q else {}))
            rows.append((f"{f.stem}__{v}", f"img/{name}", f.stem, v))
    with open(root / "table.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root / "table.csv"


def questions(data: Path) -> list[str]:
    seen = {}
    for name in ("trainset.json", "testset.json"):
        for r in json.loads((data / name).read_text()):
            seen.setdefault(" ".join(re.findall(r"\w+", r["question"].lower())), r["question"].strip())
    return sorted(seen.values())


def make_texts(qs: list[str], root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)

    def typo(s):
        ws = s.split()
        c = [i for i, w in enumerate(ws) if len(w) >= 4]
        if not c:
            return s
        i = int(rng.choice(c))
        j = int(rng.integers(1, len(ws[i]) - 2))
        ws[i] = ws[i][:j] + ws[i][j + 1] + ws[i][j] + ws[i][j + 2:]
        return " ".join(ws)

    def drop(s):
        ws = s.split()
        c = [i for i, w in enumerate(ws) if w.lower() in ("the", "a", "an", "is", "of", "there", "this", "in")]
        if c:
            del ws[int(rng.choice(c))]
        return " ".join(ws)

    edits = {"upper": str.upper, "no_punctuation": lambda s: re.sub(r"[^\w\s]", "", s), "typo": typo,
             "word_dropped": drop, "prefix": lambda s: "Question: " + s}
    picked = set(rng.choice(len(qs), 300, replace=False).tolist())
    rows = [("id", "text", "source", "variant")]
    for k, q in enumerate(qs):
        rows.append((f"q{k}__orig", q, f"q{k}", "orig"))
        if k in picked:
            rows += [(f"q{k}__{v}", f(q), f"q{k}", v) for v, f in edits.items()]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "table.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root / "table.csv"


def calibrate(x: np.ndarray, ids, texts: dict | None = None) -> dict:
    src = np.array([i.split("__")[0] for i in ids])
    var = np.array([i.split("__")[1] for i in ids])
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    orig = var == "orig"
    o_ids, o = ids[orig], u[orig]
    pos = {s: k for k, s in enumerate(src[orig])}
    s = o @ o.T
    iu = np.triu_indices(len(o), 1)
    distinct = s[iu]
    own = {v: np.sum(u[var == v] * o[[pos[k] for k in src[var == v]]], axis=1) for v in sorted(set(var) - {"orig"})}
    rows = []
    for t in THRESHOLDS:
        rows.append({"threshold": t, "false_pairs_among_originals": int((distinct >= t).sum()),
                     "caught": {v: round(float((c >= t).mean()), 4) for v, c in own.items()}})
    top = np.argsort(-distinct)[:10]
    return {"originals": int(orig.sum()), "distinct_pairs": int(len(distinct)),
            "highest_distinct_cosine": round(float(distinct.max()), 5),
            "lowest_threshold_without_false_pair": round(float(distinct.max()) + 1e-5, 5),
            "copy_cosine_median": {v: round(float(np.median(c)), 4) for v, c in own.items()},
            "by_threshold": rows,
            "closest_distinct": [{"a": (texts or {}).get(o_ids[iu[0][k]], str(o_ids[iu[0][k]])),
                                  "b": (texts or {}).get(o_ids[iu[1][k]], str(o_ids[iu[1][k]])),
                                  "cosine": round(float(distinct[k]), 4)} for k in top]}


def write_store(out: Path, es, rows, modality: str, columns: dict) -> Path:
    """The real embeddings of `rows`, re-written with new ids' columns (split, group, labels)."""
    prov = dict(es.provenance[modality])
    prov["label_columns"] = [c for c in columns if c not in BASE_COLUMNS]
    x = es.embeddings[modality][rows]
    cols = {k: list(v) for k, v in columns.items() if k not in BASE_COLUMNS}
    w = PartWriter(out / f"{modality}__{prov['name']}", build_schema(x.shape[1], cols, prov))
    ids = [str(i) for i in es.ids[rows]]
    batch = {"id": ids, "path": ids, "sha256": list(es.columns[f"{modality}_sha256"][rows]), **cols,
             "split": list(columns["split"]), "group": list(columns["group"])}
    w.write(batch, x)
    w.close()
    return out


def planted_experiment(es, data: Path, work: Path, n_planted: int, seeds: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = es.ids
    var = np.array([i.split("__")[1] for i in ids])
    src = np.array([i.split("__")[0] for i in ids])
    originals = np.flatnonzero(var == "orig")
    organ = {}
    for name in ("trainset.json", "testset.json"):
        for r in json.loads((data / name).read_text()):
            organ[Path(r["image_name"]).stem] = r["image_organ"].strip()
    originals = np.array([i for i in originals if src[i] in organ])
    split = np.where(rng.random(len(originals)) < 0.7, "train", "test").astype(object)
    coin = rng.integers(0, 2, len(originals))
    chosen = rng.choice(len(originals), n_planted, replace=False)
    kinds = np.where(np.arange(n_planted) % 2 == 0, "jpeg60", "half")
    where = {(s, v): k for k, (s, v) in enumerate(zip(src, var))}
    copy_rows = np.array([where[(src[originals[c]], kind)] for c, kind in zip(chosen, kinds)])
    rows = np.concatenate([originals, copy_rows])
    columns = {"split": np.concatenate([split, np.where(split[chosen] == "train", "test", "train")]).astype(object),
               "group": np.array([f"img{k}" for k in range(len(rows))], dtype=object),
               "coin": np.concatenate([coin, coin[chosen]]).astype(np.int64).tolist(),
               "organ": [organ[src[i]] for i in rows]}
    store = write_store(work / "planted", es, rows, "image", columns)
    es_p = load_embeddings(store, how="outer")
    r = audit_dataset(es_p, AuditConfig(labels=["organ"], label_noise=False))
    nd = r["near_duplicates"]["image"]
    planted_pairs = {frozenset((str(ids[originals[c]]), str(ids[k]))) for c, k in zip(chosen, copy_rows)}
    listed = {frozenset((p["a"], p["b"])) for p in nd["listed"]}
    found = planted_pairs & listed
    by_kind = {k: {"planted": int((kinds == k).sum()),
                   "found": sum(frozenset((str(ids[originals[c]]), str(ids[cr]))) in found
                                for c, cr, kk in zip(chosen, copy_rows, kinds) if kk == k)} for k in ("jpeg60", "half")}
    out = {"images": int(len(originals)), "planted": n_planted, "found": len(found),
           "missed": n_planted - len(found), "false_pairs": len(listed - planted_pairs), "by_kind": by_kind,
           "threshold": nd["threshold"], "across_splits_reported": nd["across_splits"]["pairs"], "metric": {}}
    for label in ("coin", "organ"):
        for grouped in (False, True):
            cfg = TrainConfig(labels=[label], fusion="image", seeds=seeds, bootstrap=1000, ood_guard="none",
                              group_near_duplicates=grouped)
            m = train(store, work / f"m_{label}_{grouped}", cfg)
            s, b = m["spread"]["test"]["macro_f1"], m["bootstrap"]["metrics"]["macro_f1"]
            out["metric"][f"{label}, {'--group-near-dups' if grouped else 'default'}"] = {
                "macro_f1_mean": round(s["mean"], 4), "macro_f1_std": round(s["std"], 4),
                "run0": round(m["test"]["macro_f1"], 4), "run0_bootstrap95": [round(b["low"], 4), round(b["high"], 4)],
                "test_rows_with_copy_in_train": m["data"]["near_duplicates_across_splits"]["image"]["test_rows"],
                "n": m["data"]["n"], "purged": m["data"]["purged_rows"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa_rad")
    ap.add_argument("--work", type=Path, default=Path("/tmp/embedkit_near_duplicates"))
    ap.add_argument("--planted", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "near_duplicates.json")
    args = ap.parse_args()
    quiet = ExtractConfig(progress=False)
    img_table = make_images(args.data / "images", args.work / "images")
    extract(args.work / "images", args.work / "img_emb", ExtractConfig(text_model=None, progress=False),
            source=SourceOptions(metadata=img_table, id_col="id", image_col="image"))
    qs = questions(args.data)
    txt_table = make_texts(qs, args.work / "texts")
    extract(args.work / "texts", args.work / "txt_emb", ExtractConfig(image_model=None, progress=quiet.progress),
            source=SourceOptions(metadata=txt_table, id_col="id", text_col="text"))
    img = load_embeddings(args.work / "img_emb")
    txt = load_embeddings(args.work / "txt_emb")
    texts = {r["id"]: r["text"] for r in csv.DictReader(open(txt_table))}
    result = {"shipped": CALIBRATED, "images": {"encoder": "efficientnet-lite0", **calibrate(
        img.embeddings["image"], img.ids)},
              "texts": {"encoder": "minilm", "distinct_questions": len(qs), **calibrate(
                  txt.embeddings["text"], txt.ids, texts)}}
    result["planted"] = planted_experiment(img, args.data, args.work, args.planted, args.seeds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "texts"}, indent=2)[:6000])


if __name__ == "__main__":
    main()
