"""Write a transformers Llama folder as a GGUF file, and quantise GGUF files with llama.cpp.

Real models come as GGUF files from their publishers (see the `gguf` specs in registry.py), or
from llama.cpp's own `convert_hf_to_gguf.py`. This writer exists so that tests and benchmarks can
build GGUF files offline from models they make themselves, and so that a clinic with a local
Llama-architecture folder can convert it. It covers what it checks, and refuses the rest:

  - architecture `llama` (LlamaForCausalLM / LlamaModel), default RoPE (no rope scaling);
  - a byte-level BPE tokenizer (tokenizer.json with a ByteLevel pre-tokenizer: GPT-2's split),
    written as llama.cpp's `gpt2` tokenizer with the `gpt-2` pre-tokenizer;
  - outtype f32, f16 or q8_0 (numpy, from the `gguf` package); k-quants through `quantize_gguf`,
    which calls llama.cpp's own quantiser.

The tensor names and the Q/K row permutation follow llama.cpp's convert_hf_to_gguf.py: llama.cpp
rotates interleaved pairs, transformers rotates halves, so the rows of q_proj and k_proj are
reordered per head on the way in (and reordered back by transformers' GGUF loader).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from embedkit.errors import EmbedkitError

OUTTYPES = ("f32", "f16", "q8_0")
# llama.cpp's quantiser accepts many more; these are the ones embedkit documents and benchmarks
QUANT_TYPES = {"q8_0": 7, "q4_0": 2, "q4_k_s": 14, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}

_LAYER_TENSORS = {  # transformers name inside model.layers.N -> llama.cpp name inside blk.N
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def convert_llama_to_gguf(folder: str | Path, out: str | Path, outtype: str = "f32") -> Path:
    """Write the Llama model and byte-level BPE tokenizer saved in `folder` as one GGUF file."""
    import gguf

    folder, out = Path(folder), Path(out)
    if outtype not in OUTTYPES:
        raise EmbedkitError(f"unknown GGUF outtype '{outtype}' (choose {', '.join(OUTTYPES)}; "
                            f"k-quants through quantize_gguf)")
    cfg = json.loads((folder / "config.json").read_text())
    _check_llama_config(cfg, folder)
    tokenizer = _byte_level_vocab(folder, cfg["vocab_size"])
    weights = _load_weights(folder)

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(folder.name)
    _add_hparams(writer, cfg)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    _add_tokenizer(writer, tokenizer)
    for name, array in _gguf_tensors(weights, cfg):
        _add_tensor(writer, name, array, outtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str, threads: int | None = None) -> Path:
    """llama.cpp's own quantiser (`llama_model_quantize`), e.g. f16 -> q4_k_m. Needs llama-cpp-python.

    Like llama.cpp's `llama-quantize`, a tensor whose rows do not split into the type's blocks
    (256 values for k-quants) falls back to a type that fits; the file type stays the one asked for.
    """
    if qtype not in QUANT_TYPES:
        raise EmbedkitError(f"unknown quantisation '{qtype}' (choose {', '.join(QUANT_TYPES)})")
    try:
        import llama_cpp
    except ImportError:
        raise EmbedkitError("quantising GGUF files needs llama-cpp-python: pip install 'embedkit[gguf]'") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    if threads:
        params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if status != 0:
        raise EmbedkitError(f"llama.cpp could not quantise '{src}' to {qtype} (status {status})")
    return Path(dst)


def _check_llama_config(cfg: dict, folder: Path) -> None:
    if cfg.get("model_type") != "llama":
        raise EmbedkitError(f"'{folder}' holds a {cfg.get('model_type')!r} model; this converter writes Llama "
                            f"models only (use llama.cpp's convert_hf_to_gguf.py for others)")
    rope = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    params = cfg.get("rope_parameters") or {}
    rope_type = params.get("rope_type", rope_type)
    if rope_type not in (None, "default"):
        raise EmbedkitError(f"'{folder}' uses {rope_type} rope scaling, which this converter does not write "
                            f"(use llama.cpp's convert_hf_to_gguf.py)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise EmbedkitError(f"'{folder}' has attention or MLP biases, which llama.cpp's llama architecture lacks")


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}  # transformers 5 keeps it here
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _add_hparams(writer, cfg: dict) -> None:
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(int(cfg["num_attention_heads"]))
    writer.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_rope_dimension_count(_head_dim(cfg))
    writer.add_key_length(_head_dim(cfg))
    writer.add_value_length(_head_dim(cfg))
    writer.add_vocab_size(int(cfg["vocab_size"]))


def _load_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EmbedkitError(f"'{folder}' has no .safetensors weights (save the model with save_pretrained)")
    weights = {}
    for f in files:
        weights.update(load_file(f))
    # LlamaModel saves without the "model." prefix; LlamaForCausalLM with it
    return {k if k.startswith(("model.", "lm_head.")) else f"model.{k}": v for k, v in weights.items()}


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' rotate-half row order -> llama.cpp's interleaved pairs, per head (as convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(weights: dict[str, np.ndarray], cfg: dict):
    """(llama.cpp name, float32 array) for every tensor the llama architecture reads."""
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    yield "token_embd.weight", weights["model.embed_tokens.weight"]
    for i in range(int(cfg["num_hidden_layers"])):
        for hf, cpp in _LAYER_TENSORS.items():
            w = weights[f"model.layers.{i}.{hf}.weight"]
            if cpp == "attn_q":
                w = _permute_rows(w, n_head)
            elif cpp == "attn_k":
                w = _permute_rows(w, n_kv)
            yield f"blk.{i}.{cpp}.weight", w
    yield "output_norm.weight", weights["model.norm.weight"]
    # an untied head is written; a tied one (or a bare LlamaModel) is left to token_embd, as llama.cpp does
    if "lm_head.weight" in weights and not cfg.get("tie_word_embeddings", False):
        yield "output.weight", weights["lm_head.weight"]


def _add_tensor(writer, name: str, array: np.ndarray, outtype: str) -> None:
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 1 or outtype == "f32":  # norms stay f32 in every llama.cpp file type
        writer.add_tensor(name, array)
    elif outtype == "f16":
        writer.add_tensor(name, array.astype(np.float16))
    elif array.shape[-1] % 32 == 0:  # q8_0: blocks of 32 along a row
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, array.astype(np.float16))  # as llama.cpp's converter does for odd widths


# ---------------------------------------------------------------- tokenizer

_NORMAL, _CONTROL, _UNUSED = 1, 3, 5  # llama.cpp token types


def _byte_level_vocab(folder: Path, vocab_size: int) -> dict:
    """tokens, types and merges of a byte-level BPE tokenizer.json, padded to the model's vocab size."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise EmbedkitError(f"'{folder}' has no tokenizer.json: this converter needs a fast byte-level BPE tokenizer")
    tok = json.loads(path.read_text())
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not _is_gpt2_byte_level(tok.get("pre_tokenizer")):
        raise EmbedkitError(f"'{folder}' has a tokenizer this converter cannot write: it writes byte-level BPE "
                            f"with GPT-2's pre-tokenizer only (use llama.cpp's convert_hf_to_gguf.py)")
    vocab = dict(model["vocab"])
    special = set()
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["content"])
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise EmbedkitError(f"'{folder}' tokenizer ids are not contiguous from 0")
    if len(by_id) > vocab_size:
        raise EmbedkitError(f"'{folder}' tokenizer has {len(by_id)} tokens, more than the model's {vocab_size}")
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [_CONTROL if t in special else _NORMAL for t in tokens]
    # rows of the embedding no token reaches, named as llama.cpp's converter names them
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [_UNUSED] * (vocab_size - len(types))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, **_special_ids(folder, vocab)}


def _is_gpt2_byte_level(pre: dict | None) -> bool:
    return bool(pre) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _special_ids(folder: Path, vocab: dict[str, int]) -> dict:
    """BOS/EOS ids and whether the tokenizer adds them, read off the tokenizer's own output."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok("a")["input_ids"]
    out = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    out["add_bos"] = tok.bos_token_id is not None and ids[0] == tok.bos_token_id
    out["add_eos"] = tok.eos_token_id is not None and ids[-1] == tok.eos_token_id and len(ids) > 1
    return out


def _add_tokenizer(writer, vocab: dict) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    if vocab["bos"] is not None:
        writer.add_bos_token_id(vocab["bos"])
    if vocab["eos"] is not None:
        writer.add_eos_token_id(vocab["eos"])
    if vocab["pad"] is not None:
        writer.add_pad_token_id(vocab["pad"])
    writer.add_add_bos_token(bool(vocab["add_bos"]))
    writer.add_add_eos_token(bool(vocab["add_eos"]))


# ---------------------------------------------------------------- random models for tests and benchmarks

def byte_level_bpe(corpus: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on `corpus`, BOS added, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def random_llama_folder(folder: str | Path, corpus: list[str], seed: int = 0, tokenizer_vocab: int = 400,
                        **config) -> Path:
    """A random-weight LlamaForCausalLM and a BPE tokenizer trained on `corpus`, saved with save_pretrained.

    `config` sets LlamaConfig sizes; vocab_size defaults to the tokenizer's size (a larger one pads)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tok = byte_level_bpe(corpus, tokenizer_vocab)
    config.setdefault("vocab_size", len(tok))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id, **config))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
