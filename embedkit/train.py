"""Embeddings on disk -> a trained, honestly evaluated classifier folder; and using one.

train:    join modalities on id -> labels -> split (the data's, or stratified and seeded)
          -> [gap shift fitted on train rows] -> estimator, model selection on validation
          -> test evaluated once -> repeated over seeds / folds for spread -> model folder
predict:  model folder + embeddings -> checks the encoders match -> same alignment -> Parquet
evaluate: predict + the same metrics against labels (e.g. a second clinic's data)

A model folder holds only safetensors and JSON: estimator weights, `embedkit_model.json`
(what it was trained on: encoders, labels, alignment), `metrics.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from embedkit.costs import Costs, dir_bytes, peak_rss_mb
from embedkit.errors import EmbedkitError
from embedkit.store import IDENTITY_FIELDS, EmbeddingSet, find_datasets, load_embeddings, write_json_atomic

FUSIONS = ("early", "late", "image", "text", "logistic")
# What must agree between training and new embeddings: the store's identity fields, except the
# dtype (a model trained on float32 embeddings may score bfloat16-extracted ones).
PROVENANCE_MATCH = tuple(f for f in IDENTITY_FIELDS if f != "dtype")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}


@dataclass
class TrainConfig:
    labels: list[str]  # one column: binary/multiclass; several binary columns: multilabel
    fusion: str = "late"  # early | late | image | text | logistic
    hidden_dim: int = 128  # early fusion hidden width (reference: 128)
    late_hidden_dim: int = 64  # late fusion per-modality width (reference: 64)
    dropout: float = 0.0  # the reference code ran with 0 (its README says 0.2)
    epochs: int = 30  # reference: 30
    lr: float = 1e-3  # AdamW, reference: 1e-3
    batch_size: int = 64  # reference: 64
    weight_decay: float = 0.01  # AdamW default
    class_weight: str | None = "balanced"
    patience: int | None = None  # early stopping on validation macro-F1
    noise_std: float = 0.0  # Gaussian noise on standardised embeddings, training only
    align_lambda: float | None = None  # modality-gap shift; None = off
    align_sweep: str | None = None  # "START:STOP:STEP": pick lambda on validation
    learned_lambda: bool = False  # train lambda jointly with the classifier
    seeds: int = 1  # repeat with seeds 0..n-1 (new split unless the data has one) for spread
    cv: int | None = None  # k-fold cross-validation instead of a single split
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    models: dict[str, str] = field(default_factory=dict)  # modality -> model name when several were extracted
    device: str = "cpu"


def modalities_for(fusion: str, available: list[str]) -> list[str]:
    if fusion not in FUSIONS:
        raise EmbedkitError(f"unknown fusion '{fusion}' (choose {', '.join(FUSIONS)})")
    if fusion in ("image", "text"):
        return [fusion]
    if fusion == "logistic":
        return [m for m in ("image", "text") if m in available]
    return ["image", "text"]


# ---------------------------------------------------------------- data


@dataclass
class Dataset:
    ids: np.ndarray
    blocks: dict[str, np.ndarray]  # modality -> float32 [n, d], rows joined on id
    y: np.ndarray  # labels (object) or a 0/1 indicator matrix for multilabel
    split: np.ndarray | None  # "train" | "val" | "test" per row, if the data had a split column
    provenance: dict[str, dict]
    dropped_unlabelled: int = 0


def load_dataset(emb_dir, labels: list[str], modalities: list[str], models: dict | None = None) -> Dataset:
    available = sorted(find_datasets(emb_dir))
    missing = [m for m in modalities if m not in available]
    if missing:
        raise EmbedkitError(f"no {' or '.join(missing)} embeddings under '{emb_dir}' (found: "
                            f"{', '.join(available) or 'none'}); choose --fusion "
                            f"{' or '.join(available) or 'after extracting'}")
    es = load_embeddings(emb_dir, modalities=modalities, models=models)
    _check_join(es, modalities)
    for name in labels:
        if name not in es.columns:
            found = sorted(c for c in es.columns if not c.endswith(("_path", "_sha256")) and c != "split")
            raise EmbedkitError(f"label column '{name}' is not in the embeddings; columns carried through: "
                                f"{', '.join(found) or 'none'}")
    if len(labels) == 1:
        y = es.columns[labels[0]]
        keep = np.array([v is not None and v == v for v in y], dtype=bool)  # v == v is False for NaN
    else:
        y = np.stack([_binary_column(es.columns[c], c) for c in labels], axis=1)
        keep = ~np.isnan(y).any(axis=1)
    blocks = {m: es.embeddings[m][keep] for m in modalities}
    for m, x in blocks.items():
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise EmbedkitError(f"{int(bad.sum())} {m} embedding rows contain NaN or infinite values; "
                                f"re-extract them (embedkit extract --overwrite)")
    split = None
    if "split" in es.columns and any(v is not None for v in es.columns["split"]):
        split = _normalise_split(es.columns["split"][keep])
    y = y[keep]
    if len(labels) > 1:
        y = y.astype(np.int64)
    return Dataset(es.ids[keep], blocks, y, split, es.provenance, dropped_unlabelled=int((~keep).sum()))


def _check_join(es: EmbeddingSet, modalities: list[str]) -> None:
    if len(modalities) > 1 and len(es.ids) == 0:
        counts = ", ".join(f"{m} {es.unmatched[m]}" for m in modalities)
        raise EmbedkitError(f"ids do not join across modalities: no id is in both ({counts} rows); were they "
                            f"extracted from the same data?")
    if len(modalities) > 1 and any(es.unmatched.values()):
        from embedkit.console import say

        say("note: rows without a partner in the other modality are left out: "
            + ", ".join(f"{m} {n}" for m, n in es.unmatched.items() if n))


def _binary_column(values: np.ndarray, name: str) -> np.ndarray:
    mapping = {"1": 1.0, "0": 0.0, "true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if v is None:
            continue
        key = str(int(v) if isinstance(v, (bool, np.bool_)) else v).strip().lower()
        key = key[:-2] if key.endswith(".0") else key
        if key not in mapping:
            raise EmbedkitError(f"multilabel needs 0/1 label columns; '{name}' has the value '{v}'")
        out[i] = mapping[key]
    return out


def _normalise_split(values: np.ndarray) -> np.ndarray:
    out = []
    for v in values:
        key = SPLIT_NAMES.get(str(v).strip().lower()) if v is not None else None
        if key is None:
            raise EmbedkitError(f"split column value '{v}' is not one of train, val, test")
        out.append(key)
    return np.array(out, dtype=object)


# ---------------------------------------------------------------- one fit


def make_estimator(cfg: TrainConfig, dims: list[int], seed: int, gap=None):
    from embedkit.fusion import FusionClassifier, LogisticBaseline

    if cfg.fusion == "logistic":
        return LogisticBaseline(random_state=seed)
    return FusionClassifier(
        fusion="late" if cfg.fusion == "late" else "early", modality_dims=tuple(dims), hidden_dim=cfg.hidden_dim,
        late_hidden_dim=cfg.late_hidden_dim, dropout=cfg.dropout, epochs=cfg.epochs, lr=cfg.lr,
        batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, class_weight=cfg.class_weight,
        patience=cfg.patience, noise_std=cfg.noise_std, random_state=seed, device=cfg.device,
        learn_lambda=gap is not None)


def split_for_run(ds: Dataset, cfg: TrainConfig, seed: int) -> dict[str, np.ndarray]:
    from embedkit.fusion.evaluate import split_indices

    if ds.split is None:
        return split_indices(ds.y, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=seed)
    idx = {k: np.flatnonzero(ds.split == k) for k in ("train", "val", "test")}
    if not len(idx["train"]) or not len(idx["test"]):
        raise EmbedkitError("the split column needs train and test rows")
    if not len(idx["val"]):  # carve validation out of train, stratified and seeded; test stays untouched
        inner = split_indices(ds.y[idx["train"]], val_fraction=cfg.val_fraction / (1 - cfg.test_fraction),
                              test_fraction=0.0, seed=seed)
        idx["val"], idx["train"] = idx["train"][inner["val"]], idx["train"][inner["train"]]
    return idx


def features(ds_blocks: dict[str, np.ndarray], modalities: list[str], aligner=None) -> np.ndarray:
    """Concatenate modality blocks (after the fitted gap shift, if any) into one matrix."""
    blocks = dict(ds_blocks)
    if aligner is not None:
        blocks["image"], blocks["text"] = aligner.transform(blocks["image"], blocks["text"])
    return np.concatenate([blocks[m] for m in modalities], axis=1).astype(np.float32, copy=False)


def fit_once(ds: Dataset, cfg: TrainConfig, modalities: list[str], idx: dict, seed: int,
             lambda_: float | None) -> tuple:
    """Fit on idx['train'], select on idx['val'], evaluate idx['test'] once. Returns (est, aligner, metrics)."""
    from embedkit.fusion.align import GapShift
    from embedkit.fusion.evaluate import compute_metrics

    aligner = None
    if lambda_ is not None or cfg.learned_lambda:
        if modalities != ["image", "text"]:
            raise EmbedkitError("modality-gap alignment needs both image and text (--fusion early or late)")
        tr = idx["train"]
        aligner = GapShift(lambda_=lambda_ or 0.0).fit(ds.blocks["image"][tr], ds.blocks["text"][tr])
    x = model_features({"modalities": modalities, "learned_lambda": cfg.learned_lambda,
                        "alignment": aligner.to_dict() if aligner is not None and not cfg.learned_lambda else None},
                       ds.blocks)
    dims = [ds.blocks[m].shape[1] for m in modalities]
    est = make_estimator(cfg, dims, seed, gap=aligner.gap_ if cfg.learned_lambda else None)
    t0 = time.perf_counter()
    tr, va, te = idx["train"], idx["val"], idx["test"]
    if cfg.fusion == "logistic":
        est.fit(x[tr], ds.y[tr])
    else:
        est.fit(x[tr], ds.y[tr], eval_set=(x[va], ds.y[va]), **({"gap": aligner.gap_} if cfg.learned_lambda else {}))
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    proba_te = est.predict_proba(x[te])
    predict_s = time.perf_counter() - t0
    task = est.task_
    threshold = getattr(est, "threshold", 0.5)
    metrics = {
        "val": compute_metrics(ds.y[va], est.predict_proba(x[va]), est.classes_, task, threshold),
        "test": compute_metrics(ds.y[te], proba_te, est.classes_, task, threshold),
        "costs": {"train_seconds": round(fit_s, 4), "predict_seconds": round(predict_s, 4),
                  "epoch_seconds": round(fit_s / max(1, len(getattr(est, "history_", [])) or 1), 4)},
        "n": {k: int(len(v)) for k, v in idx.items()}, "seed": seed,
    }
    if hasattr(est, "best_epoch_"):
        metrics["best_epoch"] = int(est.best_epoch_)
    if cfg.learned_lambda:
        metrics["learned_lambda"] = float(est.learned_lambda_)
    return est, aligner, metrics


def parse_sweep(spec: str) -> list[float]:
    try:
        start, stop, step = (float(v) for v in spec.split(":"))
    except ValueError:
        raise EmbedkitError(f"--align-sweep wants START:STOP:STEP, e.g. -1:1:0.1 (got '{spec}')") from None
    if step <= 0 or stop < start:
        raise EmbedkitError("--align-sweep needs STEP > 0 and STOP >= START")
    n = int(round((stop - start) / step)) + 1
    return [round(start + i * step, 10) for i in range(n)]


# ---------------------------------------------------------------- train


def train(emb_dir, out_dir, cfg: TrainConfig) -> dict:
    """Train, evaluate honestly, and save a model folder. Returns the metrics written to metrics.json."""
    from embedkit.fusion.evaluate import kfold_indices, summarize_runs

    costs = Costs()
    out_dir = Path(out_dir)
    modalities = modalities_for(cfg.fusion, sorted(find_datasets(emb_dir)))
    with costs.stage("load"):
        ds = load_dataset(emb_dir, cfg.labels, modalities, cfg.models)
    if len(cfg.labels) == 1:
        classes = {v for v in ds.y}
        if len(classes) < 2:
            raise EmbedkitError(f"label '{cfg.labels[0]}' has only one class ({next(iter(classes), 'none')}); "
                                f"a classifier needs at least two")
    if cfg.align_lambda is not None or cfg.align_sweep or cfg.learned_lambda:
        dims = {m: ds.blocks[m].shape[1] for m in ds.blocks}
        if len(set(dims.values())) > 1:
            from embedkit.fusion.align import GapShift

            GapShift().fit(ds.blocks["image"][:2], ds.blocks["text"][:2])  # raises the explanatory error

    # lambda: fixed, or chosen on validation from a sweep (seed-0 split)
    curve = None
    lambda_ = cfg.align_lambda
    with costs.stage("fit"):
        if cfg.align_sweep:
            idx0 = split_for_run(ds, cfg, cfg.seed)
            curve = []
            for lam in parse_sweep(cfg.align_sweep):
                _, _, m = fit_once(ds, cfg, modalities, idx0, cfg.seed, lam)
                curve.append({"lambda": lam, "val_macro_f1": m["val"]["macro_f1"],
                              "test_macro_f1": m["test"]["macro_f1"], "val_auroc": m["val"]["auroc"]})
            best = max(curve, key=lambda r: (r["val_macro_f1"], -abs(r["lambda"])))
            lambda_ = best["lambda"]

        runs = []
        if cfg.cv:
            for k, (rest, test) in enumerate(kfold_indices(ds.y, cfg.cv, cfg.seed)):
                from embedkit.fusion.evaluate import split_indices

                inner = split_indices(ds.y[rest], val_fraction=cfg.val_fraction, test_fraction=0.0, seed=cfg.seed + k)
                idx = {"train": rest[inner["train"]], "val": rest[inner["val"]], "test": test}
                runs.append(fit_once(ds, cfg, modalities, idx, cfg.seed + k, lambda_))
        else:
            for s in range(cfg.seeds):
                runs.append(fit_once(ds, cfg, modalities, split_for_run(ds, cfg, cfg.seed + s), cfg.seed + s, lambda_))
    est, aligner, first = runs[0]

    out_dir.mkdir(parents=True, exist_ok=True)
    with costs.stage("save"):
        est.save(out_dir)
        info = {
            "kind": "logistic" if cfg.fusion == "logistic" else "fusion", "fusion": cfg.fusion,
            "modalities": modalities, "labels": cfg.labels, "task": est.task_,
            "classes": list(cfg.labels) if est.task_ == "multilabel" else [_jsonable(c) for c in est.classes_],
            "encoders": {m: {k: ds.provenance[m].get(k) for k in (*PROVENANCE_MATCH, "name")} for m in modalities},
            "alignment": aligner.to_dict() if aligner is not None else None,
            "learned_lambda": cfg.learned_lambda, "config": asdict(cfg),
        }
        write_json_atomic(out_dir / "embedkit_model.json", info)
    spread_key = "folds" if cfg.cv else "seeds"
    metrics = {
        "test": first["test"], "val": first["val"],
        "spread": {"over": spread_key, "n_runs": len(runs),
                   "test": summarize_runs([_scalars(r[2]["test"]) for r in runs]),
                   "val": summarize_runs([_scalars(r[2]["val"]) for r in runs])},
        "runs": [{k: v for k, v in r[2].items() if k not in ("val", "test")} | {"test": _scalars(r[2]["test"])}
                 for r in runs],
        "alignment": {"lambda": lambda_, "sweep": curve,
                      "selected_on": "validation macro-F1" if curve else None} if (lambda_ is not None or curve)
        else None,
        "data": {"rows": int(len(ds.ids)), "dropped_unlabelled": ds.dropped_unlabelled,
                 "split": "data's split column" if ds.split is not None else
                 f"stratified {1 - cfg.val_fraction - cfg.test_fraction:.2f}/{cfg.val_fraction}/{cfg.test_fraction}",
                 "n": first["n"], "seeds": [r[2]["seed"] for r in runs]},
        "costs": {**first["costs"], "peak_rss_mb": round(peak_rss_mb(), 1), "model_bytes": _model_bytes(est),
                  "folder_bytes": dir_bytes(out_dir), "stage_seconds": costs.to_dict()["stage_seconds"]},
        "config": asdict(cfg),
    }
    write_json_atomic(out_dir / "metrics.json", metrics)
    if curve:
        _plot_curve(curve, lambda_, out_dir / "lambda_curve.png")
    if aligner is not None and lambda_ is not None:
        from embedkit.fusion.align import gap_stats, plot_gap_pca

        idx0 = split_for_run(ds, cfg, cfg.seed)["train"]
        metrics["gap"] = gap_stats(ds.blocks["image"][idx0], ds.blocks["text"][idx0], lambda_=lambda_, gap=aligner.gap_)
        plot_gap_pca(ds.blocks["image"][idx0], ds.blocks["text"][idx0], out_dir / "gap_pca.png", lambda_=lambda_,
                     gap=aligner.gap_)
        write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


def _scalars(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _model_bytes(est) -> int:
    mb = getattr(est, "model_bytes", None)
    return int(mb() if callable(mb) else (mb or 0))


def _jsonable(v):
    return v.item() if hasattr(v, "item") else v


def _plot_curve(curve: list[dict], chosen: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    lams = [r["lambda"] for r in curve]
    ax.plot(lams, [r["val_macro_f1"] for r in curve], "o-", label="validation (selects lambda)")
    ax.plot(lams, [r["test_macro_f1"] for r in curve], "s--", alpha=0.6, label="test (shown, not used to select)")
    ax.axvline(chosen, color="gray", ls=":", label=f"chosen lambda = {chosen:g}")
    ax.set_xlabel("lambda (0 = no shift, 1 = means aligned)")
    ax.set_ylabel("macro-F1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- predict / evaluate


def load_model(model_dir):
    model_dir = Path(model_dir)
    info_path = model_dir / "embedkit_model.json"
    if not info_path.is_file():
        raise EmbedkitError(f"'{model_dir}' is not an embedkit model folder (no embedkit_model.json)")
    info = json.loads(info_path.read_text())
    from embedkit.fusion import FusionClassifier, LogisticBaseline

    est = (LogisticBaseline if info["kind"] == "logistic" else FusionClassifier).load(model_dir)
    return est, info


def model_features(info: dict, blocks: dict[str, np.ndarray]) -> np.ndarray:
    """The matrix a saved model expects: its modalities, with its training-fitted alignment applied."""
    from embedkit.fusion.align import GapShift, l2_normalize

    if info.get("learned_lambda"):  # the model shifts (normalised) embeddings with its learned lambda
        return np.concatenate([l2_normalize(blocks[m]) for m in info["modalities"]], axis=1)
    aligner = GapShift.from_dict(info["alignment"]) if info.get("alignment") else None
    return features(blocks, info["modalities"], aligner)


def check_encoders(info: dict, provenance: dict[str, dict], emb_dir) -> None:
    """Refuse embeddings from another model, revision, pooling or preprocessing than training used."""
    for m in info["modalities"]:
        trained, given = info["encoders"][m], provenance[m]
        diff = [k for k in PROVENANCE_MATCH if trained.get(k) != given.get(k)]
        if diff:
            raise EmbedkitError(f"the {m} embeddings in '{emb_dir}' come from another encoder than the model was "
                                f"trained on ({given.get('name')} vs {trained.get('name')}; differs in "
                                f"{', '.join(diff)}): extract them with the same model")


def _inputs_for(model_dir, emb_dir):
    est, info = load_model(model_dir)
    modalities = info["modalities"]
    es = load_embeddings(emb_dir, modalities=modalities)
    _check_join(es, modalities)
    check_encoders(info, es.provenance, emb_dir)
    x = model_features(info, es.embeddings)
    return est, info, es, x


def predict(model_dir, emb_dir, out_path) -> dict:
    """Write id, predicted label and per-class probabilities to Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    est, info, es, x = _inputs_for(model_dir, emb_dir)
    t0 = time.perf_counter()
    proba = est.predict_proba(x)
    pred = est.predict(x)
    seconds = time.perf_counter() - t0
    cols = {"id": pa.array(list(es.ids), pa.string())}
    if info["task"] == "multilabel":
        for j, c in enumerate(info["classes"]):
            cols[f"pred_{c}"] = pa.array(np.asarray(pred)[:, j].astype(np.int8))
            cols[f"prob_{c}"] = pa.array(proba[:, j].astype(np.float32))
    else:
        cols["predicted"] = pa.array([_jsonable(p) for p in pred])
        for j, c in enumerate(info["classes"]):
            cols[f"prob_{c}"] = pa.array(proba[:, j].astype(np.float32))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), out_path)
    return {"rows": len(es.ids), "predict_seconds": round(seconds, 4), "out": str(out_path)}


def evaluate(model_dir, emb_dir, labels: list[str] | None = None, out_path=None) -> dict:
    """The training metrics, for a trained model on another labelled embedding set."""
    from embedkit.fusion.evaluate import compute_metrics

    est, info = load_model(model_dir)
    labels = labels or info["labels"]
    ds = load_dataset(emb_dir, labels, info["modalities"])
    check_encoders(info, ds.provenance, emb_dir)
    x = model_features(info, ds.blocks)
    unknown = sorted({str(v) for v in ds.y} - {str(c) for c in info["classes"]}) if ds.y.ndim == 1 else []
    if unknown:
        raise EmbedkitError(f"labels not seen in training: {', '.join(unknown[:5])}")
    metrics = compute_metrics(ds.y, est.predict_proba(x), est.classes_, info["task"], getattr(est, "threshold", 0.5))
    result = {"eval": metrics, "rows": int(len(ds.ids)), "model": str(model_dir), "embeddings": str(emb_dir)}
    if out_path:
        write_json_atomic(Path(out_path), result)
    return result
