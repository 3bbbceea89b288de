"""What every engine shares: the Engine interface, opening an encoder from the run's config, embedding one
batch, and the backend check the driver runs once before any engine opens.

An engine is a module with two functions (see `Engine`); `config` is the run's ExtractConfig, read by field
name only, so that no engine imports extract.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from embedkit.costs import Costs
from embedkit.encoders.registry import EncoderSpec
from embedkit.errors import EmbedkitError
from embedkit.items import Item
from embedkit.plan import EmbeddedBatch, Plan, input_size, read_item_text

PARITY_SAMPLE = 32  # the run's first inputs a backend is checked on against torch fp32


@runtime_checkable
class Engine(Protocol):
    def check(self) -> None:
        """Fail with one EmbedkitError line, before any work, when the engine's packages are missing."""

    def open_stream(self, modality: str, spec: EncoderSpec, plan: Plan, config, costs: Costs,
                    encoder=None) -> tuple[dict, Iterator[EmbeddedBatch]]:
        """(encoder provenance, lazy stream of the plan's batches embedded, in plan order). `encoder`: one the
        driver already opened with this config (`backend_checked_on_inputs`), to reuse or to ignore.
        Stage seconds go to `costs`."""


def open_encoder(spec: EncoderSpec, modality: str, config, log=None):
    """The encoder `config` asks for (device, dtype, threads, quantize, backend, precision, parity floor)."""
    from embedkit.encoders import create_encoder

    return create_encoder(spec, modality, device=config.device, dtype=config.dtype, threads=config.threads,
                          quantize=config.quantize, backend=config.backend, precision=config.precision,
                          parity_floor=config.parity_floor, log=log)


def decode(path, preprocess, dicom=None, inside=None) -> tuple[np.ndarray | None, str | None]:
    """(decoded and resized image, None) or (None, reason). `dicom`: the item's DicomFrame, for DICOM files.
    `inside`: the resolved data folder; the file is checked to lie in it when it is opened (limits.open_inside)."""
    from embedkit.encoders.preprocess import ImageDecodeError, decode_image

    if inside is not None:
        from embedkit.dicom import DICOM_EXTS
        from embedkit.limits import open_inside

        try:
            with open_inside(path, inside) as f:  # DICOM files are read by pydicom from the path just checked
                raw = f.read() if dicom is None and Path(path).suffix.lower() not in DICOM_EXTS else None
        except OSError as e:
            return None, f"cannot read file ({e.strerror or type(e).__name__})"
        if raw is not None and raw[128:132] != b"DICM":
            path = raw  # decode the very bytes that were checked
    try:
        return decode_image(path, preprocess, dicom=dicom), None
    except ImageDecodeError as e:
        return None, str(e)


def embed_images(encoder, arrays: list[np.ndarray], costs: Costs, out: np.ndarray | None = None) -> np.ndarray:
    """Vectors of decoded images: normalised into one batch (into `out` when given), then the model."""
    from embedkit.encoders.preprocess import normalize_batch

    with costs.stage("preprocess"):
        pixels = normalize_batch(arrays, encoder.preprocess, out=out)
    with costs.stage("model"):
        return encoder.embed(pixels)


def embed_texts(encoder, items: list[Item], costs: Costs):
    """Read and embed a batch of texts -> (indices embedded, their vectors or None, [(index, reason)], truncated)."""
    ok, texts, bad = [], [], []
    with costs.stage("read"):
        for i, it in enumerate(items):
            text, reason = read_item_text(it)
            if reason:
                bad.append((i, reason))
            else:
                ok.append(i)
                texts.append(text)
    if not ok:
        return ok, None, bad, 0
    with costs.stage("model"):
        vectors, n_truncated = encoder.embed(texts)
    return ok, vectors, bad, n_truncated


def backend_checked_on_inputs(modality: str, spec: EncoderSpec, plan: Plan, config, log):
    """Resolve --backend/--precision auto for this run's size (in the driver, never in each Ray actor), then
    check the backend against torch fp32 on this run's first inputs; with auto, the next fastest is tried when
    one falls below the floor. -> (resolved config, provenance fields, opened encoder or None)."""
    auto = config.backend == "auto" or config.precision == "auto"
    if auto:
        from embedkit.encoders.backend_choice import auto_for_run, text_work

        # the work at hand decides how much choosing is worth: a small run does not pay for exports and timings
        chars = None if modality == "image" else text_work(spec, (
            len(it.text) if it.text is not None else input_size(it.text_path) for it in plan.items()))
        pairs = auto_for_run(spec, modality, sum(len(b) for b in plan.batches), threads=config.threads,
                             floor=config.parity_floor, device=config.device, log=log, text_chars=chars,
                             only_backend=None if config.backend == "auto" else config.backend)
    else:
        pairs = [(config.backend, config.precision)]
    sample = None
    for backend, precision in pairs:
        cfg = replace(config, backend=backend, precision=precision)
        if backend == "torch" and precision in (None, "fp32"):  # the reference itself, or the legacy dtype flags
            return cfg, {}, None
        encoder = open_encoder(spec, modality, cfg, log=log)
        sample = _parity_sample(spec, plan) if sample is None else sample
        if not len(sample):
            return cfg, {}, encoder
        from embedkit.encoders.backends import parity_on_inputs

        p = parity_on_inputs(spec, modality, encoder, sample, cfg.threads)
        if p["min_cosine"] >= cfg.parity_floor:
            log(f"{modality}: {backend} {precision}, cosine to torch fp32 on this run's first {p['inputs']} "
                f"{modality}s: min {p['min_cosine']:.4f}, mean {p['mean_cosine']:.4f}")
            return cfg, {"parity_run_min_cosine": p["min_cosine"], "parity_run_mean_cosine": p["mean_cosine"],
                         "parity_run_inputs": p["inputs"]}, encoder
        below = (f"{backend} {precision} embeds this run's first {p['inputs']} {modality}s at cosine min "
                 f"{p['min_cosine']:.4f} to torch fp32, below the parity floor {cfg.parity_floor:g}")
        if not auto:
            raise EmbedkitError(f"{below}: use --precision fp32, or --backend auto to take the fastest that passes")
        log(f"{below}; trying the next fastest")
    raise EmbedkitError(f"no backend keeps parity {config.parity_floor:g} on this run's inputs: use --backend torch")


def _parity_sample(spec: EncoderSpec, plan: Plan):
    """Up to PARITY_SAMPLE of the run's first readable inputs: a normalised image batch, or texts."""
    from embedkit.encoders.preprocess import normalize_batch

    found = []
    for it in plan.items():
        if len(found) == PARITY_SAMPLE:
            break
        if plan.modality == "image":
            image, _ = decode(it.image_path, spec.preprocess, it.dicom)
            if image is not None:
                found.append(image)
        else:
            text, reason = read_item_text(it)
            if not reason:
                found.append(text)
    if plan.modality == "image":
        return normalize_batch(found, spec.preprocess) if found else []
    return found
