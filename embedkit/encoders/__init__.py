"""Encoders: the registry of named specs and `create_encoder`, the one way to load one."""

from embedkit.encoders.registry import (
    DEFAULT_IMAGE_MODEL,
    DEFAULT_TEXT_MODEL,
    REGISTRY,
    EncoderSpec,
    list_models,
    resolve_spec,
)


def create_encoder(spec, modality, device="auto", dtype="float32", threads=None, quantize=None, backend="torch",
                   precision=None, parity_floor=0.99, log=None):
    """Load the weights `spec` names (imports torch lazily, so listing specs stays fast).

    backend torch|onnxruntime|openvino|auto and precision fp32|bf16|int8|auto (None: torch's `dtype` and
    `quantize`, fp32 elsewhere) go through encoders/backends.py, which measures parity to torch fp32 and
    refuses a backend below `parity_floor`."""
    if spec.family == "gguf":  # llama.cpp, not torch
        if backend not in ("torch", "auto") or precision is not None:
            from embedkit.errors import EmbedkitError

            raise EmbedkitError("GGUF models run through llama.cpp: their precision is the file's quantisation; "
                                "leave out --backend and --precision")
        from embedkit.encoders.llamacpp import create_gguf_encoder

        return create_gguf_encoder(spec, modality, device=device, dtype=dtype, threads=threads, quantize=quantize)
    if backend == "torch" and precision is None:
        from embedkit.encoders.models import create_encoder as _create

        return _create(spec, modality, device=device, dtype=dtype, threads=threads, quantize=quantize)
    from embedkit.encoders.backends import open_encoder
    from embedkit.errors import EmbedkitError

    if dtype not in ("float32", "fp32") or quantize:
        raise EmbedkitError("--precision (and --backend) replace --dtype and --quantize: pass --precision bf16 or int8 "
                            "instead")
    if backend == "auto" or precision == "auto":
        from embedkit.encoders.backend_choice import choose_backend

        backend, precision = choose_backend(spec, modality, threads=threads, floor=parity_floor, device=device,
                                            only_backend=None if backend == "auto" else backend, log=log)
    return open_encoder(spec, modality, backend, precision or "fp32", threads=threads, floor=parity_floor,
                        device=device, log=log)


__all__ = ["DEFAULT_IMAGE_MODEL", "DEFAULT_TEXT_MODEL", "REGISTRY", "EncoderSpec", "create_encoder", "list_models",
           "resolve_spec"]
