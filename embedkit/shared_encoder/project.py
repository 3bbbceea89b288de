"""A light contrastive projection that puts two frozen unimodal encoders into one space.

OneEncoder-style (REFERENCE.md section 3): the big encoders stay frozen, their embeddings are
already on disk, and only a small head per modality is trained with the CLIP loss on row-aligned
pairs, e.g. 768-d image and 4096-d text embeddings -> one 256-d space. Seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from embedkit.errors import EmbedkitError
from embedkit.shared_encoder.model import clip_loss
from embedkit.shared_encoder.retrieval import retrieval_metrics

WEIGHTS, CONFIG = "projection.safetensors", "projection.json"
MODALITIES = ("image", "text")


class _Heads(nn.Module):
    def __init__(self, image_dim: int, text_dim: int, dim: int, hidden: int):
        super().__init__()
        self.heads = nn.ModuleDict()
        for m, d_in in zip(MODALITIES, (image_dim, text_dim)):
            # Inputs are standardised per dimension with training statistics: LLM embeddings have a
            # few huge outlier dimensions that would otherwise dominate a linear map.
            self.register_buffer(f"{m}_mean", torch.zeros(d_in))
            self.register_buffer(f"{m}_std", torch.ones(d_in))
            if hidden:
                self.heads[m] = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, dim))
            else:
                self.heads[m] = nn.Linear(d_in, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def project(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        x = (x - getattr(self, f"{modality}_mean")) / getattr(self, f"{modality}_std")
        return F.normalize(self.heads[modality](x), dim=-1)


class ProjectionHeads:
    """Trained heads; `apply` maps frozen embeddings into the common space (numpy in, numpy out)."""

    def __init__(self, image_dim: int, text_dim: int, dim: int = 256, hidden: int = 0):
        self.config = {"image_dim": image_dim, "text_dim": text_dim, "dim": dim, "hidden": hidden}
        self.net = _Heads(image_dim, text_dim, dim, hidden)

    @property
    def dim(self) -> int:
        return self.config["dim"]

    @torch.inference_mode()
    def apply(self, image: np.ndarray | None = None, text: np.ndarray | None = None):
        """-> (projected image or None, projected text or None): float32, L2-normalised rows."""
        self.net.eval()
        out = []
        for m, x in zip(MODALITIES, (image, text)):
            if x is None:
                out.append(None)
                continue
            x = np.asarray(x, dtype=np.float32)
            if x.ndim != 2 or x.shape[1] != self.config[f"{m}_dim"]:
                raise EmbedkitError(f"projection expects {m} embeddings of width {self.config[f'{m}_dim']}, got shape {x.shape}")
            out.append(self.net.project(torch.from_numpy(x), m).numpy())
        return tuple(out)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(path / WEIGHTS))
        (path / CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ProjectionHeads":
        path = Path(path)
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise EmbedkitError(f"{path} is not a projection folder: {CONFIG} or {WEIGHTS} is missing")
        heads = cls(**json.loads((path / CONFIG).read_text()))
        heads.net.load_state_dict(load_file(path / WEIGHTS), strict=True)
        return heads


def fit_projection(
    image: np.ndarray,
    text: np.ndarray,
    dim: int = 256,
    epochs: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    val_fraction: float = 0.2,
    hidden: int = 0,
    batch_size: int = 256,
    weight_decay: float = 0.01,
    groups: np.ndarray | None = None,
) -> tuple[ProjectionHeads, dict]:
    """Train per-modality heads contrastively (symmetric InfoNCE) on row-aligned embedding pairs.

    The held-out rows (val_fraction, seeded; whole `groups` at a time when given, e.g. an image
    id so that one image's several reports never straddle the split) are only evaluated, never
    used to choose anything.
    """
    t0 = time.perf_counter()
    image, text = np.asarray(image, dtype=np.float32), np.asarray(text, dtype=np.float32)
    if image.ndim != 2 or text.ndim != 2 or len(image) != len(text):
        raise EmbedkitError(f"projection needs row-aligned 2-D arrays, got {image.shape} and {text.shape}")
    if not (np.isfinite(image).all() and np.isfinite(text).all()):
        raise EmbedkitError("projection inputs contain NaN or infinite values")
    from sklearn.model_selection import GroupShuffleSplit

    keys = np.arange(len(image)) if groups is None else np.asarray(groups)
    n_groups = len(np.unique(keys))
    n_val = min(round(val_fraction * n_groups), n_groups - 1) if val_fraction > 0 else 0
    tr, va = np.arange(len(image)), np.arange(0)
    if n_val:  # a seeded share of whole groups held out
        tr, va = map(np.sort, next(GroupShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
                                   .split(image, groups=keys)))
    if len(tr) < 2:
        raise EmbedkitError("projection needs at least 2 training pairs")

    torch.manual_seed(seed)
    heads = ProjectionHeads(image.shape[1], text.shape[1], dim, hidden)
    net = heads.net
    x = {"image": torch.from_numpy(image), "text": torch.from_numpy(text)}
    for m in MODALITIES:
        getattr(net, f"{m}_mean").copy_(x[m][tr].mean(0))
        getattr(net, f"{m}_std").copy_(x[m][tr].std(0).clamp(min=1e-6) if len(tr) > 1 else 1.0)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    bs = min(batch_size, len(tr))
    g = torch.Generator().manual_seed(seed)
    losses = []
    net.train()
    for _ in range(epochs):
        perm = torch.from_numpy(tr)[torch.randperm(len(tr), generator=g)]
        epoch_loss = []
        for b in perm[: len(tr) // bs * bs].view(-1, bs):
            scale = net.logit_scale.exp().clamp(max=100.0)
            loss = clip_loss(net.project(x["image"][b], "image"), net.project(x["text"][b], "text"), scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss.append(loss.item())
        losses.append(float(np.mean(epoch_loss)))
    metrics = {
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "train_loss": losses,
        "seconds": round(time.perf_counter() - t0, 3),
        "config": heads.config,
    }
    if len(va) >= 2:
        metrics["val_retrieval"] = retrieval_metrics(*heads.apply(image[va], text[va]))
    return heads, metrics


def projection_rows(columns: dict) -> np.ndarray:
    """Rows the heads may be fitted on: the training split (all rows without one), minus training rows
    whose group (a patient, an image) also has rows in another split, which a later test would score."""
    split, group = columns.get("split"), columns.get("group")
    if split is None or all(s is None for s in split):
        return np.ones(len(split if split is not None else next(iter(columns.values()))), bool)
    train = np.array([s == "train" for s in split])
    if group is not None:
        elsewhere = {g for g, t in zip(group, train) if not t and g is not None}
        train &= np.array([g is None or g not in elsewhere for g in group])
    return train


def project_embeddings(emb_dir, out_dir, heads_dir=None, dim: int = 256, epochs: int = 100, seed: int = 0,
                       models: dict | None = None) -> dict:
    """Put the image and text embeddings of an extract folder into one space, as a new extract folder.

    Without `heads_dir`, heads are trained on the rows of the training split (all rows when the
    data has no split column; never a training row whose group has rows in another split) and
    saved to OUT/projection; with it, saved heads are applied as
    they are (new data, same encoders). The output has the same schema and provenance as
    `extract` writes (dim and a `projection` entry updated), so `train --align-*`, `gap` and
    `retrieval` work on encoders that never shared a space.
    """
    from embedkit.guards import replaced_folder

    final = Path(out_dir)
    inside_heads = heads_dir is not None and final.resolve() in Path(heads_dir).resolve().parents
    if final.resolve() == Path(emb_dir).resolve() or inside_heads:
        raise EmbedkitError("project --out must be a new folder: it is replaced whole, and it holds the input "
                            "embeddings or the heads being applied")
    with replaced_folder(final, "projection --out", "manifest.json") as staging:  # re-running replaces, never appends
        return _project_into(emb_dir, staging, final, heads_dir, dim, epochs, seed, models)


def _project_into(emb_dir, out_dir: Path, final: Path, heads_dir, dim: int, epochs: int, seed: int,
                  models: dict | None) -> dict:
    """project_embeddings, written into `out_dir` (a staging folder that becomes `final`)."""
    from embedkit.store import TEXT_COLUMN, PartWriter, build_schema, dataset_dir, load_embeddings, write_json_atomic

    es = load_embeddings(emb_dir, modalities=list(MODALITIES), models=models)
    if not len(es.ids):
        raise EmbedkitError(f"no id has both image and text embeddings in '{emb_dir}'")
    metrics = {}
    if heads_dir is None:
        train_rows = projection_rows(es.columns)
        heads, metrics = fit_projection(es.embeddings["image"][train_rows], es.embeddings["text"][train_rows],
                                        dim=dim, epochs=epochs, seed=seed)
        heads.save(out_dir / "projection")
        saved_heads, heads_dir = out_dir / "projection", final / "projection"  # where they will live
    else:
        heads = ProjectionHeads.load(heads_dir)
        saved_heads = Path(heads_dir)
    projected = dict(zip(MODALITIES, heads.apply(es.embeddings["image"], es.embeddings["text"])))
    weights_sha = hashlib.sha256((saved_heads / WEIGHTS).read_bytes()).hexdigest()
    carried = {k: list(v) for k, v in es.columns.items()
               if k not in ("split", TEXT_COLUMN) and not k.endswith(("_path", "_sha256"))}
    for m in MODALITIES:
        prov = dict(es.provenance[m])
        prov.update(name=f"{prov.get('name')}+proj", dim=int(projected[m].shape[1]),
                    source=f"{prov.get('source')}+proj:{weights_sha[:16]}",
                    projection={"heads": str(Path(heads_dir).resolve()), "sha256": weights_sha})
        with_text = m == "text" and TEXT_COLUMN in es.columns  # the text table keeps its texts (leakage checks)
        writer = PartWriter(dataset_dir(out_dir, m, prov["name"]),
                            build_schema(prov["dim"], carried, prov, text_column=with_text))
        cols = {"id": list(es.ids), "path": list(es.columns[f"{m}_path"]), "sha256": list(es.columns[f"{m}_sha256"]),
                "split": list(es.columns.get("split", [None] * len(es.ids))),
                "group": list(es.columns.get("group", [None] * len(es.ids))), **carried}
        if with_text:
            cols[TEXT_COLUMN] = list(es.columns[TEXT_COLUMN])
        writer.write(cols, projected[m])
        writer.close()
    result = {"rows": int(len(es.ids)), "dim": int(heads.dim), "heads": str(heads_dir), "fit": metrics}
    write_json_atomic(out_dir / "manifest.json", {"projected_from": str(Path(emb_dir).resolve()), **result})
    return result
