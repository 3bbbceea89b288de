"""`quantize`: int8 dynamic quantisation of the text encoder: speed-up and downstream macro-F1."""

from __future__ import annotations

import numpy as np

from embedkit.bench.data import clinic_rows
from embedkit.bench.harness import Context, quiet, ratio, run_extract, timing


def run(ctx: Context) -> dict:
    from embedkit.store import load_embeddings
    from embedkit.train import TrainConfig, train

    work, p, cfg = ctx.work, ctx.preset, ctx.config
    data = work / "clinic"
    rows = clinic_rows(data, p.quant_rows)
    runs = {"float32": [], "int8": []}
    for _ in range(p.repeats):
        for mode in runs:
            res = run_extract(data, rows, work / f"emb_quant_{mode}", None, cfg.text_model, batch_size=cfg.batch_size,
                           quantize=None if mode == "float32" else "int8")
            runs[mode].append(timing(res, "text"))
    out = {"model": cfg.text_model, "texts": len(rows), "task": "demo clinic label from the report (text only)"}
    vectors = {}
    for mode, timings in runs.items():
        emb = work / f"emb_quant_{mode}"
        with quiet():
            m = train(emb, work / f"model_quant_{mode}", TrainConfig(labels=["label"], fusion="text",
                                                                      epochs=p.quant_epochs, seeds=p.quant_seeds))
        es = load_embeddings(emb, modalities=["text"])
        vectors[mode] = es.embeddings["text"][np.argsort(es.ids)]
        best = max(timings, key=lambda r: r["items_per_second"])
        out[mode] = {"texts_per_second": best["items_per_second"],
                     "model_texts_per_second": best["model_items_per_second"],
                     "runs": [r["items_per_second"] for r in timings], "model_bytes": best["model_bytes"],
                     "macro_f1": round(m["spread"]["test"]["macro_f1"]["mean"], 4),
                     "macro_f1_std": m["spread"]["test"]["macro_f1"]["std"], "seeds": p.quant_seeds}
    a, b = vectors["float32"], vectors["int8"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    out["cosine_float32_int8"] = {"mean": round(float(cos.mean()), 4), "min": round(float(cos.min()), 4)}
    out["speedup"] = ratio(out["int8"]["model_texts_per_second"], out["float32"]["model_texts_per_second"])
    out["macro_f1_change"] = round(out["int8"]["macro_f1"] - out["float32"]["macro_f1"], 4)
    return out
