"""Zero-shot classification in a shared image-text space: label prompts against image embeddings.

    embedkit zeroshot EMB --prompt "effusion=a chest x-ray with a pleural effusion" --prompt "normal=..."

1. The prompts are embedded by the text encoder that made EMB's text embeddings (named by their
   provenance, or --text-model), and that encoder is checked first: it must reproduce the stored
   text embeddings of a few rows, or its prompts would live in another space.
2. Each label's prompts are L2-normalised and averaged (prompt ensembling), as CLIP does.
3. Image rows are classified by cosine similarity to the label vectors; probabilities are a softmax
   of the cosines over a temperature (CLIP's 0.01, a logit scale of 100).
4. The modality-gap correction is an aligner (fusion/align.py) fitted on the folder's training rows
   (image and text of the same samples), then applied to image rows and prompt vectors alike. The
   uncorrected result is reported beside it.
5. With a label column the methods are scored on the same held-out rows, with bootstrap intervals,
   next to a linear probe (LogisticBaseline) trained on the training rows' image embeddings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedkit.errors import EmbedkitError

SHARED_FAMILIES = ("clip", "shared")  # encoders whose two towers embed into one space
VERIFY_ROWS = 8  # stored texts re-embedded to prove the prompt encoder is the one that made EMB
VERIFY_MIN_COSINE = 0.999
TEMPERATURE = 0.01


@dataclass
class ZeroShotConfig:
    prompts: dict[str, list[str]]  # label -> prompt texts
    label: str | None = None  # label column to evaluate against (default: the folder's only one)
    text_model: str | None = None  # override the provenance's text encoder (a registry name, folder, hf:ID)
    align: str = "center"  # gap correction: center, shift, standardize or none
    align_lambda: float | None = None  # the shift's lambda
    temperature: float = TEMPERATURE
    shots: int | None = None  # linear probe on this many training rows per class (None: all of them)
    bootstrap: int = 1000
    seed: int = 0
    models: dict[str, str] = field(default_factory=dict)  # pick datasets when several models were extracted


# ---------------------------------------------------------------- prompts


def parse_prompts(items: list[str], file: str | Path | None = None) -> dict[str, list[str]]:
    """'LABEL=prompt' strings (repeat a label for several prompts), plus a file of such lines
    (# comments) or a JSON object {label: prompt or [prompts]}."""
    pairs = [_split_prompt(s, "--prompt") for s in items]
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise EmbedkitError(f"prompt file '{path}' does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise EmbedkitError(f"{path.name}: not valid JSON (line {e.lineno}: {e.msg})") from None
            if not isinstance(data, dict):
                raise EmbedkitError(f"{path.name}: expected a JSON object {{label: prompt or [prompts]}}")
            for label, value in data.items():
                for p in [value] if isinstance(value, str) else value if isinstance(value, list) else [None]:
                    if not isinstance(p, str) or not p.strip():
                        raise EmbedkitError(f"{path.name}: label '{label}' needs a prompt text or a list of them")
                    pairs.append((str(label), p.strip()))
        else:
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    pairs.append(_split_prompt(line, f"{path.name} line {n}"))
    prompts: dict[str, list[str]] = {}
    for label, prompt in pairs:
        prompts.setdefault(label, []).append(prompt)
    if len(prompts) < 2:
        raise EmbedkitError(f"zero-shot needs prompts for at least two labels (got {len(prompts)}): "
                            f"--prompt 'LABEL=text' once per label, or --prompts FILE")
    return prompts


def _split_prompt(s: str, where: str) -> tuple[str, str]:
    label, sep, prompt = s.partition("=")
    if not sep or not label.strip() or not prompt.strip():
        raise EmbedkitError(f"{where}: a prompt is written LABEL=text, e.g. 'effusion=a chest x-ray with an effusion'")
    return label.strip(), prompt.strip()


# ---------------------------------------------------------------- the prompt encoder


def _text_spec(provenance: dict, override: str | None):
    """The text encoder spec that made these embeddings (or the one named), and projection heads if any."""
    from embedkit.encoders.registry import EncoderSpec, resolve_spec

    projection = provenance.get("projection")
    if override:
        return resolve_spec(override, "text"), projection
    base = dict(provenance)
    if projection:  # an `embedkit project` folder: the frozen encoder's name and source, before +proj
        base["name"] = str(base.get("name", "")).removesuffix("+proj")
        base["source"] = str(base.get("source", "")).split("+proj:", 1)[0]
    try:
        return EncoderSpec.from_dict(base), projection
    except (KeyError, TypeError):
        raise EmbedkitError("the text embeddings' provenance does not name their encoder: pass --text-model") from None


def _projection_heads(projection: dict):
    import hashlib

    from embedkit.shared_encoder.project import WEIGHTS, ProjectionHeads

    folder = Path(projection.get("heads", ""))
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise EmbedkitError(f"the projection heads these embeddings were made with ('{folder}') are not on this "
                            f"machine; prompts must be projected by the same heads")
    if hashlib.sha256(weights.read_bytes()).hexdigest() != projection.get("sha256"):
        raise EmbedkitError(f"the projection heads in '{folder}' changed since these embeddings were made "
                            f"(sha256 differs)")
    return ProjectionHeads.load(folder)


class PromptEncoder:
    """Text -> vectors in EMB's text space: the text encoder, then the projection heads if EMB was projected."""

    def __init__(self, provenance: dict, override: str | None = None):
        from embedkit.encoders import create_encoder

        spec, projection = _text_spec(provenance, override)
        if not override:  # the encoder named by the provenance must still have the weights that made EMB
            from embedkit.guards import check_same_weights

            check_same_weights(provenance, spec, "zeroshot")
        self.name = spec.name
        self.encoder = create_encoder(spec, "text", device="cpu", dtype=provenance.get("dtype") or "float32",
                                      quantize=provenance.get("quantize") if not override else None)
        self.heads = _projection_heads(projection) if projection else None

    def embed(self, texts: list[str]) -> np.ndarray:
        vectors, _ = self.encoder.embed(list(texts))
        if self.heads is not None:
            vectors = self.heads.apply(text=vectors)[1]
        return np.asarray(vectors, dtype=np.float32)


def verify_encoder(enc: PromptEncoder, texts, stored: np.ndarray) -> dict:
    """Re-embed a few stored texts: the encoder must give back what is stored (cosine >= VERIFY_MIN_COSINE)."""
    rows = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()][:VERIFY_ROWS]
    if not rows:
        return {"rows": 0, "note": "no stored texts to check the prompt encoder against"}
    again = enc.embed([texts[i] for i in rows])
    if again.shape[1] != stored.shape[1]:
        raise EmbedkitError(f"the text encoder loaded for the prompts ({enc.name}) gives {again.shape[1]}-d vectors, "
                            f"the stored text embeddings are {stored.shape[1]}-d: pass --text-model with the model "
                            f"that made them")
    cos = _unit(again) @ _unit(stored[rows]).T
    worst = float(np.diag(cos).min())
    if worst < VERIFY_MIN_COSINE:
        raise EmbedkitError(f"the text encoder loaded for the prompts ({enc.name}) does not reproduce the stored "
                            f"text embeddings (cosine {worst:.4f} on {len(rows)} rows): pass --text-model with the "
                            f"model that made them")
    return {"rows": len(rows), "min_cosine": round(worst, 6)}


# ---------------------------------------------------------------- classification


def _unit(x: np.ndarray) -> np.ndarray:
    from embedkit.fusion.align import l2_normalize

    return l2_normalize(np.asarray(x, dtype=np.float64))


def label_vectors(enc: PromptEncoder, prompts: dict[str, list[str]]) -> np.ndarray:
    """One unit vector per label: the mean of its prompts' unit vectors, renormalised."""
    return np.stack([_unit(_unit(enc.embed(texts)).mean(axis=0, keepdims=True))[0] for texts in prompts.values()])


def classify(image: np.ndarray, labels: np.ndarray, temperature: float = TEMPERATURE) -> np.ndarray:
    """Softmax over labels of cosine(image row, label vector) / temperature: (rows, labels)."""
    from scipy.special import softmax

    return softmax(_unit(image) @ _unit(labels).T / temperature, axis=1)


# ---------------------------------------------------------------- the run


def _rows(es, label: str | None, seed: int) -> tuple[np.ndarray, np.ndarray, str, str]:
    """(training rows, evaluated rows, how the training rows were chosen, how the evaluated ones were)."""
    from embedkit.dataset import SPLIT_NAMES

    n = len(es.ids)
    split = es.columns.get("split")
    split = None if split is None or all(s is None for s in split) else \
        np.array([SPLIT_NAMES.get(str(s).strip().lower()) if s is not None else None for s in split], dtype=object)
    if split is not None and (split == "train").any():
        train = np.flatnonzero(split == "train")
        test = np.flatnonzero(split == "test")
        if len(test):
            return train, test, "split 'train'", "split 'test'"
        rest = np.flatnonzero(split != "train")
        return train, rest, "split 'train'", "rows outside split 'train'"
    if label is None:
        return np.arange(n), np.arange(n), "all rows (no split column; no labels are used)", "all rows"
    from embedkit.fusion.evaluate import split_indices

    y = _labels(es, label)
    have = np.flatnonzero(y != None)  # noqa: E711 - object array
    groups = es.columns.get("group")
    g = None if groups is None or all(v is None for v in groups) else groups[have]
    idx = split_indices(y[have].astype(str), val_fraction=0.0, test_fraction=0.3, seed=seed, groups=g)
    by = " by group" if g is not None else ""
    return have[idx["train"]], have[idx["test"]], f"70% of labelled rows{by} (no split column)", \
        f"the other 30%{by}"


def _labels(es, label: str) -> np.ndarray:
    values = es.columns[label]
    return np.array([None if v is None or v != v else str(v) for v in values], dtype=object)


def _default_label(es, label: str | None) -> str | None:
    if label is not None:
        if label not in es.columns:
            raise EmbedkitError(f"label column '{label}' is not in the embeddings")
        return label
    names = next(iter(es.provenance.values()), {}).get("label_columns", [])
    return names[0] if len(names) == 1 else None


def _check_one_space(es) -> None:
    image, text = es.provenance["image"], es.provenance["text"]
    same = image.get("source") == text.get("source") and image.get("family") in SHARED_FAMILIES
    if not (same or (image.get("projection") and text.get("projection")
                     and image["projection"].get("sha256") == text["projection"].get("sha256"))):
        raise EmbedkitError(f"the image ({image.get('name')}) and text ({text.get('name')}) embeddings are not in one "
                            f"space: zero-shot needs a two-tower model (CLIP), shared:PATH, or `embedkit project`")


def _score(y, proba, classes, task, groups, cfg: ZeroShotConfig) -> dict:
    from embedkit.fusion.evaluate import bootstrap_metrics, compute_metrics

    m = compute_metrics(y, proba, classes, task)
    out = {k: m[k] for k in ("n", "accuracy", "macro_f1", "weighted_f1", "auroc", "ece") if k in m}
    if "absent_classes" in m:
        out["absent_classes"] = m["absent_classes"]
    if cfg.bootstrap:
        out["bootstrap"] = bootstrap_metrics(y, proba, classes, task, groups=groups, n_resamples=cfg.bootstrap,
                                             seed=cfg.seed)
    return out


def _probe(image, y, train, test, classes, task, groups, cfg: ZeroShotConfig) -> dict:
    from embedkit.fusion.estimator import LogisticBaseline

    train = train[y[train] != None]  # noqa: E711
    if cfg.shots:  # k rows per class, a seeded draw: the few-shot probe
        rng = np.random.default_rng(cfg.seed)
        train = np.sort(np.concatenate([rng.permutation(train[y[train] == c])[:cfg.shots]
                                        for c in sorted(set(y[train].tolist()))]))
    if len(set(y[train].tolist())) < 2:
        return {"skipped": "fewer than two classes among the training rows"}
    est = LogisticBaseline().fit(image[train], y[train].astype(str))
    proba = est.predict_proba(image[test])
    # the probe's columns follow its own sorted classes; put them in the prompts' order
    order = [est.classes_.tolist().index(c) if c in est.classes_.tolist() else None for c in classes]
    full = np.column_stack([proba[:, j] if j is not None else np.zeros(len(test)) for j in order])
    return {"train_rows": int(len(train)), **_score(y[test], full, classes, task, groups, cfg)}


def zeroshot(emb, cfg: ZeroShotConfig, encoder: PromptEncoder | None = None) -> dict:
    """Classify EMB's image rows by prompt similarity; with a label column, score next to a linear probe.

    Returns {"predictions": {...}, "report": {...}}; the report is JSON-safe (zeroshot.json).
    """
    from embedkit.fusion.align import make_aligner
    from embedkit.store import TEXT_COLUMN, load_embeddings

    es = load_embeddings(emb, modalities=["image", "text"], models=cfg.models or None)
    if not len(es.ids):
        raise EmbedkitError(f"no sample under '{emb}' has both image and text embeddings (joined on id)")
    _check_one_space(es)
    label = _default_label(es, cfg.label)
    train, test, fitted_on, evaluated_on = _rows(es, label, cfg.seed)

    enc = encoder or PromptEncoder(es.provenance["text"], cfg.text_model)
    stored_texts = es.columns.get(TEXT_COLUMN)
    verified = verify_encoder(enc, list(stored_texts) if stored_texts is not None else [], es.embeddings["text"])
    classes = list(cfg.prompts)
    vectors = label_vectors(enc, cfg.prompts)
    image = es.embeddings["image"]
    if vectors.shape[1] != image.shape[1]:
        raise EmbedkitError(f"prompt vectors are {vectors.shape[1]}-d, the image embeddings {image.shape[1]}-d: "
                            f"not one space")

    methods = {"zero-shot": make_aligner("none")}
    if cfg.align != "none":
        methods[f"zero-shot + {cfg.align}"] = make_aligner(cfg.align, cfg.align_lambda)
    pair = {"image": image[train], "text": es.embeddings["text"][train]}
    proba = {}
    for name, aligner in methods.items():
        aligner.fit(pair)  # training rows only: the statistics never see an evaluated row
        proba[name] = classify(aligner.transform({"image": image})["image"],
                               aligner.transform({"text": vectors})["text"], cfg.temperature)

    chosen = next(reversed(proba))  # the corrected one when there is a correction
    report = {"source": str(emb), "labels": classes, "prompts": {k: len(v) for k, v in cfg.prompts.items()},
              "text_model": enc.name, "encoder_check": verified, "temperature": cfg.temperature,
              "alignment": {"method": cfg.align, "lambda": cfg.align_lambda, "fitted_on": f"{len(train)} rows, "
                            f"{fitted_on}"}, "predicted_with": chosen, "label_column": label, "rows": int(len(es.ids))}
    if label is not None:
        report["evaluation"] = _evaluate(es, label, image, proba, classes, train, test, evaluated_on, cfg)
    predictions = {"ids": es.ids, "columns": es.columns, "proba": proba[chosen], "classes": classes,
                   "label": label}
    return {"predictions": predictions, "report": report}


def _evaluate(es, label, image, proba, classes, train, test, evaluated_on, cfg) -> dict:
    y = _labels(es, label)
    test = test[y[test] != None]  # noqa: E711
    unknown = sorted(set(y[test].tolist()) - set(classes))
    if unknown:
        raise EmbedkitError(f"column '{label}' has labels without a prompt: {', '.join(unknown[:10])}; add "
                            f"--prompt '{unknown[0]}=...' for each")
    if not len(test):
        raise EmbedkitError(f"no labelled rows to evaluate on ({evaluated_on})")
    task = "binary" if len(classes) == 2 else "multiclass"
    groups = es.columns.get("group")
    groups = None if groups is None or all(g is None for g in groups[test]) else groups[test]
    scores = {name: _score(y[test], p[test], classes, task, groups, cfg) for name, p in proba.items()}
    shots = f"{cfg.shots} per class" if cfg.shots else "all"
    scores[f"linear probe ({shots} training rows)"] = _probe(image, y, train, test, classes, task, groups, cfg)
    return {"rows": int(len(test)), "evaluated_on": evaluated_on, "task": task, "methods": scores}


def prediction_table(predictions: dict) -> dict:
    """Columns for a Parquet file: id, group, split, true label, predicted, prob_<label>."""
    import pyarrow as pa

    cols = {"id": pa.array([str(i) for i in predictions["ids"]], pa.string())}
    for name in ("group", "split"):
        if name in predictions["columns"]:
            cols[name] = pa.array([None if v is None else str(v) for v in predictions["columns"][name]], pa.string())
    label = predictions["label"]
    if label is not None:
        cols[f"true_{label}"] = pa.array([None if v is None else str(v) for v in predictions["columns"][label]],
                                         pa.string())
    proba, classes = predictions["proba"], predictions["classes"]
    cols["predicted"] = pa.array([classes[j] for j in proba.argmax(axis=1)], pa.string())
    for j, c in enumerate(classes):
        cols[f"prob_{c}"] = pa.array(proba[:, j].astype(np.float32))
    return cols
