"""Encoders: the registry of named specs and `create_encoder`, the one way to load one."""

from embedkit.encoders.registry import (
    DEFAULT_IMAGE_MODEL,
    DEFAULT_TEXT_MODEL,
    REGISTRY,
    EncoderSpec,
    list_models,
    resolve_spec,
)


def create_encoder(spec, modality, device="auto", dtype="float32", threads=None, quantize=None):
    """Load the weights `spec` names (imports torch lazily, so listing specs stays fast)."""
    if spec.family == "gguf":  # llama.cpp, not torch
        from embedkit.encoders.llamacpp import create_gguf_encoder

        return create_gguf_encoder(spec, modality, device=device, dtype=dtype, threads=threads, quantize=quantize)
    from embedkit.encoders.models import create_encoder as _create

    return _create(spec, modality, device=device, dtype=dtype, threads=threads, quantize=quantize)


__all__ = ["DEFAULT_IMAGE_MODEL", "DEFAULT_TEXT_MODEL", "REGISTRY", "EncoderSpec", "create_encoder", "list_models",
           "resolve_spec"]
