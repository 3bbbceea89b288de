"""Raw data on the user's task (`compare --raw`): what the embeddings are compared against in the paper.

Two models over the images and texts themselves, through the encoders of the best configuration
that sees both modalities, on run 0's split (validation picks the epoch, the test rows are scored
once, paired with the embedding configurations on the same resamples):
- frozen: the backbones run on every row in every epoch and only the head learns; with the same
  backbones this is the embedding model trained the expensive way (the paper's raw baseline);
- fine-tuned: the backbones learn too (a small learning rate; BatchNorm statistics kept frozen,
  as usual for small batches), end to end.
Both feed the early-fusion head (Linear 128, ReLU, Dropout, BatchNorm, Linear) through an input
BatchNorm without weights, which standardises features the way the embedding heads' scaler does.
Images are decoded and resized every epoch, texts tokenised every epoch: the cost a clinic would pay.
"""

from __future__ import annotations

import copy
import time

import numpy as np

RAW_BATCH = 16  # rows per step on a laptop: backbone activations for backprop stay well under 1 GB
BACKBONE_LR = 5e-5  # fine-tuning: the backbones move slowly, the head at the heads' usual 1e-3
HEAD_LR = 1e-3


def estimate_raw(cfg, n_rows: int, calibrated: dict) -> float:
    """Seconds for both raw models: forward cost per item from the extraction calibration, backward ~2x."""
    per_item = sum(c.get("s_per_item", 0.0) for c in calibrated.values())
    n = min(n_rows, cfg.raw_rows or n_rows)
    forward_epoch = n * per_item
    return cfg.raw_epochs * (forward_epoch + 3 * forward_epoch)


def raw_rows(cfg, inputs, shared, splits, seeds, weights, scored, rows) -> dict:
    """Train the frozen and the fine-tuned raw models; rows for the page and compare.json."""
    from embedkit.console import say

    if not getattr(inputs, "extracting", False):
        return {"rows": [], "note": "raw data needs the data folder (compare was given embedding folders)"}
    pair = next((r for r in rows if r["status"] == "ok" and r.get("image_model") and r.get("text_model")
                 and r["fusion"] not in ("logistic",)), None)
    if pair is None:
        return {"rows": [], "note": "raw data needs a configuration that uses both images and texts"}
    reference = next(s for s in scored if s.result["config"] == pair["config"])
    items = {it.id: it for it in inputs.scan.items}
    idx = dict(splits[0])
    if cfg.raw_rows and len(idx["train"]) > cfg.raw_rows:
        rng = np.random.default_rng(cfg.seed)
        idx["train"] = np.sort(rng.choice(idx["train"], cfg.raw_rows, replace=False))
    specs = {m: inputs.specs[(m, pair[f"{m}_model"])] for m in ("image", "text")}
    out = []
    for finetune in (False, True):
        name = f"{pair['image_model']} + {pair['text_model']} · raw, {'fine-tuned' if finetune else 'frozen'}"
        say(f"raw: {name}, {cfg.raw_epochs} epochs on {len(idx['train'])} training rows")
        out.append(_train_raw(name, specs, items, shared, idx, seeds[0], cfg, finetune))
    from embedkit.comparison.board import chance_verdict, point
    from embedkit.fusion.paired import interval, paired_difference, replicates

    y_test = shared.ref.y[idx["test"]]

    def run0_replicates(s):  # a configuration's run-0 test predictions, on the shared resamples
        run = s.result["runs"][0]
        return replicates(y_test, s.probas[0], run["classes"], run["task"], run["threshold"], weights[0], cfg.metric)

    run0 = reference.result["runs"][0]
    ref_reps = run0_replicates(reference)
    # the embedding model may itself be at chance: each raw model is also paired with the input-blind predictors
    chance = [(s.result["runs"][0]["test"][cfg.metric], run0_replicates(s)) for s in scored
              if s.ok and s.result["fusion"] in ("majority", "chance")]
    for r in out:
        reps = replicates(y_test, r.pop("proba"), r["classes"], r["task"], r["threshold"], weights[0], cfg.metric)
        low, high, _ = interval(reps)
        d = paired_difference(reps, ref_reps, r[cfg.metric], run0["test"][cfg.metric])
        r.update({f"{cfg.metric}_low": low, f"{cfg.metric}_high": high, "delta": d["delta"], "low": d["low"],
                  "high": d["high"], "verdict": d["verdict"]})
        if chance:
            r["vs_chance"] = chance_verdict([paired_difference(reps, c_reps, r[cfg.metric], c_score)["verdict"]
                                             for c_score, c_reps in chance])
    note = (f"run 0's split; compared (paired, run 0) with {pair['config']} on embeddings "
            f"({cfg.metric} {run0['test'][cfg.metric]:.3f}; mean over runs {point(reference, cfg.metric):.3f})")
    return {"rows": out, "note": note, "reference": pair["config"], "train_rows": int(len(idx["train"]))}


def _train_raw(name, specs, items, shared, idx, seed, cfg, finetune: bool) -> dict:
    import torch

    from embedkit.costs import current_rss_mb, peak_rss_mb, reset_peak_rss
    from embedkit.encoders import create_encoder
    from embedkit.fusion.evaluate import compute_metrics, detect_task
    from embedkit.fusion.models import EarlyFusionHead

    reset_peak_rss()
    start_mb = current_rss_mb()
    torch.manual_seed(seed)
    image = create_encoder(specs["image"], "image", device="cpu")
    text = create_encoder(specs["text"], "text", device="cpu")
    y_all = shared.ref.y
    classes = sorted({v for v in y_all.tolist()}, key=str)
    task = detect_task(y_all)
    target = torch.tensor([classes.index(v) for v in y_all.tolist()])
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(image.dim + text.dim, affine=False),
                               EarlyFusionHead([image.dim, text.dim], 128, 0.0, len(classes)))
    params = [{"params": head.parameters(), "lr": HEAD_LR}]
    for enc in (image, text):
        enc.model.train(finetune)
        for p in enc.model.parameters():
            p.requires_grad_(finetune)
        if finetune:
            for m in enc.model.modules():  # small batches: keep the pretrained BatchNorm statistics
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
            params.append({"params": [p for p in enc.model.parameters() if p.requires_grad], "lr": BACKBONE_LR})
    opt = torch.optim.AdamW(params, weight_decay=0.01)
    tr = idx["train"]
    counts = np.bincount(target[tr].numpy(), minlength=len(classes))
    weight = torch.tensor(len(tr) / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    gen = torch.Generator().manual_seed(seed)
    best, history = None, []
    for epoch in range(cfg.raw_epochs):
        t0 = time.perf_counter()
        head.train()
        for batch in torch.randperm(len(tr), generator=gen).split(RAW_BATCH):
            if len(batch) < 2:  # BatchNorm needs two rows
                continue
            rows = tr[batch.numpy()]
            with torch.set_grad_enabled(True):
                logits = head(_features(image, text, items, shared.ref.ids[rows], finetune))
                loss = loss_fn(logits, target[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch_s = time.perf_counter() - t0
        val_proba = _predict(head, image, text, items, shared.ref.ids[idx["val"]])
        score = compute_metrics(y_all[idx["val"]], val_proba, classes, task)["macro_f1"]
        history.append({"epoch": epoch + 1, "seconds": round(epoch_s, 2), "val_macro_f1": round(score, 4)})
        if best is None or score > best[0]:
            best = (score, epoch + 1, copy.deepcopy(head.state_dict()),
                    [copy.deepcopy(e.model.state_dict()) for e in (image, text)] if finetune else None)
    head.load_state_dict(best[2])
    if best[3] is not None:
        for enc, state in zip((image, text), best[3]):
            enc.model.load_state_dict(state)
    proba = _predict(head, image, text, items, shared.ref.ids[idx["test"]])  # test, once
    metrics = compute_metrics(y_all[idx["test"]], proba, classes, task)
    return {"name": name, "finetuned": finetune, "best_epoch": best[1], "history": history, "classes": classes,
            "task": task, "threshold": 0.5, "proba": proba, cfg.metric: float(metrics[cfg.metric]),
            "epoch_s": round(float(np.median([h["seconds"] for h in history])), 2),
            "peak_rss_mb": round(peak_rss_mb(), 1), "peak_above_start_mb": round(peak_rss_mb() - start_mb, 1),
            "trainable_parameters": int(sum(p.numel() for g in params for p in g["params"]))}


def _features(image, text, items, ids, grad: bool):
    """Decode and resize each row's image and read its text now (every epoch), then run both backbones."""
    import torch

    from embedkit.encoders.preprocess import decode_image, normalize_batch
    from embedkit.plan import read_item_text

    rows = [items[i] for i in ids]
    pixels = normalize_batch([decode_image(it.image_path, image.preprocess) for it in rows], image.preprocess)
    texts = [read_item_text(it)[0] or "" for it in rows]
    with torch.set_grad_enabled(grad):
        vi = image.features(torch.from_numpy(pixels))
        vt = text.features(texts)[0]
    return torch.cat([vi, vt], dim=1)


def _predict(head, image, text, items, ids) -> np.ndarray:
    import torch

    head.eval()
    modes = [e.model.training for e in (image, text)]
    for e in (image, text):
        e.model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(ids), 32):
            out.append(torch.softmax(head(_features(image, text, items, ids[start:start + 32], False)), 1).numpy())
    for e, mode in zip((image, text), modes):
        e.model.train(mode)
        if mode:
            for m in e.model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
    return np.concatenate(out).astype(np.float64)
