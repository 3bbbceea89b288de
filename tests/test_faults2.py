"""Fault injection, round two (issue 29): each failure class that used to pass silently, re-run.

The encoder's weights checked at every use (the model store included), a model folder read as one snapshot
with every number checked, swaps killed at each step (install, train, pretrain), tables read strictly,
16-bit and extreme images, only embedkit's own outputs replaced, files named by other files and files
opened at extract time kept inside their folder, bundle sizes capped, counts users type bounded, and paths
printed literally by every command.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors.numpy import load_file as load_np, save_file as save_np

from embedkit.errors import EmbedkitError
from embedkit.extract import ExtractConfig, extract
from embedkit.predict import evaluate, load_model, predict
from embedkit.store import part_files
from embedkit.train import TrainConfig, train

from conftest import REPO, make_image, make_report
from test_faults import ENV, assert_one_line_error, run_cli_batch, table_snapshot
from test_train import clinic, write_embeddings


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDKIT_MODEL_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


def text_folder(root, n=4):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"r{i}.txt").write_text(make_report(i))
    return root


def text_cfg(model, **kw) -> ExtractConfig:
    return ExtractConfig(image_model=None, text_model=str(model), progress=False, **kw)


def perturbed_copy(src, dst):
    shutil.copytree(src, dst)
    w = load_np(dst / "model.safetensors")
    name = sorted(w)[0]
    w[name] = w[name] + np.float32(0.01)
    save_np(w, str(dst / "model.safetensors"))
    return dst


# ---------------------------------------------------------------- 1, 4, 13: the model store and bundles


def test_an_installed_model_is_identified_by_its_weights_and_checked_in_the_store(tiny_models, tmp_path, store,
                                                                                    monkeypatch):
    from embedkit.bundles import install, pack

    monkeypatch.chdir(tmp_path)
    one = shutil.copytree(tiny_models["bert"], tmp_path / "a" / "tiny-bert")
    two = perturbed_copy(tiny_models["bert"], tmp_path / "b" / "tiny-bert")  # same name, other weights
    pack([str(one)], tmp_path / "one.tar")
    pack([str(two)], tmp_path / "two.tar")
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")  # only the store has them now
    data, out = text_folder(tmp_path / "data"), tmp_path / "emb"
    install(tmp_path / "one.tar")
    res = extract(data, out, text_cfg("tiny-bert"))
    weights = res.modalities["text"].provenance["encoder_identity"]["weights"]
    assert weights and "model.safetensors" in weights  # the store's weights are part of the identity
    before = table_snapshot(out)

    install(tmp_path / "two.tar")  # another bundle, same name: its rows must never join the old ones
    (data / "r9.txt").write_text(make_report(9))
    with pytest.raises(EmbedkitError, match=r"weights \(model.safetensors changed\)"):
        extract(data, out, text_cfg("tiny-bert"))
    assert table_snapshot(out) == before

    install(tmp_path / "one.tar")
    assert extract(data, out, text_cfg("tiny-bert")).modalities["text"].rows_embedded == 1
    # a file edited in the store (same size) is noticed when the model is next opened
    weights_file = store / "tiny-bert" / "files" / "model.safetensors"
    raw = bytearray(weights_file.read_bytes())
    raw[-1] ^= 0x01
    weights_file.write_bytes(bytes(raw))
    with pytest.raises(EmbedkitError, match="does not match its bundle .*model.safetensors changed"):
        extract(data, out, text_cfg("tiny-bert"))
    (store / "tiny-bert" / "files" / "extra.bin").write_bytes(b"x")
    with pytest.raises(EmbedkitError, match="extra.bin was added"):
        extract(data, out, text_cfg("tiny-bert"))


KILL_INSTALL = textwrap.dedent("""
    import os, shutil, signal, sys
    target, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    module = {"replace": os, "rmtree": shutil}[name]
    original, calls = getattr(module, name), {"n": 0}
    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*a, **k)
    setattr(module, name, dying)
    from embedkit.bundles import install
    install(target)
""")


def test_install_killed_at_each_step_of_its_swap_leaves_one_whole_model(tiny_models, tmp_path, store):
    from embedkit.bundles import install, pack
    from embedkit.encoders.registry import installed_models, store_folder

    one = shutil.copytree(tiny_models["dinov2"], tmp_path / "a" / "tiny-dinov2")
    two = perturbed_copy(tiny_models["dinov2"], tmp_path / "b" / "tiny-dinov2")
    sha = {k: pack([str(f)], tmp_path / f"{k}.tar")["sha256"] for k, f in (("one", one), ("two", two))}
    env = {**ENV, "EMBEDKIT_MODEL_STORE": str(store)}
    # replace #1 moves the old model aside, replace #2 moves the new one in, rmtree #1 removes the old one
    for name, nth in (("replace", 2), ("rmtree", 1)):
        install(tmp_path / "one.tar")
        r = subprocess.run([sys.executable, "-c", KILL_INSTALL, str(tmp_path / "two.tar"), name, str(nth)], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == -9, r.stderr[-800:]
        listed = installed_models()
        assert [m["name"] for m in listed] == ["tiny-dinov2"], (name, nth, listed)  # listed once
        assert listed[0]["bundle_sha256"] == (sha["one"] if name == "replace" else sha["two"])
        store_folder("tiny-dinov2")  # whole: every file matches the bundle it came from
        install(tmp_path / "two.tar")  # the next install recovers, then replaces
        assert not [p.name for p in store.iterdir() if p.name.startswith((".old-", ".incoming-"))]
        assert [m["bundle_sha256"] for m in installed_models()] == [sha["two"]]


def _bundle(tmp_path, name: str, files: dict[str, bytes], mode: str = "w") -> "Path":  # noqa: F821
    """A bundle whose manifest lists `files` with their true hashes and sizes."""
    import hashlib
    import io

    from embedkit.bundles import FORMAT, FORMAT_VERSION, MANIFEST

    listed = {k: {"sha256": hashlib.sha256(v).hexdigest(), "bytes": len(v)} for k, v in files.items()}
    manifest = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "models": [
        {"name": "m", "dir": "m", "source": "m", "files": listed}]}).encode()
    path = tmp_path / name
    with tarfile.open(path, mode) as tar:
        for rel, data in [*((f"models/m/{k}", v) for k, v in files.items()), (MANIFEST, manifest)]:
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_bundles_are_capped_before_anything_is_written_and_old_pickles_are_caught(tmp_path, store, tiny_models):
    import pickle

    from embedkit.bundles import holds_pickle, install

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    cases = {  # name -> (bundle, what the refusal says)
        "proto0": (_bundle(tmp_path, "p0.tar", {"model.bin": pickle.dumps(Exploit(), protocol=0)}), "pickle"),
        "proto1": (_bundle(tmp_path, "p1.tar", {"weights.safetensors": pickle.dumps(Exploit(), protocol=1)}),
                   "pickle"),
        # 64 MiB of zeros in a ~64 KiB gzip: refused from the member sizes, before a byte is written
        "bomb": (_bundle(tmp_path, "bomb.tar.gz", {"model.safetensors": bytes(64 * 2**20)}, "w:gz"), "20 times"),
        "big_manifest": (_bundle(tmp_path, "mf.tar.gz", {"config.json": b"{}" + b" " * (17 * 2**20)}, "w:gz"),
                         "20 times"),
    }
    for name, (bundle, says) in cases.items():
        with pytest.raises(EmbedkitError, match=says):
            install(bundle)
        assert not store.exists() or not any(p for p in store.iterdir() if p.name != ".install.lock"), name
    if shutil.which("tar"):  # GNU tar writes a sparse 1 GiB member in a few KiB
        sparse = tmp_path / "sparse"
        (sparse / "models" / "m").mkdir(parents=True)
        with open(sparse / "models" / "m" / "model.safetensors", "wb") as f:
            f.truncate(2**30)
        r = subprocess.run(["tar", "-cSf", str(tmp_path / "s.tar"), "-C", str(sparse), "models"], capture_output=True)
        if r.returncode == 0:
            with pytest.raises(EmbedkitError, match="sparse|20 times"):
                install(tmp_path / "s.tar")
    for p in tiny_models["bert"].iterdir():  # no false alarm on real model files (JSON, vocabularies, weights)
        assert not holds_pickle(p.name, p.read_bytes()[:4096]), p.name


def test_zeroshot_refuses_an_encoder_whose_weights_changed_since_extract(tiny_models, tmp_path):
    from embedkit.zeroshot import ZeroShotConfig, zeroshot
    from test_zeroshot import PROMPTS, _extract

    clip = shutil.copytree(tiny_models["clip"], tmp_path / "models" / "tiny-clip")
    emb = _extract({"clip": clip}, tmp_path)
    w = load_np(clip / "model.safetensors")  # re-saved in place: same name, same shape, other weights
    save_np({k: np.asarray(v * 1.5, v.dtype) if v.dtype == np.float32 else v for k, v in w.items()},
            str(clip / "model.safetensors"))
    with pytest.raises(EmbedkitError, match="zeroshot: the weights of .* changed since its embeddings were made"):
        zeroshot(emb, ZeroShotConfig(prompts=PROMPTS, bootstrap=0))


# ---------------------------------------------------------------- 2, 3, 5, 10: model folders


def stamp_weights(emb, weights: dict) -> None:
    """Give every table of a test folder an encoder identity naming `weights` (as extract records them)."""
    for d in emb.glob("*__*"):
        for p in part_files(d):
            t = pq.read_table(p)
            meta = json.loads(t.schema.metadata[b"embedkit"])
            meta["encoder_identity"] = {"weights": weights}
            pq.write_table(t.replace_schema_metadata({b"embedkit": json.dumps(meta)}), p)


def test_predict_and_evaluate_refuse_embeddings_from_other_weights(tmp_path):
    emb = clinic(tmp_path, n=90)
    stamp_weights(emb, {"model.safetensors": "a" * 64})
    model = tmp_path / "model"
    train(emb, model, TrainConfig(labels=["dx"], fusion="logistic"))
    assert json.loads((model / "embedkit_model.json").read_text())["encoders"]["image"]["weights_digest"]
    other = clinic(tmp_path, n=90, name="other", seed=5)
    stamp_weights(other, {"model.safetensors": "b" * 64})  # same name, revision, pooling: other weights
    with pytest.raises(EmbedkitError, match="other weights"):
        predict(model, other, tmp_path / "p.parquet")
    with pytest.raises(EmbedkitError, match="other weights"):
        evaluate(model, other)
    assert not (tmp_path / "p.parquet").exists()
    stamp_weights(other, {"model.safetensors": "a" * 64})
    assert predict(model, other, tmp_path / "p.parquet")["rows"] == 90


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two logistic model folders with different classes (a, b, c vs x, y), and their embeddings."""
    tmp = tmp_path_factory.mktemp("two_models")
    emb = clinic(tmp, n=90)
    ids = np.array([f"p{i:04d}" for i in range(90)], dtype=object)
    x = np.random.default_rng(2).normal(size=(90, 16)).astype(np.float32)
    y = np.array(["x", "y"] * 45, dtype=object)
    emb_xy = tmp / "emb_xy"
    write_embeddings(emb_xy, "image", "clipish", ids, x + (y == "x")[:, None], {"dx": y})
    write_embeddings(emb_xy, "text", "clipish", ids, x, {"dx": y})
    a, b = tmp / "a", tmp / "b"
    train(emb, a, TrainConfig(labels=["dx"], fusion="logistic", bootstrap=0))
    train(emb_xy, b, TrainConfig(labels=["dx"], fusion="logistic", bootstrap=0))
    return {"emb": emb, "a": a, "b": b}


def test_a_model_folder_swapped_while_it_is_read_is_read_whole(two_models, tmp_path, monkeypatch):
    import embedkit.model_folder as mf

    final, incoming = tmp_path / "model", tmp_path / "incoming"
    shutil.copytree(two_models["a"], final)
    shutil.copytree(two_models["b"], incoming)
    real_copy, calls = shutil.copyfile, {"n": 0}

    def copy_then_swap(src, dst, **kw):  # a `train --out` swaps the folder right after we read its JSON
        out = real_copy(src, dst, **kw)
        calls["n"] += 1
        if os.path.basename(dst) == "embedkit_model.json" and incoming.exists():
            os.rename(final, tmp_path / "old")
            os.rename(incoming, final)
        return out

    monkeypatch.setattr(mf.shutil, "copyfile", copy_then_swap)
    est, info = load_model(final)
    assert info["classes"] == ["x", "y"] and [str(c) for c in est.classes_] == ["x", "y"]  # all of the new one
    assert calls["n"] > 8  # read again after the swap was seen

    # a swap stopped between its renames (no folder, `.model.old` beside it): the old model is read
    monkeypatch.undo()
    os.rename(final, tmp_path / ".model.old")
    r = predict(final, two_models["emb"], tmp_path / "p.parquet")
    assert r["rows"] == 90


def _edit(folder, edit):
    path = folder / "embedkit_model.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _tensor(folder, name, value):
    w = load_np(folder / "model.safetensors")
    w[name] = value(w[name])
    save_np(w, str(folder / "model.safetensors"))


NUMBER_TAMPERS = {
    "temperature_nan": (lambda f: _edit(f, lambda d: d["calibration"].update(temperature=float("nan"))), "temperature"),
    "temperature_negative": (lambda f: _edit(f, lambda d: d["calibration"].update(temperature=-1.0)), "temperature"),
    "threshold_above_one": (lambda f: _edit(f, lambda d: d["calibration"].update(threshold=2.0)), "threshold"),
    "threshold_text": (lambda f: _edit(f, lambda d: d["calibration"].update(threshold="x")), "threshold"),
    "scale_one_element": (lambda f: _tensor(f, "scale_", lambda v: v[:1].copy()), "scale"),
    "mean_one_element": (lambda f: _tensor(f, "mean_", lambda v: v[:1].copy()), "mean"),
    "scale_zero": (lambda f: _tensor(f, "scale_", lambda v: np.zeros_like(v)), "scale"),
}


def test_every_number_a_model_folder_holds_is_checked(tmp_path):
    emb = clinic(tmp_path, n=90)
    good = tmp_path / "late"
    train(emb, good, TrainConfig(labels=["dx"], fusion="late", epochs=2, late_hidden_dim=8, bootstrap=0))
    for name, (tamper, says) in NUMBER_TAMPERS.items():
        folder = tmp_path / "t" / name
        shutil.copytree(good, folder)
        tamper(folder)
        with pytest.raises(EmbedkitError, match=says):
            load_model(folder)
        with pytest.raises(EmbedkitError, match="damaged or was edited"):
            predict(folder, emb, tmp_path / f"{name}.parquet")
        assert not (tmp_path / f"{name}.parquet").exists()


class Interrupted(BaseException):
    """Stands for a kill: raised at a chosen step of a swap, leaving the disk as a kill there would."""


def _interrupt(monkeypatch, step: str, final) -> None:
    """Stop the swap of `final` just before `step`: 'exchange' or 'exchange-rmtree' (the one-step swap), or
    'replace1', 'replace2', 'rename-rmtree' (the two-rename swap)."""
    import embedkit.guards as g

    names = {final.name, f".{final.name}.old", f".{final.name}.writing"}
    counts = {"replace": 0}
    real_replace, real_rmtree, real_exchange = os.replace, shutil.rmtree, g.exchange_paths

    def replace(a, b, *args, **kw):
        if os.path.basename(a) in names and os.path.basename(b) in names:
            counts["replace"] += 1
            if step == f"replace{counts['replace']}":
                raise Interrupted
        return real_replace(a, b, *args, **kw)

    def rmtree(p, *args, **kw):  # the clean-up of the old folder after the swap (before it, nothing is there)
        if step.endswith("rmtree") and os.path.basename(p) in names - {final.name} and os.path.exists(p):
            raise Interrupted
        return real_rmtree(p, *args, **kw)

    def exchange(a, b):
        if step == "exchange":
            raise Interrupted
        return real_exchange(a, b) if step.startswith("exchange") else False

    monkeypatch.setattr(g.os, "replace", replace)
    monkeypatch.setattr(g.shutil, "rmtree", rmtree)
    monkeypatch.setattr(g, "exchange_paths", exchange)


def test_a_model_swap_interrupted_at_each_step_leaves_a_whole_model(two_models, tmp_path, monkeypatch):
    from embedkit.guards import atomic_folder, recover_folder

    final = tmp_path / "model"
    # exchange: one atomic step (Linux); replace1/replace2: the two-rename swap other systems get
    for step in ("exchange", "exchange-rmtree", "replace1", "replace2", "rename-rmtree"):
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(two_models["a"], final)
        with monkeypatch.context() as m:
            _interrupt(m, step, final)
            with pytest.raises(Interrupted):
                with atomic_folder(final) as staging:
                    shutil.copytree(two_models["b"], staging, dirs_exist_ok=True)
        est, info = load_model(final)  # a whole model, old or new, never missing and never a mix
        assert info["classes"] in (["a", "b", "c"], ["x", "y"]), step
        assert [str(c) for c in est.classes_] == [str(c) for c in info["classes"]]
        recover_folder(final)  # what the next `train --out` does first
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model")) == [], step
        load_model(final)


KILL_TRAIN = textwrap.dedent("""
    import os, signal, sys
    import embedkit.guards as g
    emb, out = sys.argv[1], sys.argv[2]
    g.exchange_paths = lambda a, b: False  # the two-rename swap, killed between its renames
    real = os.replace
    def dying(a, b, *args, **kw):
        if os.path.basename(b) == ".model.old":
            real(a, b, *args, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b, *args, **kw)
    g.os.replace = dying
    from embedkit.train import TrainConfig, train
    train(emb, out, TrainConfig(labels=["dx"], fusion="logistic", bootstrap=0, seed=1))
""")


def test_train_killed_between_its_renames_keeps_a_model_to_predict_with(two_models, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(two_models["a"], model)
    r = subprocess.run([sys.executable, "-c", KILL_TRAIN, str(two_models["emb"]), str(model)], env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == -9, r.stderr[-800:]
    assert not model.exists() and (tmp_path / ".model.old").is_dir()
    capsys.readouterr()
    assert predict(model, two_models["emb"], tmp_path / "p.parquet")["rows"] == 90
    assert "reading the previous model" in capsys.readouterr().err
    train(two_models["emb"], model, TrainConfig(labels=["dx"], fusion="logistic", bootstrap=0))  # recovers, replaces
    assert not (tmp_path / ".model.old").exists() and load_model(model)[1]["classes"] == ["a", "b", "c"]


# ---------------------------------------------------------------- 6, 10: pretrain


KILL_PRETRAIN = textwrap.dedent("""
    import os, signal, sys
    import torch; torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[3])
    import embedkit.guards as g
    g.exchange_paths = lambda a, b: False
    real, calls = os.replace, {"n": 0}
    def dying(a, b, *args, **kw):  # the model folder's swaps: the last export's second rename never happens
        if os.path.basename(a) == ".run.writing":
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b, *args, **kw)
    g.os.replace = dying
    from pathlib import Path
    from test_shared_encoder import make_pairs, recipe
    from embedkit.shared_encoder import pretrain
    pretrain(make_pairs(Path(sys.argv[1])), sys.argv[2], recipe(epochs=2, batch_size=4, seed=3, val_fraction=0.25),
             progress=False)
""")


def test_pretrain_killed_in_its_last_swap_exports_the_last_epoch(tmp_path):
    import torch

    from embedkit.shared_encoder import pretrain
    from test_shared_encoder import TINY, make_pairs, recipe

    (tmp_path / "img").mkdir()
    items = make_pairs(tmp_path / "img")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", KILL_PRETRAIN, str(tmp_path / "img"), str(out), str(REPO / "tests")],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-800:]
    assert not out.exists() and (tmp_path / ".run.old").is_dir()  # epoch 1's model aside, epoch 2's not in
    last = load_np(tmp_path / ".run.writing" / "model.safetensors")  # what the killed run was exporting
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = pretrain(items, out, recipe(epochs=2, batch_size=4, seed=3, val_fraction=0.25), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(metrics["epochs"]) == 2 and len(json.loads((out / "metrics.json").read_text())["epochs"]) == 2
    got = load_np(out / "model.safetensors")
    assert all(np.array_equal(got[k], last[k]) for k in last)  # the last epoch's weights, not the one before

    # another recipe (another tokenizer) into this folder: refused before a file of it changes
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    from dataclasses import replace

    from conftest import _minilm_tokenizer

    tok_dir = tmp_path / "tok"
    _minilm_tokenizer().save_pretrained(tok_dir)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 77}))
    with pytest.raises(EmbedkitError, match="different"):
        pretrain(items, out, recipe(replace(TINY, tokenizer=str(tok_dir)), epochs=2, batch_size=4, seed=3,
                                    val_fraction=0.25), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ---------------------------------------------------------------- 7: tables read strictly


def test_tables_are_read_strictly(tmp_path):
    from embedkit.items import SourceOptions
    from embedkit.sources import scan_source

    def scan(text, name="t.csv", **kw):
        (tmp_path / name).write_text(text)
        return scan_source(tmp_path, SourceOptions(metadata=tmp_path / name, id_col="id", text_col="report",
                                                   label_cols=["dx"], **kw))

    with pytest.raises(EmbedkitError, match=r"t.csv line 3: malformed quoting"):
        scan('id,report,dx\np1,fine,a\np2,"a stray quote,b\np3,next patient,c\np4,more,a\n')
    with pytest.raises(EmbedkitError, match="line 2: malformed quoting"):  # never closed: would swallow the rest
        scan('id,report,dx\np1,"open,a\np2,x,b\n')
    with pytest.raises(EmbedkitError, match="line 1: column 'dx' appears twice"):
        scan("id,report,dx,dx\np1,x,a,b\n")
    with pytest.raises(EmbedkitError, match="line 1: key 'dx' appears twice"):
        scan('{"id": "p1", "report": "x", "dx": "a", "dx": "b"}\n', name="t.jsonl")
    s = scan("id,report,dx\np1,one\np2,two,b,extra\np3,three,c,\np4,\"multi\nline, quoted\",a\n")
    assert [it.id for it in s.items] == ["p3", "p4"]  # a trailing comma loses nothing; a quoted newline is text
    assert s.items[1].text == "multi\nline, quoted"
    assert [(k.id, k.path) for k in s.skipped] == [("p1", "line 2"), ("p2", "line 3")]
    assert all("cells where the header has 3" in k.reason for k in s.skipped)
    (tmp_path / "s.csv").write_text('id,report,dx\np1,"stray,a\np2,x,b\n')
    [r] = run_cli_batch([["extract", tmp_path, "--out", tmp_path / "o", "--metadata", tmp_path / "s.csv",
                          "--id-col", "id", "--text-col", "report", "--image-model", "none"]])
    assert_one_line_error(r, "s.csv line 2: malformed quoting")


# ---------------------------------------------------------------- 8, 12, 14: images and files at open time


@pytest.fixture
def dino(tiny_models, tmp_path):
    return shutil.copytree(tiny_models["dinov2"], tmp_path / "models" / "tiny-dinov2")


def test_16_bit_images_are_scaled_and_extreme_shapes_skipped(dino, tmp_path, monkeypatch):
    from embedkit.encoders import preprocess
    from embedkit.encoders.preprocess import ImageDecodeError, ImagePreprocess, decode_image

    data = tmp_path / "xr"
    data.mkdir()
    grey = np.random.default_rng(0).integers(0, 256, (48, 64), dtype=np.uint8)
    Image.fromarray(grey).save(data / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(data / "g16.png")  # the same picture, 16 bits
    Image.fromarray((grey.astype(np.uint16) * 16)).save(data / "g12.png")  # 12-bit values in a 16-bit file
    Image.fromarray(np.zeros((1, 40000), np.uint8)).save(data / "thin.png")  # a few hundred bytes
    make_image(data / "ok.jpg", 3)
    res = extract(data, tmp_path / "emb", ExtractConfig(image_model=str(dino), text_model=None, progress=False))
    assert "scaled, never clipped" in res.modalities["image"].provenance["image_decode"]
    snap = table_snapshot(tmp_path / "emb")
    vec = {k.split("/")[-1]: np.frombuffer(v, np.float32) for k, v in snap.items()}
    assert np.allclose(vec["g8"], vec["g16"], atol=1e-6)
    cos = vec["g8"] @ vec["g12"] / np.linalg.norm(vec["g8"]) / np.linalg.norm(vec["g12"])
    assert cos > 0.99, cos  # 12 bits: its own range, so the same picture again (up to rounding)
    assert set(vec) == {"g8", "g16", "g12", "ok"}
    [thin] = [s for s in res.skipped if s.path == "thin.png"]
    assert "aspect-ratio cap" in thin.reason
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 1000)  # the pixel budget, checked on the header
    with pytest.raises(ImageDecodeError, match="over the budget"):
        decode_image(data / "ok.jpg", ImagePreprocess())


def test_files_are_checked_inside_the_data_folder_when_opened(dino, tiny_models, tmp_path):
    from embedkit.items import SourceOptions
    from embedkit.sources import scan_source

    data = tmp_path / "clinic"
    text_folder(data, n=3)
    for i in range(3):
        make_image(data / f"r{i}.png", i)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET PATIENT TEXT outside the data folder")
    make_image(outside / "secret.png", 9)
    scan = scan_source(data, SourceOptions())  # checked here, at scan time ...
    for name in ("r1.txt", "r1.png"):  # ... then swapped for links out of the folder while extract runs
        (data / name).unlink()
        (data / name).symlink_to(outside / name.replace("r1", "secret"))
    res = extract(data, tmp_path / "emb", ExtractConfig(image_model=str(dino), text_model=str(tiny_models["bert"]),
                                                        progress=False), scan=scan)
    assert {m: r.rows_total for m, r in res.modalities.items()} == {"image": 2, "text": 2}
    assert all("outside the data folder" in s.reason for s in res.skipped if s.id == "r1"), res.skipped
    texts = pq.read_table(part_files(tmp_path / "emb" / "text__tiny-bert")[0]).column("text").to_pylist()
    assert not any("SECRET" in t for t in texts)
    # the engines' own opens check too (a link swapped in after the hash was taken)
    from embedkit.documents import read_report
    from embedkit.encoders.preprocess import ImagePreprocess
    from embedkit.engines.base import decode

    real = data.resolve()
    assert "outside the data folder" in read_report(data / "r1.txt", inside=real)[1]
    assert "outside the data folder" in decode(data / "r1.png", ImagePreprocess(), inside=real)[1]
    assert read_report(data / "r0.txt", inside=real)[0] and decode(data / "r0.png", ImagePreprocess(), inside=real)[1] \
        is None


# ---------------------------------------------------------------- 9, 11: what may be replaced, what may be read


def test_only_the_same_commands_output_is_replaced(two_models, tmp_path):
    from embedkit.guards import OUTPUT_MARKER
    from embedkit.shared_encoder.project import project_embeddings

    emb = clinic(tmp_path, n=60)
    other = clinic(tmp_path, n=60, name="other")
    (other / "manifest.json").write_text(json.dumps({"embedkit_version": "x", "modalities": {}}))  # an extract
    before = table_snapshot(other)
    with pytest.raises(EmbedkitError, match="did not write"):
        project_embeddings(emb, other, dim=8, epochs=1)
    assert table_snapshot(other) == before
    proj = tmp_path / "proj"
    project_embeddings(emb, proj, dim=8, epochs=1)
    assert json.loads((proj / OUTPUT_MARKER).read_text())["command"] == "project"
    project_embeddings(emb, proj, dim=8, epochs=1, seed=1)  # its own output: replaced
    model = tmp_path / "model"
    shutil.copytree(two_models["a"], model)
    (model / OUTPUT_MARKER).write_text(json.dumps({"command": "train"}))
    (model / "manifest.json").write_text(json.dumps({"projected_from": "x"}))  # even with project's old marker
    with pytest.raises(EmbedkitError, match="holds the output of `embedkit train`"):
        project_embeddings(emb, model, dim=8, epochs=1)
    with pytest.raises(EmbedkitError, match="holds the output of `embedkit project`"):
        train(emb, proj, TrainConfig(labels=["dx"], fusion="logistic"))
    assert (model / "embedkit_model.json").is_file() and (proj / "manifest.json").is_file()


def _png(path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    return path


def test_a_bench_report_embeds_only_its_own_plots(tmp_path):
    from embedkit.report import build_report

    bench = tmp_path / "bench"
    bench.mkdir()
    _png(tmp_path / "outside.png")
    (tmp_path / "secret.txt").write_text("PATIENT SECRET")
    _png(bench / "ok.png")
    (bench / "notes.png").write_text("not a picture")
    (bench / "link.png").symlink_to(tmp_path / "outside.png")
    plots = ["ok.png", "../outside.png", str(tmp_path / "outside.png"), "link.png", "notes.png", "../secret.txt",
             "missing.png", 7]
    machine = dict.fromkeys(("cpu", "cores", "torch", "torch_threads", "matmul_gflops", "load_average_start",
                             "load_average_end"), 1)
    (bench / "bench.json").write_text(json.dumps({"preset": "p", "created": "now", "total_seconds": 1,
                                                  "machine": machine, "targets": [], "tables": [], "plots": plots}))
    page = build_report(bench).read_text()
    assert page.count("data:image/png;base64,") == 1 and 'alt="ok.png"' in page
    assert base64.b64encode(b"PATIENT SECRET").decode()[:12] not in page
    (bench / "bench.json").write_text(json.dumps({"plots": []}))  # edited: not the shape bench writes
    [r] = run_cli_batch([["report", bench]])
    assert_one_line_error(r, "bench.json is damaged or was edited")


# ---------------------------------------------------------------- 15, 16: counts and literal output


def test_counts_users_type_are_bounded(tmp_path):
    from embedkit.limits import fits_note

    emb = clinic(tmp_path, n=60)
    (tmp_path / "bad_model").mkdir()
    (tmp_path / "bad_model" / "metrics.json").write_text("[]")
    expected = {  # command -> what its one line says (the last three used to end in "this is a bug")
        ("train", emb, "--out", tmp_path / "m1", "--label", "dx", "--seeds", "100000"): "--seeds must lie between 1",
        ("train", emb, "--out", tmp_path / "m2", "--label", "dx", "--align-sweep", "0:1:1e-4"):
            "--align-sweep points must lie between",
        ("train", emb, "--out", tmp_path / "m4", "--label", "dx", "--cv", "1000"): "--cv must lie between 2 and 50",
        ("extract", tmp_path, "--out", tmp_path / "e", "--batch-size", "100000"): "--batch-size must lie",
        ("project", emb, "--out", tmp_path / "p", "--epochs", "-1"): "--epochs must lie between 1",
        ("train", emb, "--out", tmp_path / "m3", "--label", "dx", "--align-sweep", "0:nan:1"): "finite numbers",
        ("project", emb, "--out", tmp_path / "p", "--dim", "0"): "--dim must lie between 1",
        ("report", tmp_path / "bad_model"): "metrics.json is damaged or was edited",
    }
    for r, says in zip(run_cli_batch([list(c) for c in expected]), expected.values()):
        assert_one_line_error(r, says)
    assert not any((tmp_path / f"m{i}").exists() for i in range(1, 5))
    assert "100 model fits (5 seeds x 20" in fits_note(5, 20, "seeds") and fits_note(2, 3, "seeds") is None


WEIRD = "we[bold]ird [/x] $x^$ {0}"


def test_every_command_prints_paths_literally(dino, tmp_path):
    root = tmp_path / WEIRD
    data = root / "data [red]"
    data.mkdir(parents=True)
    for i in range(6):
        make_image(data / f"c{i}.png", i)
    emb, model, proj = root / "emb [/]", root / "model $a^$ [i]", root / "proj [b]"
    n = 90
    ids = np.array([f"p{i:03d}" for i in range(n)], dtype=object)
    x = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    y = np.array(["[red]a", "$b^$"] * (n // 2), dtype=object)
    write_embeddings(emb, "image", "m", ids, x + (y == "$b^$")[:, None], {"dx": y})
    write_embeddings(emb, "text", "m", ids, x, {"dx": y})
    results = run_cli_batch([
        ["extract", data, "--out", root / "ex [/]", "--image-model", dino, "--text-model", "none", "--no-progress"],
        ["train", emb, "--out", model, "--label", "dx", "--fusion", "logistic", "--bootstrap", "0"],
        ["predict", model, emb, "--out", root / "p [/].parquet"],
        ["evaluate", model, emb, "--allow-overlap"],
        ["report", model],
        ["gap", emb, "--out", root / "gap [/]"],
        ["project", emb, "--out", proj, "--dim", "4", "--epochs", "1"],
    ])
    for argv, r in zip(("extract", "train", "predict", "evaluate", "report", "gap", "project"), results):
        assert r["code"] == 0 and "Traceback" not in r["err"], (argv, r["err"][-1500:])
    assert str(root / "ex [/]") in results[0]["err"].replace("\n", "") or "ex [/]" in results[0]["err"]
    assert "[red]a" in (model / "report.html").read_text() or "[red]a" in results[1]["err"]
    assert "model $a^$ [i]" in "".join(r["err"] for r in results[1:5]).replace("\n", "")
    assert "proj [b]" in results[6]["err"].replace("\n", "")
