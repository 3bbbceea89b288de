"""What `embedkit pretrain` runs, as data: a model config, training settings and (MoMo) stages.

open_clip keeps architectures as JSON files; embedkit does the same for whole recipes. A preset
is a JSON file in shared_encoder/presets/ (`--preset NAME`), a user file (`--config FILE`) has the
same shape, and `--set key=value` overrides any field afterwards:

    {"description": "...", "model": {SharedEncoderConfig fields}, "train": {PretrainSettings fields},
     "stages": [{StageConfig fields}, ...]}

Keys in --set are `model.width`, `train.lr`, or a bare field name when it names one field only
(`width`, `lr`). The resolved config (preset name, overrides, every field) is saved beside the
checkpoint and the model, and travels into the provenance of every table embedded with it.
"""

from __future__ import annotations

import difflib
import json
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.shared_encoder.config import SharedEncoderConfig

PRESET_DIR = "presets"
DEFAULT_PRESET = "shared-encoder"
OBJECTIVES = ("clip", "mim", "mlm")  # contrastive pairs, masked image patches, masked text tokens


@dataclass
class PretrainSettings:
    epochs: int = 20  # passes over the training pairs (the contrastive stage, when there are stages)
    batch_size: int = 64  # pairs per contrastive batch: more in-batch negatives, more memory
    lr: float = 1e-3  # AdamW peak learning rate (Roy et al.: 5e-4, which stayed near chance in 5-20 epochs here)
    weight_decay: float = 0.2  # on matrices only (Roy et al.)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (CLIP)
    warmup_fraction: float = 0.1  # linear warmup share of all steps; short runs collapse without it
    augment: bool = False  # random resized crops of the training images
    seed: int = 0  # weights init, batch order, held-out split
    val_fraction: float = 0.1  # share of linked-row groups held out for retrieval (never trained on)
    save_every: int = 1  # checkpoint every N epochs (and after the last)
    # One pair per image and per exact text in a batch: duplicates are false negatives (~6 questions per image
    # on VQA-RAD) that pull a batch's embeddings together
    unique_in_batch: bool = True
    init_text: str = "random"  # "minilm": token table from the offline MiniLM's word vectors (PCA to the width)
    keep_checkpoint: bool = False  # keep OUT.checkpoint (optimizer state) after a completed run, to extend it later
    mim_mask_ratio: float = 0.5  # masked image modelling: share of patches masked (SimMIM: 0.6 at 32 px patches)
    mlm_probability: float = 0.15  # masked language modelling: share of word pieces predicted (BERT)


@dataclass
class StageConfig:
    """One MoMo stage: which objectives on which data, for how many epochs."""

    name: str = "pairs"
    epochs: int = 1
    objectives: tuple[str, ...] = ("clip",)  # any of OBJECTIVES
    # "pairs": the training pairs; "images": every training image, paired or not; "unpaired": images
    # and texts without a partner as well as the pairs' own, one batch of each per step
    data: str = "pairs"


@dataclass
class PretrainConfig:
    model: SharedEncoderConfig = field(default_factory=SharedEncoderConfig)
    train: PretrainSettings = field(default_factory=PretrainSettings)
    stages: list[StageConfig] = field(default_factory=list)  # empty: one contrastive stage of train.epochs
    preset: str | None = None  # the preset it started from, if any
    description: str = ""
    overrides: list[str] = field(default_factory=list)  # the --set strings, in order, for provenance

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"]["betas"] = list(self.train.betas)
        for s in d["stages"]:
            s["objectives"] = list(s["objectives"])
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "PretrainConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise EmbedkitError(f"{where}: unknown section(s) {', '.join(unknown)} (known: model, train, stages)")
        model = _dataclass_from(SharedEncoderConfig, d.get("model", {}), f"{where} model")
        train = _dataclass_from(PretrainSettings, d.get("train", {}), f"{where} train")
        stages = [_dataclass_from(StageConfig, s, f"{where} stage {i + 1}") for i, s in enumerate(d.get("stages", []))]
        return cls(model=model, train=train, stages=stages, preset=d.get("preset"),
                   description=d.get("description", ""), overrides=list(d.get("overrides", [])))

    def validate(self) -> "PretrainConfig":
        self.model.validate()
        t, problems = self.train, []
        if t.init_text not in ("random", "minilm"):
            problems.append("train.init_text must be random or minilm")
        if t.epochs < 0 or t.batch_size < 2 or t.lr <= 0 or not 0 <= t.val_fraction < 1 or t.save_every < 1:
            problems.append("train needs epochs >= 0, batch_size >= 2, lr > 0, 0 <= val_fraction < 1, save_every >= 1")
        if not 0 < t.mim_mask_ratio < 1 or not 0 < t.mlm_probability < 1:
            problems.append("train needs 0 < mim_mask_ratio < 1 and 0 < mlm_probability < 1")
        for i, s in enumerate(self.stages):
            bad = sorted(set(s.objectives) - set(OBJECTIVES))
            if bad or not s.objectives:
                problems.append(f"stage {i + 1} objectives must be among {', '.join(OBJECTIVES)}")
            if s.data not in ("pairs", "images", "unpaired"):
                problems.append(f"stage {i + 1} data must be pairs, images or unpaired")
            if s.data == "images" and set(s.objectives) != {"mim"}:
                problems.append(f"stage {i + 1} has images only: its one objective can be mim")
            if s.epochs < 0:
                problems.append(f"stage {i + 1} epochs must be >= 0")
        if problems:
            raise EmbedkitError("pretrain config: " + "; ".join(problems))
        return self

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PretrainConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EmbedkitError(f"cannot read pretrain config {path}: {type(e).__name__}") from None
        if not isinstance(d, dict):
            raise EmbedkitError(f"pretrain config {path} must hold a JSON object")
        return cls.from_dict(d, where=str(path))


def preset_names() -> list[str]:
    folder = resources.files("embedkit.shared_encoder").joinpath(PRESET_DIR)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> PretrainConfig:
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise EmbedkitError(f"unknown preset '{name}': {hint}choose one of {', '.join(names)} (or --config FILE)")
    text = resources.files("embedkit.shared_encoder").joinpath(PRESET_DIR, f"{name}.json").read_text()
    cfg = PretrainConfig.from_dict(json.loads(text), where=f"preset {name}")
    return replace(cfg, preset=name)


def resolve_pretrain_config(preset: str | None = None, config_file: str | Path | None = None,
                            sets: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """A preset (default shared-encoder) or a config file, then each `key=value` override, validated."""
    if preset and config_file:
        raise EmbedkitError("--preset and --config contradict each other: pass one")
    cfg = PretrainConfig.load(config_file) if config_file else load_preset(preset or DEFAULT_PRESET)
    for s in sets:
        cfg = apply_set(cfg, s)
    return cfg.validate()


def apply_set(cfg: PretrainConfig, assignment: str) -> PretrainConfig:
    """One `key=value` override: `model.width=128`, `lr=1e-3`, `stages.2.epochs=3`."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise EmbedkitError(f"--set takes key=value, got '{assignment}'")
    section, name, target = _locate(cfg, key)
    value = _parse_value(raw.strip(), typing.get_type_hints(type(target))[name], key)
    new_target = replace(target, **{name: value})
    out = replace(cfg, overrides=[*cfg.overrides, f"{key}={raw.strip()}"])
    if section == "model":
        return replace(out, model=new_target)
    if section == "train":
        return replace(out, train=new_target)
    stages = list(out.stages)
    stages[int(section.split(".")[1])] = new_target
    return replace(out, stages=stages)


def _locate(cfg: PretrainConfig, key: str):
    parts = key.split(".")
    sections = {"model": cfg.model, "train": cfg.train}
    if len(parts) == 2 and parts[0] in sections:
        section, name = parts
        target = sections[section]
    elif len(parts) == 3 and parts[0] == "stages":
        if not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(cfg.stages):
            raise EmbedkitError(f"--set {key}: this config has {len(cfg.stages)} stage(s), numbered from 1")
        section, name, target = f"stages.{int(parts[1]) - 1}", parts[2], cfg.stages[int(parts[1]) - 1]
    elif len(parts) == 1:
        owners = [s for s, obj in sections.items() if key in {f.name for f in fields(obj)}]
        if len(owners) > 1:
            raise EmbedkitError(f"--set {key}: ambiguous, write {' or '.join(f'{o}.{key}' for o in owners)}")
        section, name = (owners[0] if owners else "model"), key
        target = sections[section]
    else:
        raise EmbedkitError(f"--set {key}: keys look like width, model.width, train.lr or stages.1.epochs")
    known = [f.name for f in fields(target)]
    if name not in known:
        close = difflib.get_close_matches(name, known + [f.name for f in fields(PretrainSettings)], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise EmbedkitError(f"--set {key}: no such field{hint}")
    return section, name, target


def _parse_value(raw: str, hint, key: str):
    """The text of an override as the field's type: ints, floats, booleans, tuples as JSON lists."""
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is str:
            return raw
        if origin in (tuple, list):
            value = json.loads(raw)
            if not isinstance(value, list):
                raise ValueError
            return tuple(value) if origin is tuple else value
        if origin is typing.Union:  # Optional[...]: "none" clears it
            return None if raw.lower() in ("none", "null") else json.loads(raw)
    except (ValueError, json.JSONDecodeError):
        pass
    else:
        raise EmbedkitError(f"--set {key}: fields of type {hint} cannot be set from the command line")
    raise EmbedkitError(f"--set {key}: '{raw}' is not a valid {getattr(hint, '__name__', hint)}")


def _dataclass_from(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise EmbedkitError(f"{where} must be a JSON object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        close = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        hints = ", ".join(u + (f" (did you mean {c[0]}?)" if c else "") for u, c in close.items())
        raise EmbedkitError(f"{where} has unknown keys: {hints}")
    values = dict(d)
    hints = typing.get_type_hints(cls)
    for name, value in d.items():  # JSON lists back to the tuples the dataclass declares
        if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            values[name] = tuple(value)
    return cls(**values)
