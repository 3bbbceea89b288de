"""`text`: length-sorted batching (extract's order) against unsorted, on reports with skewed lengths."""

from __future__ import annotations

import time

import numpy as np

from embedkit.bench.data import skewed_reports
from embedkit.bench.harness import Context, ratio

def batch_stats(batches: list[list[str]], tokens: dict[str, int], max_length: int) -> dict:
    real = sum(min(tokens[t], max_length) for b in batches for t in b)
    padded = sum(len(b) * max(min(tokens[t], max_length) for t in b) for b in batches)
    return {"real_tokens": real, "padded_tokens": padded, "padding_fraction": round(1 - real / padded, 4)}


def run(ctx: Context) -> dict:
    from embedkit.encoders import create_encoder, resolve_spec
    from embedkit.items import Item
    from embedkit.plan import make_plan

    p, cfg = ctx.preset, ctx.config
    enc = create_encoder(resolve_spec(cfg.text_model, "text"), "text", device="cpu")
    texts = skewed_reports(p.texts)
    items = [Item(id=str(i), text=t) for i, t in enumerate(texts)]
    bs = p.text_batch
    planned = make_plan("text", items, {}, bs)  # the order extract() embeds in
    orders = {"sorted": [[it.text for it in b] for b in planned.batches],
              "unsorted": [texts[i:i + bs] for i in range(0, len(texts), bs)]}
    tokens = dict(zip(texts, enc.count_tokens(texts)))
    enc.embed(texts[:4])  # warm-up
    seconds = {k: [] for k in orders}
    for _ in range(p.repeats):
        for name, batches in orders.items():
            t0 = time.perf_counter()
            for b in batches:
                enc.embed(b)
            seconds[name].append(time.perf_counter() - t0)
    lengths = np.array(list(tokens.values()))
    out = {"model": cfg.text_model, "texts": len(texts), "batch_size": bs, "max_length": enc.max_length,
           "token_lengths": {"median": int(np.median(lengths)), "p90": int(np.percentile(lengths, 90)),
                             "max": int(lengths.max()), "truncated": int((lengths > enc.max_length).sum())}}
    for name, batches in orders.items():
        s = batch_stats(batches, tokens, enc.max_length)
        best = min(seconds[name])
        out[name] = {**s, "seconds": round(best, 3), "runs": [round(x, 3) for x in seconds[name]],
                     "tokens_per_second": round(s["real_tokens"] / best, 1),
                     "texts_per_second": round(len(texts) / best, 2)}
    out["speedup"] = ratio(out["sorted"]["tokens_per_second"], out["unsorted"]["tokens_per_second"])
    return out
