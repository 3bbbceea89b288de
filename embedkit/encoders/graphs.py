"""The computation a backend runs: one torch module from model inputs to the stored vector.

The torch path (models.py) runs the same steps inside `Encoder.embed`; here they are one module
with plain tensor inputs and one tensor output, so the TorchScript ONNX exporter can trace it and
ONNX Runtime or OpenVINO can run it. Whatever differs from the torch path shows up in parity
(backends.py compares both on a calibration batch), so the two cannot drift apart silently.

Tokenisation, image decode and normalisation stay in Python: the graph starts at the model's inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features; older versions a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ImageGraph(torch.nn.Module):
    """pixel_values [B, 3, H, W] float32, normalised as the spec says -> [B, dim] float32."""

    input_names = ("pixel_values",)

    def __init__(self, model: torch.nn.Module, family: str, pooling: str, normalize: bool):
        super().__init__()
        self.model, self.family, self.pooling, self.normalize = model, family, pooling, normalize

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.family == "dinov2":
            out = self.model(pixel_values=pixel_values)
            x = out.pooler_output if self.pooling == "cls" else out.last_hidden_state[:, 1:].mean(dim=1)
        elif self.family == "clip":
            x = _pooled(self.model.get_image_features(pixel_values=pixel_values))
        elif self.family == "efficientnet":
            x = self.model.extract_features(pixel_values).mean(dim=(2, 3))
        else:  # shared: embedkit's own encoder, already L2-normalised
            x = self.model.encode_image(pixel_values)
        x = x.float()
        return F.normalize(x, dim=-1) if self.normalize else x


class TextGraph(torch.nn.Module):
    """input_ids, attention_mask (and token_type_ids for BERT-style models), int64 [B, L] -> [B, dim]."""

    def __init__(self, model: torch.nn.Module, family: str, pooling: str, normalize: bool,
                 input_names: tuple[str, ...]):
        super().__init__()
        self.model, self.family, self.pooling, self.normalize = model, family, pooling, normalize
        self.input_names = input_names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.family == "clip":
            x = _pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        elif self.family == "shared":
            x = self.model.encode_text(input_ids, attention_mask)
        else:
            extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            if self.pooling == "cls":
                x = hidden[:, 0]
            elif self.pooling == "last":
                # index of the last real token, whichever side the tokenizer pads on
                last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(dim=1)
                x = hidden[torch.arange(hidden.shape[0]), last]
            else:
                m = attention_mask.unsqueeze(-1).to(hidden.dtype)
                x = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        x = x.float()
        return F.normalize(x, dim=-1) if self.normalize else x


def text_input_names(family: str, tokenizer) -> tuple[str, ...]:
    """The tokenizer outputs the graph reads: token types only for BERT-style models whose tokenizer makes them."""
    if family == "sentence" and "token_type_ids" in getattr(tokenizer, "model_input_names", ()):
        return TEXT_INPUTS
    return ("input_ids", "attention_mask")


def graph_of(encoder) -> torch.nn.Module:
    """The export graph of a loaded torch encoder (models.ImageEncoder or TextEncoder), in eval mode."""
    spec = encoder.spec
    model = encoder.runner.model if spec.family == "shared" else encoder.model
    if encoder.modality == "image":
        # the torch path keeps EfficientNet channels-last for oneDNN; the exported graph takes plain NCHW
        model = model.to(memory_format=torch.contiguous_format)
        return ImageGraph(model, spec.family, spec.pooling, spec.normalize).eval()
    names = text_input_names(spec.family, encoder.tokenizer)
    return TextGraph(model, spec.family, spec.pooling, spec.normalize, names).eval()


def export_onnx(graph: torch.nn.Module, example: dict, path) -> None:
    """Trace `graph` on `example` (name -> numpy array) into an ONNX file; batch (and sequence) stay dynamic."""
    import warnings

    names = list(graph.input_names)
    args = tuple(torch.from_numpy(example[n]) for n in names)
    axes = {n: ({0: "batch"} if n == "pixel_values" else {0: "batch", 1: "sequence"}) for n in names}
    axes["embedding"] = {0: "batch"}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # the TorchScript exporter is deprecated in favour of torch.export, which needs onnxscript and
        # fails on several of these models today; its warnings say nothing the user can act on
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, str(path), input_names=names, output_names=["embedding"], dynamic_axes=axes,
                          opset_version=17, dynamo=False, do_constant_folding=True)
