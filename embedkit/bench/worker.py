"""Worker processes: `python -m embedkit.bench KIND JSON` runs one configuration and prints one JSON
line; its peak memory (ru_maxrss) is then this configuration's alone (harness.run_worker starts it)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from embedkit.bench.harness import peak_rss_mb, quiet, rss_mb, run_extract, timing


def _imports(kind: str):
    """What a worker needs, imported before its baseline is taken (training on embeddings needs no
    transformers; extraction no scikit-learn)."""
    import importlib

    needs = {"extract": ["torch", "transformers", "embedkit.extract", "embedkit.encoders.models"],
             "train_emb": ["torch", "embedkit.fusion", "embedkit.train"],
             "train_raw": ["torch", "transformers", "embedkit.encoders.models", "embedkit.fusion"]}
    for name in needs[kind]:
        importlib.import_module(name)


def _work_extract(a: dict) -> dict:
    res = run_extract(Path(a["data"]), None, Path(a["out"]), a["image_model"], None, batch_size=a["batch_size"],
                      metadata=Path(a["metadata"]))
    return timing(res, "image")


def _work_train_emb(a: dict) -> dict:
    """The fusion head on stored embeddings: load them, then fit (no validation, so epochs are pure training)."""
    from embedkit.fusion import FusionClassifier
    from embedkit.dataset import load_dataset
    from embedkit.predict import model_features

    t0 = time.perf_counter()
    with quiet():
        ds = load_dataset(a["emb"], ["label"], a["modalities"])
    load_s = time.perf_counter() - t0
    x = model_features({"modalities": a["modalities"]}, ds.blocks)
    est = FusionClassifier(fusion="early", modality_dims=tuple(ds.blocks[m].shape[1] for m in a["modalities"]),
                           epochs=a["epochs"], batch_size=a["batch_size"]).fit(x, ds.y)
    seconds = [h["seconds"] for h in est.history_]
    return {"rows": int(len(x)), "load_seconds": round(load_s, 3), "epoch_seconds": round(min(seconds), 4),
            "epochs": [round(s, 4) for s in seconds]}


def _work_train_raw(a: dict) -> dict:
    """The same head fed raw inputs: every epoch decodes every image and runs both frozen backbones."""
    import torch

    from embedkit.encoders import create_encoder, resolve_spec
    from embedkit.encoders.preprocess import decode_image, normalize_batch
    from embedkit.fusion.models import EarlyFusionHead

    root, rows, bs = Path(a["data"]), a["rows"], a["batch_size"]
    t0 = time.perf_counter()
    img = create_encoder(resolve_spec(a["image_model"], "image"), "image", device="cpu")
    txt = create_encoder(resolve_spec(a["text_model"], "text"), "text", device="cpu")
    load_s = time.perf_counter() - t0
    classes = sorted({r["label"] for r in rows})
    y = torch.tensor([classes.index(r["label"]) for r in rows])
    head = EarlyFusionHead([img.dim, txt.dim], 128, 0.0, len(classes))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(a["epochs"]):
        t0 = time.perf_counter()
        head.train()
        for batch in torch.randperm(len(rows), generator=gen).split(bs):
            if len(batch) < 2:  # BatchNorm needs two rows
                continue
            sel = [rows[i] for i in batch.tolist()]
            pixels = normalize_batch([decode_image(root / r["image"], img.preprocess) for r in sel], img.preprocess)
            vi = torch.from_numpy(img.embed(pixels))
            vt = torch.from_numpy(txt.embed([(root / r["report"]).read_text() for r in sel])[0])
            loss = loss_fn(head(torch.cat([vi, vt], dim=1)), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds.append(time.perf_counter() - t0)
    return {"rows": len(rows), "load_seconds": round(load_s, 3), "epoch_seconds": round(min(seconds), 4),
            "epochs": [round(s, 4) for s in seconds]}


WORKERS = {"extract": _work_extract, "train_emb": _work_train_emb, "train_raw": _work_train_raw}


def main(argv: list[str]) -> None:
    import torch

    kind, args = argv[0], json.loads(argv[1])
    _imports(kind)
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    baseline = rss_mb()
    out = WORKERS[kind](args)
    peak = peak_rss_mb()
    out.update(baseline_rss_mb=round(baseline, 1), peak_rss_mb=round(peak, 1),
               above_baseline_mb=round(peak - baseline, 1), torch_threads=torch.get_num_threads())
    print(json.dumps(out, default=str), flush=True)

