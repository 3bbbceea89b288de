"""Run one configuration of a comparison on the shared splits, and keep its result so a rerun reuses it.

Each configuration is trained exactly as `embedkit train` trains (train.run_once: every choice on the
run's validation rows, the test rows scored once) on every shared split. Its test probabilities
are written to CONFIG/predictions.parquet and its summary to CONFIG/result.json, the latter last
and atomically: a configuration is finished when its result.json is there with the expected key,
and a killed comparison redoes only the unfinished ones. The key covers everything the result
depends on (the configuration, the encoders' fingerprints, the training settings, the rows, labels,
groups and splits), so a changed input never reuses a stale result.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from embedkit.comparison.config import CompareConfig
from embedkit.comparison.grid import Configuration
from embedkit.costs import current_rss_mb, peak_rss_mb, reset_peak_rss
from embedkit.errors import EmbedkitError
from embedkit.predict import jsonable
from embedkit.store import write_json_atomic

RESULT, PREDICTIONS = "result.json", "predictions.parquet"
SHIFT_SWEEP = "shift:0:1:0.25"  # `--align shift`: the gap-shift lambda chosen on validation in each run
ROBUSTNESS_RESAMPLES = 300  # bootstrap resamples per point of a robustness curve (10 points per configuration)


def train_config(cfg: CompareConfig, fusion: str = "early", align: str = "none"):
    """The TrainConfig of one configuration: `train`'s defaults, the comparison's shared settings."""
    from embedkit.train import TrainConfig

    both = fusion not in ("image", "text", "logistic")  # modality dropout: for heads that see both modalities
    return TrainConfig(labels=[cfg.label], fusion=fusion, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       modality_dropout=cfg.modality_dropout if both else 0.0,
                       align=None if align in ("none", "shift") else align,
                       align_sweep=SHIFT_SWEEP if align == "shift" else None, group_col=cfg.group_col,
                       groups=cfg.groups, data_split=cfg.data_split, seeds=cfg.seeds, cv=cfg.cv, seed=cfg.seed,
                       val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, bootstrap=0)


def data_key(ref, groups, splits: list[dict]) -> str:
    """A fingerprint of the rows, their labels and groups, and every split: what makes two results comparable."""
    h = hashlib.sha256()
    for values in (ref.ids, ref.y, groups if groups is not None else []):
        h.update("\x1f".join("" if v is None else str(v) for v in np.asarray(values, dtype=object).ravel()).encode())
        h.update(b"\x1e")
    for idx in splits:
        for k in ("train", "val", "test"):
            h.update(np.asarray(idx[k], dtype=np.int64).tobytes() + k.encode())
    return h.hexdigest()[:20]


def config_key(conf: Configuration, train_cfg, data: str) -> str:
    encoders = {m: e.fingerprint for m, e in (("image", conf.image), ("text", conf.text)) if e is not None}
    blob = json.dumps({"config": conf.describe(), "encoders": encoders, "train": asdict(train_cfg), "data": data},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def finished(folder: Path, key: str) -> dict | None:
    """The stored result of a configuration if it was finished with this key, else None."""
    path = folder / RESULT
    if not path.is_file() or not (folder / PREDICTIONS).is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("key") == key else None


def run_configuration(conf: Configuration, ds, splits: list[dict], seeds: list[int], train_cfg, folder: Path,
                      key: str, groups=None) -> dict:
    """Train and score the configuration on every split; write its predictions, then its result."""
    reset_peak_rss()
    start_mb = current_rss_mb()
    t0 = time.perf_counter()
    try:
        runs, probas = (_baseline_runs(conf, ds, splits, seeds) if conf.fusion in ("majority", "chance")
                        else _fusion_runs(conf, ds, splits, seeds, train_cfg, groups))
    except (EmbedkitError, ValueError) as e:  # this configuration cannot run on these rows; the others go on
        from embedkit.guards import one_line_error

        runs, probas, status = [], [], f"failed: {one_line_error(e)[0]}"
    else:
        status = "ok"
    result = {"key": key, **conf.describe(), "status": status, "runs": runs,
              "costs": _costs(runs, time.perf_counter() - t0, start_mb) if runs else {}}
    folder.mkdir(parents=True, exist_ok=True)
    _write_predictions(folder / PREDICTIONS, splits, probas)
    write_json_atomic(folder / RESULT, result)
    return result


def not_run(conf: Configuration, folder: Path, key: str) -> dict:
    result = {"key": key, **conf.describe(), "status": f"not run: {conf.reason}", "runs": [], "costs": {}}
    folder.mkdir(parents=True, exist_ok=True)
    _write_predictions(folder / PREDICTIONS, [], [])
    write_json_atomic(folder / RESULT, result)
    return result


def _fusion_runs(conf: Configuration, ds, splits, seeds, train_cfg, groups) -> tuple[list[dict], list[np.ndarray]]:
    from embedkit.train import run_once

    runs, probas = [], []
    for k, (idx, seed) in enumerate(zip(splits, seeds)):
        r = run_once(ds, train_cfg, conf.modalities, idx, seed)
        c = r.metrics["costs"]
        runs.append({"seed": seed, "task": r.est.task_, "classes": [jsonable(v) for v in r.est.classes_],
                     "threshold": float(r.calibration["threshold"]), "temperature": float(r.calibration["temperature"]),
                     "alignment": r.metrics.get("alignment"), "best_epoch": r.metrics.get("best_epoch"),
                     "val": _scalars(r.metrics["val"]), "test": _scalars(r.metrics["test"]),
                     "n_test": int(len(idx["test"])), "train_seconds": c["train_seconds"],
                     "predict_seconds": c["predict_seconds"], "model_bytes": _model_bytes(r.est)})
        if k == 0 and len(conf.modalities) == 2:  # run 0: how the model as trained holds up as a modality goes missing
            runs[0]["robustness"] = _robustness(r, ds, idx["test"], groups)
        probas.append(np.asarray(r.test_proba, dtype=np.float64))
    return runs, probas


def _robustness(run, ds, test, groups) -> dict:
    """Robustness curves of run 0's model on its test rows, image and text removed in turn."""
    from embedkit.predict import robustness

    info = {**run.info, "task": run.est.task_, "calibration": run.calibration}
    blocks = {m: ds.blocks[m][test] for m in run.info["modalities"]}
    g = None if groups is None else groups[test]
    return {m: robustness(run.est, info, blocks, ds.y[test], g, m, n_resamples=ROBUSTNESS_RESAMPLES)
            for m in run.info["modalities"]}


def _baseline_runs(conf: Configuration, ds, splits, seeds) -> tuple[list[dict], list[np.ndarray]]:
    """Predictors that never look at the input: the training rows' most frequent class, or a draw from their
    class frequencies (scikit-learn's DummyClassifier), scored on the same test rows as everything else."""
    from sklearn.dummy import DummyClassifier

    from embedkit.fusion.evaluate import compute_metrics, detect_task

    task = detect_task(ds.y)
    strategy = "most_frequent" if conf.fusion == "majority" else "stratified"
    runs, probas = [], []
    for idx, seed in zip(splits, seeds):
        tr, va, te = idx["train"], idx["val"], idx["test"]
        t0 = time.perf_counter()
        est = DummyClassifier(strategy=strategy, random_state=seed).fit(np.zeros((len(tr), 1)), ds.y[tr])
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        proba = est.predict_proba(np.zeros((len(te), 1)))
        predict_s = time.perf_counter() - t1
        val = compute_metrics(ds.y[va], est.predict_proba(np.zeros((len(va), 1))), est.classes_, task) if len(va) else {}
        runs.append({"seed": seed, "task": task, "classes": [jsonable(v) for v in est.classes_], "threshold": 0.5,
                     "temperature": 1.0, "alignment": None, "best_epoch": None, "val": _scalars(val),
                     "test": _scalars(compute_metrics(ds.y[te], proba, est.classes_, task)), "n_test": int(len(te)),
                     "train_seconds": round(fit_s, 4), "predict_seconds": round(predict_s, 4), "model_bytes": 0})
        probas.append(np.asarray(proba, dtype=np.float64))
    return runs, probas


def _costs(runs: list[dict], wall: float, start_mb: float) -> dict:
    peak = peak_rss_mb()
    n_test = sum(r["n_test"] for r in runs)
    return {"train_s": round(float(np.mean([r["train_seconds"] for r in runs])), 4),
            "predict_ms_per_case": round(1000 * sum(r["predict_seconds"] for r in runs) / max(n_test, 1), 4),
            "model_bytes": int(runs[0]["model_bytes"]), "peak_rss_mb": round(peak, 1),
            "peak_above_start_mb": round(max(peak - start_mb, 0.0), 1),
            "wall_s": round(wall, 3)}


def _write_predictions(path: Path, splits: list[dict], probas: list[np.ndarray]) -> None:
    """run, row (index into the shared rows) and one probability column per class index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    width = max((p.shape[1] for p in probas), default=0)
    cols = {"run": [], "row": [], **{f"p{j}": [] for j in range(width)}}
    for run, (idx, proba) in enumerate(zip(splits, probas)):
        cols["run"].append(np.full(len(idx["test"]), run, dtype=np.int32))
        cols["row"].append(np.asarray(idx["test"], dtype=np.int64))
        for j in range(width):
            cols[f"p{j}"].append(proba[:, j] if j < proba.shape[1] else np.full(len(proba), np.nan))
    table = pa.table({k: pa.array(np.concatenate(v) if v else np.array([], dtype=np.float64)) for k, v in cols.items()})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def read_predictions(folder: Path, n_runs: int) -> list[np.ndarray]:
    """Per run, the test probabilities in the order of that run's test rows."""
    import pyarrow.parquet as pq

    table = pq.read_table(folder / PREDICTIONS)
    if table.num_rows == 0:
        return []
    run = table.column("run").to_numpy()
    p = np.column_stack([table.column(c).to_numpy() for c in table.column_names if c.startswith("p")])
    return [p[run == k] for k in range(n_runs)]


def _scalars(m: dict) -> dict:
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _model_bytes(est) -> int:
    mb = getattr(est, "model_bytes", None)
    return int(mb() if callable(mb) else (mb or 0))
