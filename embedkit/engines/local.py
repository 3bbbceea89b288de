"""The local engine: the plan's batches embedded in this process.

Images: decode + resize of the next batches runs in threads while the model embeds this one
(Pillow releases the GIL while it decodes and resizes). Texts: read and embedded batch by batch,
in the plan's (length-sorted) order.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np

from embedkit.costs import Costs
from embedkit.encoders.registry import EncoderSpec
from embedkit.engines.base import decode, embed_images, embed_texts, open_encoder
from embedkit.items import Item
from embedkit.plan import EmbeddedBatch, Plan


def check() -> None:
    """Nothing to check: the local engine needs only embedkit's own dependencies."""


def open_stream(modality: str, spec: EncoderSpec, plan: Plan, config, costs: Costs, encoder=None):
    from embedkit.console import say

    if encoder is None:
        encoder = open_encoder(spec, modality, config, log=say)
    embed = _images if modality == "image" else _texts
    return encoder.provenance(), embed(plan.batches, encoder, config, costs)


def decode_threads(config) -> int:
    """Image decode threads: `decode_workers`, or by default one beside torch (whose model stage takes every
    core and most of the time) and one per core beside ONNX Runtime / OpenVINO, whose model stage is fast
    enough that decoding becomes the limit."""
    if config.decode_workers:
        return config.decode_workers
    return 1 if config.backend == "torch" else max(1, min(4, os.cpu_count() or 1))


def _images(batches: list[list[Item]], encoder, config, costs: Costs):
    pre = encoder.preprocess
    buffer = np.empty((config.batch_size, 3, pre.crop, pre.crop), dtype=np.float32)

    def timed_decode(it: Item):
        t0 = time.perf_counter()
        try:
            return decode(it.image_path, pre, it.dicom)
        finally:
            costs.add("decode", time.perf_counter() - t0)

    with ThreadPoolExecutor(max_workers=decode_threads(config)) as pool:
        queue = iter(batches)
        # one task per image, two batches queued: the threads share a batch and run ahead of the model
        ahead = deque([pool.submit(timed_decode, it) for it in b] for b in islice(queue, 2))
        for batch in batches:
            decoded = [f.result() for f in ahead.popleft()]
            for nxt in islice(queue, 1):
                ahead.append([pool.submit(timed_decode, it) for it in nxt])  # decode ahead while the model runs
            ok = [it for it, (img, _) in zip(batch, decoded) if img is not None]
            bad = [(it, reason) for it, (img, reason) in zip(batch, decoded) if img is None]
            arrays = [img for img, _ in decoded if img is not None]
            vectors = embed_images(encoder, arrays, costs, out=buffer) if ok else None
            yield EmbeddedBatch(batch, ok, vectors, bad, 0)


def _texts(batches: list[list[Item]], encoder, config, costs: Costs):
    for batch in batches:
        ok, vectors, bad, n_truncated = embed_texts(encoder, batch, costs)
        yield EmbeddedBatch(batch, [batch[i] for i in ok], vectors, [(batch[i], reason) for i, reason in bad],
                            n_truncated)
