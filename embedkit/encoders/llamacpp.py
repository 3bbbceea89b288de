"""The llama.cpp backend: text embeddings from a GGUF file (quantised or not) through llama-cpp-python.

Why: a 7B model in transformers needs its weights in fp32 (28 GB) or bf16 (14 GB) in memory; as a
Q8_0 GGUF file it is 7.2 GB, as Q4_K_M 4.1 GB, memory-mapped (pages load as they are read and
stay shareable with the page cache), and llama.cpp's CPU kernels compute on the quantised weights.

What it does, like the transformers text encoder (models.TextEncoder):
  - tokenises with the tokenizer stored in the file (llama.cpp's, BOS added as the file says);
  - counts texts longer than `max_length` tokens and cuts them there (reported as truncated);
  - pools with llama.cpp's own pooling over each text's tokens: mean, or the last token; the
    hidden states pooled are the final-norm outputs, as transformers' last_hidden_state;
  - packs several texts into one llama.cpp batch of at most `max_length` tokens (each text is
    its own sequence: no attention across texts), so short reports do not waste a forward;
  - records provenance: the file's sha256 (the identity of the weights), quantisation type and
    per-tensor types, context length, pooling, llama-cpp-python version and CPU features.
The KV cache is kept in f32 for an f32 file (so its vectors match a float32 forward to ~1e-5)
and in llama.cpp's default f16 otherwise, where the weights' own rounding dominates.

On CPUs with Intel AMX (Sapphire Rapids and later), llama.cpp's AMX matmul crashed on every
quantised file here (segfault in ggml_backend_amx_mul_mat, Q8_0, Q4_0 and Q4_K_M alike; llama.cpp
issue 20824, and PR 16315 reports wrong results from the same path). So where the build reports
AMX, llama.cpp's extra weight buffer types (AMX, and CPU weight repacking) are turned off: the
plain CPU kernels run instead. Elsewhere they stay on. Provenance records which.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import numpy as np

from embedkit.encoders.gguf_files import INSTALL_HINT, file_sha256, find_gguf, missing_gguf_message, read_header
from embedkit.encoders.registry import EncoderSpec
from embedkit.errors import EmbedkitError

POOLING_TYPES = {"mean": 1, "last": 3}  # llama.cpp's LLAMA_POOLING_TYPE_MEAN / _LAST


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise EmbedkitError(f"GGUF models need llama-cpp-python: {INSTALL_HINT}") from None
    return llama_cpp


class GGUFTextEncoder:
    """A GGUF model loaded by llama.cpp, embedding texts. Same interface as models.TextEncoder."""

    modality = "text"

    def __init__(self, spec: EncoderSpec, device: str = "auto", threads: int | None = None):
        llama_cpp = _import_llama_cpp()
        path = find_gguf(spec.source)
        if path is None:
            raise EmbedkitError(missing_gguf_message(spec.name, spec.source))
        self.spec, self.path = spec, path
        self.header = read_header(path)
        self.sha256 = file_sha256(path)
        if spec.revision and spec.revision != f"sha256:{self.sha256}":
            raise EmbedkitError(f"'{path}' is not the published file of model '{spec.name}' (its sha256 differs): "
                                f"download it again, or pass it as gguf:PATH to embed with it anyway")
        if spec.pooling not in POOLING_TYPES:
            raise EmbedkitError(f"pooling '{spec.pooling}' is not available for GGUF models "
                                f"(choose from {', '.join(POOLING_TYPES)})")
        self.max_length = _context(spec, self.header.context_length)
        self.threads = threads or _cpu_count()
        self.device = _device(device, llama_cpp)
        f32_cache = self.header.file_type == "F32"
        system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        self.extra_buffer_types = "AMX_INT8 = 1" not in system_info
        _quiet_log(llama_cpp)
        with _model_params(use_extra_bufts=self.extra_buffer_types), _load_error(path, self.header):
            self.llm = llama_cpp.Llama(
                model_path=str(path), embedding=True, pooling_type=POOLING_TYPES[spec.pooling],
                # one llama.cpp batch holds at most max_length tokens; llama-cpp-python's embed() cuts each
                # text there, which is the truncation counted in embed() below
                n_ctx=self.max_length, n_batch=self.max_length, n_ubatch=self.max_length,
                n_threads=self.threads, n_threads_batch=self.threads, use_mmap=True,
                n_gpu_layers=-1 if self.device != "cpu" else 0,
                type_k=llama_cpp.GGML_TYPE_F32 if f32_cache else None,
                type_v=llama_cpp.GGML_TYPE_F32 if f32_cache else None, verbose=False)
        self.dim = int(self.llm.n_embd())
        self.n_parameters = int(llama_cpp.llama_model_n_params(self.llm.model))
        self.model_bytes = int(llama_cpp.llama_model_size(self.llm.model))
        self.versions = {"llama_cpp_python": llama_cpp.__version__, "system_info": system_info}

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(self._tokenize(t)) for t in texts]

    def _tokenize(self, text: str) -> list[int]:
        # the same call llama-cpp-python's embed() makes, so counts and cuts agree
        return self.llm.tokenize(text.encode("utf-8"))

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Embed one batch; returns (float32 vectors, how many texts were cut at max_length)."""
        n_truncated = sum(n > self.max_length for n in self.count_tokens(texts))
        vectors = np.asarray(self.llm.embed(list(texts), normalize=False, truncate=True), dtype=np.float32)
        if self.spec.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors, n_truncated

    def provenance(self) -> dict:
        return {**self.spec.to_dict(), "modality": self.modality, "dim": self.dim, "max_length": self.max_length,
                # the weights' identity: a different file never shares a table (store.IDENTITY_FIELDS)
                "revision": f"sha256:{self.sha256}", "device": self.device, "dtype": "float32",
                "quantize": self.header.file_type, "n_parameters": self.n_parameters,
                "model_bytes": self.model_bytes,
                "gguf": {"path": str(self.path), "sha256": self.sha256, **self.header.to_dict(),
                         "context_length_used": self.max_length, "pooling": self.spec.pooling,
                         "kv_cache": "f32" if self.header.file_type == "F32" else "f16", "threads": self.threads,
                         "extra_buffer_types": self.extra_buffer_types, **self.versions}}


@contextmanager
def _model_params(**fields):
    """Set fields of llama.cpp's model parameters that llama-cpp-python's `Llama` does not take as
    arguments: its constructor starts from `llama_model_default_params()`, so that is wrapped while
    it runs."""
    module = sys.modules["llama_cpp.llama_cpp"]
    default = module.llama_model_default_params

    def params():
        p = default()
        for k, v in fields.items():
            setattr(p, k, v)
        return p

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default


_LOG_ERROR = 4  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_log_callback = None  # kept referenced: llama.cpp calls it for as long as the process runs


def _quiet_log(llama_cpp) -> None:
    """llama.cpp's log, errors only. Left alone, it tells at every load that a generative model's default
    pooling is not the one asked for (true, and meant) and reports buffer sizes: noise in extract's
    output. A failure still raises in Python (see _load_error)."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def errors_only(level, text, user_data):
        if level == _LOG_ERROR:
            print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr, flush=True)

    _log_callback = errors_only
    llama_cpp.llama_log_set(_log_callback, None)


@contextmanager
def _load_error(path, header):
    try:
        yield
    except ValueError:  # llama-cpp-python's "Failed to load model from file" / "Failed to create llama_context"
        raise EmbedkitError(f"llama.cpp could not load '{path}' ({header.architecture}, {header.file_type}): an "
                            f"architecture or type this llama-cpp-python does not support, or a damaged file") from None


def _context(spec: EncoderSpec, trained: int) -> int:
    want = spec.max_length or 512
    if trained and want > trained:
        raise EmbedkitError(f"--max-length {want} is more than the {trained} tokens model '{spec.name}' was "
                            f"trained on")
    return want


def _device(device: str, llama_cpp) -> str:
    if device in ("auto", "cpu"):
        # auto stays on the CPU: a GPU build of llama-cpp-python offloads only when asked (--device cuda)
        return "cpu"
    if device in ("cuda", "mps") or device.startswith("cuda:"):
        if not llama_cpp.llama_supports_gpu_offload():
            raise EmbedkitError(f"--device {device}: this llama-cpp-python was built without GPU support "
                                f"(rebuild it with CMAKE_ARGS=-DGGML_CUDA=on, or use --device cpu)")
        return device
    raise EmbedkitError(f"unknown device '{device}' (choose auto, cpu, cuda or mps)")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def create_gguf_encoder(spec: EncoderSpec, modality: str, device: str = "auto", dtype: str = "float32",
                        threads: int | None = None, quantize: str | None = None) -> GGUFTextEncoder:
    """create_encoder for the `gguf` family: refuses the options a GGUF file fixes by itself."""
    if modality != "text":
        raise EmbedkitError(f"GGUF models embed text, not {modality}")
    if dtype not in ("float32", "fp32"):
        raise EmbedkitError(f"--dtype {dtype} does not apply to GGUF models: the file fixes the weights' precision "
                            f"(choose a Q8_0, Q4_K_M or F16 file instead)")
    if quantize:
        raise EmbedkitError("--quantize does not apply to GGUF models: the file is already quantised "
                            "(choose a Q8_0 or Q4_K_M file instead)")
    return GGUFTextEncoder(spec, device=device, threads=threads)
