"""Embeddings on disk -> a trained, honestly evaluated classifier folder.

train:    join modalities on id -> labels, groups -> split (the data's, or stratified + grouped,
          seeded) -> per run: [aligner fitted on train rows] -> estimator; every choice (best
          epoch, alignment method/lambda, temperature, threshold) on that run's validation rows
          -> test scored once -> bootstrap over test groups, subgroups -> model folder
Data and splits live in dataset.py; predict and evaluate (re-exported here) in predict.py.

A model folder holds only safetensors and JSON: estimator weights, `embedkit_model.json`
(what it was trained on: encoders, labels, alignment, calibration, hashed training ids),
`metrics.json`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from embedkit.costs import Costs, dir_bytes, peak_rss_mb
from embedkit.dataset import (Dataset, carried_columns, groups_for, load_dataset, purge_shared_groups, row_keys,
                              run_splits, warn_shared_inputs, warn_ungrouped)
from embedkit.errors import EmbedkitError
from embedkit.fusion.adequacy import parameters_finding
from embedkit.fusion.missing import MASKED_FUSIONS, block_presence, combinations, handling
from embedkit.fusion.ood import OODGuard, metrics_by_flag, ood_columns, ood_summary, split_blocks
from embedkit.limits import MAX_SWEEP, check_classes, check_count, check_train_counts, fits_note
from embedkit.near_duplicates import grouping_modalities, near_duplicate_groups, warn_near_duplicates
from embedkit.predict import (PROVENANCE_MATCH, apply_calibration, decide, evaluate, jsonable,  # noqa: F401
                              encoder_record, load_model, model_features, predict, prediction_columns, write_rows)
from embedkit.store import find_datasets, write_json_atomic

FUSIONS = ("early", "late", "gated", "attention", "lowrank", "image", "text", "logistic")


@dataclass
class TrainConfig:
    labels: list[str]  # one column: binary/multiclass; several binary columns: multilabel
    fusion: str = "late"  # early | late | gated | attention | lowrank (fusion/models.py) | image | text | logistic
    hidden_dim: int = 128  # early fusion hidden width (reference: 128)
    late_hidden_dim: int = 64  # late fusion per-modality width (reference: 64)
    dropout: float = 0.0  # the reference code ran with 0 (its README says 0.2)
    epochs: int = 30  # reference: 30
    lr: float = 1e-3  # AdamW, reference: 1e-3
    batch_size: int = 64  # reference: 64
    weight_decay: float = 0.01  # AdamW default
    class_weight: str | None = "balanced"
    patience: int | None = None  # early stopping on validation macro-F1
    noise_std: float = 0.0  # Gaussian noise in units of each input feature's training std, training only
    align: str | None = None  # none | shift | center | standardize (fusion/align.py); None = raw embeddings
    align_lambda: float | None = None  # lambda of the gap shift (implies align="shift")
    align_sweep: str | None = None  # e.g. "shift:-1:1:0.5,center,none": chosen on validation in each run
    learned_lambda: bool = False  # train the shift's lambda jointly with the classifier
    scale: str | None = None  # standard | none; None: none when aligning (keeps the shift), else standard
    modality_dropout: float = 0.0  # share of training rows with image or text masked (with --align: its stand-in)
    threshold: str = "val-f1"  # binary decision threshold: val-f1 (chosen on validation) | 0.5 | a number
    calibrate: bool = True  # temperature scaling, fitted where there are enough rows (calibrate_on)
    calibrate_on: str = "auto"  # auto (validation if >= 200 rows, else out-of-fold training rows, else none) | val | oof
    group_col: str | None = None  # None: the group stored by extract (e.g. a patient id), if any
    groups: bool = True  # False (--no-groups): rows are treated as independent
    group_near_duplicates: bool = False  # each near-duplicate cluster becomes one group (near_duplicates.py)
    near_duplicate_threshold: float | None = None  # cosine; None: calibrated per encoder (near_duplicates.py)
    ood_guard: str = "centroids"  # centroids | rows | none: prototypes of the OOD guard (fusion/ood.py)
    ood_percentile: float = 95.0  # of validation rows' guard distances: the flagging threshold
    data_split: bool = True  # use the data's split column when it has one
    subgroups: list[str] = field(default_factory=list)  # columns to report metrics per value of
    bootstrap: int = 1000  # resamples for the test-set intervals (0: none)
    seeds: int = 1  # repeat with seeds 0..n-1 (new split unless the data has one) for spread
    cv: int | None = None  # k-fold cross-validation instead of a single split
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    models: dict[str, str] = field(default_factory=dict)  # modality -> model name when several were extracted
    device: str = "cpu"
    class_names: dict[str, str] = field(default_factory=dict)  # class -> what it means, e.g. {"0": "no", "1": "yes"}
    card: str | None = None  # card.toml: what only a person knows (intended use, outcome, licence, ...)


def modalities_for(fusion: str, available: list[str]) -> list[str]:
    if fusion not in FUSIONS:
        raise EmbedkitError(f"unknown fusion '{fusion}' (choose {', '.join(FUSIONS)})")
    if fusion in ("image", "text"):
        return [fusion]
    if fusion == "logistic":
        return [m for m in ("image", "text") if m in available]
    return ["image", "text"]


# ---------------------------------------------------------------- alignment choices


def parse_sweep(spec: str) -> list[dict]:
    """Alignment candidates: comma-separated `none`, `center`, `standardize`, `shift=L` or
    `shift:START:STOP:STEP`; a bare START:STOP:STEP means gap-shift lambdas."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part[0].isdigit() or part[0] in "-.":  # a bare lambda grid
            method, value, grid = "shift", "", part
        else:
            head, _, grid = part.partition(":")
            method, _, value = head.partition("=")
        if method not in ("none", "shift", "center", "standardize"):
            raise EmbedkitError(f"--align-sweep: unknown method '{method}' (none, shift, center, standardize)")
        if method != "shift":
            out.append({"method": method, "lambda": None})
        elif value:
            out.append({"method": "shift", "lambda": _number(value)})
        else:
            out.extend({"method": "shift", "lambda": lam} for lam in _grid(grid or "1:1:1"))
    if not out:
        raise EmbedkitError("--align-sweep is empty")
    check_count(len(out), "--align-sweep candidates", 1, MAX_SWEEP)
    return out


def _number(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise EmbedkitError(f"--align-sweep: '{v}' is not a number") from None


def _grid(spec: str) -> list[float]:
    try:
        start, stop, step = (float(v) for v in spec.split(":"))
    except ValueError:
        raise EmbedkitError(f"--align-sweep wants START:STOP:STEP, e.g. -1:1:0.1 (got '{spec}')") from None
    if step <= 0 or stop < start:
        raise EmbedkitError("--align-sweep needs STEP > 0 and STOP >= START")
    if not all(math.isfinite(v) for v in (start, stop, step)):
        raise EmbedkitError(f"--align-sweep wants finite numbers (got '{spec}')")
    n = int(round((stop - start) / step)) + 1
    check_count(n, "--align-sweep points", 1, MAX_SWEEP, f"{spec} is {n} points")
    return [round(start + i * step, 10) for i in range(n)]


def alignment_candidates(cfg: TrainConfig) -> list[dict]:
    if cfg.align_sweep:
        return parse_sweep(cfg.align_sweep)
    if cfg.learned_lambda:
        return [{"method": "shift", "lambda": "learned"}]
    if cfg.align_lambda is not None:
        if cfg.align not in (None, "shift"):
            raise EmbedkitError(f"--align-lambda goes with --align shift, not '{cfg.align}'")
        return [{"method": "shift", "lambda": float(cfg.align_lambda)}]
    if cfg.align is not None:
        if cfg.align not in ("none", "shift", "center", "standardize"):
            raise EmbedkitError(f"unknown --align '{cfg.align}' (none, shift, center, standardize)")
        return [{"method": cfg.align, "lambda": 1.0 if cfg.align == "shift" else None}]
    return [{"method": None, "lambda": None}]


def input_scale(cfg: TrainConfig, aligned: bool) -> str:
    scale = cfg.scale or ("none" if aligned else "standard")
    if scale not in ("standard", "none"):
        raise EmbedkitError(f"--scale must be standard or none, got '{scale}'")
    return scale


# ---------------------------------------------------------------- one run


def make_estimator(cfg: TrainConfig, dims: list[int], seed: int, scale: str, learn_lambda: bool = False,
                   masking: float = 0.0):
    from embedkit.fusion import FusionClassifier, LogisticBaseline

    if cfg.fusion == "logistic":
        return LogisticBaseline(random_state=seed)
    return FusionClassifier(
        fusion=cfg.fusion if cfg.fusion in MASKED_FUSIONS else "early", modality_dims=tuple(dims),
        hidden_dim=cfg.hidden_dim, modality_dropout=masking,
        late_hidden_dim=cfg.late_hidden_dim, dropout=cfg.dropout, epochs=cfg.epochs, lr=cfg.lr,
        batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, class_weight=cfg.class_weight,
        patience=cfg.patience, noise_std=cfg.noise_std, scale=scale, random_state=seed, device=cfg.device,
        learn_lambda=learn_lambda)


def modality_dropout(blocks: dict, rows: np.ndarray, aligner, share: float, seed: int) -> dict:
    """Training rows with one modality replaced by its stand-in (half image, half text), so the
    head learns to work when a modality is missing at inference."""
    rng = np.random.default_rng(seed)
    chosen = rows[rng.random(len(rows)) < share]
    chosen = chosen[np.isfinite(blocks["image"][chosen]).all(1) & np.isfinite(blocks["text"][chosen]).all(1)]
    drop_image = rng.random(len(chosen)) < 0.5
    out = {m: b.copy() for m, b in blocks.items()}
    for m, present, sel in (("image", "text", chosen[drop_image]), ("text", "image", chosen[~drop_image])):
        if len(sel):
            out[m][sel] = aligner.stand_in(present, blocks[present][sel])
    return out


@dataclass
class Run:
    est: object
    info: dict  # what model_features / predict need: modalities, alignment, learned_lambda
    metrics: dict
    calibration: dict
    idx: dict
    test_proba: np.ndarray
    val_proba: np.ndarray | None = None  # calibrated, as the choices saw them
    raw_test_proba: np.ndarray | None = None  # before temperature scaling


def fit_candidate(ds, cfg, modalities, idx, seed, cand) -> tuple:
    """Fit one alignment candidate on the run's training rows; returns (estimator, info, validation input)."""
    tr, va = idx["train"], idx["val"]
    aligner = None
    if cand["method"] is not None:
        from embedkit.fusion.align import make_aligner

        learned = cand["lambda"] == "learned"
        aligner = make_aligner("none" if learned else cand["method"], None if learned else cand["lambda"])
        paired = tr[np.isfinite(ds.blocks["image"][tr]).all(1) & np.isfinite(ds.blocks["text"][tr]).all(1)]
        aligner.fit({"image": ds.blocks["image"][paired], "text": ds.blocks["text"][paired]})
    info = {"modalities": modalities, "learned_lambda": cand["lambda"] == "learned",
            "alignment": aligner.to_dict() if aligner is not None else None}
    blocks, masking = ds.blocks, 0.0
    if cfg.modality_dropout > 0 and aligner is not None:  # the stand-in, as predict will make it
        blocks = modality_dropout(blocks, tr, aligner, cfg.modality_dropout, seed)
    elif cfg.modality_dropout > 0:  # masking: the head learns its missing token (or mask) on these rows
        if cfg.fusion not in MASKED_FUSIONS:
            raise EmbedkitError(f"--modality-dropout masks a modality of a fusion of two ({', '.join(MASKED_FUSIONS)}); "
                                f"--fusion {cfg.fusion} takes it with --align (a stand-in from the fitted gap)")
        masking = cfg.modality_dropout
    x_train = model_features(info, {m: blocks[m][tr] for m in blocks})
    x_val = model_features(info, {m: ds.blocks[m][va] for m in ds.blocks})
    dims = [ds.blocks[m].shape[1] for m in modalities]
    est = make_estimator(cfg, dims, seed, input_scale(cfg, aligner is not None), learn_lambda=info["learned_lambda"],
                         masking=masking)
    if cfg.fusion == "logistic":
        est.fit(x_train, ds.y[tr])
    else:
        est.fit(x_train, ds.y[tr], eval_set=(x_val, ds.y[va]),
                **({"gap": np.asarray(info["alignment"]["gap"], dtype=np.float32)} if info["learned_lambda"] else {}))
    return est, info, x_val


def run_once(ds: Dataset, cfg: TrainConfig, modalities: list[str], idx: dict, seed: int) -> Run:
    """One run: fit each alignment candidate on train, keep the best on validation, calibrate on
    validation, then score the test rows once with the chosen model."""
    from embedkit.fusion.calibrate import choose_calibration_rows, choose_threshold
    from embedkit.fusion.evaluate import compute_metrics

    t0 = time.perf_counter()
    va, te = idx["val"], idx["test"]
    curve, best = [], None
    for cand in alignment_candidates(cfg):
        est, info, x_val = fit_candidate(ds, cfg, modalities, idx, seed, cand)
        val_proba = est.predict_proba(x_val)
        score = compute_metrics(ds.y[va], val_proba, est.classes_, est.task_)["macro_f1"]
        curve.append({**cand, "val_macro_f1": score})
        # ties: the simpler choice (no shift before a shift, the smaller |lambda|)
        key = (round(score, 12), -_complexity(cand))
        if best is None or key > best[0]:
            best = (key, est, info, val_proba, cand)
    _, est, info, val_proba, chosen = best
    fit_s = time.perf_counter() - t0

    task, classes = est.task_, est.classes_
    calibration = {"temperature": 1.0, "threshold": 0.5, "threshold_rule": "0.5"}
    val_targets, train_targets = _targets(ds.y[va], classes, task), _targets(ds.y[idx["train"]], classes, task)
    combos = combinations(ds.blocks)  # the modalities each row has: per-combination temperatures and metrics
    if cfg.calibrate:
        from functools import cache

        from embedkit.fusion.combinations import combination_temperatures

        oof = cache(lambda: _out_of_fold(ds, cfg, modalities, idx, seed, chosen, classes, task,
                                         getattr(est, "best_epoch_", None)))
        fitted = choose_calibration_rows(task, val_proba, val_targets, train_targets,
                                         lambda: None if oof() is None else oof()[:3], cfg.calibrate_on)
        calibration["temperature"] = fitted.pop("temperature")
        calibration["calibrated_on"] = fitted
        calibration.update(combination_temperatures(task, val_proba, val_targets, combos[va], train_targets,
                                                    combos[idx["train"]], oof, cfg.calibrate_on))
    val_cal = apply_calibration(val_proba, calibration, task, combos[va])
    if task == "binary":
        calibration["threshold_rule"] = cfg.threshold
        calibration["threshold"] = choose_threshold(val_cal[:, 1], val_targets, cfg.threshold)
    elif cfg.threshold not in ("val-f1", "0.5"):  # multilabel: a fixed number applies to every label
        calibration["threshold"] = float(cfg.threshold)
        calibration["threshold_rule"] = cfg.threshold

    t1 = time.perf_counter()
    raw_test = est.predict_proba(model_features(info, {m: ds.blocks[m][te] for m in ds.blocks}))  # test, once
    predict_s = time.perf_counter() - t1
    test_cal = apply_calibration(raw_test, calibration, task, combos[te])
    thr = calibration["threshold"]
    metrics = {
        "val": compute_metrics(ds.y[va], val_cal, classes, task, thr),
        "test": compute_metrics(ds.y[te], test_cal, classes, task, thr),
        "costs": {"train_seconds": round(fit_s, 4), "predict_seconds": round(predict_s, 4),
                  "epoch_seconds": round(fit_s / max(1, len(getattr(est, "history_", [])) or 1), 4)},
        "n": {k: int(len(idx[k])) for k in ("train", "val", "test")}, "seed": seed,
        "alignment": {"method": chosen["method"], "lambda": chosen["lambda"]},
    }
    calibration["ece_before"] = {"val": compute_metrics(ds.y[va], val_proba, classes, task, thr)["ece"],
                                 "test": compute_metrics(ds.y[te], raw_test, classes, task, thr)["ece"]}
    calibration["ece_after"] = {"val": metrics["val"]["ece"], "test": metrics["test"]["ece"]}
    if len(curve) > 1:
        metrics["sweep"] = curve
    if hasattr(est, "best_epoch_"):
        metrics["best_epoch"] = int(est.best_epoch_)
    if info["learned_lambda"]:
        metrics["learned_lambda"] = float(est.learned_lambda_)
        metrics["alignment"]["lambda"] = metrics["learned_lambda"]
    return Run(est, info, metrics, calibration, idx, test_cal, val_cal, raw_test)


def _out_of_fold(ds, cfg, modalities, idx, seed, cand, classes, task, best_epoch=None):
    """The chosen candidate's out-of-fold predictions of the training rows (calibrate.out_of_fold), each fold
    model trained as long as the chosen one was; -> (proba, targets, how, each row's modalities) or None."""
    from dataclasses import replace

    from embedkit.fusion.calibrate import out_of_fold

    cfg = replace(cfg, epochs=best_epoch, patience=None) if best_epoch else cfg

    def fit_predict(fit_rows, held_rows):
        est, info, _ = fit_candidate(ds, cfg, modalities, {"train": fit_rows, "val": idx["val"]}, seed, cand)
        if [str(c) for c in est.classes_] != [str(c) for c in classes]:  # a fold without a class: unusable
            return None
        return est.predict_proba(model_features(info, {m: ds.blocks[m][held_rows] for m in ds.blocks}))

    made = out_of_fold(ds.y, idx["train"], groups_for(ds, cfg.group_col, cfg.groups)[0], fit_predict, seed)
    return None if made is None else (made[0], _targets(ds.y[made[1]], classes, task), made[2],
                                      combinations({m: b[made[1]] for m, b in ds.blocks.items()}))


def _complexity(cand: dict) -> float:
    if cand["method"] is None:
        return 0.0
    lam = cand["lambda"]
    return 1.0 + (abs(lam) if isinstance(lam, (int, float)) else 0.0) + (cand["method"] != "none")


def _targets(y, classes, task: str) -> np.ndarray:
    if task == "multilabel":
        return np.asarray(y).astype(int)
    index = {c: i for i, c in enumerate(np.asarray(classes).tolist())}
    return np.array([index[c] for c in np.asarray(y).tolist()], dtype=int)




# ---------------------------------------------------------------- train


def train(emb_dir, out_dir, cfg: TrainConfig) -> dict:
    """Train, evaluate honestly, and save a model folder. Returns the metrics written to metrics.json.

    The folder is written beside its place and renamed into it when complete (guards.replaced_folder):
    a crash leaves the previous model whole, and no earlier artefact sits beside a new one.
    """
    from embedkit.console import recording
    from embedkit.guards import replaced_folder
    from embedkit.modelcard import read_card_toml, write_model_card

    if cfg.card:
        read_card_toml(cfg.card)  # a bad card.toml fails before any fit
    check_train_counts(cfg)
    with replaced_folder(Path(out_dir), "model folder", "embedkit_model.json", "train") as staging, \
            recording() as said:
        metrics = _train_into(emb_dir, staging, cfg, said)
        write_model_card(staging, emb_dir, cfg.card, name=Path(out_dir).name)
        return metrics


def _train_into(emb_dir, out_dir: Path, cfg: TrainConfig, said: list[str] | None = None) -> dict:
    from embedkit.console import say
    from embedkit.fusion.combinations import combination_metrics
    from embedkit.fusion.evaluate import bootstrap_metrics, subgroup_metrics, summarize_runs

    costs = Costs()
    out_dir = Path(out_dir)
    available = sorted(find_datasets(emb_dir))
    modalities = modalities_for(cfg.fusion, available)
    candidates = alignment_candidates(cfg)
    aligning = any(c["method"] is not None for c in candidates)
    # the aligner is fitted on paired rows, also for a one-modality classifier (cross-modal transfer)
    data_modalities = ["image", "text"] if aligning else modalities
    with costs.stage("load"):
        ds = load_dataset(emb_dir, cfg.labels, data_modalities, cfg.models,
                          keep_incomplete=cfg.fusion in MASKED_FUSIONS or aligning)
    if ds.dropped_unlabelled:
        say(f"note: {ds.dropped_unlabelled} of {ds.dropped_unlabelled + len(ds.ids)} rows have no "
            f"{' / '.join(cfg.labels)} label and are left out")
    if len(cfg.labels) == 1:
        classes = {v for v in ds.y}
        if len(classes) < 2:
            raise EmbedkitError(f"label '{cfg.labels[0]}' has only one class ({next(iter(classes), 'none')}); "
                                f"a classifier needs at least two")
        check_classes(len(classes), cfg.labels[0])
    if aligning:
        widths = {m: ds.blocks[m].shape[1] for m in ds.blocks}
        if widths["image"] != widths["text"]:
            from embedkit.fusion.align import make_aligner

            make_aligner("none").fit({"image": ds.blocks["image"][:2], "text": ds.blocks["text"][:2]})  # explains
    unknown = sorted(set(map(str, cfg.class_names)) - ({str(v) for v in ds.y} if ds.y.ndim == 1 else set(cfg.labels)))
    if unknown:
        raise EmbedkitError(f"--class-names names {', '.join(unknown)}, which label '{cfg.labels[0]}' does not have")
    for name in cfg.subgroups:
        if name not in ds.columns:
            raise EmbedkitError(f"subgroup column '{name}' is not in the embeddings; columns carried through: "
                                f"{', '.join(carried_columns(ds.columns)) or 'none'}")
    groups, group_note = groups_for(ds, cfg.group_col, cfg.groups)
    nd_modalities = grouping_modalities([m for m in modalities if m in ds.blocks])
    nd_thresholds = {m: cfg.near_duplicate_threshold for m in nd_modalities if cfg.near_duplicate_threshold}
    if cfg.group_near_duplicates:
        groups, nd_grouping = near_duplicate_groups(ds, groups, nd_modalities, nd_thresholds)
        group_note += (f" + near-duplicate clusters of {', '.join(nd_modalities)} ({nd_grouping['groups_formed']} "
                       f"groups joining {nd_grouping['rows_regrouped']} rows)")
    say(f"groups: {group_note}")
    purged = {"train": 0, "val": 0}
    if ds.split is not None and cfg.data_split:
        _, purged = purge_shared_groups({k: np.flatnonzero(ds.split == k) for k in ("train", "val", "test")}, groups)
        if any(purged.values()):
            say(f"note: the data's split puts some groups on both sides; left out so that no group crosses a "
                f"split: {purged['train']} train and {purged['val']} validation rows (their group has later rows)")

    with costs.stage("fit"):
        splits, seeds = run_splits(ds, cfg, groups)
        small_data = _say_small_data(ds, splits[0], cfg)
        if note := fits_note(len(splits), len(candidates), "folds" if cfg.cv else "seeds"):
            say(note)
        runs = [run_once(ds, cfg, modalities, idx, s) for idx, s in zip(splits, seeds)]
    first = runs[0]
    te = first.idx["test"]
    stored_groups = groups_for(ds, cfg.group_col)[0] if not cfg.groups else groups
    fix = "leave out --no-groups" if not cfg.groups and stored_groups is not None else None
    if groups is None:
        shared_inputs = warn_shared_inputs(ds, first.idx, *([fix] if fix else []))
    else:  # one person under two group ids puts the same image on both sides
        shared_inputs = warn_shared_inputs(ds, first.idx, "the same image under two group ids (one patient under "
                                           "two ids?): merge those ids or de-duplicate", columns=("image_sha256",))
    ungrouped = warn_ungrouped(first.idx, stored_groups) if fix else None
    leakage = _leakage_scan(ds, cfg, first, groups)
    near_dups = warn_near_duplicates(ds, first.idx, groups, nd_modalities, nd_thresholds, cfg.group_near_duplicates)
    guard, test_ood = _fit_ood_guard(ds, cfg, first)

    with costs.stage("intervals"):
        g_test = None if groups is None else groups[te]
        task, classes, thr = first.est.task_, first.est.classes_, first.calibration["threshold"]
        boot = bootstrap_metrics(ds.y[te], first.test_proba, classes, task, thr, g_test, n_resamples=cfg.bootstrap,
                                 seed=cfg.seed) if cfg.bootstrap else None
        combos = combinations(ds.blocks)
        by_combination = combination_metrics(ds.y[te], first.raw_test_proba, first.calibration, classes, task,
                                             combos[te], g_test, cfg.bootstrap or 200, cfg.seed) \
            if len(ds.blocks) > 1 else None
        subgroups = {name: subgroup_metrics(ds.y[te], first.test_proba, classes, task, ds.columns[name][te], thr,
                                            g_test, n_resamples=cfg.bootstrap or 200, seed=cfg.seed)
                     for name in cfg.subgroups}

    with costs.stage("save"):
        info = _model_info(ds, cfg, first, groups)
        if guard is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            info["ood_guard"] = guard.save(out_dir)
        _save_model_folder(out_dir, first.est, info)
        # run 0's test rows, one line each: what the report's reliability diagram and a reader can check
        pred = decide(first.test_proba, info["classes"], first.est.task_, thr)
        cols = prediction_columns(info, ds.ids[te], {k: v[te] for k, v in ds.columns.items()}, first.test_proba,
                                  pred, combos[te].tolist())
        write_rows({**cols, **ood_columns(test_ood)}, out_dir / "test_predictions.parquet")
    spread_key = "folds" if cfg.cv else "seeds"
    metrics = {
        "test": first.metrics["test"], "val": first.metrics["val"],
        "bootstrap": {"what": ("95% percentile bootstrap interval of each test metric of the saved model (run 0), "
                               f"resampling test {'groups' if groups is not None else 'rows'}"), **boot}
        if boot else None,
        "spread": {"what": f"mean, std and t 95% interval of test metrics over {len(runs)} {spread_key}",
                   "over": spread_key, "n_runs": len(runs),
                   "test": summarize_runs([_scalars(r.metrics["test"]) for r in runs]),
                   "val": summarize_runs([_scalars(r.metrics["val"]) for r in runs])},
        "runs": [{k: v for k, v in r.metrics.items() if k not in ("val", "test")}
                 | {"test": _scalars(r.metrics["test"]), "calibration": _round(r.calibration)} for r in runs],
        "calibration": _round(first.calibration),
        "alignment": _alignment_summary(cfg, runs, first) if aligning else None,
        "subgroups": subgroups or None,
        "by_combination": by_combination,
        "leakage": leakage,
        "ood": None if guard is None else {**guard.to_dict(), "test": ood_summary(test_ood > 1),
                                           "test_by_ood": metrics_by_flag(ds.y[te], first.test_proba, classes, task,
                                                                          thr, test_ood > 1,
                                                                          all_rows=first.metrics["test"])},
        "data": {"rows": int(len(ds.ids)), "dropped_unlabelled": ds.dropped_unlabelled,
                 "split": _split_description(ds, cfg), "groups": group_note,
                 "purged_rows": purged, "n": first.metrics["n"], "groups_per_split": _groups_per_split(first.idx,
                                                                                                      groups),
                 "test_rows_sharing_inputs_with_train": shared_inputs, "seeds": seeds,
                 "combinations": {k: {str(c): int(n) for c, n in zip(*np.unique(combos[first.idx[k]].astype(str),
                                                                              return_counts=True))}
                                  for k in ("train", "val", "test")},
                 "near_duplicates_across_splits": near_dups, "group_near_duplicates": cfg.group_near_duplicates,
                 **({"ungrouped": ungrouped} if ungrouped else {})},
        "costs": {**first.metrics["costs"], "peak_rss_mb": round(peak_rss_mb(), 1),
                  "model_bytes": _model_bytes(first.est), "folder_bytes": dir_bytes(out_dir),
                  "parameters": int(getattr(first.est, "n_parameters_", 0) or first.est.coef_.size
                                    + first.est.intercept_.size),
                  "stage_seconds": costs.to_dict()["stage_seconds"]},
        "config": asdict(cfg),
    }
    too_many = parameters_finding(metrics["costs"]["parameters"], len(first.idx["train"]))
    if too_many:
        say(f"[yellow]warning:[/] {too_many['message']}")
    metrics["small_data"] = small_data + ([too_many] if too_many else [])
    if aligning:
        _alignment_artifacts(ds, first, out_dir, metrics)
    with costs.stage("intervals"):
        _clinical_metrics(ds, first, cfg, groups, metrics)
    metrics["warnings"] = [m for m in (said or []) if m.startswith(("warning", "note", "leakage"))]
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


def _clinical_metrics(ds: Dataset, run: Run, cfg: TrainConfig, groups, metrics: dict) -> None:
    """fusion/clinical.py's additions to metrics.json, and the mean cosine of a shared or projected space."""
    from embedkit.fusion.clinical import add_clinical_metrics

    add_clinical_metrics(metrics, {k: ds.y[run.idx[k]] for k in ("train", "val", "test")}, run.val_proba,
                         run.test_proba, run.raw_test_proba, run.est.classes_, run.est.task_,
                         run.calibration["threshold"], None if groups is None else
                         {k: groups[run.idx[k]] for k in ("val", "test")}, cfg.bootstrap, cfg.seed)
    shared = [m for m in run.info["modalities"] if ds.provenance[m].get("family") == "shared"
              or "projection" in ds.provenance[m]]
    if shared:  # a shared or projected space can collapse: the card says so
        from embedkit.shared_encoder.collapse import mean_pairwise_cosine

        first = {m: ds.blocks[m][run.idx["train"]][:2000] for m in shared}  # rows that have it, up to 500
        metrics["data"]["mean_within_cosine"] = {m: round(mean_pairwise_cosine(x[np.isfinite(x).all(1)][:500]), 4)
                                                 for m, x in first.items()}


def _say_small_data(ds: Dataset, idx: dict, cfg: TrainConfig) -> list[dict]:
    """Run 0's split: too few test rows, or too few rows of a class in a split (fusion/adequacy.py), said once."""
    from embedkit.console import say
    from embedkit.fusion.adequacy import findings

    found = findings(ds.y, idx, list(cfg.labels) if ds.y.ndim == 2 else None)
    for f in found:
        say(f"[yellow]warning:[/] {f['message']}")
    return found


def _leakage_scan(ds: Dataset, cfg: TrainConfig, run: Run, groups=None) -> dict | None:
    """Training rows' texts: label words and single tokens that alone predict the label."""
    if "text" not in ds.columns or "text" not in run.info["modalities"]:
        return None
    from embedkit.console import say
    from embedkit.leakage import format_leakage, scan_text_leakage

    tr = run.idx["train"]
    texts = ds.columns["text"][tr].tolist()
    # multilabel estimators number their outputs: the scan needs the label names
    classes = list(cfg.labels) if run.est.task_ == "multilabel" else [str(c) for c in run.est.classes_]
    result = scan_text_leakage(texts, ds.y[tr], run.est.task_, classes, label_names=cfg.labels,
                               groups=None if groups is None else groups[tr])
    for line in format_leakage(result, ", ".join(cfg.labels)):
        say(f"[yellow]{line}[/]")
    if not result["n_rows_scanned"] and any(t is not None for t in texts):
        say("[yellow]warning:[/] the text-leakage scan matched no training row to its label: nothing was scanned")
    return result


def _fit_ood_guard(ds: Dataset, cfg: TrainConfig, run: Run):
    """The OOD guard on run 0's training rows in the model's input space, threshold on its validation
    rows; -> (guard, test rows' ood_score) or (None, None) with --ood-guard none."""
    if cfg.ood_guard == "none":
        return None, None
    mods = run.info["modalities"]
    dims = {m: ds.blocks[m].shape[1] for m in mods}
    feats = {k: split_blocks(model_features(run.info, {m: ds.blocks[m][run.idx[k]] for m in ds.blocks}), mods, dims)
             for k in ("train", "val", "test")}
    # a modality the row lacks (masked, or stood in for) is not the guard's to judge, as in predict
    has = {k: block_presence({m: ds.blocks[m][run.idx[k]] for m in mods}) for k in feats}
    guard = OODGuard(cfg.ood_guard, cfg.ood_percentile, random_state=cfg.seed).fit(
        *({m: feats[k][m][has[k][m]] for m in mods} for k in ("train", "val")))
    return guard, guard.score(feats["test"], has["test"])[0]


def _model_info(ds: Dataset, cfg: TrainConfig, run: Run, groups) -> dict:
    est = run.est
    return {
        "kind": "logistic" if cfg.fusion == "logistic" else "fusion", "fusion": cfg.fusion,
        "modalities": run.info["modalities"], "labels": cfg.labels, "task": est.task_,
        "classes": list(cfg.labels) if est.task_ == "multilabel" else [jsonable(c) for c in est.classes_],
        "encoders": {m: encoder_record(ds.provenance[m]) for m in ds.provenance},
        "alignment": run.info["alignment"], "learned_lambda": run.info["learned_lambda"],
        # how a row lacking each modality is taken (fusion/missing.py), and block widths for a NaN stand-in
        "missing_handling": handling(est, run.info), "modality_dims": {m: int(ds.blocks[m].shape[1])
                                                                       for m in run.info["modalities"]},
        "calibration": {k: run.calibration[k] for k in ("temperature", "threshold", "threshold_rule", "by_combination")
                        if k in run.calibration},
        "class_names": {str(k): str(v) for k, v in cfg.class_names.items()},
        "group_col": (cfg.group_col or "group") if groups is not None else None,
        # hashed, so the folder names no patient; evaluate refuses rows the model was fitted or selected on
        "fitted_rows": {k: sorted(row_keys(ds, run.idx[k], run.info["modalities"])) for k in ("train", "val")},
        "config": asdict(cfg),
    }


def _save_model_folder(out_dir: Path, est, info: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # an earlier run's artefacts never appear beside this one's
    for stale in ("lambda_curve.png", "gap_pca.png", "lambda_trajectory.png", "test_predictions.parquet"):
        (out_dir / stale).unlink(missing_ok=True)
    est.save(out_dir)
    write_json_atomic(out_dir / "embedkit_model.json", info)


def _alignment_summary(cfg: TrainConfig, runs: list[Run], first: Run) -> dict:
    chosen = [r.metrics["alignment"] for r in runs]
    out = {"method": chosen[0]["method"], "lambda": chosen[0]["lambda"], "chosen_per_run": chosen,
           "scale": input_scale(cfg, True), "noise_std": cfg.noise_std, "modality_dropout": cfg.modality_dropout,
           "selected_on": "validation macro-F1 of each run" if len(alignment_candidates(cfg)) > 1 else None,
           "sweep": first.metrics.get("sweep")}
    if first.info["learned_lambda"]:
        out["learned_lambda"] = [r.metrics["learned_lambda"] for r in runs]
        out["lambda_trajectory"] = [h.get("lambda") for h in first.est.history_]
    return out


def _alignment_artifacts(ds: Dataset, run: Run, out_dir: Path, metrics: dict) -> None:
    from embedkit.fusion.align import aligner_from_dict, gap_stats, plot_gap_pca

    tr = run.idx["train"]
    tr = tr[np.isfinite(ds.blocks["image"][tr]).all(1) & np.isfinite(ds.blocks["text"][tr]).all(1)]  # paired rows
    img, txt = ds.blocks["image"][tr], ds.blocks["text"][tr]
    aligner = aligner_from_dict(run.info["alignment"])
    lam = run.metrics["alignment"]["lambda"]
    shift_lambda = lam if isinstance(lam, (int, float)) and run.metrics["alignment"]["method"] == "shift" else None
    metrics["gap"] = gap_stats(img, txt, lambda_=shift_lambda, gap=aligner.gap_)
    plot_gap_pca(img, txt, out_dir / "gap_pca.png", lambda_=shift_lambda, gap=aligner.gap_)
    if metrics["alignment"].get("sweep"):
        _plot_sweep(metrics["alignment"]["sweep"], run.metrics["alignment"], out_dir / "lambda_curve.png")
    if metrics["alignment"].get("lambda_trajectory"):
        _plot_trajectory(metrics["alignment"]["lambda_trajectory"], out_dir / "lambda_trajectory.png")


def _split_description(ds: Dataset, cfg: TrainConfig) -> str:
    if ds.split is not None and cfg.data_split:
        return "data's split column" + (" (folds inside train+validation; official test scored by each fold)"
                                          if cfg.cv and (ds.split == "test").any() else "")
    if cfg.cv:
        return f"{cfg.cv}-fold cross-validation, stratified"
    return f"stratified {1 - cfg.val_fraction - cfg.test_fraction:.2f}/{cfg.val_fraction}/{cfg.test_fraction}"


def _groups_per_split(idx: dict, groups) -> dict:
    return {k: int(len(set(groups[v].tolist()))) if groups is not None else int(len(v))
            for k, v in idx.items() if k in ("train", "val", "test")}


def _scalars(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _round(d: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else _round(v) if isinstance(v, dict) else v) for k, v in d.items()}


def _model_bytes(est) -> int:
    mb = getattr(est, "model_bytes", None)
    return int(mb() if callable(mb) else (mb or 0))


def _plot_sweep(curve: list[dict], chosen: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    names = [_candidate_name(r) for r in curve]
    ax.plot(range(len(curve)), [r["val_macro_f1"] for r in curve], "o-", label="validation (selects; run 0)")
    ax.set_xticks(range(len(curve)), names, rotation=45, ha="right", fontsize=8)
    ax.axvline(names.index(_candidate_name(chosen)), color="gray", ls=":", label=f"chosen: {_candidate_name(chosen)}")
    ax.set_ylabel("validation macro-F1")
    ax.set_title("alignment choice (test rows are scored only for the chosen one)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _candidate_name(c: dict) -> str:
    if c["method"] == "shift":
        lam = c["lambda"]
        return f"shift {lam:g}" if isinstance(lam, (int, float)) else "shift (learned)"
    return c["method"] or "raw"


def _plot_trajectory(lambdas: list[float], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot()
    ax.plot(range(1, len(lambdas) + 1), lambdas, "o-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learned lambda")
    ax.set_title("learned lambda per epoch (run 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
