"""File hashes shared by the store, the guards and the model store, cached so repeated checks stay fast."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HASH_CACHE: dict[tuple, str] = {}


def cached_sha256(path: Path, blob_names: bool = True) -> str:
    """sha256 of a file's bytes, cached in this process by (real path, size, mtime). blob_names: a file named by
    64 hex digits is a Hugging Face cache blob, named by its content's sha256 (not read)."""
    real = Path(os.path.realpath(path))
    if blob_names and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name  # a hub cache blob is named by its content's sha256
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]
