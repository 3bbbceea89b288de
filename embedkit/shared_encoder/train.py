"""pretrain(): train a SharedEncoder from scratch with the CLIP loss on image/text pairs, on a CPU.

Read top to bottom: data (decode every image once into a uint8 array, tokenise every text once),
a held-out split that keeps rows sharing an image or a group (a patient) on one side, batches with
one pair per image, the training loop (symmetric InfoNCE, AdamW, warmup + cosine; a recipe's stages
add MoMo's masked objectives and images/texts without a partner, see stages.py and unpaired.py),
checkpoints written after every epoch so an interrupted run resumes where it stopped, and a
collapse check.

The exported model folder OUT (no pickle anywhere), what `shared:OUT` loads:
  model.safetensors, config.json, tokenizer files  - the self-contained model
  pretrain_config.json                             - the resolved recipe (preset, overrides, every field)
  metrics.json                                     - losses, held-out retrieval, collapse check, timings
The resumable checkpoint lives beside it in OUT.checkpoint/ (never inside the model: AdamW's two
moments are twice the weights): state.safetensors (weights "model.*", AdamW moments "adam.*", MoMo's
training-only heads "heads.*") and train_state.json (epoch, step, seed, settings, history). It is
removed once the run completes, unless train.keep_checkpoint is set (needed to extend a finished
run with more epochs)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from embedkit.encoders.preprocess import ImageDecodeError, decode_image
from embedkit.errors import EmbedkitError
from embedkit.guards import atomic_folder, check_writable_folder, folder_lock, recover_folder, sibling_lock
from embedkit.items import Item, SkippedInput
from embedkit.plan import read_item_text
from embedkit.shared_encoder import stages
from embedkit.shared_encoder.budget import resolve_budget
from embedkit.shared_encoder.collapse import collapse_check, first_per_image, warning_line
from embedkit.shared_encoder.config import SharedEncoderConfig
from embedkit.shared_encoder.heldout import linked_rows, split_held_out
from embedkit.shared_encoder.model import SharedEncoder
from embedkit.shared_encoder.pretrain_config import PretrainConfig, PretrainSettings, StageConfig
from embedkit.shared_encoder.retrieval import retrieval_metrics
from embedkit.shared_encoder.runner import WEIGHTS, image_preprocess, load_tokenizer, save_shared_encoder, tokenize
from embedkit.shared_encoder.unpaired import Unpaired, prepare_unpaired

STATE, STATE_JSON, METRICS = "state.safetensors", "train_state.json", "metrics.json"
RECIPE = "pretrain_config.json"  # the resolved PretrainConfig: preset, overrides, every field
OLD_STATE = "train_state.safetensors"  # optimizer state inside the model folder, before #14: dropped on export


def checkpoint_folder(out: str | Path) -> Path:
    """Where the resumable checkpoint of model folder `out` lives: `OUT.checkpoint` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


# ----------------------------------------------------------------------------- data

def select_pairs(items: list[Item], only_split: str | None = None) -> tuple[list[Item], str]:
    """The image + text pairs to pretrain on, and a one-line note saying which and why.

    When the rows carry a split, only `train` rows are used (`only_split` picks another): a model
    pretrained on test rows would later embed those rows having seen them.
    """
    from collections import Counter

    pairs = [it for it in items if it.image_path is not None and it.has_text]
    splits = Counter(it.split for it in pairs)
    if only_split is not None:
        chosen = [it for it in pairs if it.split == only_split]
        return chosen, f"pretrain: training on the {len(chosen)} pairs of split '{only_split}'"
    if any(s is not None for s in splits):
        held_back = ", ".join(f"{n} without a split" if s is None else f"{n} in '{s}'"
                              for s, n in sorted(splits.items(), key=lambda kv: str(kv[0])) if s != "train")
        chosen = [it for it in pairs if it.split == "train"]
        return chosen, (f"pretrain: training on the {len(chosen)} pairs of split 'train' (held back: "
                        f"{held_back or 'none'}); --only-split picks another split")
    return pairs, (f"pretrain: the pairs carry no split, so all {len(pairs)} are used: rows you later test on may "
                   f"have been seen here (--split-col)")


def prepare_pairs(pairs: list[Item], cfg: SharedEncoderConfig, tokenizer) -> dict:
    """Decode each distinct image once, tokenise each text once; unusable pairs are recorded."""
    pre = image_preprocess(cfg)
    images, image_of_path, kept, texts, image_index, groups, skipped = [], {}, [], [], [], [], []
    for item in pairs:
        path = str(item.image_path) if item.image_path is not None else None
        if path is None or not item.has_text:
            skipped.append(SkippedInput(item.id, path, "pair", "needs both an image and a text"))
            continue
        text, reason = read_item_text(item)  # report files of every kind (documents.py), as extract reads them
        if reason:
            skipped.append(SkippedInput(item.id, str(item.text_path or path), "read", reason))
            continue
        key = (path, item.dicom)  # a DICOM file's frames are images of their own
        if key not in image_of_path:
            try:
                images.append(decode_image(path, pre, dicom=item.dicom))
                image_of_path[key] = len(images) - 1
            except ImageDecodeError as e:
                image_of_path[key] = str(e)  # the reason, reused for every pair of this image
        if isinstance(image_of_path[key], str):
            skipped.append(SkippedInput(item.id, path, "decode", image_of_path[key]))
            continue
        kept.append(item.id)
        texts.append(text)
        image_index.append(image_of_path[key])
        groups.append(None if item.group is None else str(item.group))
    if len(kept) < 2:
        raise EmbedkitError(f"shared encoder training needs at least 2 usable image/text pairs, got {len(kept)}")
    # Pad to max_text_len once; each batch is trimmed to its own longest text later.
    ids, mask, n_truncated = tokenize(tokenizer, texts, cfg.max_text_len, padding="max_length")
    return {
        "ids": kept,
        "images": np.stack(images),  # uint8 [n_images, S, S, 3]: 37 KB per image at 112 px
        "image_index": torch.tensor(image_index),
        "groups": groups,  # item.group per kept pair, None where it has none
        "texts": texts,  # the raw texts, so unpaired items repeating a held-out one can be left out
        "input_ids": ids,
        "attention_mask": mask,
        "skipped": skipped,
        "n_truncated": n_truncated,
    }


def held_out_summary(data: dict, component: np.ndarray, train_rows, val_rows, grouped: bool) -> dict:
    """What metrics.json records about the split: sizes, and the held-out ids to leave out later."""
    return {
        "by": "image and group" if grouped and any(g is not None for g in data["groups"]) else "image",
        "n_train_rows": len(train_rows),
        "n_val_rows": len(val_rows),
        "n_train_groups": len(np.unique(component[train_rows.numpy()])),
        "n_val_groups": len(np.unique(component[val_rows.numpy()])),
        "val_ids": [data["ids"][i] for i in val_rows.tolist()],
    }


def pixel_batch(data: dict, rows: torch.Tensor, cfg: SharedEncoderConfig) -> torch.Tensor:
    return stages.pixels(data["images"], data["image_index"][rows], cfg)


def text_batch(data: dict, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return stages.tokens(data["input_ids"], data["attention_mask"], rows)


def random_resized_crop(x: torch.Tensor, g: torch.Generator, min_scale: float = 0.6) -> torch.Tensor:
    """Light augmentation: a random square covering min_scale..1 of the area, resized back."""
    S = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(len(x)):
        side = max(1, round(S * math.sqrt(min_scale + (1 - min_scale) * torch.rand(1, generator=g).item())))
        top, left = (torch.randint(0, S - side + 1, (2,), generator=g)).tolist()
        crop = x[i : i + 1, :, top : top + side, left : left + side]
        out[i] = F.interpolate(crop, size=(S, S), mode="bilinear", align_corners=False)[0]
    return out


def batch_order(rows: torch.Tensor, keys: list[np.ndarray], bs: int, n_batches: int,
                g: torch.Generator) -> torch.Tensor:
    """n_batches batches of bs rows in a random order (g); with keys, no two rows of a batch share a key.

    Keys are e.g. the image index and the text: VQA-RAD asks ~6 questions about each image, and a
    batch holding two of them makes each pair's own image a negative of the other (identical pixels
    cannot be told apart, so the loss pushes the two questions together and the images towards the
    mean). Rows go round-robin to the first batch without their keys; a batch left short (a key on
    more rows than there are batches) is filled from the rows left over, as a plain shuffle would.
    """
    order = rows[torch.randperm(len(rows), generator=g)].tolist()
    if not keys:
        return torch.tensor(order[: n_batches * bs]).view(n_batches, bs)
    batches: list[list[int]] = [[] for _ in range(n_batches)]
    taken: list[set] = [set() for _ in range(n_batches)]
    left, nxt = [], 0
    for r in order:
        row_keys = {(j, k[r]) for j, k in enumerate(keys)}
        for t in range(n_batches):
            b = (nxt + t) % n_batches
            if len(batches[b]) < bs and not row_keys & taken[b]:
                batches[b].append(r)
                taken[b] |= row_keys
                nxt = b + 1
                break
        else:
            left.append(r)
    for b in batches:
        while len(b) < bs:
            b.append(left.pop())
    return torch.tensor(batches)


def batch_keys(data: dict, rows: torch.Tensor, unique: bool) -> list[np.ndarray]:
    """Per row, what a batch may hold only once: its image and its exact text (when unique)."""
    if not unique:
        return []
    text_code = np.unique(data["input_ids"].numpy(), axis=0, return_inverse=True)[1].reshape(-1)
    return [data["image_index"].numpy(), text_code]


@torch.inference_mode()
def embed_rows(model: SharedEncoder, data: dict, rows: torch.Tensor, cfg, batch_size: int = 128):
    model.eval()
    img, txt = [], []
    for b in rows.split(batch_size):
        img.append(model.encode_image(pixel_batch(data, b, cfg)))
        txt.append(model.encode_text(*text_batch(data, b)))
    return torch.cat(img), torch.cat(txt)


def check_collapse(model: SharedEncoder, data: dict, rows: torch.Tensor, cfg, where: str) -> dict:
    """collapse.py's check on one pair per image of `rows` (distinct candidates, embedded once)."""
    rows = rows[torch.from_numpy(first_per_image(data["image_index"][rows].numpy()))]
    img, txt = embed_rows(model, data, rows, cfg)
    return collapse_check(img.numpy(), txt.numpy(), data["image_index"][rows].numpy(), where=where)


def init_token_embedding(model: SharedEncoder, cfg: SharedEncoderConfig) -> None:
    """Start the token table from the offline MiniLM's word embeddings (its tokenizer is ours).

    A few hundred pairs cannot teach 30,522 word vectors; MiniLM's already place related words
    together. Its 384-d rows are reduced to the token width by PCA of the table (the top components;
    no data rows involved), rescaled to the random init's std 0.02; widths above 384 keep random extra columns.
    """
    if cfg.tokenizer != "minilm":
        raise EmbedkitError("init_text=minilm needs the minilm tokenizer (the word vectors are indexed by its vocabulary)")
    from embedkit.encoders.loading import source_path
    from embedkit.encoders.registry import REGISTRY

    table = load_file(str(Path(source_path(REGISTRY["minilm"])) / WEIGHTS))["embeddings.word_embeddings.weight"]
    table = table.double() - table.double().mean(0)
    _, _, v = torch.linalg.svd(table, full_matrices=False)
    k = min(cfg.token_width, v.shape[0])
    reduced = table @ v[:k].T
    with torch.no_grad():
        rows = min(len(reduced), model.tok_embed.weight.shape[0])
        model.tok_embed.weight[:rows, :k] = (reduced[:rows] * (0.02 / reduced.std())).float()


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(ckpt: Path, model, opt, state: dict, heads=None, recipe: PretrainConfig | None = None) -> None:
    """Weights, AdamW moments, MoMo's training-only heads, train_state.json and the recipe as one unit: the
    folder is staged beside `ckpt` and renamed into place, so a crash leaves the previous checkpoint or this one."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"adam.{pid}.{k}": v.contiguous() for pid, s in opt.state_dict()["state"].items() for k, v in s.items()}
    if heads is not None:
        tensors |= {stages.HEADS_PREFIX + k: v.detach().contiguous() for k, v in heads.state_dict().items()}
    with atomic_folder(ckpt) as staging:
        save_file(tensors, str(staging / STATE))
        (staging / STATE_JSON).write_text(json.dumps(state, indent=2) + "\n")
        if recipe is not None:
            recipe.save(staging / RECIPE)


def load_checkpoint(ckpt: Path, model, opt, heads=None) -> None:
    tensors = load_file(ckpt / STATE)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    if heads is not None:
        n = len(stages.HEADS_PREFIX)
        heads.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(stages.HEADS_PREFIX)}, strict=True)
    sd = opt.state_dict()
    sd["state"] = {}
    for key, t in tensors.items():
        if key.startswith("adam."):
            pid, name = key[5:].split(".", 1)
            sd["state"].setdefault(int(pid), {})[name] = t
    opt.load_state_dict(sd)


def export_model(out: Path, model, metrics: dict, recipe: PretrainConfig) -> None:
    """The model folder alone (weights, config, recipe, metrics, tokenizer), swapped in whole."""
    with atomic_folder(out) as staging:
        for p in out.iterdir():  # the tokenizer and anything else of the folder's own, as they are
            if p.is_dir():
                shutil.copytree(p, staging / p.name, symlinks=True)
            elif p.name not in (WEIGHTS, METRICS, RECIPE, OLD_STATE, STATE_JSON):
                shutil.copy2(p, staging / p.name, follow_symlinks=False)
        save_shared_encoder(model, None, staging)
        (staging / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
        recipe.save(staging / RECIPE)


def _fingerprint(ids: list[str], groups: list[str | None] | None = None) -> str:
    # Groups change the held-out split, so they are part of the data; runs without groups keep
    # the fingerprint of their ids alone (checkpoints written before groups existed still resume).
    lines = ids if not groups or all(g is None for g in groups) else [f"{i}\t{g}" for i, g in zip(ids, groups)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- training

def pretrain(pairs: list[Item], out_dir: str | Path, recipe: PretrainConfig, *, resume: bool = True,
             progress: bool = True, grouped: bool = True, unpaired: Unpaired | list[Item] | None = None) -> dict:
    """Train on image/text pairs as `recipe` says, export the model to out_dir, return the metrics dict.

    Checkpoints (checkpoint_folder(out_dir), beside it) and the model folder are written every
    `recipe.train.save_every` epochs and after the last one. resume=True continues from the last
    checkpointed epoch when the recipe (epochs aside) and the data match (raising otherwise); more
    epochs extend the cosine schedule from there. A completed run removes its checkpoint unless
    train.keep_checkpoint; run again, it reports what is on disk, and more epochs are refused.
    The held-out split takes val_fraction of the groups of linked rows: rows sharing an image, or
    (grouped=True) an item.group such as a patient, all land on one side. Its held-out retrieval counts
    ties against the query, so data with several texts per image scores lower than its
    distinct-candidate retrieval would.
    One run at a time per folder (a lock beside it); a checkpoint left half-swapped by a crash is restored.
    After the last epoch a collapse check (collapse.py) goes into metrics["collapse"], with a warning on stderr.
    `unpaired` (MoMo's stages): images without a text and texts without an image, training items only (see
    unpaired.select_unpaired); none of them may share an image, text or group with a held-out or held-back row.
    """
    if not isinstance(recipe, PretrainConfig):
        raise EmbedkitError("pretrain takes a PretrainConfig (see resolve_pretrain_config)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EmbedkitError(f"pretrain --out '{out}' is a file, not a folder")
    check_writable_folder(out.parent, "the folder holding the pretrain --out")
    with folder_lock(sibling_lock(out), f"pretrain folder '{out}'"):
        recover_folder(out)
        if isinstance(unpaired, list):
            unpaired = Unpaired(unpaired)
        return _pretrain(pairs, out, recipe.validate(), resume=resume, progress=progress, grouped=grouped,
                         unpaired=unpaired or Unpaired())


def epoch_plan(recipe: PretrainConfig) -> list[StageConfig]:
    """The stage each epoch belongs to; without stages, train.epochs epochs of the contrastive loss."""
    stages = recipe.stages or [StageConfig(name="pairs", epochs=recipe.train.epochs, objectives=("clip",))]
    return [stage for stage in stages for _ in range(stage.epochs)]


def resume_key(recipe: PretrainConfig, data_fingerprint: str) -> dict:
    """What must match for a checkpoint to resume: everything but the run's length and checkpoint cadence."""
    d = recipe.to_dict()
    train = {k: v for k, v in d["train"].items() if k not in ("epochs", "save_every", "keep_checkpoint")}
    stages = [dict(s) for s in d["stages"]]
    if stages:  # the last stage may be lengthened like train.epochs
        stages[-1].pop("epochs")
    return {"config": d["model"], "data": data_fingerprint, **train, "stages": stages}


def make_optimizer(model: SharedEncoder, train: PretrainSettings, heads=None) -> torch.optim.Optimizer:
    # Decay matrices only; biases, LayerNorms, CLS/positions/modality vectors and the temperature are not decayed.
    named = [*model.named_parameters(), *(heads.named_parameters() if heads is not None else [])]
    decay = [p for n, p in named if p.ndim >= 2 and n.endswith("weight")]
    other = [p for n, p in named if not (p.ndim >= 2 and n.endswith("weight"))]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": other, "weight_decay": 0.0}]
    try:  # the fused CPU kernel (torch >= 2.4) steps the 30522-row token table ~20x faster
        return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas))


def lr_schedule(train: PretrainSettings, total_steps: int):
    """Linear warmup, then cosine to zero over the whole run."""
    warmup = max(1, round(train.warmup_fraction * total_steps))

    def lr_at(s: int) -> float:
        if s < warmup:
            return train.lr * (s + 1) / warmup
        return train.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total_steps - warmup))))

    return lr_at


def _pretrain(pairs: list[Item], out: Path, recipe: PretrainConfig, resume: bool, progress: bool,
              grouped: bool, unpaired: Unpaired) -> dict:
    t0 = time.perf_counter()
    train = recipe.train
    out.mkdir(parents=True, exist_ok=True)
    cfg = recipe.model
    tokenizer = load_tokenizer(cfg.tokenizer)
    if 0 < cfg.vocab_size < len(tokenizer):
        raise EmbedkitError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    # Now that the vocabulary is known: vocab_size filled in, a budget-matched baseline sized (budget.py).
    cfg = resolve_budget(cfg, len(tokenizer))
    recipe = replace(recipe, model=cfg)
    tokenizer.save_pretrained(str(out))  # the model folder carries its own tokenizer

    data = prepare_pairs(pairs, cfg, tokenizer)
    if data["skipped"]:
        print(f"shared encoder: skipped {len(data['skipped'])} pairs (reasons in {out / METRICS})", file=sys.stderr)
    if data["n_truncated"]:  # a cut report loses what its end says: say so, with the knob
        print(f"shared encoder: {data['n_truncated']} of {len(data['ids'])} texts are longer than max_text_len="
              f"{cfg.max_text_len} word pieces and were cut (--set max_text_len=N)", file=sys.stderr)
    component = linked_rows(data["image_index"], data["groups"] if grouped else None)
    train_rows, val_rows = split_held_out(component, train.val_fraction, train.seed)
    held_out = held_out_summary(data, component, train_rows, val_rows, grouped)
    if train.val_fraction > 0 and len(val_rows) == 0:
        print(f"shared encoder: {held_out['n_train_groups']} group(s) of linked rows (sharing an image or a group) "
              f"are too few to hold {train.val_fraction:.0%} out: no held-out retrieval", file=sys.stderr)
    n_train = len(train_rows)
    if n_train < 2:
        raise EmbedkitError("fewer than 2 training pairs left after the held-out split: lower val_fraction")
    bs = min(train.batch_size, n_train)
    plan = epoch_plan(recipe)
    stages.check_stages(plan)
    banks, extra = _banks(data, train_rows, val_rows, recipe, unpaired, tokenizer, grouped)
    # Per stage: what it draws from, how many steps an epoch takes, how many items of each kind it uses.
    pools = {s.data: stages.stage_pools(s, banks, train_rows) for s in plan}
    steps = [stages.steps_per_epoch(pools[s.data], bs) for s in plan]
    used = [stages.stage_counts(s, pools[s.data], banks) for s in recipe.stages or plan[:1]]
    lr_at = lr_schedule(train, sum(steps))
    prepare_s = time.perf_counter() - t0

    torch.manual_seed(train.seed)
    model = SharedEncoder(cfg)
    if train.init_text == "minilm":  # deterministic (no random numbers drawn): the rest of the init is unchanged
        init_token_embedding(model, cfg)
    heads = stages.build_heads(cfg, recipe)  # after the model: the encoder's init does not depend on them
    opt = make_optimizer(model, train, heads)
    settings = resume_key(recipe, _fingerprint(data["ids"], data["groups"] if grouped else None))
    if extra is not None:  # other unpaired data is another run; runs without any keep their key
        settings["unpaired"] = extra["fingerprint"]
    ckpt = checkpoint_folder(out)
    recover_folder(ckpt)
    start_epoch, step, history = 0, 0, []
    if resume and (ckpt / STATE_JSON).is_file():
        saved = json.loads((ckpt / STATE_JSON).read_text())
        _same_run(saved["settings"], settings, ckpt)
        load_checkpoint(ckpt, model, opt, heads)
        start_epoch, step, history = saved["epoch"], saved["step"], saved["history"]
    elif resume and (out / METRICS).is_file() and "resume_key" in (done := json.loads((out / METRICS).read_text())):
        _same_run(done["resume_key"], settings, out)
        if len(done["epochs"]) >= len(plan):  # nothing left to train: report what is on disk
            return done
        raise EmbedkitError(f"{out} holds a completed run of {len(done['epochs'])} epochs whose checkpoint was "
                            f"removed: to add epochs, rerun it with keep_checkpoint=true, or use another folder")
    keys = batch_keys(data, train_rows, train.unique_in_batch)
    if recipe.stages:
        for c in used:
            print(f"stage {c['stage']}: {c['epochs']} epoch(s) of {'+'.join(c['objectives'])} on {c['pairs']} pairs, "
                  f"{c['images']} images ({c['unpaired_images']} unpaired), {c['texts']} texts "
                  f"({c['unpaired_texts']} unpaired)", file=sys.stderr)

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), console=Console(stderr=True), disable=not progress,
    )
    metrics = None
    with bar:
        task = bar.add_task("shared encoder", total=sum(steps[start_epoch:]), loss=float("nan"))
        for epoch in range(start_epoch, len(plan)):
            stage = plan[epoch]
            te = time.perf_counter()
            bar.update(task, description=f"{stage.name} epoch {epoch + 1}/{len(plan)}")
            # The batch order and the masks depend only on (seed, epoch), so a resumed run sees the same batches.
            g = torch.Generator().manual_seed(train.seed * 1_000_003 + epoch)
            model.train()
            losses = []
            for batch in epoch_batches(stage, pools[stage.data], keys, bs, g):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
                loss = stages.stage_loss(model, heads, stage, batch, data, banks, train, g, random_resized_crop)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():  # CLIP's cap: a temperature below 1/100 saturates the softmax
                    model.logit_scale.clamp_(max=math.log(cfg.logit_scale_max))
                step += 1
                losses.append(loss.item())
                bar.update(task, advance=1, loss=losses[-1])
            record = {
                "epoch": epoch + 1,
                "stage": stage.name,
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "seconds": round(time.perf_counter() - te, 3),  # training only, evaluation excluded
                "steps": len(losses),
                "logit_scale": model.logit_scale.exp().item(),
            }
            if len(val_rows) >= 2:
                record["val"] = retrieval_metrics(*embed_rows(model, data, val_rows, cfg))
            history.append(record)
            last = epoch + 1 == len(plan)
            if (epoch + 1) % train.save_every and not last:
                continue
            state = {
                "epoch": epoch + 1,
                "step": step,
                "rng": {"init_seed": train.seed, "batch_order_seed": "seed * 1000003 + epoch (per epoch)"},
                "settings": settings,
                "history": history,
            }
            metrics = _metrics(data, recipe, model, history, held_out, prepare_s, bs) | {"resume_key": settings}
            metrics["stages"] = used
            if extra is not None:
                metrics["unpaired"] = {**extra["counts"], "skipped": [asdict(x) for x in extra["skipped"]],
                                       "n_text_truncated": extra["n_truncated"]}
            if last:
                held = len(val_rows) >= 2
                metrics["collapse"] = check_collapse(model, data, val_rows if held else train_rows, cfg,
                                                     "held-out" if held else "training")
            save_checkpoint(ckpt, model, opt, state, heads, recipe)  # the checkpoint first: a crash between the two resumes
            export_model(out, model, metrics, recipe)
    if metrics is None:  # a checkpoint of every planned epoch, killed before cleanup: report what is on disk
        metrics = json.loads((out / METRICS).read_text())
    elif warning_line(metrics.get("collapse", {})):
        print(warning_line(metrics["collapse"]), file=sys.stderr)
    if not train.keep_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def _same_run(saved: dict, settings: dict, where: Path) -> None:
    if saved != settings:
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise EmbedkitError(f"{where} holds a run with different {', '.join(changed)}: use another folder or resume=False")


def epoch_batches(stage: StageConfig, pools: dict, keys: list[np.ndarray], bs: int, g: torch.Generator):
    """One epoch's batches of a stage: pair stages with one pair per image and text (batch_order), others
    as stages.py draws them."""
    if stage.data != "pairs" or not keys:
        yield from stages.stage_batches(pools, bs, g)
        return
    rows = pools["pairs"]
    b = min(bs, len(rows))
    for batch in batch_order(rows, keys, b, stages.steps_per_epoch(pools, bs), g):
        yield {"pairs": batch}


def _banks(data: dict, train_rows, val_rows, recipe: PretrainConfig, unpaired: Unpaired, tokenizer, grouped: bool):
    """Every image and text the stages may draw from: the pairs' own, then the usable unpaired items
    appended (-> banks, and the unpaired intake or None). Only stages with images/unpaired data use them."""
    cfg = recipe.model
    wants = any(s.data != "pairs" for s in recipe.stages)
    extra = prepare_unpaired(unpaired, data, val_rows, cfg, tokenizer, grouped) if wants and unpaired.items else None
    if unpaired.items and not wants:
        print(f"pretrain: {len(unpaired.items)} unpaired items given, but no stage of this recipe uses them "
              f"(--preset momo does)", file=sys.stderr)
    n_img, n_txt = len(data["images"]), len(data["ids"])
    banks = {"images": data["images"], "input_ids": data["input_ids"], "attention_mask": data["attention_mask"],
             "pair_images": torch.unique(data["image_index"][train_rows]),
             "unpaired_images": torch.empty(0, dtype=torch.long), "unpaired_texts": torch.empty(0, dtype=torch.long),
             "tok": {"mask_id": tokenizer.mask_token_id, "n_vocab": len(tokenizer),
                     "special_ids": torch.tensor(tokenizer.all_special_ids)}}
    if extra is not None:
        banks |= {"images": np.concatenate([data["images"], extra["images"]]),
                  "input_ids": torch.cat([data["input_ids"], extra["input_ids"]]),
                  "attention_mask": torch.cat([data["attention_mask"], extra["attention_mask"]]),
                  "unpaired_images": n_img + torch.arange(len(extra["images"])),
                  "unpaired_texts": n_txt + torch.arange(len(extra["input_ids"]))}
    return banks, extra


def _metrics(data, recipe: PretrainConfig, model, history, held_out, prepare_s, bs) -> dict:
    train_s = sum(h["seconds"] for h in history)
    pair_epochs = [h for h, s in zip(history, epoch_plan(recipe)) if s.data == "pairs"]
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "n_pairs_used": len(data["ids"]),
        "n_images": int(len(data["images"])),
        "n_train": held_out["n_train_rows"],
        "n_val": held_out["n_val_rows"],
        "held_out": held_out,
        "skipped": [asdict(s) for s in data["skipped"]],
        "n_text_truncated": data["n_truncated"],
        "parameters": {"total": n_params, "non_embedding": n_params - model.tok_embed.weight.numel()},
        "epochs": history,
        "train_loss": [h["train_loss"] for h in history],
        "val_retrieval": history[-1].get("val") if history else None,
        "timings": {
            "prepare_s": round(prepare_s, 3),
            "train_s": round(train_s, 3),
            "pairs_per_s": (round(sum(h.get("steps", 0) for h in pair_epochs) * bs / sum(h["seconds"] for h in pair_epochs), 1)
                            if pair_epochs and sum(h["seconds"] for h in pair_epochs) else None),
        },
        "config": recipe.model.to_dict(),
        "recipe": recipe.to_dict(),
    }
