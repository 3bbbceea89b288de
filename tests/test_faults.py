"""Fault injection: kills at write points, a full disk, read-only folders, concurrent runs, tampered files.

Each attack asserts what a user sees (exit 2 and one `error:` line, no traceback) and that nothing
stored was lost or mixed. CLI failures run through `embedkit.cli.main` in one subprocess per batch
(RUNNER), so a corpus of bad inputs costs one interpreter start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

from embedkit.errors import EmbedkitError
from embedkit.extract import ExtractConfig, extract
from embedkit.guards import folder_lock
from embedkit.store import load_embeddings, part_files, read_embedding_table
from embedkit.train import TrainConfig, predict, train

from conftest import REPO, make_image
from test_train import clinic, write_embeddings

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# Runs several CLI command lines in one interpreter; prints [{code, err}, ...] as JSON on stdout.
RUNNER = textwrap.dedent("""
    import contextlib, io, json, sys
    from embedkit import cli
    results = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        sys.argv = ["embedkit", *argv]
        code = 0
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        results.append({"code": code, "err": err.getvalue()})
    print(json.dumps(results))
""")


def run_cli_batch(commands: list[list]) -> list[dict]:
    r = subprocess.run([sys.executable, "-c", RUNNER, json.dumps([[str(a) for a in c] for c in commands])],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_one_line_error(result: dict, *fragments: str) -> None:
    lines = [ln for ln in result["err"].splitlines() if ln.strip()]
    assert result["code"] == 2, result
    assert "Traceback" not in result["err"], result["err"]
    assert lines and lines[-1].startswith("error: "), result["err"]
    assert sum(ln.startswith("error:") for ln in lines) == 1
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])


def table_snapshot(out) -> dict:
    """Every stored row's id -> its vector's bytes, over every table under an extract folder."""
    snap = {}
    for d in sorted(p for p in out.glob("*__*") if p.is_dir()):
        t = read_embedding_table(d)
        assert len(set(t.ids)) == len(t.ids), f"duplicate ids in {d.name}"
        snap.update({f"{d.name}/{i}": t.embeddings[k].tobytes() for k, i in enumerate(t.ids)})
    return snap


def image_cfg(model, **kw) -> ExtractConfig:
    return ExtractConfig(image_model=str(model), text_model=None, progress=False, batch_size=4, **kw)


@pytest.fixture
def dino_copy(tiny_models, tmp_path):
    """A private copy of the tiny DINOv2 folder (same folder name, so the same table name)."""
    path = tmp_path / "models" / "tiny-dinov2"
    shutil.copytree(tiny_models["dinov2"], path)
    return path


def perturb_weights(model_dir) -> None:
    w = load_file(model_dir / "model.safetensors")
    name = sorted(w)[0]
    w[name] = w[name] + 0.01
    save_file(w, str(model_dir / "model.safetensors"))


# ---------------------------------------------------------------- extract: identity, deletion, locks


def test_encoder_identity_is_checked_on_every_resume(dino_copy, paired_folder, tmp_path):
    out = tmp_path / "emb"
    extract(paired_folder, out, image_cfg(dino_copy))
    before, manifest = table_snapshot(out), (out / "manifest.json").read_text()
    pristine = tmp_path / "pristine.safetensors"
    shutil.copy(dino_copy / "model.safetensors", pristine)

    perturb_weights(dino_copy)  # a re-saved model under the same name: nothing pending, then one new case
    with pytest.raises(EmbedkitError, match=r"another configuration \(weights \(model.safetensors changed\)\)"):
        extract(paired_folder, out, image_cfg(dino_copy))
    make_image(paired_folder / "new.jpg", 99)
    with pytest.raises(EmbedkitError, match="weights"):
        extract(paired_folder, out, image_cfg(dino_copy))
    shutil.copy(pristine, dino_copy / "model.safetensors")  # the stored encoder again
    with pytest.raises(EmbedkitError, match="pooling cls -> mean"):  # a setting that changes vectors
        extract(paired_folder, out, image_cfg(dino_copy, image_pooling="mean"))
    assert table_snapshot(out) == before and (out / "manifest.json").read_text() == manifest

    res = extract(paired_folder, out, image_cfg(dino_copy))  # the same encoder as stored: resumes
    assert res.modalities["image"].rows_embedded == 1 and len(table_snapshot(out)) == 9
    again = extract(paired_folder, out, image_cfg(dino_copy))  # nothing pending: the manifest names the stored model
    prov = json.loads((out / "manifest.json").read_text())["modalities"]["image"]["provenance"]
    assert again.modalities["image"].rows_embedded == 0
    assert prov["encoder_fingerprint"] == res.modalities["image"].provenance["encoder_fingerprint"]
    perturb_weights(dino_copy)
    res = extract(paired_folder, out, image_cfg(dino_copy, overwrite=True))
    assert res.modalities["image"].rows_embedded == 9


def test_pickle_only_model_folder_is_refused(dino_copy, paired_folder, tmp_path):
    (dino_copy / "model.safetensors").rename(dino_copy / "pytorch_model.bin")
    with pytest.raises(EmbedkitError, match="only pickle weights"):
        extract(paired_folder, tmp_path / "emb", image_cfg(dino_copy))


def test_mass_deletion_needs_prune(dino_copy, paired_folder, tmp_path):
    out, other = tmp_path / "emb", tmp_path / "other"
    extract(paired_folder, out, image_cfg(dino_copy))
    before = table_snapshot(out)
    other.mkdir()
    make_image(other / "one.jpg", 1)
    with pytest.raises(EmbedkitError, match="8 of the 8 rows stored .* --prune"):
        extract(other, out, image_cfg(dino_copy))
    assert table_snapshot(out) == before
    res = extract(other, out, image_cfg(dino_copy, prune=True))
    assert res.modalities["image"].rows_dropped == 8 and len(table_snapshot(out)) == 1


def test_lock_refuses_a_second_run_and_a_stale_lock_is_taken_over(dino_copy, paired_folder, tmp_path, capsys):
    out = tmp_path / "emb"
    cmd = ["extract", paired_folder, "--out", out, "--image-model", dino_copy, "--text-model", "none",
           "--no-progress", "--batch-size", "4"]
    with folder_lock(out / ".embedkit.lock", "test"):
        [held] = run_cli_batch([cmd])
    assert_one_line_error(held, "in use by another embedkit run", f"pid {os.getpid()}")
    assert not part_files(out / "image__tiny-dinov2")

    # a killed run's lock: the file names a dead pid and no process holds it
    (out / ".embedkit.lock").write_text(json.dumps({"pid": 2**22 + 7, "host": "h", "started": "then"}))
    res = extract(paired_folder, out, image_cfg(dino_copy))
    assert res.modalities["image"].rows_total == 8
    assert "took over the lock" in capsys.readouterr().err
    assert not (out / ".embedkit.lock").exists()


def test_two_extracts_started_together_never_store_a_row_twice(dino_copy, paired_folder, tmp_path):
    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "embedkit.cli", "extract", str(paired_folder), "--out", str(out), "--image-model",
           str(dino_copy), "--text-model", "none", "--no-progress", "--batch-size", "2"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results)[0] == 0
    for code, err in results:
        assert code == 0 or (code == 2 and "in use by another embedkit run" in err and "Traceback" not in err), err
    ok = next(err for code, err in results if code == 0)
    assert "dropped" in ok  # the summary always shows rows dropped
    snap = table_snapshot(out)
    assert len(snap) == 8


# ---------------------------------------------------------------- kills at write points

KILL = textwrap.dedent("""
    import os, signal, sys, importlib
    module, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    target = importlib.import_module(module)
    original, calls = getattr(target, name), {"n": 0}
    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9, at a chosen write
        return original(*a, **k)
    setattr(target, name, dying)
    exec(sys.argv[4])
""")


def run_killed(module: str, name: str, nth: int, code: str) -> None:
    r = subprocess.run([sys.executable, "-c", KILL, module, name, str(nth), code], env=ENV, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == -signal.SIGKILL, r.stderr[-1500:]


def test_kill_during_retrain_leaves_the_old_model_whole(tmp_path):
    emb = clinic(tmp_path, n=120)
    model = tmp_path / "model"
    train(emb, model, TrainConfig(labels=["dx"], fusion="logistic"))
    old_info = (model / "embedkit_model.json").read_text()
    # the retrain (another label set: other classes) dies after its weights are written, before its JSON
    (tmp_path / "emb2").mkdir()
    emb2 = clinic(tmp_path, n=120, name="emb2", seed=3)
    run_killed("embedkit.train", "write_rows", 1, textwrap.dedent(f"""
        from embedkit.train import TrainConfig, train
        train({str(emb2)!r}, {str(model)!r}, TrainConfig(labels=["dx"], fusion="logistic", seeds=1))
    """))
    assert (model / "embedkit_model.json").read_text() == old_info
    assert sorted(p.name for p in model.iterdir()) == sorted(os.listdir(model))  # readable
    r = predict(model, emb, tmp_path / "p.parquet")
    assert r["rows"] == 120
    train(emb2, model, TrainConfig(labels=["dx"], fusion="logistic"))  # the next run cleans up and replaces
    assert not any(p.name.startswith(".model.") and p.name != ".model.lock" for p in tmp_path.iterdir())


def test_kill_during_pretrain_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    import torch

    from test_shared_encoder import make_pairs, recipe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed subprocess runs: the same arithmetic, bit for bit

    kw = dict(batch_size=4, seed=3, val_fraction=0.25)
    (tmp_path / "img").mkdir()
    from embedkit.shared_encoder.train import checkpoint_folder
    items = make_pairs(tmp_path / "img")
    from embedkit.shared_encoder import pretrain

    pretrain(items, tmp_path / "ref", recipe(epochs=3, **kw), progress=False)
    # dies while writing the checkpoint of epoch 2 (weights + optimiser state, one save_file call)
    code = textwrap.dedent(f"""
        import torch; torch.set_num_threads(1)
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_shared_encoder import make_pairs, recipe
        from pathlib import Path
        from embedkit.shared_encoder import pretrain
        pretrain(make_pairs(Path({str(tmp_path / 'img')!r})), {str(tmp_path / 'run')!r},
                 recipe(epochs=3, batch_size=4, seed=3, val_fraction=0.25), progress=False)
    """)
    run_killed("embedkit.shared_encoder.train", "save_file", 2, code)
    state = json.loads((checkpoint_folder(tmp_path / "run") / "train_state.json").read_text())
    assert state["epoch"] == 1  # the whole epoch-1 checkpoint, not epoch-2 weights with epoch-1 state
    pretrain(items, tmp_path / "run", recipe(epochs=3, **kw), progress=False)
    torch.set_num_threads(threads)
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)


def test_kill_during_projection_keeps_the_earlier_output(tmp_path):
    from embedkit.shared_encoder.project import project_embeddings

    emb = clinic(tmp_path, n=60)
    out = tmp_path / "proj"
    project_embeddings(emb, out, dim=8, epochs=3)
    before = table_snapshot(out)
    run_killed("embedkit.store", "write_json_atomic", 1, textwrap.dedent(f"""
        from embedkit.shared_encoder.project import project_embeddings
        project_embeddings({str(emb)!r}, {str(out)!r}, dim=8, epochs=3, seed=1)
    """))
    assert table_snapshot(out) == before
    project_embeddings(emb, out, dim=8, epochs=3, seed=1)  # re-running replaces; never appends
    after = table_snapshot(out)
    assert len(after) == len(before) and after != before


def test_kill_after_parts_before_manifest_resumes_without_duplicates(dino_copy, paired_folder, tmp_path):
    out = tmp_path / "emb"
    run_killed("embedkit.extract", "write_errors", 1, textwrap.dedent(f"""
        from embedkit.extract import ExtractConfig, extract
        extract({str(paired_folder)!r}, {str(out)!r}, ExtractConfig(image_model={str(dino_copy)!r},
                text_model=None, progress=False, batch_size=4))
    """))
    res = extract(paired_folder, out, image_cfg(dino_copy))
    assert res.modalities["image"].rows_embedded == 0 and len(table_snapshot(out)) == 8


# ---------------------------------------------------------------- full disk, read-only, file-valued folders


@pytest.fixture
def small_mount(tmp_path):
    """A 2 MiB tmpfs (root only); skipped where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder) -> None:
    try:
        with open(folder / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    except OSError:
        pass


def test_full_disk_and_read_only_folders(small_mount, tmp_path, dino_copy, paired_folder):
    emb = clinic(tmp_path, n=90)
    model = small_mount / "model"
    train(emb, model, TrainConfig(labels=["dx"], fusion="logistic"))
    out = small_mount / "emb"
    extract(paired_folder, out, image_cfg(dino_copy))
    stored = table_snapshot(out)
    make_image(paired_folder / "extra.jpg", 42)
    fill(small_mount)
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], check=True)
    try:
        results = run_cli_batch([
            ["train", emb, "--out", model, "--label", "dx", "--fusion", "logistic"],
            ["extract", paired_folder, "--out", out, "--image-model", dino_copy, "--text-model", "none",
             "--no-progress"],
            ["train", emb, "--out", ro / "model", "--label", "dx", "--fusion", "logistic"],
            ["extract", paired_folder, "--out", ro / "emb", "--image-model", dino_copy, "--text-model", "none"],
        ])
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)
    assert_one_line_error(results[0], "disk is full")
    assert_one_line_error(results[1], "disk is full")
    assert_one_line_error(results[2], "Read-only file system")
    assert_one_line_error(results[3], "Read-only file system")
    (small_mount / "filler").unlink()
    assert table_snapshot(out) == stored  # nothing stored was lost
    assert predict(model, emb, tmp_path / "p.parquet")["rows"] == 90  # the old model is whole


def test_file_valued_out_fails_before_the_fit(tmp_path):
    emb = clinic(tmp_path, n=90)
    (tmp_path / "afile").write_text("x")
    [r] = run_cli_batch([["train", emb, "--out", tmp_path / "afile", "--label", "dx", "--fusion", "late"]])
    assert_one_line_error(r, "is a file, not a folder")
    assert "groups:" not in r["err"]  # refused before the data was even loaded


# ---------------------------------------------------------------- bit rot and a corpus of bad Parquet


def _flip_in_embedding_page(part) -> None:
    """Flip 2 bytes inside the embedding page where a reader without checksums silently gets other values."""
    meta = pq.ParquetFile(part).metadata.row_group(0)
    col = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema.startswith("embedding"))
    original = part.read_bytes()
    clean = pq.read_table(part).column("embedding").to_pylist()
    for pos in range(col.data_page_offset + col.total_compressed_size - 8, col.data_page_offset + 16, -1):
        raw = bytearray(original)
        raw[pos] ^= 0x01
        raw[pos + 1] ^= 0x01
        part.write_bytes(bytes(raw))
        try:
            values = pq.read_table(part, page_checksum_verification=False).column("embedding").to_pylist()
        except Exception:  # noqa: BLE001 - this flip broke decompression: try the next byte
            continue
        if values != clean:
            return  # silent corruption without checksums: the attack the checksums must catch
    raise AssertionError("no silent flip found")


def bad_parquet_corpus(tmp_path) -> dict:
    """name -> an extract folder whose image table holds one bad part."""
    ids = np.array([f"p{i}" for i in range(40)], dtype=object)
    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    cols = {"dx": np.array(["a", "b"] * 20, dtype=object)}
    corpus = {}

    def make(name, damage):
        out = tmp_path / "bad" / name
        write_embeddings(out, "image", "m", ids, x, cols)
        write_embeddings(out, "text", "m", ids, x, cols)
        damage(part_files(out / "image__m")[0])
        corpus[name] = out

    make("bit_flip", _flip_in_embedding_page)
    make("zero_bytes", lambda p: p.write_bytes(b""))
    make("truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))
    make("not_parquet", lambda p: p.write_text("id,embedding\n1,2\n"))

    def rewrite(p, table):
        pq.write_table(table, p)

    make("no_id_column", lambda p: rewrite(p, pq.read_table(p).drop_columns(["id"])))
    make("no_embedding_column", lambda p: rewrite(p, pq.read_table(p).drop_columns(["embedding"])))
    make("bad_provenance_json", lambda p: rewrite(p, pq.read_table(p).replace_schema_metadata({"embedkit": "{oops"})))
    make("provenance_not_object", lambda p: rewrite(p, pq.read_table(p).replace_schema_metadata({"embedkit": "[1]"})))
    make("no_provenance", lambda p: rewrite(p, pq.read_table(p).replace_schema_metadata(None)))
    make("string_embedding", lambda p: rewrite(p, pq.read_table(p).set_column(
        3, "embedding", pa.array(["x"] * 40)).replace_schema_metadata(pq.read_schema(p).metadata)))
    return corpus


def test_bad_parquet_corpus_ends_in_one_line(tmp_path):
    corpus = bad_parquet_corpus(tmp_path)
    for name, out in corpus.items():
        with pytest.raises(EmbedkitError):
            load_embeddings(out)
    results = run_cli_batch([["train", out, "--out", tmp_path / f"m_{name}", "--label", "dx"]
                             for name, out in corpus.items()])
    for (name, _), r in zip(corpus.items(), results):
        assert_one_line_error(r)
        assert not (tmp_path / f"m_{name}").exists(), name
    assert "damaged" in results[0]["err"]  # the flipped bits were noticed (page checksums)


# ---------------------------------------------------------------- tampered model folders


def _edit_json(path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _nan_weights(folder) -> None:
    w = load_file(folder / "model.safetensors")
    name = next(k for k in sorted(w) if k.startswith("model."))
    w[name][..., 0] = float("nan")
    save_file(w, str(folder / "model.safetensors"))


def _cuda_trained(folder) -> None:
    _edit_json(folder / "estimator.json", lambda d: d["params"].update(device="cuda"))


TAMPERS = {
    "weights_zero_bytes": lambda f: (f / "model.safetensors").write_bytes(b""),
    "weights_truncated": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-64]),
    "weights_header_garbage": lambda f: (f / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json!!}xxxx"),
    "weights_missing": lambda f: (f / "model.safetensors").unlink(),
    "weights_nan": _nan_weights,
    "estimator_not_json": lambda f: (f / "estimator.json").write_text("{"),
    "estimator_list": lambda f: (f / "estimator.json").write_text("[]"),
    "late_hidden_dim_absurd": lambda f: _edit_json(f / "estimator.json",
                                                   lambda d: d["params"].update(late_hidden_dim=300000)),
    "modality_dims_wrong": lambda f: _edit_json(f / "estimator.json", lambda d: d.update(modality_dims=[9, 16])),
    "params_missing": lambda f: _edit_json(f / "estimator.json", lambda d: d.pop("params")),
    "info_not_json": lambda f: (f / "embedkit_model.json").write_text("nope"),
    "info_missing_key": lambda f: _edit_json(f / "embedkit_model.json", lambda d: d.pop("classes")),
    "info_other_classes": lambda f: _edit_json(f / "embedkit_model.json",
                                               lambda d: d.update(classes=["x", "y", "z"])),
    "info_kind_wrong": lambda f: _edit_json(f / "embedkit_model.json", lambda d: d.update(kind="logistic")),
    "format_wrong": lambda f: _edit_json(f / "estimator.json", lambda d: d.update(format="pickle")),
    "n_features_wrong": lambda f: _edit_json(f / "estimator.json", lambda d: d.update(n_features_in=7)),
}


def test_tampered_logistic_folder_is_refused_before_use(tmp_path):
    emb = clinic(tmp_path, n=90)
    good = tmp_path / "model"
    train(emb, good, TrainConfig(labels=["dx"], fusion="logistic"))
    _edit_json(good / "estimator.json", lambda d: d.update(n_features_in=7))
    with pytest.raises(EmbedkitError, match="disagree"):
        predict(good, emb, tmp_path / "p.parquet")


def test_predict_and_evaluate_pick_among_several_models(tmp_path):
    rng = np.random.default_rng(0)
    n = 90
    ids = np.array([f"p{i:03d}" for i in range(n)], dtype=object)
    y = np.array(["a", "b", "c"] * (n // 3), dtype=object)
    x = (rng.normal(size=(n, 8)) + (np.arange(n) % 3)[:, None]).astype(np.float32)
    emb = tmp_path / "emb"
    for name in ("enc1", "enc2"):
        write_embeddings(emb, "image", name, ids, x, {"dx": y})
    write_embeddings(emb, "text", "t", ids, x, {"dx": y})
    model = tmp_path / "model"
    train(emb, model, TrainConfig(labels=["dx"], fusion="image", epochs=3, models={"image": "enc1"}))
    out = tmp_path / "p"
    results = run_cli_batch([
        ["predict", model, emb, "--out", out / "own.parquet"],  # the model's own encoder, picked for it
        ["predict", model, emb, "--out", out / "chosen.parquet", "--image-model", "enc1"],
        ["predict", model, emb, "--out", out / "other.parquet", "--image-model", "enc2"],
        ["evaluate", model, emb, "--image-model", "enc1", "--allow-overlap"],
    ])
    assert results[0]["code"] == 0 and results[1]["code"] == 0, results[:2]
    assert_one_line_error(results[2], "another encoder")
    assert results[3]["code"] == 0, results[3]
    assert pq.read_table(out / "own.parquet").equals(pq.read_table(out / "chosen.parquet"))


def test_tampered_model_folders_end_in_one_line(tmp_path):
    emb = clinic(tmp_path, n=90)
    good = tmp_path / "model"
    train(emb, good, TrainConfig(labels=["dx"], fusion="late", epochs=2, late_hidden_dim=8))
    commands = []
    for name, tamper in TAMPERS.items():
        folder = tmp_path / "tampered" / name
        shutil.copytree(good, folder)
        tamper(folder)
        commands.append(["predict", folder, emb, "--out", tmp_path / f"{name}.parquet"])
    cuda = tmp_path / "tampered" / "cuda"
    shutil.copytree(good, cuda)
    _cuda_trained(cuda)
    commands.append(["predict", cuda, emb, "--out", tmp_path / "cuda.parquet"])
    results = run_cli_batch(commands)
    for name, r in zip(TAMPERS, results):
        assert_one_line_error(r)
        assert not (tmp_path / f"{name}.parquet").exists(), name
    assert "non-finite" in results[list(TAMPERS).index("weights_nan")]["err"]
    assert "disagree" in results[list(TAMPERS).index("late_hidden_dim_absurd")]["err"]
    assert results[-1]["code"] == 0, results[-1]["err"]  # a GPU-trained model loads on a CPU machine
    expect = pq.read_table(predict(good, emb, tmp_path / "good.parquet")["out"]).to_pandas()
    got = pq.read_table(tmp_path / "cuda.parquet").to_pandas()
    assert (expect["predicted"] == got["predicted"]).all()


# ---------------------------------------------------------------- inputs that used to end in tracebacks


def test_odd_inputs_end_in_one_line_or_work(tmp_path, dino_copy, paired_folder, tiny_models):
    from embedkit.items import SourceOptions
    from embedkit.sources import scan_source

    # a 200 KB CSV field is one field
    (tmp_path / "t.csv").write_text("id,report,dx\na," + "word " * 40000 + ",x\nb,short,y\n")
    scan = scan_source(tmp_path, SourceOptions(metadata=tmp_path / "t.csv", id_col="id", text_col="report"))
    assert len(scan.items) == 2

    # a huge (sparse) report is skipped and recorded, never read whole
    big = paired_folder / "ward_a" / "cases" / "case01.txt"
    with open(big, "r+b") as f:
        f.truncate(64 * 2**20)
    res = extract(paired_folder, tmp_path / "emb", ExtractConfig(image_model=None, text_model=str(tiny_models["bert"]),
                                                                 progress=False, max_report_bytes=2**20))
    assert any("larger than" in s.reason for s in res.skipped) and res.modalities["text"].rows_total == 7

    emb = clinic(tmp_path, n=90, name="emb_c")
    weird = tmp_path / "we[left]ird[/]"
    results = run_cli_batch([
        ["extract", weird, "--out", tmp_path / "o"],  # rich markup in a path
        ["predict", tmp_path / "no[bold]model", emb, "--out", tmp_path / "x.parquet"],
        ["train", emb, "--out", tmp_path / "m", "--label", "nolabel"],
    ])
    assert_one_line_error(results[0], "[left]ird[/]")
    assert_one_line_error(results[1], "no[bold]model")
    assert_one_line_error(results[2], "nolabel")


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(tmp_path):
    code = textwrap.dedent("""
        import contextlib, io, json, sys, traceback
        from embedkit import cli
        import embedkit.fusion.gap as gap
        def broken(*a, **k):
            raise ZeroDivisionError("division by zero")
        gap.gap_report_for_folder = broken
        results = []
        for argv in (["gap", sys.argv[1]], ["--debug", "gap", sys.argv[1]]):
            sys.argv, err, code = ["embedkit", *argv], io.StringIO(), 0
            with contextlib.redirect_stderr(err):
                try:
                    cli.main()
                except SystemExit as e:
                    code = e.code
                except ZeroDivisionError:
                    code, _ = 1, traceback.print_exc()
            results.append({"code": code, "err": err.getvalue()})
        print(json.dumps(results))
    """)
    emb = tmp_path / "emb"
    emb.mkdir()
    r = subprocess.run([sys.executable, "-c", code, str(emb)], env=ENV, capture_output=True, text=True, timeout=120)
    plain, debug = json.loads(r.stdout.strip().splitlines()[-1])
    assert_one_line_error(plain, "unexpected ZeroDivisionError", "--debug")
    assert debug["code"] != 0 and "Traceback" in debug["err"]


def test_a_folder_embedkit_did_not_write_is_never_replaced(tmp_path):
    emb = clinic(tmp_path, n=90)
    mine = tmp_path / "my documents"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(EmbedkitError, match="did not write"):
        train(emb, mine, TrainConfig(labels=["dx"], fusion="logistic"))
    from embedkit.shared_encoder.project import project_embeddings

    with pytest.raises(EmbedkitError, match="did not write"):
        project_embeddings(emb, mine, dim=8, epochs=1)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_cv_with_a_one_row_class_and_dollar_labels(tmp_path):
    n = 90
    ids = np.array([f"p{i:03d}" for i in range(n)], dtype=object)
    x = np.random.default_rng(1).normal(size=(n, 8)).astype(np.float32)
    y = np.array(["$a", "x$^$"] * (n // 2), dtype=object)  # "$^$" is invalid matplotlib math
    y[0] = "$lonely"
    out = tmp_path / "emb"
    write_embeddings(out, "image", "m", ids, x, {"dx": y})
    write_embeddings(out, "text", "m", ids, x, {"dx": y})
    results = run_cli_batch([
        ["train", out, "--out", tmp_path / "cv", "--label", "dx", "--fusion", "logistic", "--cv", "3"],
    ])
    assert_one_line_error(results[0], "$lonely")
    y[0] = "$a"
    out2 = tmp_path / "emb2"
    write_embeddings(out2, "image", "m", ids, x, {"dx": y})
    write_embeddings(out2, "text", "m", ids, x, {"dx": y})
    train(out2, tmp_path / "model", TrainConfig(labels=["dx"], fusion="logistic"))
    from embedkit.report import build_report

    html = build_report(tmp_path / "model", None, None).read_text()
    assert "x$^$" in html
