"""A first run on a new machine: `--backend auto` against `--backend torch`, each from an empty export cache.

    python benchmarks/first_run.py --repeats 2 --cases 2000

Two jobs, as a user runs them (a fresh `embedkit` process each): `embedkit demo` (300 generated cases,
extract + every fusion trained) and `embedkit extract` of a generated clinic of `--cases` image + report
pairs (efficientnet-lite0 and minilm). Runs alternate auto/torch (the order flips each repeat) with an
empty EMBEDKIT_CACHE each; wall time, CPU time and peak RSS of the process, the backend each table was
written with and the one line `auto` says about its choice. Goal (issue 32): auto never slower than torch
on a first run. Writes benchmarks/results/first_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embedkit.costs import load_average  # noqa: E402
from embedkit.demo import make_synthetic_clinic  # noqa: E402
from embedkit.encoders.backend_choice import cpu_family  # noqa: E402
from embedkit.store import read_embedding_table  # noqa: E402


def run(args: list[str], cache: Path) -> dict:
    """One fresh process: wall, CPU and peak RSS (from wait4), and what auto said."""
    env = {**os.environ, "EMBEDKIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "COLUMNS": "1000"}  # auto's line unwrapped
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "embedkit.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: {' '.join(args[:2])} failed:\n{err[-2000:]}")
    said = [" ".join(line.split()) for line in err.splitlines() if "auto:" in line]
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "auto_said": said}


def backends_written(emb: Path) -> dict:
    return {d.name: f"{p['backend']} {p.get('precision') or 'fp32'}" for d in sorted(emb.iterdir()) if d.is_dir()
            for p in [read_embedding_table(d).provenance]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "first_run.json")
    args = ap.parse_args()
    result = {"cpu_family": cpu_family(), "cores": os.cpu_count(), "cases": args.cases, "repeats": args.repeats,
              "load_average_start": load_average(), "jobs": {}}
    with tempfile.TemporaryDirectory(prefix="embedkit-first-run-") as tmp:
        tmp = Path(tmp)
        data = make_synthetic_clinic(tmp / "clinic", n=args.cases, seed=1)
        jobs = {"demo (300 cases)": lambda out, b: ["demo", "--out", out, "--no-progress", "--backend", b],
                f"extract ({args.cases} cases)": lambda out, b: [
                    "extract", str(data), "--metadata", str(data / "labels.csv"), "--id-col", "id",
                    "--image-col", "image", "--text-file-col", "report", "--out", out, "--image-model",
                    "efficientnet-lite0", "--text-model", "minilm", "--no-progress", "--backend", b]}
        for job, command in jobs.items():
            runs = {"auto": [], "torch": []}
            for rep in range(args.repeats):
                for backend in (("auto", "torch") if rep % 2 == 0 else ("torch", "auto")):
                    out = tmp / f"out-{len(runs[backend])}-{backend}"
                    r = run(command(str(out), backend), tmp / f"cache-{rep}-{backend}")
                    emb = out / "emb" if job.startswith("demo") else out
                    r["written_with"] = backends_written(emb)
                    runs[backend].append(r)
                    print(f"{job} {backend}: {r['wall_s']} s, {r['peak_rss_mb']} MB, {r['written_with']}",
                          file=sys.stderr)
                    shutil.rmtree(out)
            best = {b: min(rs, key=lambda r: r["wall_s"]) for b, rs in runs.items()}
            result["jobs"][job] = {"runs": runs, "auto_over_torch_wall": round(best["auto"]["wall_s"]
                                                                               / best["torch"]["wall_s"], 2)}
    result["load_average_end"] = load_average()
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for job, r in result["jobs"].items():
        print(f"{job}: auto / torch wall (best of {args.repeats}) = {r['auto_over_torch_wall']}", file=sys.stderr)


if __name__ == "__main__":
    main()
