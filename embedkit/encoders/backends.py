"""Which engine runs an encoder on CPU: torch, ONNX Runtime or OpenVINO, at fp32, bf16 or int8.

`open_encoder(spec, modality, backend, precision)` returns an object with the torch encoder's
interface (`embed`, `preprocess`, `dim`, `provenance()`), so extraction and the Ray actors use
every backend through the same code. For ONNX Runtime and OpenVINO the torch model is traced once
(graphs.py), converted, and kept in the export cache (export_cache.py); later runs load the
converted model without torch weights.

Parity is measured, not assumed: when an entry is built, a calibration batch (generated images or
built-in sentences, no patient data) runs through embedkit's torch fp32 path and through the
backend; the min and mean cosine between the two go into the entry and into the provenance of
every table the backend writes. Below the floor (default 0.99) the backend is refused.

`choose_backend` (`--backend auto`) times every candidate that passes parity on this machine and
keeps the fastest; the measurement is cached per machine, model and thread count.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from embedkit.encoders import export_cache
from embedkit.encoders.registry import EncoderSpec
from embedkit.errors import EmbedkitError

BACKENDS = ("torch", "onnxruntime", "openvino")
BACKEND_CHOICES = (*BACKENDS, "auto")
PRECISIONS = ("fp32", "bf16", "int8")
PRECISION_CHOICES = (*PRECISIONS, "auto")
DEFAULT_PARITY_FLOOR = 0.99
EXPORTABLE = ("dinov2", "clip", "sentence", "efficientnet", "shared")  # llm: see family_problem
CALIBRATION_IMAGES = 16
_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


# ---------------------------------------------------------------- what can run where


def backend_module(backend: str):
    if backend == "onnxruntime":
        from embedkit.encoders import onnxruntime_backend as mod
    elif backend == "openvino":
        from embedkit.encoders import openvino_backend as mod
    else:
        raise EmbedkitError(f"unknown backend '{backend}' (choose {', '.join(BACKEND_CHOICES)})")
    return mod


def family_problem(spec: EncoderSpec, backend: str, precision: str) -> str | None:
    """Why this model cannot run on this backend/precision, or None."""
    if backend == "torch":
        if precision != "fp32" and spec.family == "shared":
            return "the shared encoder runs fp32 only on torch (its runner casts inputs to fp32): use openvino bf16"
        if precision == "int8" and spec.family == "efficientnet":
            return "torch int8 quantises Linear layers only, and EfficientNet is convolutions: use onnxruntime int8"
        return None
    if spec.family not in EXPORTABLE:
        # causal LMs trace to a graph with a KV cache and rotary caches sized at export; embedkit's route for
        # them on CPU is torch (bf16 / int8) or a llama.cpp GGUF, not an ONNX export
        return f"{spec.family} models are not exported to {backend} (use --backend torch)"
    return None


def check_request(spec: EncoderSpec, modality: str, backend: str, precision: str | None, device: str = "auto") -> None:
    """One-line failures before any model loads: unknown names, missing packages, impossible pairs."""
    if backend not in BACKEND_CHOICES:
        raise EmbedkitError(f"unknown backend '{backend}' (choose {', '.join(BACKEND_CHOICES)})")
    if precision is not None and precision not in PRECISION_CHOICES:
        raise EmbedkitError(f"unknown precision '{precision}' (choose {', '.join(PRECISION_CHOICES)})")
    if backend in ("torch", "auto"):
        if backend == "auto" and device not in ("auto", "cpu"):
            raise EmbedkitError("--backend auto chooses among CPU backends: pass --device cpu, or --backend torch")
        problem = backend == "torch" and precision not in (None, "auto") and family_problem(spec, "torch", precision)
        if problem:
            raise EmbedkitError(problem)
        return
    if device not in ("auto", "cpu"):
        raise EmbedkitError(f"--backend {backend} runs on CPU; for --device {device} use --backend torch")
    mod = backend_module(backend)
    for problem in (mod.missing(), precision not in (None, "auto") and mod.precision_problem(precision),
                    family_problem(spec, backend, precision or "fp32")):
        if problem:
            raise EmbedkitError(problem)


# ---------------------------------------------------------------- calibration inputs and parity


def calibration_images(pre, n: int = CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
    """n generated images (smooth shapes, gradients, texture, grey and colour) as a normalised batch."""
    from embedkit.encoders.preprocess import normalize_batch

    rng = np.random.default_rng(seed)
    side = pre.crop
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    images = []
    for i in range(n):
        img = np.zeros((side, side, 3), np.float32) + rng.uniform(0, 0.4) * (xx if i % 2 else yy)[..., None]
        for _ in range(rng.integers(2, 7)):  # blobs: organs, lesions, objects
            cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.35)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
            img += blob[..., None] * rng.uniform(0.2, 0.8, 3 if i % 3 else 1)
        img += rng.normal(0, 0.03 + 0.05 * (i % 4 == 0), img.shape)  # sensor noise, some images grainy
        images.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return normalize_batch(images, pre)


_PHRASES = ["no acute cardiopulmonary abnormality", "small left pleural effusion", "mild cardiomegaly",
            "patchy opacity in the right lower lobe", "consistent with pneumonia", "lungs are clear",
            "stable compared with the prior study", "degenerative changes of the thoracic spine",
            "nodule measuring 6 mm", "recommend follow-up CT", "status post sternotomy", "no pneumothorax",
            "diffuse interstitial markings", "endotracheal tube in good position", "the heart size is normal"]


def calibration_texts(n: int = 24, seed: int = 0) -> list[str]:
    """Built-in report-like sentences from 3 to ~400 words (the longest are truncated by most encoders)."""
    rng = np.random.default_rng(seed)
    lengths = [1, 2, 3, 4, 6, 8, 12, 20, 40, 60][: n // 2] + list(rng.integers(1, 12, max(0, n - 12))) + [80, 120]
    texts = []
    for k in lengths[:n]:
        words = ". ".join(rng.choice(_PHRASES, int(k)))
        texts.append(f"Findings: {words[0].upper()}{words[1:]}.")
    return texts


def calibration_inputs(spec: EncoderSpec, modality: str):
    return calibration_images(spec.preprocess) if modality == "image" else calibration_texts()


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Row-wise cosine between two embedding matrices of the same inputs: min, mean, rows."""
    a, b = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if a.shape != b.shape:
        return {"min_cosine": 0.0, "mean_cosine": 0.0, "inputs": len(a), "note": f"shape {b.shape} != {a.shape}"}
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    cos = np.nan_to_num(cos, nan=0.0)
    return {"min_cosine": round(float(cos.min()), 6), "mean_cosine": round(float(cos.mean()), 6), "inputs": len(a)}


def run_encoder(encoder, inputs) -> np.ndarray:
    out = encoder.embed(inputs)
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------- encoders on ONNX Runtime / OpenVINO


class BackendEncoder:
    """The torch encoder's interface over a converted model: embed(), preprocess, dim, provenance()."""

    def __init__(self, spec: EncoderSpec, modality: str, session, meta: dict, backend: str, precision: str):
        self.spec, self.modality, self.session, self.meta = spec, modality, session, meta
        self.backend, self.precision = backend, precision
        self.dim = int(meta["dim"])
        self.revision = meta.get("revision")
        self.parity = meta["parity"]

    def provenance(self) -> dict:
        return {**self.spec.to_dict(), "modality": self.modality, "dim": self.dim, "revision": self.revision,
                "device": "cpu", "dtype": "float32", "quantize": None, "n_parameters": self.meta.get("n_parameters"),
                "model_bytes": self.meta.get("artefact_bytes"), **backend_provenance(self.backend, self.precision,
                                                                                      self.parity, self.meta)}


class BackendImageEncoder(BackendEncoder):
    @property
    def preprocess(self):
        return self.spec.preprocess

    def embed(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.session({"pixel_values": np.ascontiguousarray(pixel_values, dtype=np.float32)})


class BackendTextEncoder(BackendEncoder):
    def __init__(self, *args, tokenizer, max_length: int):
        super().__init__(*args)
        self.tokenizer, self.max_length = tokenizer, max_length

    def count_tokens(self, texts: list[str]) -> list[int]:
        # verbose=False: counting the long ones is the point, transformers' "longer than the maximum" warning is noise
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Embed one batch; returns (vectors, how many texts were cut at max_length), as TextEncoder does."""
        if self.spec.family == "shared":
            from embedkit.shared_encoder.runner import tokenize

            ids, mask, n_truncated = tokenize(self.tokenizer, texts, self.max_length)
            return self.session({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}), n_truncated
        n_truncated = sum(n > self.max_length for n in self.count_tokens(texts))
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        feeds = {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
        return self.session(feeds), n_truncated


def backend_provenance(backend: str, precision: str, parity_result: dict | None, meta: dict | None = None) -> dict:
    """The provenance fields every table gets from its backend (store.IDENTITY_FIELDS holds backend, precision)."""
    p = parity_result or {}
    out = {"backend": backend, "precision": precision, "parity_min_cosine": p.get("min_cosine"),
           "parity_mean_cosine": p.get("mean_cosine"), "parity_inputs": p.get("inputs"),
           "parity_reference": "embedkit torch fp32 on the built-in calibration batch"}
    if meta:
        out.update(backend_version=meta.get("backend_version"), export_seconds=meta.get("export_seconds"))
    return out


def library_versions(backend: str) -> dict:
    """The versions an export depends on: torch and transformers trace it, the backend runs it."""
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    if backend != "torch":
        out[backend] = backend_module(backend).version()
    return out


def _tokenizer_for(spec: EncoderSpec):
    """(tokenizer, max_length) exactly as the torch text encoder sets them up."""
    if spec.family == "shared":
        from embedkit.shared_encoder.runner import load_tokenizer

        cfg = json.loads((Path(spec.source) / "config.json").read_text())
        return load_tokenizer(spec.source), int(cfg["max_text_len"])
    from embedkit.encoders.loading import load_tokenizer

    tok = load_tokenizer(spec)
    return tok, spec.max_length or getattr(tok, "model_max_length", 512)


class _Reference:
    """The torch fp32 encoder, its calibration embeddings and its ONNX trace, made once per process and model:
    building several entries (auto, `models check`) loads and traces the torch model once."""

    def __init__(self, spec: EncoderSpec, modality: str, threads: int | None, fingerprint: str):
        from embedkit.encoders.models import create_encoder as create_torch

        self.key = (spec, modality, fingerprint)
        self.encoder = create_torch(spec, modality, device="cpu", dtype="float32", threads=threads)
        self.inputs = calibration_inputs(spec, modality)
        self.embeddings = run_encoder(self.encoder, self.inputs)
        self.feeds = _example_feeds(self.encoder, self.inputs)
        self._onnx: Path | None = None
        self.export_seconds = 0.0

    def onnx(self) -> Path:
        """The fp32 ONNX trace, in a temporary folder that lives as long as this object."""
        from embedkit.encoders.graphs import export_onnx, graph_of

        if self._onnx is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="embedkit-export-")
            path = Path(self._tmp.name) / "export.onnx"
            t0 = time.perf_counter()
            export_onnx(graph_of(self.encoder), self.feeds, path)
            self.export_seconds = time.perf_counter() - t0
            self._onnx = path
        return self._onnx


_REFERENCE: list[_Reference] = []  # the last one only: a model's weights are held no longer than needed


def reference(spec: EncoderSpec, modality: str, threads: int | None = None) -> _Reference:
    """The torch fp32 reference of these weights as they are on disk now (new weights: a new reference)."""
    fingerprint = export_cache.source_fingerprint(spec)
    if not _REFERENCE or _REFERENCE[0].key != (spec, modality, fingerprint):
        _REFERENCE.clear()
        _REFERENCE.append(_Reference(spec, modality, threads, fingerprint))
    return _REFERENCE[0]


def release_reference() -> None:
    _REFERENCE.clear()


def _export_and_measure(spec: EncoderSpec, modality: str, backend: str, precision: str, threads: int | None):
    """The build step of a cache entry: trace the torch fp32 encoder, convert, load, measure parity."""
    import shutil

    mod = backend_module(backend)

    def build(folder: Path) -> dict:
        ref = reference(spec, modality, threads)
        t0 = time.perf_counter()
        try:
            onnx_path = folder / "export.onnx"
            shutil.copy(ref.onnx(), onnx_path)
            mod.build(onnx_path, folder, precision)
        except EmbedkitError:
            raise
        except Exception as e:  # noqa: BLE001 - exporters fail in many ways; the user needs the model and the way out
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise EmbedkitError(f"{spec.name} ({modality}) does not export to {backend}: {type(e).__name__}: {first} "
                                f"(use --backend torch)") from None
        export_seconds = ref.export_seconds + time.perf_counter() - t0
        session = _session(mod, folder, threads, precision)
        result = parity(ref.embeddings, session(ref.feeds))
        return {"dim": int(ref.embeddings.shape[1]), "revision": ref.encoder.revision, "parity": result,
                "n_parameters": ref.encoder.n_parameters, "export_seconds": round(export_seconds, 2),
                "artefact_bytes": sum(p.stat().st_size for p in folder.iterdir()), "backend_version": mod.version(),
                "spec": spec.name, "modality": modality, "backend": backend, "precision": precision}

    return build


def _example_feeds(encoder, inputs) -> dict:
    if encoder.modality == "image":
        return {"pixel_values": np.ascontiguousarray(inputs, dtype=np.float32)}
    return _text_feeds(encoder, inputs)


def _text_feeds(encoder, texts) -> dict:
    """The feeds the torch text encoder builds for `texts` (same tokenizer, padding, truncation)."""
    if encoder.spec.family == "shared":
        from embedkit.shared_encoder.runner import tokenize

        ids, mask, _ = tokenize(encoder.runner.tokenizer, texts, encoder.runner.cfg.max_text_len)
        return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    enc = encoder.tokenizer(texts, padding=True, truncation=True, max_length=encoder.max_length, return_tensors="np")
    return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}


def _session(mod, folder: Path, threads: int | None, precision: str):
    if mod.NAME == "openvino":
        return mod.Session(folder, threads, precision)
    return mod.Session(folder, threads)


def load_entry(spec: EncoderSpec, modality: str, backend: str, precision: str, threads: int | None = None,
               log=None) -> tuple[Path, dict, bool]:
    """The export cache entry for this request, built if missing or stale. -> (folder, meta, built now)."""
    folder = export_cache.entry_dir(spec, modality, backend, precision)
    key = export_cache.entry_key(spec, modality, backend, precision, export_cache.source_fingerprint(spec),
                                 library_versions(backend))
    meta = export_cache.read_entry(folder, key)
    if meta is not None:
        return folder, meta, False
    stale = (folder / export_cache.ENTRY).is_file()
    if log:
        log(f"{spec.name} ({modality}): {'rebuilding stale' if stale else 'building'} {backend} {precision} export "
            f"in {folder}")
    if backend == "torch":
        build = _torch_parity(spec, modality, precision, threads)
    else:
        build = _export_and_measure(spec, modality, backend, precision, threads)
    meta = export_cache.build_entry(folder, key, build)
    if log:
        p = meta["parity"]
        log(f"{spec.name} ({modality}): {backend} {precision} built in {meta['build_seconds']} s (export "
            f"{meta.get('export_seconds', 0)} s); cosine to torch fp32 min {p['min_cosine']:.4f}, "
            f"mean {p['mean_cosine']:.4f}")
    return folder, meta, True


def _torch_parity(spec: EncoderSpec, modality: str, precision: str, threads: int | None):
    """torch bf16 / int8 have nothing to export; their entry keeps the measured parity only."""

    def build(folder: Path) -> dict:
        ref = reference(spec, modality, threads)
        result = parity(ref.embeddings, run_encoder(_torch_encoder(spec, modality, precision, threads), ref.inputs))
        return {"dim": int(ref.embeddings.shape[1]), "parity": result, "spec": spec.name, "modality": modality,
                "backend": "torch", "precision": precision}

    return build


def _torch_encoder(spec: EncoderSpec, modality: str, precision: str, threads: int | None, device: str = "cpu"):
    from embedkit.encoders.models import create_encoder as create_torch

    if precision == "int8":
        # per output channel, as onnxruntime int8: embedkit's int8 is per-channel everywhere
        return create_torch(spec, modality, device=device, dtype="float32", threads=threads, quantize="int8-channel")
    return create_torch(spec, modality, device=device, dtype=_TORCH_DTYPE[precision], threads=threads)


# ---------------------------------------------------------------- the one entry point


def open_encoder(spec: EncoderSpec, modality: str, backend: str, precision: str = "fp32", threads: int | None = None,
                 floor: float = DEFAULT_PARITY_FLOOR, device: str = "auto", log=None):
    """An encoder on `backend` at `precision` whose parity to torch fp32 is at least `floor`, or EmbedkitError.

    "auto" is resolved before this, by backend_choice.choose_backend (a measurement, cached per machine)."""
    if backend == "auto" or precision == "auto":
        raise EmbedkitError("open_encoder takes a resolved backend and precision: resolve 'auto' with "
                            "embedkit.encoders.backend_choice.choose_backend")
    check_request(spec, modality, backend, precision, device)
    if backend == "torch" and precision == "fp32":  # the reference itself
        enc = _torch_encoder(spec, modality, "fp32", threads, device=device)
        enc.backend_fields = backend_provenance("torch", "fp32", {"min_cosine": 1.0, "mean_cosine": 1.0,
                                                                   "inputs": 0})
        return enc
    folder, meta, _ = load_entry(spec, modality, backend, precision, threads, log=log)
    release_reference()  # the torch weights traced for the export are not needed to run it
    refuse_below_floor(spec, modality, backend, precision, meta["parity"], floor)
    if backend == "torch":
        enc = _torch_encoder(spec, modality, precision, threads, device=device)
        enc.backend_fields = backend_provenance("torch", precision, meta["parity"], meta)
        return enc
    return _backend_encoder(spec, modality, backend, precision, folder, meta, threads)


def _backend_encoder(spec: EncoderSpec, modality: str, backend: str, precision: str, folder: Path, meta: dict,
                     threads: int | None) -> BackendEncoder:
    session = _session(backend_module(backend), folder, threads, precision)
    if modality == "image":
        return BackendImageEncoder(spec, modality, session, meta, backend, precision)
    tokenizer, max_length = _tokenizer_for(spec)
    return BackendTextEncoder(spec, modality, session, meta, backend, precision, tokenizer=tokenizer,
                              max_length=max_length)


def open_encoders(spec: EncoderSpec, modality: str, pairs: list[tuple[str, str]], threads: int | None = None,
                  log=None, release: bool = True) -> tuple[dict, dict]:
    """Several (backend, precision) encoders of one model at once, tracing it once, parity not enforced
    (for measuring). -> ({pair: encoder}, {pair: why it could not be opened}). release=False keeps the
    traced torch reference for the next call (release_reference() ends it)."""
    out, errors = {}, {}
    for backend, precision in pairs:
        try:
            if backend == "torch" and precision == "fp32":
                out[(backend, precision)] = _torch_encoder(spec, modality, "fp32", threads)
                continue
            folder, meta, _ = load_entry(spec, modality, backend, precision, threads, log=log)
            if backend == "torch":
                enc = _torch_encoder(spec, modality, precision, threads)
                enc.backend_fields = backend_provenance("torch", precision, meta["parity"], meta)
            else:
                enc = _backend_encoder(spec, modality, backend, precision, folder, meta, threads)
            out[(backend, precision)] = enc
        except EmbedkitError as e:
            errors[(backend, precision)] = str(e)
    if release:
        release_reference()
    return out, errors


def parity_on_inputs(spec: EncoderSpec, modality: str, encoder, inputs, threads: int | None = None) -> dict:
    """Cosine of `encoder` to torch fp32 on these inputs (extract passes the run's own first inputs: the
    calibration batch is generated, a clinic's images are not, and bf16 can pass on one and fail on the other)."""
    return parity(run_encoder(_torch_encoder(spec, modality, "fp32", threads), inputs), run_encoder(encoder, inputs))


def refuse_below_floor(spec: EncoderSpec, modality: str, backend: str, precision: str, result: dict,
                       floor: float) -> None:
    if result["min_cosine"] >= floor:
        return
    better = ("--precision fp32 keeps this backend exact" if precision != "fp32"
              else "--backend torch (this model does not export faithfully)")
    raise EmbedkitError(f"{backend} {precision} embeds {spec.name} {modality}s at cosine min {result['min_cosine']:.4f} "
                        f"(mean {result['mean_cosine']:.4f}) to torch fp32, below the parity floor {floor:g}: "
                        f"use {better}, or --backend auto to take the fastest that passes")


def candidates(spec: EncoderSpec, modality: str, only_backend: str | None = None) -> list[tuple[str, str]]:
    """Every (backend, precision) that could run this model here; torch fp32 (the reference) first."""
    out = []
    for backend in BACKENDS:
        if only_backend and backend != only_backend:
            continue
        for precision in PRECISIONS:
            if backend != "torch":
                mod = backend_module(backend)
                if mod.missing() or mod.precision_problem(precision):
                    continue
            if family_problem(spec, backend, precision):
                continue
            out.append((backend, precision))
    return out
