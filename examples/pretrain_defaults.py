"""Which pretrain settings learn on a laptop's data? One short trial per call, on VQA-RAD.

Trains the shared encoder on VQA-RAD's official train split (closed questions as texts, the
shipped data manifest, held out by image), then measures on the held-out IMAGES, one question
per image so every candidate is distinct (chance R@k = k / n): retrieval both ways and the mean
within-modality cosine (collapse.py). Appends one JSON line per trial to --results.

    python examples/pretrain_defaults.py --name defaults                       # the preset as shipped
    python examples/pretrain_defaults.py --name lr3e-4 --set lr=3e-4 --set epochs=8
    python examples/pretrain_defaults.py --preset separate --name separate
    python examples/pretrain_defaults.py --table                               # the trials so far, as Markdown

Evaluation uses the exported model folder through SharedEncoderRunner, as `extract shared:OUT` would.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from embedkit.encoders.preprocess import preprocess_images
from embedkit.manifests import find_manifest
from embedkit.shared_encoder import SharedEncoderRunner, pretrain, resolve_pretrain_config
from embedkit.shared_encoder.collapse import collapse_check
from embedkit.shared_encoder.train import select_pairs
from embedkit.sources import scan_source

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vqa_rad"


def folder_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6, 1)


def table(results: Path) -> str:
    """The trials of a results file as a Markdown table (the README's block renders the same)."""
    from embedkit.bench.tables import pretrain_trials_table

    return pretrain_trials_table([json.loads(line) for line in results.read_text().splitlines() if line.strip()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--name", help="trial name in the results file")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key=value, repeatable")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=Path("runs/pretrain_trials.jsonl"))
    ap.add_argument("--keep", type=Path, default=None, help="keep the model folder here")
    ap.add_argument("--table", action="store_true", help="print the results so far as Markdown and stop")
    args = ap.parse_args()
    if args.table:
        print(table(args.results))
        return
    if not args.name:
        ap.error("--name is required for a trial")
    torch.set_num_threads(args.threads)

    manifest = find_manifest("vqa_rad")
    scan = scan_source(args.data, manifest.source_options(), rows=manifest.load_rows(args.data))
    pairs, note = select_pairs(scan.items)
    print(note, file=sys.stderr)
    recipe = resolve_pretrain_config(args.preset, sets=args.sets)

    work = Path(tempfile.mkdtemp(prefix="pretrain_trial_"))
    out = args.keep or work / "model"
    t0 = time.perf_counter()
    metrics = pretrain(pairs, out, recipe, resume=False, progress=False)
    seconds = time.perf_counter() - t0

    by_id = {it.id: it for it in pairs}
    val = [by_id[i] for i in metrics["held_out"]["val_ids"]]
    runner = SharedEncoderRunner(out)
    img = runner.embed_images(torch.from_numpy(preprocess_images([it.image_path for it in val], runner.preprocess)))
    txt, _ = runner.embed_texts([it.text for it in val])
    image_of = {p: k for k, p in enumerate(dict.fromkeys(str(it.image_path) for it in val))}
    check = collapse_check(img.numpy(), txt.numpy(), np.array([image_of[str(it.image_path)] for it in val]))
    row = {
        "name": args.name, "preset": recipe.preset, "overrides": recipe.overrides,
        "n_train": metrics["n_train"], "n_val_images": check["n_images"],
        "retrieval": check.get("retrieval"), "chance": check.get("chance"),
        "image_cosine": check["image_cosine"], "text_cosine": check["text_cosine"], "collapsed": check["collapsed"],
        "train_loss_first_last": [round(metrics["train_loss"][0], 3), round(metrics["train_loss"][-1], 3)],
        "logit_scale": round(metrics["epochs"][-1]["logit_scale"], 2),
        "n_text_truncated": metrics["n_text_truncated"],
        "seconds": round(seconds, 1), "train_s": metrics["timings"]["train_s"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "model_folder_mb": folder_mb(out), "parameters": metrics["parameters"],
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
