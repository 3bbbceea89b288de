"""One training epoch of embedkit's FusionClassifier against the published reference loop.

    python benchmarks/train_speed.py                    # BRSET-shaped: 13,000 rows, 4096-d text + 768-d image
    python benchmarks/train_speed.py --rows 4000 --epochs 2 --json out.json

The reference loop is the one of Restrepo et al.'s published code (src/classifiers_cpu_metrics.py):
a torch Dataset whose __getitem__ returns one row as a dict of FloatTensors taken from the
DataFrame's values (float64, as read from the embeddings CSV), a DataLoader with batch 64 and
shuffling, EarlyFusionModel (Linear 128, ReLU, Dropout 0.2, BatchNorm1d, Linear) in
nn.DataParallel, CrossEntropy with 'balanced' class weights, AdamW lr 1e-3. embedkit trains the
same early-fusion head with its tensors in memory (no DataLoader), also with a larger batch and
on PCA-reduced inputs (fitted once on the training rows). Same synthetic data with
signal, same split, same epochs; macro-F1 on held-out rows. Timings: the best epoch of each
(other work on a shared machine only ever slows an epoch down); both loops again with one
thread each; the compute floor of an epoch at this machine's matmul rate. This is the same
code as `embedkit bench --sections train` (embedkit/bench/train.py: train_speed). Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedkit.bench import load_average, machine_info, train_speed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=13000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--big-batch", type=int, default=512, help="the large-batch setting (lr scaled by sqrt)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    load0 = load_average()
    r = train_speed(args.rows, args.epochs, big_batch=args.big_batch)
    r["machine"] = {**machine_info(), "load_average_start": load0, "load_average_end": load_average()}
    rows = [("reference loop (Dataset per row + DataLoader)", r["reference"], 1.0),
            ("embedkit FusionClassifier", r["embedkit"], r["speedup"]),
            ("embedkit FusionClassifier, large batch", r["embedkit_big_batch"], r["speedup_big_batch"]),
            (f"embedkit FusionClassifier on PCA {r['embedkit_pca']['dims']} input (fitted once in "
             f"{r['embedkit_pca']['fit_seconds']} s)", r["embedkit_pca"], r["speedup_pca"])]
    print(f"{r['rows']} rows ({r['dims']['text']}-d text + {r['dims']['image']}-d image), {r['epochs']} epochs, "
          f"train/val/test {r['split']['train']}/{r['split']['val']}/{r['split']['test']}; "
          f"{r['machine']['cpu']}, {r['machine']['cores']} cores, load {load0} -> {r['machine']['load_average_end']}\n")
    print("| loop | batch | lr | s / epoch (best) | speed-up | test macro-F1 |\n|---|---|---|---|---|---|")
    for name, x, speed in rows:
        print(f"| {name} | {x['batch_size']} | {x['lr']:g} | {x['epoch_seconds']:.3f} | {speed:.2f}x "
              f"| {x['macro_f1']:.3f} |")
    one = r["one_thread"]
    print(f"| reference loop, one thread | 64 | 0.001 | {one['reference']['epoch_seconds']:.3f} | 1.00x | - |")
    print(f"| embedkit, one thread | 64 | 0.001 | {one['embedkit']['epoch_seconds']:.3f} | {one['speedup']:.2f}x | - |")
    print(f"\ncompute floor of one epoch (forward + weight gradients at {r['matmul_gflops']} GFLOP/s): "
          f"{r['epoch_floor_seconds']:.3f} s, i.e. at most {r['max_possible_speedup']}x over this reference run "
          f"({r['max_possible_speedup_one_thread']}x over the one-thread one)")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
