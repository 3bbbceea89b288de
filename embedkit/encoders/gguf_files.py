"""GGUF files on this machine: where a named one is looked for, what its header says, its sha256.

Nothing here loads weights or imports llama.cpp: the registry resolves `gguf:PATH` and the named
GGUF specs with it (a header read is a memory map of the first few MB), and the llama.cpp backend
(llamacpp.py) records its provenance with it.

A named spec's source is `OWNER/REPO/FILE.gguf`, the file as its publisher names it on the Hugging
Face hub. It is found, in this order, in each folder of $EMBEDKIT_GGUF_DIR (separated like PATH),
in ~/.cache/embedkit/gguf, and in the Hugging Face cache (after `hf download OWNER/REPO FILE`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from embedkit.errors import EmbedkitError

DEFAULT_GGUF_DIR = Path("~/.cache/embedkit/gguf")
INSTALL_HINT = "pip install 'embedkit[gguf]' (builds llama.cpp from source: about 9 minutes on 2 cores)"


def gguf_dirs() -> list[Path]:
    extra = [Path(p).expanduser() for p in os.environ.get("EMBEDKIT_GGUF_DIR", "").split(os.pathsep) if p]
    return [*extra, DEFAULT_GGUF_DIR.expanduser()]


def split_source(source: str) -> tuple[str, str]:
    """'OWNER/REPO/FILE.gguf' -> ('OWNER/REPO', 'FILE.gguf')."""
    repo, _, filename = source.rpartition("/")
    return repo, filename


def find_gguf(source: str) -> Path | None:
    """The local file a source names: an existing path, or a named OWNER/REPO/FILE.gguf found here."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.resolve()
    if source.startswith(("/", ".", "~")) or source.count("/") != 2:
        return None
    repo, filename = split_source(source)
    for folder in gguf_dirs():
        if (folder / filename).is_file():
            return (folder / filename).resolve()
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, filename)
        if isinstance(hit, str):
            return Path(hit).resolve()
    except Exception:  # no hub client or an unreadable cache: the file is simply not found
        pass
    return None


def missing_gguf_message(name: str, source: str) -> str:
    repo, filename = split_source(source)
    return (f"model '{name}' ({filename}) is not on this machine: on a connected machine run "
            f"`hf download {repo} {filename} --local-dir DIR` and copy the file into {DEFAULT_GGUF_DIR} "
            f"(or a folder named by EMBEDKIT_GGUF_DIR), or pass --text-model gguf:PATH; `embedkit models` "
            f"lists what is here")


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file says about itself, read without loading its weights."""

    architecture: str
    name: str | None
    dim: int  # embedding length: the width of the vectors extract writes
    context_length: int  # tokens the model was trained on
    file_type: str  # e.g. Q8_0, F16, Q4_K_M: llama.cpp's name for the file's quantisation
    tensor_types: dict[str, int]  # ggml type -> how many tensors have it (a Q4_K_M file mixes several)
    n_parameters: int
    tensor_bytes: int  # the weights as stored: what memory-mapping them costs at most

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def read_header(path: str | Path) -> GGUFHeader:
    try:
        from gguf import GGUFReader, LlamaFileType
    except ImportError:
        raise EmbedkitError(f"GGUF models need the gguf extra: {INSTALL_HINT}") from None
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise EmbedkitError(f"'{path}' is not a readable GGUF file ({type(e).__name__})") from None

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture")
    dim = field(f"{arch}.embedding_length")
    if not arch or not dim:
        raise EmbedkitError(f"'{path}' has no architecture or embedding length in its GGUF header")
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    ftype = field("general.file_type")
    try:
        file_type = LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        file_type = f"file_type {ftype}" if ftype is not None else max(types, key=types.get)
    return GGUFHeader(architecture=arch, name=field("general.name"), dim=int(dim),
                      context_length=int(field(f"{arch}.context_length", 0) or 0), file_type=file_type,
                      tensor_types=types, n_parameters=sum(int(t.n_elements) for t in reader.tensors),
                      tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors))


def file_sha256(path: str | Path) -> str:
    """sha256 of the file (a 7 GB file takes seconds); remembered per path, size and mtime in this process."""
    p = Path(path)
    st = p.stat()
    return _sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()
