"""`--backend auto` and `embedkit models check`: which backend is fastest here, among those that keep parity.

Every candidate (backend, precision) this model can run on this machine is opened through
backends.py (exported once, parity measured there) and timed on the calibration batch; `auto`
takes the fastest whose parity meets the floor. The measurement is cached per machine, model,
thread count and library versions, so it runs once.

A run that knows its size (`extract`) asks `auto_for_run` instead, which never spends more time choosing
than the choice can save on the work at hand: where this machine has measured the model, that decides;
where embedkit's shipped table (backend_speeds.json, written by benchmarks/backend_table.py) has the model
on this CPU family, the saving it predicts for this many items is weighed against what the export and the
checks cost; with neither, a run too small to repay a sweep stays on torch fp32.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from embedkit.encoders import export_cache
from embedkit.encoders.backends import (BACKENDS, DEFAULT_PARITY_FLOOR, PRECISIONS, backend_module, calibration_inputs,
                                        candidates, check_request, library_versions, open_encoders, release_reference,
                                        run_encoder)
from embedkit.encoders.registry import EncoderSpec
from embedkit.errors import EmbedkitError


def throughput(encoder, inputs, repeats: int = 2) -> float:
    """Items per second of `encoder.embed` on `inputs`: one warm-up call, then the best of `repeats`."""
    run_encoder(encoder, inputs)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_encoder(encoder, inputs)
        best = min(best, time.perf_counter() - t0)
    return len(inputs) / best


def measure_candidates(spec: EncoderSpec, modality: str, threads: int | None = None, only_backend: str | None = None,
                       log=None) -> list[dict]:
    """Parity (from the export cache) and speed on the calibration batch of every candidate, one at a time."""
    inputs = calibration_inputs(spec, modality)
    pairs = candidates(spec, modality, only_backend)
    if ("torch", "fp32") not in pairs:  # the reference every speed-up is measured against
        pairs.insert(0, ("torch", "fp32"))
    rows = []
    for pair in pairs:
        row = {"backend": pair[0], "precision": pair[1]}
        opened, errors = open_encoders(spec, modality, [pair], threads=threads, log=log, release=False)
        if pair in errors:
            rows.append({**row, "error": errors[pair]})
            continue
        enc = opened.pop(pair)
        prov = enc.provenance()
        row["parity"] = None if pair == ("torch", "fp32") else {
            "min_cosine": prov["parity_min_cosine"], "mean_cosine": prov["parity_mean_cosine"],
            "inputs": prov["parity_inputs"]}
        row["export_seconds"] = prov.get("export_seconds")
        row["items_per_second"] = round(throughput(enc, inputs), 2)
        del enc
        rows.append(row)
    release_reference()
    torch_speed = next((r.get("items_per_second") for r in rows if (r["backend"], r["precision"]) == ("torch", "fp32")),
                       None)
    for r in rows:
        if torch_speed and r.get("items_per_second"):
            r["speedup"] = round(r["items_per_second"] / torch_speed, 2)
    return rows


def choose_backend(spec: EncoderSpec, modality: str, threads: int | None = None, floor: float = DEFAULT_PARITY_FLOOR,
                   device: str = "auto", only_backend: str | None = None, log=None) -> tuple[str, str]:
    """The fastest (backend, precision) whose parity meets `floor` on this machine; measured once, cached."""
    return rank_backends(spec, modality, threads, floor, device, only_backend, log)[0]


def rank_backends(spec: EncoderSpec, modality: str, threads: int | None = None, floor: float = DEFAULT_PARITY_FLOOR,
                  device: str = "auto", only_backend: str | None = None, log=None) -> list[tuple[str, str]]:
    """Every (backend, precision) whose calibration parity meets `floor`, fastest first (torch fp32 always
    among them: it is the reference); measured once per machine, cached."""
    check_request(spec, modality, "auto" if only_backend is None else only_backend, None, device)
    path = _auto_cache_path(spec, modality, threads, only_backend)
    try:
        rows = json.loads(path.read_text())["candidates"]
    except (OSError, ValueError, KeyError):
        if log:
            log(f"{spec.name} ({modality}): measuring {only_backend or 'every backend'} on this machine "
                f"(once; cached in {path.parent})")
        rows = measure_candidates(spec, modality, threads=threads, only_backend=only_backend, log=log)
        _save_measurement(path, rows, threads)
    passing = [r for r in rows if r.get("items_per_second") and (only_backend in (None, r["backend"]))
               and (r["parity"] is None or r["parity"]["min_cosine"] >= floor)]
    if not passing:
        raise EmbedkitError(f"no backend runs {spec.name} ({modality}) at parity >= {floor:g} here: use --backend torch")
    ranked = sorted(passing, key=lambda r: -r["items_per_second"])
    if log:
        best = ranked[0]
        log(f"{spec.name} ({modality}): fastest here at parity >= {floor:g}: {best['backend']} {best['precision']} "
            f"({best.get('speedup', 1.0)}x torch fp32 on the calibration batch)")
    return [(r["backend"], r["precision"]) for r in ranked]


SPEED_TABLE = Path(__file__).with_name("backend_speeds.json")
# A choice must save at least PAYBACK times what it costs: the table's speeds come from another machine of the
# same CPU family, and a wrong guess on a small run costs more than it could have saved.
PAYBACK = 2.0
# With no measurement and no table entry, a sweep (every backend exported and timed) costs about a minute per
# model here (the demo's two models: 124 s); at 4x on a model of 50 items/s it is repaid after ~4,000 items.
SWEEP_MIN_ITEMS = 4000
# A text's cost grows with its length up to the encoder's max_length: the table keeps torch's characters per
# second and a run is weighed by its own characters, each text counted up to max_length tokens of ~4 characters
CHARS_PER_TOKEN = 4


def text_work(spec: EncoderSpec, sizes) -> int:
    """Characters of these texts (sizes in characters or bytes) that the encoder would read, after truncation."""
    cap = CHARS_PER_TOKEN * (spec.max_length or 512)
    return int(sum(min(int(s), cap) for s in sizes))


@lru_cache(maxsize=1)
def cpu_family() -> str:
    """The CPU features that decide which backend is fastest: the architecture and its widest matrix extension."""
    flags: set[str] = set()
    try:
        line = next(line for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features")))
        flags = set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    best = next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "sve", "asimd") if f in flags), "")
    return f"{platform.machine()} {best}".strip()


def speed_table_entry(spec: EncoderSpec, modality: str, table: Path | None = None) -> dict | None:
    """The shipped measurement of this model on this CPU family, or None."""
    try:
        families = json.loads(Path(table or SPEED_TABLE).read_text())["families"]
    except (OSError, ValueError, KeyError):
        return None
    entry = (families.get(cpu_family()) or {}).get("models", {}).get(f"{spec.name}/{modality}")
    return None if entry is None else {**entry, "family": cpu_family()}


def auto_for_run(spec: EncoderSpec, modality: str, n_items: int, threads: int | None = None,
                 floor: float = DEFAULT_PARITY_FLOOR, device: str = "auto", only_backend: str | None = None,
                 log=None, table: Path | None = None, text_chars: int | None = None) -> list[tuple[str, str]]:
    """`--backend auto` for a run of `n_items` (texts: `text_chars` of them, from text_work): the candidates to
    try in order (the run checks each on its own first inputs and takes the first that keeps parity). One line
    says the choice and why."""
    check_request(spec, modality, "auto" if only_backend is None else only_backend, None, device)
    say = log or (lambda _msg: None)
    what = f"{spec.name} ({n_items:,} {modality}s)"
    if only_backend is not None or _auto_cache_path(spec, modality, threads, None).is_file():
        return rank_backends(spec, modality, threads, floor, device, only_backend, log)  # measured here: free
    entry = speed_table_entry(spec, modality, table)
    if entry is None:
        if n_items < SWEEP_MIN_ITEMS:
            say(f"auto: torch fp32 for {what}: no measurement of this model on {cpu_family() or 'this CPU'}, and "
                f"timing every backend (about a minute) costs more than under {SWEEP_MIN_ITEMS:,} items can "
                f"repay; `embedkit models check {spec.name}` measures it once")
            return [("torch", "fp32")]
        return rank_backends(spec, modality, threads, floor, device, None, log)
    if text_chars is not None and entry.get("torch_fp32_chars_per_second"):
        torch_seconds = text_chars / entry["torch_fp32_chars_per_second"]
        what = f"{spec.name} ({n_items:,} {modality}s, {text_chars:,} characters)"
    else:
        torch_seconds = n_items / entry["torch_fp32_items_per_second"]
    usable = [{**c, "saving": torch_seconds * (1 - 1 / c["speedup"])} for c in entry["candidates"]
              if c["min_cosine"] >= floor and c["speedup"] > 1]
    # each one taken must repay its own export and checks: a later one is tried only when an earlier one fails
    # on this run's own inputs, and by then the earlier one's cost is spent
    paying = sorted((c for c in usable if c["saving"] >= PAYBACK * c["extra_seconds"]),
                    key=lambda c: c["extra_seconds"] - c["saving"])
    elsewhere = []
    if paying:  # only then ask which backends run here (opening OpenVINO to ask costs a second)
        possible = set(candidates(spec, modality))
        elsewhere = [c for c in paying if (c["backend"], c["precision"]) not in possible]
        paying = [c for c in paying if (c["backend"], c["precision"]) in possible]
    source = f"measured on {entry['family']} CPUs"
    if not paying:
        fastest = max(usable, key=lambda c: c["speedup"], default=None)
        why = "nothing faster keeps parity" if fastest is None else (
            f"the backends that would repay their export cannot run here "
            f"({', '.join(c['backend'] + ' ' + c['precision'] for c in elsewhere)}: see `embedkit models check`)"
            if elsewhere else (
            f"{fastest['backend']} {fastest['precision']} ({fastest['speedup']:g}x, {source}) would save about "
            f"{fastest['saving']:.0f} s for about {fastest['extra_seconds']:.0f} s of export and checks"))
        say(f"auto: torch fp32 for {what}, about {torch_seconds:.0f} s on torch: {why}")
        return [("torch", "fp32")]
    best = paying[0]
    say(f"auto: {best['backend']} {best['precision']} for {what}: {best['speedup']:g}x torch fp32 at cosine "
        f">= {best['min_cosine']:.4f} ({source}), saves about {best['saving']:.0f} s for about "
        f"{best['extra_seconds']:.0f} s of export and checks; if it fails on this run's inputs: "
        f"{', '.join(c['backend'] + ' ' + c['precision'] for c in paying[1:]) or 'torch fp32'}")
    return [(c["backend"], c["precision"]) for c in paying] + [("torch", "fp32")]


def _save_measurement(path: Path, rows: list[dict], threads: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump({"machine": machine_key(threads), "candidates": rows}, f, indent=2)
    os.replace(f.name, path)


def machine_key(threads: int | None) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "node": platform.node()}


def _auto_cache_path(spec: EncoderSpec, modality: str, threads: int | None, only_backend: str | None) -> Path:
    installed = {b: backend_module(b).missing() is None for b in BACKENDS if b != "torch"}
    key = {"machine": machine_key(threads), "fingerprint": export_cache.source_fingerprint(spec),
           "spec": spec.to_dict(), "modality": modality, "only": only_backend, "installed": installed,
           "versions": {b: library_versions(b) for b, ok in installed.items() if ok} or library_versions("torch"),
           "format": export_cache.CACHE_FORMAT}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return export_cache.entry_dir(spec, modality, "auto", "x").parent / f"auto-{modality}-{digest}.json"


def check_backends(model: str, modality: str | None = None, backend: str = "all", precision: str | None = None,
                   threads: int | None = None, floor: float = DEFAULT_PARITY_FLOOR,
                   trust_remote_code: bool = False) -> list[dict]:
    """`embedkit models check`: every (backend, precision) asked for, with parity, speed and a verdict."""
    from embedkit.encoders.registry import require_model, resolve_spec

    if backend != "all" and backend not in BACKENDS:
        raise EmbedkitError(f"unknown backend '{backend}' (choose all, {', '.join(BACKENDS)})")
    if precision is not None and precision not in PRECISIONS:
        raise EmbedkitError(f"unknown precision '{precision}' (choose {', '.join(PRECISIONS)})")
    modalities = [modality] if modality else [m for m in ("image", "text") if _has_modality(model, m)]
    rows = []
    for m in modalities:
        spec = resolve_spec(model, m, trust_remote_code=trust_remote_code)
        require_model(spec)  # not here and not fetchable now: one line, before any backend is tried
        only = None if backend == "all" else backend
        if only and only != "torch":
            check_request(spec, m, only, precision)
        measured = measure_candidates(spec, m, threads=threads, only_backend=only)
        if only is None:  # every backend measured: what `--backend auto` reads from now on
            _save_measurement(_auto_cache_path(spec, m, threads, None), measured, threads)
        if precision and not any(r["precision"] == precision for r in measured):
            raise EmbedkitError(f"{only or 'no backend'} cannot run {spec.name} at {precision} here")
        for r in measured:
            if (precision and r["precision"] != precision) or (only and r["backend"] != only):
                continue
            p = r.get("parity")
            verdict = ("error" if r.get("error") else "passes" if p is None or p["min_cosine"] >= floor
                       else "below floor")
            rows.append({"modality": m, **r, "verdict": verdict})
    return rows


def _has_modality(model: str, modality: str) -> bool:
    from embedkit.encoders.registry import resolve_spec

    try:
        resolve_spec(model, modality)
        return True
    except EmbedkitError as e:
        if "embeds" in str(e):  # "model X embeds image, not text"
            return False
        raise
