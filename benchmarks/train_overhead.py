"""What the honesty work costs: `train` with bootstrap intervals, temperature scaling and a validation
threshold vs the same run without them, side by side on one machine.

    python benchmarks/train_overhead.py --rows 3000 --repeats 3

Synthetic embeddings (image 768-d + text 384-d, a BRSET-like width at laptop scale), written through
the real store; binary and 3-class tasks, early fusion, 30 epochs, 1 seed. The two settings alternate
(A B A B ...) and the best time of each is kept, so a busy moment hurts both alike. Goal: the
bootstrap (1000 resamples over test rows) and calibration add at most 20 % to the wall time of
`train`. Writes benchmarks/results/train_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from embedkit.store import BASE_COLUMNS, PartWriter, build_schema
from embedkit.train import TrainConfig, train


def write_set(out: Path, n: int, k: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    ids = [f"r{i:06d}" for i in range(n)]
    for modality, dim in (("image", 768), ("text", 384)):
        x = (np.eye(k)[y] @ rng.normal(size=(k, dim)) * 0.3 + rng.normal(size=(n, dim))).astype(np.float32)
        prov = {"name": f"bench-{modality}", "source": "bench", "family": "bench", "revision": "1", "pooling": "mean",
                "dim": dim, "preprocess": None, "max_length": None, "normalize": False, "dtype": "float32",
                "label_columns": ["label"]}
        w = PartWriter(out / f"{modality}__bench", build_schema(dim, {"label": [str(v) for v in y]}, prov))
        cols = {"id": ids, "path": ids, "sha256": [f"{modality}{i}" for i in ids], "label": [str(v) for v in y]}
        cols.update({c: [None] * n for c in BASE_COLUMNS if c not in cols and c != "embedding"})
        w.write(cols, x)
        w.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_overhead.json")
    args = ap.parse_args()
    settings = {"plain": dict(bootstrap=0, calibrate=False, threshold="0.5"),
                "honest (default)": dict()}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task, k in (("binary", 2), ("multiclass", 3)):
            emb = write_set(Path(tmp) / task, args.rows, k)
            times = {name: [] for name in settings}
            for _ in range(args.repeats):
                for name, kw in settings.items():
                    t0 = time.perf_counter()
                    train(emb, Path(tmp) / f"m_{task}", TrainConfig(labels=["label"], fusion="early", **kw))
                    times[name].append(time.perf_counter() - t0)
            best = {name: min(v) for name, v in times.items()}
            results[task] = {"seconds": times, "best": best, "ratio": best["honest (default)"] / best["plain"]}
            print(f"{task}: plain {best['plain']:.2f} s, honest {best['honest (default)']:.2f} s, "
                  f"ratio {results[task]['ratio']:.3f}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": args.rows, "repeats": args.repeats, "goal": "ratio <= 1.20",
                                    "results": results}, indent=2))
    print(json.dumps({t: round(r["ratio"], 3) for t, r in results.items()}))


if __name__ == "__main__":
    main()
