"""How long a comparison will take, measured on this machine before it starts, and what a budget drops.

Extraction: each encoder embeds a few of the data's own items (spread over the list, so text
lengths are typical) into the comparison's embedding folder, which the full extraction then
resumes; seconds per item and the model's load time give the encoder's estimate. Training: each
fusion head is fitted for 1 and 3 epochs on random rows of the data's size and widths (fixed cost and cost per epoch), scaled to the
configured epochs, runs and alignment candidates. It is an estimate: early stopping, other load
on the machine and the data's own difficulty move it, and the run records the real times beside it.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

CALIBRATION_ITEMS = 24  # items each encoder embeds to time itself (kept: the extraction resumes after them)
LOGISTIC_ITERATIONS = 100  # the logistic baseline is timed for this many iterations and counted twice


def calibrate_extraction(data, out_emb, scan, spec, modality: str, extract_config) -> dict:
    """Embed a few items with one encoder; {seconds, s_per_item, load_s, pending, dim} for the rest."""
    from embedkit.console import console
    from embedkit.extract import extract
    from embedkit.store import dataset_dir, existing_hashes

    items = [it for it in scan.items if (it.has_text if modality == "text" else it.image_path is not None)]
    folder = dataset_dir(out_emb, modality, spec.name)
    stored = set(existing_hashes(folder)) if folder.exists() else set()
    pending = [it for it in items if it.id not in stored]
    if modality == "image":  # an image file shared by several rows is embedded once (plan.make_plan)
        pending = list({it.image_path.resolve(): it for it in reversed(pending)}.values())[::-1]
    if not pending:
        return {"seconds": 0.0, "s_per_item": 0.0, "load_s": 0.0, "pending": 0, "dim": spec.dim}
    step = max(1, len(pending) // CALIBRATION_ITEMS)
    sample = pending[::step][:CALIBRATION_ITEMS]
    sub = replace(scan, items=[it for it in items if it.id in stored] + sample, skipped=[])
    config = replace(extract_config, image_model=spec.name if modality == "image" else None,
                     text_model=spec.name if modality == "text" else None, progress=False)
    from embedkit.costs import reset_peak_rss

    quiet, console.quiet = console.quiet, True  # its layout and count lines would repeat the real run's
    reset_peak_rss()
    try:
        res = extract(data, out_emb, config, scan=sub).modalities[modality]
    finally:
        console.quiet = quiet
    stages = res.costs.get("stage_seconds", {})
    load = stages.get("load_model", 0.0)
    busy = max(res.costs.get("wall_seconds", 0.0) - load, 1e-6)
    per_item = busy / max(res.unique_inputs_embedded, 1)
    rest = len(pending) - res.unique_inputs_embedded
    return {"seconds": round(load + rest * per_item, 2), "s_per_item": round(per_item, 5), "load_s": round(load, 2),
            "pending": rest, "dim": res.provenance.get("dim") or spec.dim, "embedded": res.unique_inputs_embedded,
            "busy_s": round(busy, 3), "peak_rss_mb": res.costs.get("peak_rss_mb")}


def fit_seconds(train_cfg, dims: list[int], n_train: int, n_val: int, n_classes: int) -> float:
    """Seconds one run of this head takes on rows of this size: fits of 1 and 3 epochs on random rows give the
    fixed cost and the cost per epoch (the first fit, which pays for imports and warm-up, is not timed)."""
    from embedkit.train import make_estimator

    rng = np.random.default_rng(0)
    x = rng.standard_normal((max(n_train, 2 * n_classes), int(sum(dims)))).astype(np.float32)
    y = np.arange(len(x)) % n_classes
    xv, yv = x[:max(n_val, n_classes)], y[:max(n_val, n_classes)]

    def fit(epochs: int) -> float:
        est = make_estimator(replace(train_cfg, epochs=epochs), dims, 0, "standard")
        t0 = time.perf_counter()
        est.fit(x, y) if train_cfg.fusion == "logistic" else est.fit(x, y, eval_set=(xv, yv))
        return time.perf_counter() - t0

    if train_cfg.fusion == "logistic":  # L-BFGS on random rows converges slowly: time 100 iterations, count 200
        from embedkit.fusion import LogisticBaseline

        t0 = time.perf_counter()
        LogisticBaseline(max_iter=LOGISTIC_ITERATIONS).fit(x, y)
        return (time.perf_counter() - t0) * 2
    fit(1)  # warm-up
    one, three = fit(1), fit(3)
    per_epoch = max((three - one) / 2, 0.0)
    return max(one - per_epoch, 0.0) + per_epoch * train_cfg.epochs


def drop_to_budget(train_seconds: dict, extract_seconds: dict, encoders_of, fixed_seconds: float,
                   budget_seconds: float, keep=()) -> list:
    """The configurations to drop, most expensive first, until the estimate fits the budget.

    A configuration costs its training plus the extraction of its encoders (what running it needs);
    an encoder's extraction is saved once no kept configuration uses it. `keep` is never dropped."""
    kept = list(train_seconds)

    def total() -> float:
        used = {e for c in kept for e in encoders_of(c)}
        return fixed_seconds + sum(train_seconds[c] for c in kept) + sum(extract_seconds.get(e, 0.0) for e in used)

    cost = {c: train_seconds[c] + sum(extract_seconds.get(e, 0.0) for e in encoders_of(c)) for c in kept}
    dropped = []
    for conf in sorted(kept, key=lambda c: -cost[c]):
        if total() <= budget_seconds:
            break
        if conf not in keep:
            kept.remove(conf)
            dropped.append(conf)
    return dropped


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
