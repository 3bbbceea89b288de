"""A light contrastive projection that puts frozen unimodal encoders into one space.

OneEncoder-style (REFERENCE.md section 3): the big encoders stay frozen, their embeddings are
already on disk, and only a small projection is trained with the CLIP loss on row-aligned pairs,
e.g. 768-d image and 4096-d text embeddings -> one 256-d space. Seconds on a CPU. Two archs:
"linear" (one linear or MLP head per modality) and "up" (OneEncoder's universal projection, a light
transformer with modality tokens: universal.py). A further modality is added later by training only
its own small alignment layer against the frozen projection of a partner modality.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from embedkit.errors import EmbedkitError
from embedkit.shared_encoder.heldout import linked_rows, split_held_out
from embedkit.shared_encoder.model import clip_loss
from embedkit.shared_encoder.retrieval import retrieval_metrics
from embedkit.shared_encoder.universal import UniversalProjection, UniversalSettings

WEIGHTS, CONFIG, METRICS = "projection.safetensors", "projection.json", "metrics.json"
MODALITIES = ("image", "text")
ARCHS = ("linear", "up")


class _Net(nn.Module):
    """Per-modality input standardisation + the arch's core + L2 normalisation, and the CLIP temperature."""

    def __init__(self, arch: str, dim: int, hidden: int, up: UniversalSettings | None):
        super().__init__()
        self.arch, self.dim, self.hidden = arch, dim, hidden
        if arch == "up":
            self.up = UniversalProjection(up or UniversalSettings(), dim)
        else:
            self.heads = nn.ModuleDict()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def add_modality(self, name: str, d_in: int) -> list[nn.Parameter]:
        # Inputs are standardised per dimension with training statistics: LLM embeddings have a
        # few huge outlier dimensions that would otherwise dominate the first linear map.
        self.register_buffer(f"{name}_mean", torch.zeros(d_in))
        self.register_buffer(f"{name}_std", torch.ones(d_in))
        if self.arch == "up":
            return self.up.add_modality(name, d_in)
        if self.hidden:
            self.heads[name] = nn.Sequential(nn.Linear(d_in, self.hidden), nn.GELU(), nn.Linear(self.hidden, self.dim))
        else:
            self.heads[name] = nn.Linear(d_in, self.dim)
        return list(self.heads[name].parameters())

    def project(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        x = (x - getattr(self, f"{modality}_mean")) / getattr(self, f"{modality}_std")
        return F.normalize(self.up(x, modality) if self.arch == "up" else self.heads[modality](x), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)


class ProjectionHeads:
    """A trained projection; `apply` / `transform` map frozen embeddings into the common space (numpy in and out)."""

    def __init__(self, image_dim: int, text_dim: int, dim: int = 256, hidden: int = 0, arch: str = "linear",
                 up: dict | None = None, added: dict | None = None):
        if arch not in ARCHS:
            raise EmbedkitError(f"unknown projection arch '{arch}' (choose from {', '.join(ARCHS)})")
        settings = UniversalSettings(**(up or {})) if arch == "up" else None
        self.config = {"arch": arch, "image_dim": image_dim, "text_dim": text_dim, "dim": dim, "hidden": hidden,
                       **({"up": asdict(settings)} if settings else {}), "added": {}}
        self.net = _Net(arch, dim, hidden, settings)
        for m, d in zip(MODALITIES, (image_dim, text_dim)):
            self.net.add_modality(m, d)
        for name, spec in (added or {}).items():  # modalities added later, in the order they were added
            self.add_modality(name, spec["dim"], spec["partner"])

    @property
    def dim(self) -> int:
        return self.config["dim"]

    @property
    def modalities(self) -> list[str]:
        return [*MODALITIES, *self.config["added"]]

    def input_dim(self, modality: str) -> int:
        return self.config[f"{modality}_dim"] if modality in MODALITIES else self.config["added"][modality]["dim"]

    def add_modality(self, name: str, d_in: int, partner: str) -> list[nn.Parameter]:
        """Room for a further modality: its own standardisation and alignment layer; returns the new parameters."""
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name) or "__" in name:
            raise EmbedkitError(f"modality name '{name}': use lower-case letters, digits and single '_' (e.g. meta)")
        if name in self.modalities:
            raise EmbedkitError(f"the projection already has a '{name}' modality ({', '.join(self.modalities)})")
        self.config["added"][name] = {"dim": int(d_in), "partner": partner}
        return self.net.add_modality(name, int(d_in))

    @torch.inference_mode()
    def transform(self, x: np.ndarray, modality: str) -> np.ndarray:
        """Frozen embeddings of one modality [n, d_in] -> float32 [n, dim], L2-normalised rows."""
        if modality not in self.modalities:
            raise EmbedkitError(f"the projection has no '{modality}' modality ({', '.join(self.modalities)})")
        self.net.eval()
        x, width = np.asarray(x, dtype=np.float32), self.input_dim(modality)
        if x.ndim != 2 or x.shape[1] != width:
            raise EmbedkitError(f"projection expects {modality} embeddings of width {width}, got shape {x.shape}")
        return self.net.project(torch.from_numpy(x), modality).numpy()

    def apply(self, image: np.ndarray | None = None, text: np.ndarray | None = None):
        """-> (projected image or None, projected text or None): float32, L2-normalised rows."""
        return tuple(None if x is None else self.transform(x, m) for m, x in zip(MODALITIES, (image, text)))

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
        heads = cls(**json.loads((path / CONFIG).read_text()))  # folders from before "arch" load as linear
        heads.net.load_state_dict(load_file(path / WEIGHTS), strict=True)
        return heads


# ----------------------------------------------------------------------------- fitting


def _held_out(n: int, groups, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded share of whole groups held out (rows when no groups): only evaluated, never fitted on."""
    keys = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    tr, va = split_held_out(keys, val_fraction, seed)
    return tr.numpy(), va.numpy()


def _check_pairs(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b):
        raise EmbedkitError(f"{what} needs row-aligned 2-D arrays, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise EmbedkitError(f"{what} inputs contain NaN or infinite values")
    return a, b


def _train(net: _Net, params: list, left, right, tr: np.ndarray, epochs: int, lr: float, weight_decay: float,
           batch_size: int, seed: int, progress: bool = False) -> list[float]:
    """Symmetric InfoNCE over minibatches of the training rows `tr`; left(rows)/right(rows) give unit vectors.
    progress: a bar over the epochs (all alike, so its time estimate holds)."""
    from embedkit.console import progress_bar

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    bs = min(batch_size, len(tr))
    g = torch.Generator().manual_seed(seed)
    losses = []
    net.train()
    with progress_bar(progress) as bar:
        task = bar.add_task("projection epochs", total=epochs, rate="")
        for _ in range(epochs):
            perm = torch.from_numpy(tr)[torch.randperm(len(tr), generator=g)]
            epoch_loss = []
            for b in perm[: len(tr) // bs * bs].view(-1, bs):
                loss = clip_loss(left(b), right(b), net.scale())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                epoch_loss.append(loss.item())
            losses.append(float(np.mean(epoch_loss)))
            bar.update(task, advance=1, rate=f"loss {losses[-1]:.3f}")
    return losses


def _distinct_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rows whose vectors on both sides occur for the first time: one pair per image when an image has several
    questions, so that retrieval counts distinct candidates instead of ties (retrieval.py)."""
    keep = np.ones(len(a), bool)
    for x in (a, b):
        first = np.zeros(len(x), bool)
        first[np.unique(x, axis=0, return_index=True)[1]] = True
        keep &= first
    return np.nonzero(keep)[0]


def _held_out_retrieval(za: np.ndarray, zb: np.ndarray, xa: np.ndarray, xb: np.ndarray) -> dict:
    out = {"val_retrieval": retrieval_metrics(za, zb)}
    rows = _distinct_pairs(xa, xb)
    if 2 <= len(rows) < len(za):
        out["val_retrieval_distinct"] = retrieval_metrics(za[rows], zb[rows])
    return out


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
    arch: str = "linear",
    up: UniversalSettings | None = None,
    progress: bool = False,
) -> tuple[ProjectionHeads, dict]:
    """Train a projection contrastively (symmetric InfoNCE) on row-aligned embedding pairs.

    The held-out rows (val_fraction, seeded; whole `groups` at a time when given, e.g. an image
    id so that one image's several reports never straddle the split) are only evaluated, never
    used to choose anything.
    """
    t0 = time.perf_counter()
    image, text = _check_pairs(image, text, "projection")
    tr, va = _held_out(len(image), groups, val_fraction, seed)
    if len(tr) < 2:
        raise EmbedkitError("projection needs at least 2 training pairs")

    torch.manual_seed(seed)
    heads = ProjectionHeads(image.shape[1], text.shape[1], dim, hidden, arch=arch,
                            up=asdict(up) if up is not None else None)
    net = heads.net
    x = {"image": torch.from_numpy(image), "text": torch.from_numpy(text)}
    for m in MODALITIES:
        getattr(net, f"{m}_mean").copy_(x[m][tr].mean(0))
        getattr(net, f"{m}_std").copy_(x[m][tr].std(0).clamp(min=1e-6))
    losses = _train(net, list(net.parameters()), lambda b: net.project(x["image"][b], "image"),
                    lambda b: net.project(x["text"][b], "text"), tr, epochs, lr, weight_decay, batch_size, seed,
                    progress)
    metrics = {"n_train": int(len(tr)), "n_val": int(len(va)), "val_rows": va.tolist(), "train_loss": losses,
               "seconds": round(time.perf_counter() - t0, 3), "config": heads.config}
    if len(va) >= 2:
        metrics.update(_held_out_retrieval(*heads.apply(image[va], text[va]), image[va], text[va]))
    return heads, metrics


def fit_added_modality(
    heads: ProjectionHeads,
    name: str,
    x: np.ndarray,
    partner_x: np.ndarray,
    partner: str,
    epochs: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    val_fraction: float = 0.2,
    batch_size: int = 256,
    weight_decay: float = 0.01,
    groups: np.ndarray | None = None,
    progress: bool = False,
) -> tuple[ProjectionHeads, dict]:
    """A copy of `heads` that also knows modality `name`: only its alignment layer is trained.

    x (the new modality's frozen embeddings) and partner_x (the partner modality's) are row-aligned
    pairs; the alignment layer (linear: a new head; up: a new adapter into the token space and a new
    modality token, run through the frozen transformer) is trained with the CLIP loss against the
    frozen projection of the partner. Everything `heads` had stays bit-identical (checked).
    """
    t0 = time.perf_counter()
    if partner not in heads.modalities:
        raise EmbedkitError(f"partner '{partner}' is not a modality of the projection ({', '.join(heads.modalities)})")
    x, partner_x = _check_pairs(x, partner_x, f"adding modality '{name}'")
    if partner_x.shape[1] != heads.input_dim(partner):
        raise EmbedkitError(f"the projection expects {partner} embeddings of width {heads.input_dim(partner)}, "
                            f"got {partner_x.shape[1]}: the partner must come from the encoder the projection was fitted on")
    tr, va = _held_out(len(x), groups, val_fraction, seed)
    if len(tr) < 2:
        raise EmbedkitError(f"adding modality '{name}' needs at least 2 training pairs")

    torch.manual_seed(seed)
    out = copy.deepcopy(heads)
    net = out.net
    for p in net.parameters():
        p.requires_grad_(False)
    params = out.add_modality(name, x.shape[1], partner)
    xt = torch.from_numpy(x)
    getattr(net, f"{name}_mean").copy_(xt[tr].mean(0))
    getattr(net, f"{name}_std").copy_(xt[tr].std(0).clamp(min=1e-6))
    target = torch.from_numpy(out.transform(partner_x, partner))  # frozen: computed once
    losses = _train(net, params, lambda b: net.project(xt[b], name), lambda b: target[b], tr, epochs, lr,
                    weight_decay, batch_size, seed, progress)
    before, after = heads.net.state_dict(), net.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    if changed:  # a guard on the promise: the frozen space must not move
        raise EmbedkitError(f"adding modality '{name}' changed frozen weights ({', '.join(changed[:3])})")
    metrics = {"modality": name, "partner": partner, "n_train": int(len(tr)), "n_val": int(len(va)),
               "val_rows": va.tolist(),
               "train_loss": losses, "trained_parameters": int(sum(p.numel() for p in params)),
               "frozen_parameters": int(sum(p.numel() for p in heads.net.parameters())),
               "seconds": round(time.perf_counter() - t0, 3), "config": out.config}
    if len(va) >= 2:
        metrics.update(_held_out_retrieval(out.transform(x[va], name), target[va].numpy(), x[va], partner_x[va]))
    return out, metrics


# ----------------------------------------------------------------------------- extract folders in and out


def fitted_on(columns: dict, rows: np.ndarray) -> str:
    """Which rows a projection was fitted on, in words, and how to keep future test rows out of it."""
    split = columns.get("split")
    if split is None or all(s is None for s in split):
        return (f"all {int(rows.sum())} rows (the folder has no split column): a classifier trained later on this "
                f"projection has its test rows inside the projection's fit; to keep them out, extract with "
                f"--split-col (or a manifest with a split) and project again, or project a folder of training "
                f"rows only and apply the heads (--heads) to the rest")
    return f"the {int(rows.sum())} training-split rows whose group has no rows in another split"


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


def held_out_groups(columns: dict, image_key: str = "image_sha256") -> np.ndarray:
    """A component id per row for the held-out split: rows sharing an image or a group (or linked through a
    chain of both) stay on one side, as pretrain splits them."""
    n = len(next(iter(columns.values())))
    images = columns.get(image_key)
    keys = [f"row{i}" if v is None else v for i, v in enumerate(images)] if images is not None else range(n)
    image_index = torch.from_numpy(np.unique(np.array([str(k) for k in keys]), return_inverse=True)[1].reshape(-1))
    group = columns.get("group")
    return linked_rows(image_index, None if group is None else list(group))


@dataclass
class AddModality:
    name: str  # the new modality's name in the projection and in the projected folder (e.g. meta)
    emb: Path  # extract folder holding its embeddings, joined on id with the partner's rows
    partner: str | None = None  # image or text; None: the one that joins the most rows
    source: str | None = None  # which table of `emb` (image or text); None: its only one


def project_embeddings(emb_dir, out_dir, heads_dir=None, dim: int = 256, epochs: int = 100, seed: int = 0,
                       models: dict | None = None, arch: str = "linear", up: UniversalSettings | None = None,
                       add: AddModality | None = None, progress: bool = False) -> dict:
    """Put the image and text embeddings of an extract folder into one space, as a new extract folder.

    Without `heads_dir`, a projection (`arch`) is trained on the rows of the training split (all rows
    when the data has no split column; never a training row whose group has rows in another split)
    and saved to OUT/projection with its metrics.json; with it, saved heads are applied as they are
    (new data, same encoders). With `add` (and `heads_dir`), the saved projection stays frozen and
    only an alignment layer for a further modality is trained on the same rules (or applied, when the
    heads already know it); OUT then holds that modality too. The output has the same schema and
    provenance as `extract` writes (dim and a `projection` entry updated), so `train --align-*`,
    `gap` and `retrieval` work on encoders that never shared a space.
    """
    from embedkit.guards import replaced_folder
    from embedkit.limits import MAX_EPOCHS, MAX_PROJECTION_DIM, check_count

    if arch not in ARCHS:
        raise EmbedkitError(f"unknown projection arch '{arch}' (choose from {', '.join(ARCHS)})")
    check_count(dim, "--dim", 1, MAX_PROJECTION_DIM)
    check_count(epochs, "--epochs", 1, MAX_EPOCHS)
    if add is not None and heads_dir is None:
        raise EmbedkitError("project --add-modality needs --heads: the trained projection to keep frozen")
    final = Path(out_dir)
    inside_heads = heads_dir is not None and final.resolve() in Path(heads_dir).resolve().parents
    inputs = [Path(emb_dir)] + ([Path(add.emb)] if add is not None else [])
    if any(final.resolve() == p.resolve() for p in inputs) or inside_heads:
        raise EmbedkitError("project --out must be a new folder: it is replaced whole, and it holds the input "
                            "embeddings or the heads being applied")
    # re-running replaces, never appends; an extract folder (its manifest names no projection) is never replaced
    with replaced_folder(final, "projection --out", "manifest.json", "project", marker_key="projected_from") as staging:
        return _project_into(emb_dir, staging, final, heads_dir, dim, epochs, seed, models, arch, up, add,
                             progress)


def _project_into(emb_dir, out_dir: Path, final: Path, heads_dir, dim: int, epochs: int, seed: int,
                  models: dict | None, arch: str, up: UniversalSettings | None, add: AddModality | None,
                  progress: bool = False) -> dict:
    """project_embeddings, written into `out_dir` (a staging folder that becomes `final`)."""
    from embedkit.store import load_embeddings, write_json_atomic

    es = load_embeddings(emb_dir, modalities=list(MODALITIES), models=models)
    if not len(es.ids):
        raise EmbedkitError(f"no id has both image and text embeddings in '{emb_dir}'")
    metrics, added = {}, None
    if heads_dir is None:
        train_rows = projection_rows(es.columns)
        if train_rows.sum() < 2:  # every training row's group also has rows in another split, or no 'train' rows
            raise EmbedkitError(f"no rows to fit the projection on in '{emb_dir}': it fits on split 'train' only, "
                                f"minus rows whose group also has rows in another split ({int(train_rows.sum())} left)")
        heads, metrics = fit_projection(es.embeddings["image"][train_rows], es.embeddings["text"][train_rows],
                                        dim=dim, epochs=epochs, seed=seed, arch=arch, up=up, progress=progress,
                                        groups=held_out_groups({k: v[train_rows] for k, v in es.columns.items()}))
        metrics["val_ids"] = es.ids[train_rows][metrics.pop("val_rows")].tolist()  # rows -> ids: readable later
        metrics["fitted_on"] = fitted_on(es.columns, train_rows)
    else:
        heads = ProjectionHeads.load(heads_dir)
    if add is not None:
        heads, added, new, source = _add_modality(heads, emb_dir, add, models, epochs, seed, progress)
        metrics = added.get("fit", {})
    if metrics:  # something was trained: it is saved with the output
        heads.save(out_dir / "projection")
        write_json_atomic(out_dir / "projection" / METRICS, metrics)
        saved_heads, heads_dir = out_dir / "projection", final / "projection"  # where they will live
    else:
        saved_heads = Path(heads_dir)
    weights_sha = hashlib.sha256((saved_heads / WEIGHTS).read_bytes()).hexdigest()
    link = {"heads": str(Path(heads_dir).resolve()), "sha256": weights_sha}
    for m in MODALITIES:
        _write_projected(out_dir, es, m, m, heads.transform(es.embeddings[m], m), link)
    if add is not None:
        _write_projected(out_dir, new, source, add.name, heads.transform(new.embeddings[source], add.name), link)
    result = {"rows": int(len(es.ids)), "dim": int(heads.dim), "arch": heads.config["arch"], "heads": str(heads_dir),
              "modalities": heads.modalities, "fit": metrics if add is None else {}}
    if added is not None:
        result["added"] = added
    write_json_atomic(out_dir / "manifest.json", {"projected_from": str(Path(emb_dir).resolve()), **result})
    return result


def _add_modality(heads: ProjectionHeads, emb_dir, add: AddModality, models: dict | None, epochs: int, seed: int,
                  progress: bool = False):
    """Load the new modality's table, join it with the partner's rows, and train (or reuse) its alignment layer.

    -> (heads knowing add.name, summary, the new table as an EmbeddingSet, its modality there)."""
    from embedkit.store import find_datasets, load_embeddings

    found = sorted(find_datasets(add.emb)) if Path(add.emb).is_dir() else []
    source = add.source or (found[0] if len(found) == 1 else None)
    if source is None:
        raise EmbedkitError(f"'{add.emb}' holds {', '.join(found) or 'no'} embeddings: pick the table for "
                            f"'{add.name}' with --add-source" if found else f"no embeddings under '{add.emb}'")
    new = load_embeddings(add.emb, modalities=[source])
    x_all = new.embeddings[source]
    if add.name in heads.modalities:  # the heads already know it: apply, train nothing
        if add.name in MODALITIES:
            raise EmbedkitError(f"--add-modality '{add.name}': image and text are the projection's own modalities")
        heads.transform(x_all[:1], add.name)  # checks the width before anything is written
        return heads, {"modality": add.name, "trained": False, "rows": int(len(new.ids))}, new, source
    if add.partner is not None and add.partner not in MODALITIES:
        raise EmbedkitError(f"--partner must be image or text, got '{add.partner}'")
    partners = {m: load_embeddings(emb_dir, modalities=[m], models=models) for m in MODALITIES}
    joined = {m: np.intersect1d(p.ids.astype(str), new.ids.astype(str), return_indices=True) for m, p in partners.items()}
    partner = add.partner or max(MODALITIES, key=lambda m: len(joined[m][0]))  # ties: image
    common, ip, inew = joined[partner]
    if not len(common):
        raise EmbedkitError(f"no id of '{add.emb}' ({source}) joins a {partner} row of '{emb_dir}': "
                            f"the new modality must describe the same items")
    pset = partners[partner]
    cols = {k: v[ip] for k, v in pset.columns.items()}
    new_cols = {k: v[inew] for k, v in new.columns.items()}
    # Honest on both sides: a row trains only when both tables call it a training row.
    rows = projection_rows(cols) & projection_rows(new_cols)
    if rows.sum() < 2:
        raise EmbedkitError(f"only {int(rows.sum())} joined rows of '{add.name}' and {partner} are training rows")
    # Held-out groups link rows sharing an image (from whichever side is an image table) or a group.
    image_ids = None
    if partner == "image":
        image_ids = cols.get("image_sha256")
    elif source == "image":
        image_ids = new_cols.get("image_sha256")
    group_cols = {"group": cols.get("group", new_cols.get("group")), "image_sha256": image_ids}
    group_cols = {k: v[rows] for k, v in group_cols.items() if v is not None} or {"row": np.arange(int(rows.sum()))}
    out, fit = fit_added_modality(heads, add.name, new.embeddings[source][inew][rows],
                                  pset.embeddings[partner][ip][rows], partner, epochs=epochs, seed=seed,
                                  groups=held_out_groups(group_cols), progress=progress)
    fit["joined_rows"], fit["source"] = int(len(common)), f"{Path(add.emb).resolve()} ({source})"
    fit["val_ids"] = common[rows][fit.pop("val_rows")].tolist()
    return out, {"modality": add.name, "partner": partner, "trained": True, "rows": int(len(new.ids)), "fit": fit}, \
        new, source


def _write_projected(out_dir: Path, es, src: str, modality: str, projected: np.ndarray, link: dict) -> None:
    """One projected table: the rows of `es`'s `src` modality, written as `modality` with provenance updated."""
    from embedkit.store import TEXT_COLUMN, PartWriter, build_schema, dataset_dir

    carried = {k: list(v) for k, v in es.columns.items()
               if k not in ("split", TEXT_COLUMN) and not k.endswith(("_path", "_sha256"))}
    prov = dict(es.provenance[src])
    prov.update(name=f"{prov.get('name')}+proj", dim=int(projected.shape[1]),
                source=f"{prov.get('source')}+proj:{link['sha256'][:16]}", projection=link)
    with_text = src == "text" and TEXT_COLUMN in es.columns  # a text table keeps its texts (leakage checks)
    writer = PartWriter(dataset_dir(out_dir, modality, prov["name"]),
                        build_schema(prov["dim"], carried, prov, text_column=with_text))
    n = len(es.ids)
    cols = {"id": list(es.ids), "path": list(es.columns[f"{src}_path"]), "sha256": list(es.columns[f"{src}_sha256"]),
            "split": list(es.columns.get("split", [None] * n)), "group": list(es.columns.get("group", [None] * n)),
            **carried}
    if with_text:
        cols[TEXT_COLUMN] = list(es.columns[TEXT_COLUMN])
    writer.write(cols, projected)
    writer.close()
