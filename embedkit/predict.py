"""Using a trained model folder: predict new rows, evaluate on labelled ones.

The saved alignment and calibration are applied exactly as in training; the saved OOD guard
(fusion/ood.py) adds `ood_score` and `ood` per row and never changes a prediction. Rows that lack a
modality are predicted when the model carries an aligner: the missing modality is stood in for
by the present one moved across the gap fitted on training rows, and every output row says
which modalities it had. evaluate refuses rows the model was fitted or selected on.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from embedkit.dataset import Dataset, load_dataset, row_keys
from embedkit.errors import EmbedkitError
from embedkit.fusion.missing import combinations
from embedkit.fusion.ood import guard_scores, metrics_by_flag, ood_columns, ood_summary
from embedkit.store import IDENTITY_FIELDS, find_datasets, load_embeddings, write_json_atomic

# What must agree between training and new embeddings: the store's identity fields, except the
# dtype, backend and precision (a model trained on float32 torch embeddings may score bfloat16 or
# OpenVINO ones: the backend that wrote them measured and recorded their parity to torch fp32).
PROVENANCE_MATCH = tuple(f for f in IDENTITY_FIELDS if f not in ("dtype", "backend", "precision"))


MODEL_KEYS = ("kind", "task", "classes", "labels", "modalities", "encoders")


def load_model(model_dir):
    """(estimator, model info) from a model folder, checked: JSON, weight headers, shapes, finite values.

    Everything (the OOD guard too) is read from one snapshot of the folder (model_folder.snapshot), so a
    `train --out` swapping it meanwhile never pairs one model's JSON with another's weights."""
    from embedkit.model_folder import snapshot

    with snapshot(model_dir) as snap:
        try:
            return _load_model(snap, Path(model_dir))
        except EmbedkitError as e:  # name the folder the user gave, not the private copy
            raise EmbedkitError(str(e).replace(str(snap), str(model_dir))) from None


def _load_model(model_dir: Path, given: Path):
    from safetensors import SafetensorError

    from embedkit.guards import read_json_object
    from embedkit.model_folder import check_model_numbers

    info_path = model_dir / "embedkit_model.json"
    if not info_path.is_file():
        raise EmbedkitError(f"'{model_dir}' is not an embedkit model folder (no embedkit_model.json)")
    info = read_json_object(info_path, "model file")
    missing = [k for k in MODEL_KEYS if k not in info]
    if missing or not isinstance(info["classes"], list) or not isinstance(info["encoders"], dict):
        raise EmbedkitError(f"{info_path} is damaged or was edited (missing or malformed: "
                            f"{', '.join(missing) or 'classes/encoders'})")
    from embedkit.fusion import FusionClassifier, LogisticBaseline

    try:
        est = (LogisticBaseline if info["kind"] == "logistic" else FusionClassifier).load(model_dir)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, SafetensorError) as e:
        raise EmbedkitError(f"model folder '{model_dir}' is damaged or was edited ({type(e).__name__} while "
                            f"loading it); retrain it") from None
    # multilabel estimators number their outputs; the names live in embedkit_model.json only
    names = list(range(len(info["classes"]))) if info["task"] == "multilabel" else info["classes"]
    if [str(c) for c in est.classes_] != [str(c) for c in names]:
        raise EmbedkitError(f"model folder '{model_dir}' is inconsistent: embedkit_model.json and estimator.json name "
                            f"different classes (files from two runs?); retrain it")
    check_model_numbers(est, info, given)
    if info.get("ood_guard"):  # read now, from the same snapshot; guard_scores uses it
        from embedkit.fusion.ood import LOADED_GUARD, OODGuard

        info[LOADED_GUARD] = OODGuard.load(model_dir, info["ood_guard"])
    return est, info


def pick_models(info: dict, emb_dir, chosen: dict | None = None) -> dict:
    """Which dataset per modality: as chosen (--image-model/--text-model), else the model's own encoder
    when the folder holds several for that modality."""
    from embedkit.store import dataset_dir

    picked = dict(chosen or {})
    for m, folders in find_datasets(emb_dir).items():
        trained = (info.get("encoders", {}).get(m) or {}).get("name")
        if m not in picked and len(folders) > 1 and trained:
            if any(d.name == dataset_dir(emb_dir, m, trained).name for d in folders):
                picked[m] = trained
    return picked


def model_features(info: dict, blocks: dict[str, np.ndarray]) -> np.ndarray:
    """The matrix a saved model expects: its modalities, with its training-fitted aligner applied.
    `blocks` may lack one modality, or rows of it (NaN rows): with an aligner it is stood in for, else the
    rows go to the model as missing (a NaN block; fusion/missing.py), which takes or refuses them."""
    aligner = None
    if info.get("alignment"):
        from embedkit.fusion.align import aligner_from_dict

        aligner = aligner_from_dict(info["alignment"])
    blocks = complete_blocks(blocks, info["modalities"], aligner, info.get("modality_dims"))
    if info.get("learned_lambda"):  # the model shifts (normalised) embeddings with its learned lambda
        from embedkit.fusion.align import l2_normalize

        return np.concatenate([l2_normalize(blocks[m]) for m in info["modalities"]], axis=1).astype(np.float32)
    if aligner is not None:
        blocks = aligner.transform({m: blocks[m] for m in ("image", "text") if m in blocks})
    return np.concatenate([blocks[m] for m in info["modalities"]], axis=1).astype(np.float32, copy=False)


def complete_blocks(blocks: dict, needed: list[str], aligner, widths: dict | None = None) -> dict:
    """Fill a modality the rows lack (the whole block, or its NaN rows) with the aligner's stand-in from
    the one they have. Without an aligner, a model that learned to take the modality missing (`widths`
    from its info) gets a NaN block for it; its NaN rows are left to the model's presence mask."""
    missing = [m for m in needed if m not in blocks]
    present = [m for m in ("image", "text") if m in blocks]
    if aligner is None:
        if any(m not in (widths or {}) for m in missing) or not present:
            raise EmbedkitError(f"these rows have no {missing[0]} embeddings and the model was trained without "
                                f"--align, so nothing can stand in for them; train with --align none|shift|center|"
                                f"standardize on embeddings in one space, or with --modality-dropout")
        n = len(blocks[present[0]])
        return {**blocks, **{m: np.full((n, widths[m]), np.nan, dtype=np.float32) for m in missing}}
    if not present:
        raise EmbedkitError("these rows have no image or text embeddings")
    out = dict(blocks)
    for m in needed:
        donors = [d for d in present if d != m]
        if not donors:
            continue
        n = len(blocks[donors[0]])
        lacking = np.ones(n, dtype=bool) if m not in blocks else ~np.isfinite(blocks[m]).all(axis=1)
        rows = lacking & np.isfinite(blocks[donors[0]]).all(axis=1)
        if not rows.any():
            continue
        if rows.all():  # the whole block stood in for
            out[m] = aligner.stand_in(donors[0], blocks[donors[0]])
            continue
        out[m] = blocks[m].copy() if m in blocks else np.full_like(blocks[donors[0]], np.nan)
        out[m][rows] = aligner.stand_in(donors[0], blocks[donors[0]][rows])
    return out


def apply_calibration(proba, calibration: dict | None, task: str, combinations=None) -> np.ndarray:
    """Probabilities after the saved temperature (identity without one); `combinations` (each row's
    modalities, e.g. "image+text") picks a per-combination temperature where the model has one."""
    from embedkit.fusion.calibrate import apply_temperature

    return apply_temperature(proba, calibration, task, combinations)


def decide(proba, classes, task: str, threshold: float) -> np.ndarray:
    """Predicted labels (multilabel: a 0/1 matrix) from calibrated probabilities."""
    if task == "multiclass":
        return np.asarray(classes)[np.asarray(proba).argmax(1)]
    if task == "binary":
        return np.asarray(classes)[(np.asarray(proba)[:, 1] >= threshold).astype(int)]
    return (np.asarray(proba) >= threshold).astype(np.int64)



def check_encoders(info: dict, provenance: dict[str, dict], emb_dir) -> None:
    """Refuse embeddings from another model, revision, pooling or preprocessing than training used."""
    for m, given in provenance.items():
        trained = info["encoders"].get(m)
        if trained is None:
            continue
        diff = [k for k in PROVENANCE_MATCH if trained.get(k) != given.get(k)]
        if diff:
            raise EmbedkitError(f"the {m} embeddings in '{emb_dir}' come from another encoder than the model was "
                                f"trained on ({given.get('name')} vs {trained.get('name')}; differs in "
                                f"{', '.join(diff)}): extract them with the same model")
        check_same_weights(trained, given, f"the {m} embeddings in '{emb_dir}'")


def encoder_record(provenance: dict) -> dict:
    """What a model folder keeps of the encoder of its training embeddings: the fields predict compares,
    its name, fingerprint, and the digest of its weight files (guards.weights_digest)."""
    from embedkit.guards import FINGERPRINT_KEY, weights_digest

    return {**{k: provenance.get(k) for k in (*PROVENANCE_MATCH, "name", FINGERPRINT_KEY)},
            "weights_digest": weights_digest(provenance)}


def check_same_weights(trained: dict, provenance: dict, what: str) -> None:
    """The encoder's weight files must be the ones training saw (when both sides recorded them): a model
    re-saved under the same name and revision gives other vectors."""
    from embedkit.guards import weights_digest

    a, b = trained.get("weights_digest"), weights_digest(provenance)
    if a and b and a != b:
        raise EmbedkitError(f"{what} were made with other weights of {provenance.get('name')} than the model was "
                            f"trained on (the encoder's weight hashes differ): extract them with the same weights")


def _modalities_to_read(info: dict, emb_dir) -> list[str]:
    """The model's modalities that the folder has; with an aligner, any one of image/text will do."""
    found = set(find_datasets(emb_dir))
    wanted = set(info["modalities"]) | ({"image", "text"} if info.get("alignment") else set())
    have = sorted(wanted & found)
    taken = info.get("missing_handling") or {}  # modalities the model takes missing (fusion/missing.py)
    if not have or (not info.get("alignment") and {m for m in set(info["modalities"]) - found if not taken.get(m)}):
        need = " and ".join(info["modalities"])
        raise EmbedkitError(f"the model needs {need} embeddings; '{emb_dir}' has "
                            f"{', '.join(sorted(found)) or 'none'}")
    return have


def _rows_features(info: dict, es) -> tuple[np.ndarray, list[str]]:
    """Model input for every row of an outer-joined set, and which modalities each row had."""
    for m, x in es.embeddings.items():
        bad = es.present[m] & ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise EmbedkitError(f"{int(bad.sum())} {m} embedding rows contain NaN or infinite values; re-extract them "
                                f"(embedkit extract --overwrite)")
    return model_features(info, es.embeddings), combinations(es.embeddings).tolist()


def prediction_columns(info: dict, ids, columns: dict, proba, pred, had) -> dict:
    import pyarrow as pa

    cols = {"id": pa.array([str(i) for i in ids], pa.string())}
    for name in ("group", "split"):
        if name in columns:
            cols[name] = pa.array([None if v is None else str(v) for v in columns[name]], pa.string())
    for label in info["labels"]:
        if label in columns:
            cols[f"true_{label}"] = pa.array([None if v is None else str(v) for v in columns[label]], pa.string())
    cols["modalities"] = pa.array(had, pa.string())
    if info["task"] == "multilabel":
        for j, c in enumerate(info["classes"]):
            cols[f"pred_{c}"] = pa.array(np.asarray(pred)[:, j].astype(np.int8))
            cols[f"prob_{c}"] = pa.array(proba[:, j].astype(np.float32))
    else:
        cols["predicted"] = pa.array([jsonable(p) for p in pred])
        for j, c in enumerate(info["classes"]):
            cols[f"prob_{c}"] = pa.array(proba[:, j].astype(np.float32))
    return cols


def write_rows(cols: dict, out_path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    pq.write_table(pa.table(cols), tmp)
    tmp.replace(out_path)
    return out_path


def predict(model_dir, emb_dir, out_path, models: dict | None = None) -> dict:
    """Write id, group, split, true labels (when present), modalities, predicted and per-class
    probabilities to Parquet. `models` picks a dataset per modality, e.g. {"image": "dinov2-small"}."""
    est, info = load_model(model_dir)
    es = load_embeddings(emb_dir, modalities=_modalities_to_read(info, emb_dir), how="outer",
                         models=pick_models(info, emb_dir, models))
    check_encoders(info, es.provenance, emb_dir)
    t0 = time.perf_counter()
    _refuse_unhandled(est, info, es.embeddings)
    x, had = _rows_features(info, es)
    proba = apply_calibration(est.predict_proba(x), info.get("calibration"), info["task"], np.asarray(had))
    pred = decide(proba, info["classes"], info["task"], (info.get("calibration") or {}).get("threshold", 0.5))
    ood = guard_scores(model_dir, info, x, had)  # None for a model trained without the guard
    seconds = time.perf_counter() - t0
    out = write_rows({**prediction_columns(info, es.ids, es.columns, proba, pred, had), **ood_columns(ood)}, out_path)
    counts = {k: had.count(k) for k in sorted(set(had))}
    return {"rows": len(es.ids), "modalities": counts, "predict_seconds": round(seconds, 4), "out": str(out),
            "ood": None if ood is None else ood_summary(ood > 1)}


def evaluate(model_dir, emb_dir, labels: list[str] | None = None, out_path=None, split: str | None = None,
             allow_overlap: bool = False, rows_out=None, models: dict | None = None,
             exclude_fitted: bool = False, drop_modality: str | None = None, rates=None) -> dict:
    """The training metrics for a trained model on labelled embeddings it was not fitted on.

    split: only rows whose split column says so (e.g. "test" of the training folder). Rows the
    model was trained or selected on are refused unless allow_overlap (then counted and flagged), or left
    out and counted with exclude_fitted (`rows_left_out_as_fitted`). Rows lacking a modality are kept
    where the model takes them, else left out and counted (`rows_left_out_missing_modality`, with a note);
    metrics per modality combination go to `by_combination`. drop_modality ("image" | "text"): the
    robustness curve over `rates` (fusion/robustness.py) in `robustness`.
    """
    from embedkit.dataset import SPLIT_NAMES
    from embedkit.fusion.evaluate import bootstrap_metrics, compute_metrics

    est, info = load_model(model_dir)
    labels = labels or info["labels"]
    ds = load_dataset(emb_dir, labels, info["modalities"], pick_models(info, emb_dir, models),
                      keep_incomplete=len(info["modalities"]) > 1)
    check_encoders(info, ds.provenance, emb_dir)
    rows = np.arange(len(ds.ids))
    if split is not None:
        want = SPLIT_NAMES.get(split.strip().lower())
        if want is None:
            raise EmbedkitError(f"--split must be train, val or test, got '{split}'")
        if ds.split is None:
            raise EmbedkitError(f"--split {split}: the embeddings have no split column")
        rows = np.flatnonzero(ds.split == want)
        if not len(rows):
            raise EmbedkitError(f"no labelled {want} rows in '{emb_dir}'")
    left_out = 0
    if exclude_fitted:
        fitted = set().union(*(info.get("fitted_rows", {}).values() or [set()]))
        seen = np.array([k in fitted for k in row_keys(ds, rows, info["modalities"])], dtype=bool)
        rows, left_out = rows[~seen], int(seen.sum())
        if not len(rows):
            raise EmbedkitError(f"every labelled row of '{emb_dir}' was used to train or select this model")
    overlap = _fitted_overlap(info, ds, rows)
    if overlap and not allow_overlap:
        raise EmbedkitError(f"{overlap} of {len(rows)} rows were used to train or select this model; its score on "
                            f"them would be optimistic: pass --split test (rows it never saw) or --allow-overlap")
    rows, refused = _takeable_rows(est, info, ds, rows)
    sub = {m: b[rows] for m, b in ds.blocks.items()}
    combos = combinations(sub)
    x = model_features(info, sub)
    y = ds.y[rows]
    unknown = sorted({str(v) for v in y} - {str(c) for c in info["classes"]}) if y.ndim == 1 else []
    if unknown:
        raise EmbedkitError(f"labels not seen in training: {', '.join(unknown[:5])}")
    calib = info.get("calibration") or {}
    threshold = calib.get("threshold", 0.5)
    raw = est.predict_proba(x)
    proba = apply_calibration(raw, calib, info["task"], combos)
    metrics = compute_metrics(y, proba, est.classes_, info["task"], threshold)
    groups = ds.columns.get("group")
    groups = None if groups is None or all(g is None for g in groups[rows]) else groups[rows]
    boot = bootstrap_metrics(y, proba, est.classes_, info["task"], threshold, groups)
    ood = guard_scores(model_dir, info, x, combos.tolist())
    result = {"eval": metrics, "bootstrap": boot, "rows": int(len(rows)), "rows_seen_in_training": overlap,
              "rows_left_out_as_fitted": left_out, "rows_left_out_missing_modality": refused,
              "by_combination": _by_combination(y, raw, calib, est, info, combos, groups),
              "robustness": None if drop_modality is None else robustness(est, info, sub, y, groups, drop_modality,
                                                                           rates),
              "split": split, "model": str(model_dir), "embeddings": str(emb_dir),
              "ood": None if ood is None else {**ood_summary(ood > 1), "by_ood": metrics_by_flag(
                  y, proba, est.classes_, info["task"], threshold, ood > 1, all_rows=metrics)}}
    if out_path:
        write_json_atomic(Path(out_path), result)
    if rows_out:
        pred = decide(proba, info["classes"], info["task"], threshold)
        cols = {k: v[rows] for k, v in ds.columns.items()}
        write_rows({**prediction_columns(info, ds.ids[rows], cols, proba, pred, combos.tolist()),
                    **ood_columns(ood)}, rows_out)
    return result


def _refuse_unhandled(est, info: dict, blocks: dict) -> None:
    """One line, naming the modality, for rows the model cannot take (never a silent guess)."""
    from embedkit.fusion.missing import unhandled_rows

    bad, why = unhandled_rows(est, info, {m: b for m, b in blocks.items()})
    if bad.any():
        raise EmbedkitError(why)


def _takeable_rows(est, info: dict, ds: Dataset, rows) -> tuple[np.ndarray, int]:
    """evaluate's rows minus those lacking a modality the model cannot take (left out with a note, counted)."""
    from embedkit.fusion.missing import unhandled_rows

    bad, why = unhandled_rows(est, info, {m: b[rows] for m, b in ds.blocks.items()})
    if not bad.any():
        return rows, 0
    if bad.all():
        raise EmbedkitError(why)
    from embedkit.console import say

    say(f"note: {why}; those rows are left out of this evaluation")
    return rows[~bad], int(bad.sum())


def _by_combination(y, raw, calib: dict, est, info: dict, combos, groups) -> dict | None:
    if len(info["modalities"]) < 2:
        return None
    from embedkit.fusion.combinations import combination_metrics

    return combination_metrics(y, raw, calib, est.classes_, info["task"], combos, groups)


def robustness(est, info: dict, blocks: dict, y, groups, modality: str, rates=None, n_resamples: int = 1000) -> dict:
    """The model's robustness curve as `modality` goes missing from a share of these rows (fusion/robustness.py);
    `info` needs modalities, task, calibration and the alignment, as a model folder's embedkit_model.json has."""
    from embedkit.fusion.robustness import parse_rates, robustness_curve

    calib = info.get("calibration") or {}

    def score(masked: dict) -> np.ndarray:
        _refuse_unhandled(est, info, masked)
        return apply_calibration(est.predict_proba(model_features(info, masked)), calib, info["task"],
                                 combinations(masked))

    rates = parse_rates(rates) if rates is None or isinstance(rates, str) else rates
    return robustness_curve(score, blocks, y, est.classes_, info["task"], calib.get("threshold", 0.5), modality,
                            rates, groups, n_resamples)


def _fitted_overlap(info: dict, ds: Dataset, rows) -> int:
    fitted = set().union(*(info.get("fitted_rows", {}).values() or [set()]))
    return sum(k in fitted for k in row_keys(ds, rows, info["modalities"])) if fitted else 0


def jsonable(v):
    """A numpy scalar as the plain Python value JSON and Arrow take."""
    return v.item() if hasattr(v, "item") else v
