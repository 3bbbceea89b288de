"""The Ray engine: the plan's batches embedded by Ray Data actors.

Everything else stays in the driver (the process that called `extract`): scanning, hashing and
resume planning, batching, dedupe, the Parquet writer, errors.parquet and manifest.json. So ids,
schema, errors and crash-safety are the local engine's by construction. Here:

  1. each planned batch becomes one Ray Data block of (uid, path, text);
  2. `map_batches` hands blocks to a fixed pool of `Embedder` actors, each loading the model once;
  3. the driver streams the results back with `iter_batches` and writes them as they arrive.

Actors read inputs by path, so on a cluster DATA and the model must be at the same path on
every node (a shared or identical mount, and the Hugging Face cache or model folder).
"""

from __future__ import annotations

import json
import os
import warnings
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa

import embedkit
from embedkit.costs import Costs
from embedkit.encoders.registry import EncoderSpec
from embedkit.engines.base import decode, embed_images, embed_texts
from embedkit.errors import EmbedkitError
from embedkit.items import DicomFrame, Item
from embedkit.plan import EmbeddedBatch, Plan, item_path

# A dying actor (OOM, segfault, lost node) is restarted and its batch re-run; bounded, so that an
# input that kills every actor fails the job instead of restarting actors forever (Ray Data's default).
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3


class Embedder:
    """One per Ray actor: loads the encoder once, then embeds blocks of {uid, path, text}.

    A bad input comes back as a row with an `error` reason and a zero vector, never as an
    exception, so the driver records it exactly as the local engine does. What concerns the
    whole block (the encoder's provenance, stage seconds, texts truncated) rides as JSON on the
    block's first row, so sums over rows stay right however Ray slices blocks.
    """

    def __init__(self, spec: EncoderSpec, modality: str, device: str, dtype: str, threads: int,
                 quantize: str | None, backend: str = "torch", precision: str | None = None,
                 parity_floor: float = 0.99):
        from embedkit.encoders import create_encoder

        self.modality = modality
        # the same creation code as the local engine: a converted model comes from the export cache the
        # driver filled (extract resolves --backend auto there), with the parity it measured
        self.encoder = create_encoder(spec, modality, device=device, dtype=dtype, threads=threads, quantize=quantize,
                                      backend=backend, precision=precision, parity_floor=parity_floor)
        self.provenance = self.encoder.provenance()

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(block["uid"])
        vectors = np.zeros((n, self.encoder.dim), dtype=np.float32)
        errors = np.full(n, "", dtype=object)
        costs = Costs()
        embed = self._images if self.modality == "image" else self._texts
        n_truncated = embed(block, vectors, errors, costs)
        info = json.dumps({"provenance": self.provenance, "stage_seconds": costs.stages, "truncated": n_truncated},
                          default=str)
        return {"uid": block["uid"], "embedding": vectors, "error": errors,
                "info": np.array([info] + [""] * (n - 1), dtype=object)}

    def _images(self, block, vectors, errors, costs: Costs) -> int:
        ok, arrays = [], []
        with costs.stage("decode"):
            for i, (path, frame, window) in enumerate(zip(block["path"], block["frame"], block["window"])):
                dicom = DicomFrame(None if frame < 0 else int(frame), window) if window else None
                image, reason = decode(path, self.encoder.preprocess, dicom)
                if image is None:
                    errors[i] = reason
                else:
                    ok.append(i)
                    arrays.append(image)
        if ok:
            vectors[ok] = embed_images(self.encoder, arrays, costs)
        return 0

    def _texts(self, block, vectors, errors, costs: Costs) -> int:
        items = [Item("", text=text, text_path=Path(path) if path else None)
                 for path, text in zip(block["path"], block["text"])]
        ok, embedded, bad, n_truncated = embed_texts(self.encoder, items, costs)
        for i, reason in bad:
            errors[i] = reason
        if ok:
            vectors[ok] = embedded
        return n_truncated


def check() -> None:
    """Ray Data is an optional package: without it, one line before any file is read."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise EmbedkitError("--engine ray needs Ray Data: pip install 'embedkit[ray]'") from None


def open_stream(modality: str, spec: EncoderSpec, plan: Plan, config, costs: Costs, encoder=None):
    """The Engine step on Ray: (encoder provenance, stream of embedded batches). `encoder` is not used:
    actors open their own, from the export cache the driver's backend check filled.

    The provenance comes from the actors' first result rather than from a model loaded in the
    driver: the driver needs no model memory, and the recorded device is the one that embedded.
    Stage seconds are the actors' own, summed over actors (as the local engine's are its own).
    """
    import ray

    _init(config)
    batches = plan.batches
    units = list(plan.items())  # a row's uid is its position here
    blocks, start = [], 0
    for batch in batches:  # one block per batch: the actors see the local engine's batches
        blocks.append(_block(batch, start, modality))
        start += len(batch)
    ds = ray.data.from_arrow(blocks)
    ds.context.execution_options.preserve_order = True  # the local engine's row order: reproducible files
    ds.context.enable_progress_bars = False  # extract's own bar counts the rows
    with warnings.catch_warnings():
        # Ray >= 2.60 deprecates passing actor options such as max_restarts this way, with no replacement yet
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        results = ds.map_batches(
            Embedder, batch_size=config.batch_size, batch_format="numpy",
            fn_constructor_kwargs=dict(spec=spec, modality=modality, device=config.device, dtype=config.dtype,
                                       threads=config.threads or max(1, int(config.ray_cpus_per_actor)),
                                       quantize=config.quantize, backend=config.backend,
                                       precision=config.precision, parity_floor=config.parity_floor),
            compute=ray.data.ActorPoolStrategy(size=_actors(config, len(batches))),
            num_cpus=config.ray_cpus_per_actor, num_gpus=config.ray_gpus_per_actor,
            max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
    stream = iter(results.iter_batches(batch_size=None, batch_format="numpy"))
    first = _next(stream)  # waits for one actor to load the model and embed a batch
    if first is None:
        raise EmbedkitError("the Ray job returned no results")
    provenance = json.loads(next(i for i in first["info"] if i))["provenance"]
    rest = iter(lambda: _next(stream), None)  # calls _next until it returns None
    return provenance, _batches(chain([first], rest), units, costs)


def _init(config) -> None:
    import ray

    if ray.is_initialized():
        return  # the caller's Ray (a notebook, a test, an earlier modality) is used as it is
    if config.ray_address is None:
        # a laptop: a private Ray on this machine with every core; it stops when the process exits
        ray.init(include_dashboard=False)
        return
    # a cluster: ship this embedkit so actors run the very code the driver planned with
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE",) if k in os.environ}
    ray.init(address=config.ray_address,
             runtime_env={"py_modules": [str(Path(embedkit.__file__).parent)], "env_vars": env})


def _actors(config, n_batches: int) -> int:
    """`ray_actors`, or as many as the cluster's GPUs (or CPUs) hold; never more than there are batches."""
    import ray

    fit = config.ray_actors
    if fit is None:
        total = ray.cluster_resources()
        if config.ray_gpus_per_actor:
            fit = total.get("GPU", 0) // config.ray_gpus_per_actor
        else:
            fit = total.get("CPU", 1) // (config.ray_cpus_per_actor or 1)
    return int(max(1, min(fit, n_batches)))


def _block(batch: list[Item], start: int, modality: str) -> pa.Table:
    # absolute: actors need not share the driver's working directory
    paths = [str(p.absolute()) if (p := item_path(it, modality)) is not None else None for it in batch]
    texts = [it.text if modality == "text" else None for it in batch]
    dicom = [it.dicom if modality == "image" else None for it in batch]  # which frame and window of a DICOM file
    frames = [-1 if d is None or d.frame is None else d.frame for d in dicom]
    return pa.table({"uid": pa.array(range(start, start + len(batch)), pa.int64()),
                     "path": pa.array(paths, pa.string()), "text": pa.array(texts, pa.string()),
                     "frame": pa.array(frames, pa.int64()),
                     "window": pa.array([d.window if d else "" for d in dicom], pa.string())})


def _batches(blocks, units: list[Item], costs: Costs):
    """Ray's result blocks as the plan's embedded batches."""
    for block in blocks:
        batch = [units[u] for u in block["uid"]]
        good = block["error"] == ""
        ok = [it for it, g in zip(batch, good) if g]
        bad = [(it, reason) for it, reason in zip(batch, block["error"]) if reason]
        infos = [json.loads(i) for i in block["info"] if i]
        for info in infos:
            for stage, seconds in info["stage_seconds"].items():
                costs.add(stage, seconds)
        yield EmbeddedBatch(batch, ok, block["embedding"][good], bad, sum(info["truncated"] for info in infos))


def _next(stream):
    """next(stream), with an EmbedkitError raised in an actor (e.g. no model on that node) as its one line."""
    try:
        return next(stream, None)
    except Exception as e:
        # Ray re-raises an actor's exception as text: a traceback ending in "embedkit.errors.EmbedkitError: ..."
        marker = f"{EmbedkitError.__module__}.{EmbedkitError.__name__}: "
        messages = [line.split(marker, 1)[1] for line in str(e).splitlines() if marker in line]
        if messages:
            raise EmbedkitError(messages[-1]) from None
        raise
