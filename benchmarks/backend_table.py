"""The speed table `--backend auto` ships with: what each CPU backend gains over torch fp32, and what a
first run pays to use it, for the offline models on this machine's CPU family.

    python benchmarks/backend_table.py --threads 2

For every (backend, precision) a model can run here, from an empty export cache: the time to get the encoder
ready (torch trace, conversion, calibration parity) and to check it on 32 inputs against torch fp32, as a
run does, minus torch fp32's own load; then items/s on the calibration batch (one warm-up, best of 2; texts
in length-sorted batches of 4) as a ratio to torch fp32 timed just before and after it in the same process.
Merges the result into embedkit/encoders/backend_speeds.json under this CPU family
(backend_choice.cpu_family), replacing the entries of the models measured; `auto_for_run` reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embedkit.costs import load_average  # noqa: E402
from embedkit.encoders import backend_choice, resolve_spec  # noqa: E402
from embedkit.encoders.backends import (calibration_inputs, candidates, library_versions, open_encoder,  # noqa: E402
                                        parity_on_inputs, release_reference)
from embedkit.encoders.registry import require_model  # noqa: E402
from embedkit.engines.base import PARITY_SAMPLE  # noqa: E402
from embedkit.errors import EmbedkitError  # noqa: E402

MODELS = [("efficientnet-lite0", "image"), ("dinov2-small", "image"), ("clip-vit-b32", "image"),
          ("clip-vit-b32", "text"), ("minilm", "text")]


class _SortedBatches:
    """Texts embedded as extract does: length-sorted batches of 4, so padding is what a run pays, not 24 texts
    padded to the longest."""

    def __init__(self, encoder):
        self.encoder = encoder

    def embed(self, texts):
        order = sorted(texts, key=len)
        return [self.encoder.embed(order[i:i + 4]) for i in range(0, len(order), 4)]


def speed(encoder, inputs) -> float:
    return backend_choice.throughput(encoder if not isinstance(inputs, list) else _SortedBatches(encoder), inputs)


def measure_model(name: str, modality: str, threads: int) -> dict:
    spec = resolve_spec(name, modality)
    inputs = calibration_inputs(spec, modality)
    sample = inputs[:PARITY_SAMPLE]
    release_reference()
    t0 = time.perf_counter()
    ref = open_encoder(spec, modality, "torch", "fp32", threads=threads)
    torch_load = time.perf_counter() - t0
    torch_runs = [speed(ref, inputs)]
    rows, errors = [], {}
    for backend, precision in candidates(spec, modality):
        if (backend, precision) == ("torch", "fp32"):
            continue
        release_reference()
        t0 = time.perf_counter()
        try:
            enc = open_encoder(spec, modality, backend, precision, threads=threads, floor=0.0)
        except EmbedkitError as e:
            errors[f"{backend} {precision}"] = str(e)[:200]
            continue
        run = parity_on_inputs(spec, modality, enc, sample, threads)
        ready = time.perf_counter() - t0
        # torch fp32 timed just before and after, in the same process: a shared machine's load changes by the minute
        before, ips, after = speed(ref, inputs), speed(enc, inputs), speed(ref, inputs)
        torch_runs += [before, after]
        calibration = enc.provenance()["parity_min_cosine"]  # the table keeps the lower of the two parities
        del enc
        rows.append({"backend": backend, "precision": precision, "speedup": round(ips / max(before, after), 2),
                     "min_cosine": round(min(run["min_cosine"], calibration), 6),
                     "extra_seconds": round(max(0.0, ready - torch_load), 1)})
        print(f"{name} ({modality}) {backend} {precision}: {rows[-1]}", file=sys.stderr)
    del ref
    torch_ips = max(torch_runs)  # the best of every torch fp32 timing: the quietest moment of the run
    out = {"torch_fp32_items_per_second": round(torch_ips, 2), "torch_fp32_load_seconds": round(torch_load, 2),
           "calibration_items": len(inputs), "candidates": rows, "errors": errors}
    if modality == "text":  # a run of texts is weighed by its characters (backend_choice.text_work)
        chars = backend_choice.text_work(spec, (len(t) for t in inputs))
        out["torch_fp32_chars_per_second"] = round(chars * torch_ips / len(inputs), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(f"{m}/{mod}" for m, mod in MODELS),
                    help="name/modality, comma separated")
    ap.add_argument("--table", type=Path, default=backend_choice.SPEED_TABLE)
    args = ap.parse_args()
    family = backend_choice.cpu_family()
    load_start = load_average()
    models = {}
    with tempfile.TemporaryDirectory(prefix="embedkit-speeds-") as tmp:
        for item in args.models.split(","):
            name, modality = item.rsplit("/", 1)
            try:
                require_model(resolve_spec(name, modality))
            except EmbedkitError as e:
                print(f"{item}: skipped ({e})", file=sys.stderr)
                continue
            os.environ["EMBEDKIT_CACHE"] = str(Path(tmp) / item.replace("/", "_"))  # an empty cache per model
            models[item] = measure_model(name, modality, args.threads)
    if not models:
        sys.exit("error: none of the models is on this machine")
    try:
        table = json.loads(args.table.read_text())
    except OSError:
        table = {"format": 1, "families": {}}
    machine = backend_choice.machine_key(args.threads)
    machine.pop("node", None)
    measured_on = {**machine, "date": time.strftime("%Y-%m-%d"), "versions": library_versions("torch"),
                   "load_average": [load_start, load_average()]}
    family_models = table["families"].setdefault(family, {}).setdefault("models", {})
    family_models.update({k: {**v, "measured_on": measured_on} for k, v in models.items()})  # others kept
    args.table.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.table} ({family}: {', '.join(models)})", file=sys.stderr)


if __name__ == "__main__":
    main()
