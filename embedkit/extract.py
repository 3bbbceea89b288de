"""The extraction pipeline: items -> batches -> encoder -> Parquet, resumable and streaming.

For each requested modality:
  1. hash every input (sha256 of the file, or of the text) and compare with what `--out` holds:
     only new or changed items are embedded; rows of changed or vanished items are dropped;
     the rows kept take the table's current labels, split, group and metadata (store.relabel_parts),
     their embeddings untouched;
  2. load the encoder only if there is work;
  3. images: decode + resize of batch k+1 runs in a thread while the model embeds batch k;
     identical files (same sha256) are embedded once;
     texts: sorted by length so a batch pads to similar lengths (sentence-transformers' trick);
  4. rows stream into row groups of atomically-renamed part files (see store.py); a text row also
     keeps the exact text that was embedded, so training can check training rows for leakage.
Bad inputs become rows of errors.parquet; `strict` turns the first one into a failure.
Only step 3 differs by engine: extract hands the plan (plan.py) to the engine named by `engine`
(engines/: "local" in this process, "ray" in Ray actors), and every engine's batches reach the same writer.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from embedkit.costs import Costs, dir_bytes, reset_peak_rss
from embedkit.dicom import SALT_FILE
from embedkit.encoders.preprocess import IMAGE_DECODE
from embedkit.encoders.registry import (DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, EncoderSpec, require_model,
                                        resolve_spec)
from embedkit.engines import get_engine
from embedkit.engines.base import backend_checked_on_inputs
from embedkit.errors import EmbedkitError
from embedkit.guards import (
    FINGERPRINT_KEY, IDENTITY_KEY, check_encoder_identity, check_writable_folder, encoder_identity, fingerprint,
    folder_lock,
)
from embedkit.items import Item, SkippedInput, SourceOptions
from embedkit.limits import MAX_EXTRACT_BATCH, check_count, open_inside
from embedkit.plan import Plan, input_size, item_path, make_plan, read_item_text
from embedkit.sources import SourceScan, scan_source
from embedkit.store import (
    TEXT_COLUMN, PartWriter, build_schema, check_same_encoder, dataset_dir, drop_rows, existing_hashes, part_files,
    read_provenance, relabel_parts, remove_partial_parts, write_errors, write_json_atomic,
)

MODALITIES = ("image", "text")


@dataclass
class ExtractConfig:
    image_model: str | None = DEFAULT_IMAGE_MODEL  # None: do not embed images
    text_model: str | None = DEFAULT_TEXT_MODEL  # None: do not embed texts
    image_pooling: str | None = None  # None: the spec's default (e.g. cls for DINOv2)
    text_pooling: str | None = None  # LLMs: mean (default) or last
    max_length: int | None = None  # text tokens before truncation; None: the spec's
    text_normalize: bool | None = None  # L2-normalise text vectors; None: the spec's choice
    device: str = "auto"
    dtype: str = "float32"
    quantize: str | None = None  # "int8": dynamic int8 Linear layers on CPU (encoders/models.py)
    backend: str = "torch"  # torch | onnxruntime | openvino | auto (encoders/backends.py)
    precision: str | None = None  # fp32 | bf16 | int8 | auto; None: torch's dtype/quantize, fp32 elsewhere
    parity_floor: float = 0.99  # min cosine to torch fp32 a backend must reach (calibration batch, first inputs)
    batch_size: int = 32
    threads: int | None = None  # model threads (torch or the backend); None: the library's default (all cores)
    decode_workers: int | None = None  # image decode threads beside the model; None: engines/local.py decode_threads
    trust_remote_code: bool = False
    rows_per_part: int = 8192  # rows per Parquet part file: the most a crash can cost to recompute
    overwrite: bool = False
    strict: bool = False  # first bad input aborts the run
    progress: bool = True
    engine: str = "local"  # "local": this process; "ray": Ray actors (pip install 'embedkit[ray]')
    ray_address: str | None = None  # None: start a local Ray with every core; "auto" or ray://...: join a cluster
    ray_actors: int | None = None  # None: as many as the cluster's CPUs (or GPUs) fit, at most one per batch
    ray_cpus_per_actor: float = 1.0  # also the actor's torch threads (unless `threads` is set)
    ray_gpus_per_actor: float = 0.0  # > 0: each actor reserves (a share of) a GPU
    prune: bool = False  # allow a resume to drop more than `max_drop_share` of stored rows (inputs gone)
    max_drop_share: float = 0.1  # a small table may lose up to `max_drop_rows` rows (cheap to recompute)
    max_drop_rows: int = 3
    max_report_bytes: int = 5 * 2**20  # a larger report file is skipped (recorded), never read whole
    group_near_duplicates: bool = False  # rewrite `group` so each near-duplicate cluster is one (near_duplicates.py)


@dataclass
class ModalityResult:
    modality: str
    model: str
    dataset: str
    rows_total: int = 0
    rows_embedded: int = 0  # this run
    rows_reused: int = 0  # already in --out with the same content hash
    rows_dropped: int = 0  # stale rows removed (content changed or input gone)
    rows_relabelled: int = 0  # stored rows whose labels, split, group, metadata or path changed (not re-embedded)
    unique_inputs_embedded: int = 0  # identical files are embedded once
    skipped: int = 0
    truncated_texts: int = 0
    bytes: int = 0
    provenance: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)


@dataclass
class ExtractResult:
    out: str
    layout: str
    counts: dict
    modalities: dict[str, ModalityResult]
    skipped: list[SkippedInput]
    costs: dict

    def to_dict(self) -> dict:
        return {"out": self.out, "layout": self.layout, "counts": self.counts, "costs": self.costs,
                "modalities": {m: asdict(r) for m, r in self.modalities.items()}, "skipped": len(self.skipped)}

    def __repr__(self) -> str:  # one line: where, how many; the skipped inputs as a count (they can be thousands)
        mods = ", ".join(f"{m} {r.model}" for m, r in self.modalities.items())
        return f"ExtractResult({self.out!r}; {self.layout}; {mods or 'no modality'}; {len(self.skipped)} skipped)"


def extract(data: str | Path, out: str | Path, config: ExtractConfig | None = None,
            source: SourceOptions | None = None, rows: list[dict] | None = None,
            scan: SourceScan | None = None) -> ExtractResult:
    """Embed every image and text under `data` into Parquet under `out`. See module docstring."""
    from embedkit.console import say

    config = config or ExtractConfig()
    get_engine(config.engine)  # an unknown engine or a missing Ray fails before any file is read
    check_count(config.batch_size, "--batch-size", 1, MAX_EXTRACT_BATCH, "a batch of inputs is decoded at once")
    costs = Costs()
    data, out = Path(data), Path(out)
    source = source or SourceOptions()
    if source.dicom_salt_file is None:  # DICOM pseudonyms are keyed by a salt kept in --out
        source = replace(source, dicom_salt_file=out / SALT_FILE)
    with costs.stage("scan"):
        scan = scan or scan_source(data, source, rows=rows)
    real_root = data.resolve() if data.is_dir() else None
    for it in scan.items:  # files are opened inside the data folder only, checked again at open time
        it.data_root = real_root
    counts = scan.counts()
    say(f"[bold]layout[/]: {scan.layout}")
    say("found: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items() if v or k in ("images", "texts")))
    if scan.duplicate_ids:
        say(f"note: {scan.duplicate_ids} table rows dropped because their id repeats an earlier row's "
            f"(listed in errors.parquet)")
    for note in scan.notes:
        say(f"note: {note}")
    if scan.not_carried:
        say(f"note: column(s) {', '.join(scan.not_carried)} not carried through: embedkit's own columns have these "
            f"names (name such a column with --split-col or --group-col if that is what it holds)")
    skipped = list(scan.skipped)
    if config.strict and skipped:
        s = skipped[0]
        raise EmbedkitError(f"--strict: {s.path}: {s.reason}")

    wanted = {"image": config.image_model, "text": config.text_model}
    has = {"image": counts["images"] > 0, "text": counts["texts"] > 0}
    todo = [m for m in MODALITIES if wanted[m] and has[m]]
    if not todo:
        asked = [m for m in MODALITIES if wanted[m]]
        raise EmbedkitError(f"nothing to embed under '{data}': found {counts['images']} images and "
                            f"{counts['texts']} texts, asked for {' and '.join(asked) or 'no modality'}")
    for m in MODALITIES:
        if wanted[m] and not has[m]:
            say(f"note: no {m}s found, so no {m} embeddings (a one-modality run)")
    specs = {m: resolve_spec(wanted[m], m, pooling=config.image_pooling if m == "image" else config.text_pooling,
                             max_length=config.max_length if m == "text" else None,
                             normalize=config.text_normalize if m == "text" else None,
                             trust_remote_code=config.trust_remote_code) for m in todo}

    from embedkit.encoders.backends import check_request

    for m in todo:  # an unknown backend, a missing package or an impossible precision fails before any work
        check_request(specs[m], m, config.backend, config.precision, config.device)
        require_model(specs[m])  # a model that is not here and cannot be fetched now: one line, at once
    check_writable_folder(out, "--out")
    with folder_lock(out / ".embedkit.lock", f"--out '{out}'"):
        return _extract_locked(data, out, config, scan, counts, specs, todo, skipped, costs,
                               dataset=source.dataset if source is not None else None)


def _extract_locked(data, out, config, scan, counts, specs, todo, skipped, costs, dataset=None) -> ExtractResult:
    results = {}
    for m in todo:
        reset_peak_rss()  # each modality's peak_rss_mb is its own, not the high-water mark of what ran before it
        results[m] = _extract_modality(m, specs[m], scan, data, out, config, skipped)
    if config.group_near_duplicates and any(r.rows_total for r in results.values()):
        from embedkit.console import say
        from embedkit.near_duplicates import regroup_store

        g = regroup_store(out)
        say(f"near-duplicate groups: {g['groups_formed']} groups join {g['rows_regrouped']} rows "
            f"({', '.join(m + ' cosine >= ' + format(t['threshold'], 'g') for m, t in g['thresholds'].items())})")
    write_errors(out, skipped)
    total = costs.to_dict()
    total["peak_rss_mb"] = max([total["peak_rss_mb"], *(r.costs.get("peak_rss_mb", 0) for r in results.values())])
    result = ExtractResult(str(out), scan.layout, counts, results, skipped, total)
    write_json_atomic(out / "manifest.json", {
        "embedkit_version": _version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data": str(data.resolve()),
        **result.to_dict(), "skipped_by_stage": dict(Counter(s.stage for s in skipped)),
        **({"dataset": dataset} if dataset else {})})  # a data manifest's source and label meanings (model cards)
    if not any(r.rows_total for r in results.values()):
        raise EmbedkitError(f"nothing could be embedded: all {len(skipped)} inputs were skipped "
                            f"(reasons in {out / 'errors.parquet'})")
    return result


def _extract_modality(modality: str, spec: EncoderSpec, scan: SourceScan, root: Path, out: Path,
                      config: ExtractConfig, skipped: list[SkippedInput]) -> ModalityResult:
    from embedkit.console import progress_bar, say

    costs = Costs()
    is_text = modality == "text"
    items = [it for it in scan.items if (it.has_text if is_text else it.image_path is not None)]
    directory = dataset_dir(out, modality, spec.name)
    res = ModalityResult(modality, spec.name, str(directory))
    if config.overwrite and directory.exists():
        shutil.rmtree(directory)
    remove_partial_parts(directory)
    # the encoder's identity is checked on every run, before anything is dropped or reused
    identity = encoder_identity(spec, config)
    stored_provenance = read_provenance(part_files(directory)[0]) if part_files(directory) else {}
    check_encoder_identity(directory, stored_provenance.get(IDENTITY_KEY), identity)
    if stored_provenance and IDENTITY_KEY not in stored_provenance:
        say(f"note: {directory.name} was written before encoder fingerprints: its weights cannot be compared "
            f"(--overwrite re-embeds it under one)")
    elif stored_provenance and "image_decode" in identity and "image_decode" not in stored_provenance[IDENTITY_KEY]:
        say(f"note: {directory.name} was written before 16-bit images were scaled (they were clipped): "
            f"--overwrite re-embeds it if the data holds 16-bit images")

    # 1. content hashes decide what is new, changed or gone
    with costs.stage("hash"):
        hashes: dict[str, str] = {}
        readable = []
        for it in items:
            if is_text and it.text_path is not None and input_size(it.text_path) > config.max_report_bytes:
                _skip(skipped, config, SkippedInput(it.id, _rel(it.text_path, root), "read", f"report larger than "
                                                    f"{config.max_report_bytes} bytes (the cap; see --max-report-mb)"),
                      modality)
                continue
            try:
                hashes[it.id] = _sha256(it, modality)
                readable.append(it)
            except OSError as e:
                _skip(skipped, config, SkippedInput(it.id, _rel(item_path(it, modality), root), "read",
                                                    f"cannot read file ({e.strerror or type(e).__name__})"), modality)
    items = readable
    stored = existing_hashes(directory) if directory.exists() else {}
    stale = {i for i, h in stored.items() if hashes.get(i) != h}
    _check_drop_share(directory, stored, {i for i in stale if i not in hashes}, config)
    pending = [it for it in items if stored.get(it.id) != hashes[it.id]]
    res.rows_reused = len(items) - len(pending)

    label_cols = sorted({k for it in items for k in it.labels})
    meta_cols = sorted({k for it in items for k in it.meta} - set(label_cols))
    # what the table says now: stored rows follow it (relabel_parts), new rows are written with it
    table_keys = {"label_columns": label_cols, "metadata_columns": meta_cols, "group_col": scan.group_col,
                  "group_near_duplicates": None}  # set again by the --group-near-dups pass, if asked
    columns = {c: [it.labels.get(c) for it in items] for c in label_cols}
    columns.update({c: [it.meta.get(c) for it in items] for c in meta_cols})
    by_id = {it.id: it for it in items}

    def current_values(part) -> dict[str, list]:
        rows = [by_id[i] for i in part.column("id").to_pylist()]  # stale rows were dropped: every id is here
        values = _row_values(rows, modality, root, hashes, label_cols, meta_cols)
        if is_text:  # same hash, same text: keep it; parts from before the column existed get it now
            values[TEXT_COLUMN] = (part.column(TEXT_COLUMN).to_pylist() if TEXT_COLUMN in part.column_names
                                   else [read_item_text(it)[0] for it in rows])
        return values

    if not pending:
        if stale:
            res.rows_dropped = drop_rows(directory, stale)
        if part_files(directory):
            dim = read_provenance(part_files(directory)[0])["dim"]
            schema = build_schema(dim, columns, table_keys, text_column=is_text)
            res.rows_relabelled = relabel_parts(directory, schema, current_values, table_keys)
        say(f"{modality}: all {len(items)} rows already in {directory.name}, nothing to embed")
        res.provenance = read_provenance(part_files(directory)[0]) if part_files(directory) else {}
        res.rows_total = len(items)
        res.bytes = dir_bytes(directory) if directory.exists() else 0
        return res

    # 2. load the model (only now that there is work), here or in the engine's workers
    plan = make_plan(modality, pending, hashes, config.batch_size)
    with costs.stage("load_model"):
        encoder_provenance, embedded = _open_engine(spec, plan, config, costs)
    provenance = {**encoder_provenance, **table_keys, "versions": _versions(), "layout": scan.layout,
                  "data_root": str(root.resolve()), IDENTITY_KEY: identity, FINGERPRINT_KEY: fingerprint(identity),
                  **({"image_decode": IMAGE_DECODE} if modality == "image" else {})}
    if directory.exists():
        check_same_encoder(directory, provenance)
    if stale:
        res.rows_dropped = drop_rows(directory, stale)
    schema = build_schema(encoder_provenance["dim"], columns, provenance, text_column=is_text)
    res.rows_relabelled = relabel_parts(directory, schema, current_values, table_keys)
    writer = PartWriter(directory, schema, rows_per_part=config.rows_per_part,
                        row_group_size=min(256, config.rows_per_part))

    def write(batch: list[Item], vectors: np.ndarray) -> None:
        with costs.stage("write"):
            cols = _row_values(batch, modality, root, hashes, label_cols, meta_cols)
            if is_text:  # the text as the encoder got it (read again here, so every engine agrees)
                cols[TEXT_COLUMN] = [read_item_text(it)[0] for it in batch]
            writer.write(cols, vectors)

    # 3. embed
    with progress_bar(config.progress) as bar:
        from rich.markup import escape

        task = bar.add_task(escape(f"{modality} · {spec.name}"), total=len(pending), rate="")
        t0 = time.perf_counter()

        def advance(n: int) -> None:
            done = bar.tasks[task].completed + n
            bar.update(task, advance=n, rate=f"{done / max(time.perf_counter() - t0, 1e-9):.1f}/s")

        _write_batches(plan, embedded, config, skipped, root, write, advance, res)
    writer.close()
    provenance["truncated_texts"] = res.truncated_texts
    res.rows_embedded = writer.rows_written
    res.rows_total = res.rows_reused + res.rows_embedded
    res.skipped = sum(1 for s in skipped if getattr(s, "modality", modality) == modality)
    res.bytes = dir_bytes(directory)
    model_s = costs.stages.get("model", 0.0)
    spent = costs.to_dict()
    busy = spent["wall_seconds"] - costs.stages.get("load_model", 0.0)  # hash, decode, model, write; not the load
    res.costs = {**spent, "items_per_second": round(res.unique_inputs_embedded / model_s, 2) if model_s else 0,
                 "end_to_end_items_per_second": round(res.rows_embedded / busy, 2) if busy > 0 else 0}
    res.provenance = provenance
    return res


def _check_drop_share(directory: Path, stored: dict, vanished: set, config: ExtractConfig) -> None:
    """Rows of inputs that are gone are dropped; more than a small share needs --prune (a wrong DATA or --out)."""
    limit = max(config.max_drop_share * len(stored), config.max_drop_rows)
    if stored and not config.prune and len(vanished) > limit:
        raise EmbedkitError(f"{len(vanished)} of the {len(stored)} rows stored in {directory} have no input under "
                            f"DATA any more and would be deleted ({len(vanished) / len(stored):.0%} > "
                            f"{config.max_drop_share:.0%}); check DATA and --out, or pass --prune to delete them")


def _row_values(rows: list[Item], modality: str, root: Path, hashes: dict[str, str], label_cols: list[str],
                meta_cols: list[str]) -> dict[str, list]:
    """Every stored column of `rows` but the embedding (and `text`), from the items as scanned now."""
    values = {"id": [it.id for it in rows], "path": [_rel(item_path(it, modality), root) for it in rows],
              "sha256": [hashes[it.id] for it in rows], "split": [it.split for it in rows],
              "group": [it.group for it in rows]}
    values.update({c: [it.labels.get(c) for it in rows] for c in label_cols})
    values.update({c: [it.meta.get(c) for it in rows] for c in meta_cols})
    return values


def _open_engine(spec: EncoderSpec, plan: Plan, config: ExtractConfig, costs: Costs):
    """The one step that differs by engine: (encoder provenance, lazy stream of EmbeddedBatch)."""
    from embedkit.console import say

    # --backend auto is resolved, and the backend checked on this run's inputs, once here for every engine
    config, checked, encoder = backend_checked_on_inputs(plan.modality, spec, plan, config, say)
    provenance, stream = get_engine(config.engine).open_stream(plan.modality, spec, plan, config, costs, encoder)
    return {**provenance, **checked}, stream


def _write_batches(plan: Plan, embedded, config, skipped, root, write, advance, res) -> None:
    """Shared by every engine: record bad inputs, write each vector under every id that shares it."""
    modality, groups = plan.modality, plan.groups
    stage = "decode" if modality == "image" else "read"
    for batch, ok, vectors, bad, n_truncated in embedded:
        for it, reason in bad:
            for dup in groups[it.id]:
                _skip(skipped, config, SkippedInput(dup.id, _rel(item_path(dup, modality), root) or "(inline)",
                                                    stage, reason), modality)
        if ok:
            rows = [dup for it in ok for dup in groups[it.id]]
            index = [n for n, it in enumerate(ok) for _ in groups[it.id]]
            write(rows, vectors[index])
            res.unique_inputs_embedded += len(ok)
        res.truncated_texts += n_truncated
        advance(sum(len(groups[it.id]) for it in batch))


def _skip(skipped: list, config: ExtractConfig, s: SkippedInput, modality: str) -> None:
    s.modality = modality
    if config.strict:
        raise EmbedkitError(f"--strict: {s.path}: {s.reason}")
    skipped.append(s)


def _rel(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _sha256(it: Item, modality: str) -> str:
    path = item_path(it, modality)
    if path is None:
        return hashlib.sha256(it.text.encode("utf-8")).hexdigest()
    h = hashlib.sha256()
    with open_inside(path, it.data_root) if it.data_root is not None else open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if modality == "image" and it.dicom is not None:  # a DICOM frame and window are pixels of their own
        h.update(f"\0dicom frame={it.dicom.frame} window={it.dicom.window}".encode())
    return h.hexdigest()


def _version() -> str:
    from embedkit import __version__

    return __version__


def _versions() -> dict:
    # read from the installed packages' metadata, not by importing them: a llama.cpp run needs no torch,
    # and importing torch and transformers costs about 200 MB of memory
    from importlib.metadata import PackageNotFoundError, version

    out = {"embedkit": _version()}
    for package in ("torch", "transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out
