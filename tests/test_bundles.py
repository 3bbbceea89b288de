"""Offline model bundles: pack tiny models saved by the tests, install them into a model store, embed from
there with the provenance a connected machine writes; tampered, pickle-bearing and escaping bundles refused."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from embedkit.bundles import MANIFEST, install, pack
from embedkit.encoders.registry import installed_models, resolve_spec
from embedkit.errors import EmbedkitError

from conftest import REPO

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDKIT_MODEL_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


def _hub_cache(tmp_path, tiny_folder, repo="org/tiny-bert") -> Path:
    """A Hugging Face cache as `hf download` leaves it: blobs, a snapshot of symlinks, refs/main."""
    cache = tmp_path / "hub"
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / COMMIT
    (base / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in tiny_folder.iterdir():
        blob = base / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(blob)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)
    (snap / "README.md").symlink_to(base / "blobs" / "readme")
    (base / "blobs" / "readme").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return cache


def _embed(name, texts):
    from embedkit.encoders import create_encoder

    return create_encoder(resolve_spec(name, "text"), "text", device="cpu")


def test_a_hub_model_packed_online_installs_offline_and_embeds_with_the_same_provenance(tiny_models, tmp_path,
                                                                                         store):
    cache = _hub_cache(tmp_path, tiny_models["bert"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "embedkit.cli", "models", "pack", "hf:org/tiny-bert", "--out",
                        str(tmp_path / "b.tar")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout.strip().splitlines()[-1])
    assert "licence apache-2.0" in r.stderr

    with pytest.raises(EmbedkitError, match="not available on this machine"):
        resolve_spec("hf:org/tiny-bert", "text")  # this process sees no hub cache: the offline machine
    done = install(tmp_path / "b.tar", expect_sha256=printed["sha256"])
    assert [m["name"] for m in done["models"]] == ["org/tiny-bert"] and done["models"][0]["revision"] == COMMIT
    spec = resolve_spec("hf:org/tiny-bert", "text")
    assert spec.source == "org/tiny-bert" and spec.revision == COMMIT  # as the connected machine records it
    enc = _embed("hf:org/tiny-bert", None)
    assert enc.provenance()["source"] == "org/tiny-bert" and enc.provenance()["revision"] == COMMIT
    texts = ["a small effusion", "clear lungs"]
    from embedkit.encoders import create_encoder

    reference = create_encoder(resolve_spec(str(tiny_models["bert"]), "text"), "text", device="cpu")
    np.testing.assert_array_equal(enc.embed(texts)[0], reference.embed(texts)[0])

    listing = subprocess.run([sys.executable, "-m", "embedkit.cli", "models"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO), "EMBEDKIT_MODEL_STORE": str(store),
                                  "COLUMNS": "250"})
    assert listing.returncode == 0 and "org/tiny-bert" in listing.stdout and "apache-2.0" in listing.stdout


def test_a_folder_bundle_round_trips_and_leaves_pickles_out(tiny_models, tmp_path, store):
    import torch

    folder = tmp_path / "my-clip"
    shutil.copytree(tiny_models["clip"], folder)
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")  # a pickle beside the safetensors
    r = pack([str(folder)], tmp_path / "clip.tar")
    entry = r["models"][0]
    assert entry["name"] == "my-clip" and entry["left_out"][0].startswith("pytorch_model.bin")
    assert entry["license"] == "unknown"
    with tarfile.open(tmp_path / "clip.tar") as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile(MANIFEST).read())
    assert "models/my-clip/pytorch_model.bin" not in names and "models/my-clip/model.safetensors" in names
    spec = manifest["models"][0]["spec"]
    assert spec["family"] == "clip" and spec["preprocess"]["crop"] == 32  # embedkit's spec travels with it
    install(tmp_path / "clip.tar")
    (folder / "pytorch_model.bin").unlink()
    shutil.rmtree(folder)  # gone from where it was packed: only the store has it
    assert resolve_spec("my-clip", "image").family == "clip"
    assert [m["name"] for m in installed_models()] == ["my-clip"]
    install(tmp_path / "clip.tar")  # installing again replaces, does not duplicate
    assert len(installed_models()) == 1


def test_pack_refuses_pickle_only_weights_and_pypi_models(tmp_path, tiny_models):
    import torch

    folder = tmp_path / "old"
    folder.mkdir()
    shutil.copy(tiny_models["bert"] / "config.json", folder)
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(EmbedkitError, match="pickled weights"):
        pack([str(folder)], tmp_path / "x.tar")
    with pytest.raises(EmbedkitError, match="installs offline from PyPI"):
        pack(["minilm"], tmp_path / "y.tar")


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a bundle member by member; `edit(name, data)` returns new data, None to drop, or a list of
    (TarInfo, data) pairs to write instead."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            out = edit(m.name, data)
            if out is None:
                continue
            for info, payload in (out if isinstance(out, list) else [(m, out)]):
                if payload is not None:
                    info.size = len(payload)
                tout.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return dst


def _with_manifest_entry(data: bytes, name: str, payload: bytes) -> bytes:
    import hashlib

    manifest = json.loads(data)
    manifest["models"][0]["files"][name] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    return json.dumps(manifest).encode()


@pytest.fixture
def good_bundle(tiny_models, tmp_path):
    return Path(pack([str(tiny_models["dinov2"])], tmp_path / "good.tar")["bundle"])


def _pickle_bytes() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


def _cases(tmp_path):
    def tamper(name, data):
        return data[:-1] + bytes([data[-1] ^ 1]) if name.endswith("config.json") else data

    def extra_pickle(name, data, file="weights.safetensors", payload=None):
        payload = payload or _pickle_bytes()
        if name == MANIFEST:
            return [(tarfile.TarInfo(f"models/tiny-dinov2/{file}"), payload),
                    (tarfile.TarInfo(MANIFEST), _with_manifest_entry(data, file, payload))]
        return data

    def raw_pickle(name, data):  # a plain pickle stream (protocol 4) under an innocent name
        return extra_pickle(name, data, "tokenizer.json", b"\x80\x04\x95" + b"\x00" * 20)

    def escape(name, data):
        if name == MANIFEST:
            return [(tarfile.TarInfo("models/tiny-dinov2/../../../evil.txt"), b"x"),
                    (tarfile.TarInfo(MANIFEST), _with_manifest_entry(data, "../../../evil.txt", b"x"))]
        return data

    def link(name, data):
        if name == MANIFEST:
            info = tarfile.TarInfo("models/tiny-dinov2/link.json")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            return [(info, None), (tarfile.TarInfo(MANIFEST), data)]
        return data

    def unlisted(name, data):
        return [(tarfile.TarInfo("models/tiny-dinov2/extra.txt"), b"x"), (tarfile.TarInfo(name), data)] \
            if name == MANIFEST else data

    def missing(name, data):
        return None if name.endswith("config.json") else data

    return {"tamper": (tamper, "does not match its sha256"),
            "torch_pickle": (extra_pickle, "holds a pickle"),
            "raw_pickle": (raw_pickle, "holds a pickle"),
            "escape": (escape, "not a plain relative path"),
            "symlink": (link, "link or special file"),
            "unlisted": (unlisted, "not listed in the manifest"),
            "missing": (missing, "missing")}


@pytest.mark.parametrize("case", ["tamper", "torch_pickle", "raw_pickle", "escape", "symlink", "unlisted", "missing"])
def test_bad_bundles_are_refused_and_install_nothing(case, good_bundle, tmp_path, store):
    edit, words = _cases(tmp_path)[case]
    bad = _rewrite(good_bundle, tmp_path / f"{case}.tar", edit)
    with pytest.raises(EmbedkitError, match=words) as e:
        install(bad)
    assert "nothing was installed" in str(e.value)
    assert installed_models() == [] and not [p for p in store.iterdir()]  # no model, no leftover temp folder
    assert not (tmp_path / "evil.txt").exists() and not (store.parent / "evil.txt").exists()


def test_expected_sha256_and_a_non_bundle(good_bundle, tmp_path, store):
    with pytest.raises(EmbedkitError, match="not the"):
        install(good_bundle, expect_sha256="0" * 64)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all")
    with pytest.raises(EmbedkitError, match="not a tar file"):
        install(tmp_path / "junk.tar")
    install(good_bundle)  # the good one installs
    assert [m["name"] for m in installed_models()] == ["tiny-dinov2"]
