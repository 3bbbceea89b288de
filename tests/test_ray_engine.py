"""The Ray engine on a local 2-CPU Ray: the local engine's output, resume, bad inputs, a dying actor."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedkit.engines import ray as ray_engine
from embedkit.errors import EmbedkitError
from embedkit.extract import ExtractConfig, extract
from embedkit.store import part_files, read_embedding_table

from conftest import REPO, make_image

DIE_ONCE = "EMBEDKIT_TEST_DIE_ONCE"  # read by DyingEmbedder only, which lives in this test file


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A 2-CPU Ray for this module. Its workers can import this file (for DyingEmbedder) and know the marker."""
    pytest.importorskip("ray.data", reason="the Ray engine needs Ray: pip install 'embedkit[ray]'")
    import ray

    marker = tmp_path_factory.mktemp("ray") / "die-once"
    path = os.pathsep.join(p for p in (str(REPO), str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    with pytest.MonkeyPatch.context() as cache:  # driver and actors share one export cache (--backend)
        cache.setenv("EMBEDKIT_CACHE", str(tmp_path_factory.mktemp("export_cache")))
        with pytest.MonkeyPatch.context() as mp:  # workers inherit the environment Ray starts with
            mp.setenv("PYTHONPATH", path)
            mp.setenv(DIE_ONCE, str(marker))
            ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
        yield marker
        ray.shutdown()


class DyingEmbedder(ray_engine.Embedder):
    """Kills its actor's process on the first batch after the marker file appears, once."""

    def __call__(self, block):
        try:
            os.unlink(os.environ[DIE_ONCE])  # only one actor wins this
        except FileNotFoundError:
            return super().__call__(block)
        os._exit(1)


def _cfg(tiny_models, engine="local", **kw) -> ExtractConfig:
    kw.setdefault("image_model", str(tiny_models["dinov2"]))
    kw.setdefault("text_model", str(tiny_models["bert"]))
    kw.setdefault("batch_size", 3)  # several batches, so both actors work
    if engine == "ray":
        kw.setdefault("ray_actors", 2)
    return ExtractConfig(engine=engine, progress=False, **kw)


def _assert_same_output(a: Path, b: Path, same_order: bool = True) -> None:
    """Same rows (in the same order), same columns, same schema and provenance in every part, same errors."""
    datasets = sorted(d.name for d in a.glob("*__*"))
    assert datasets == sorted(d.name for d in b.glob("*__*"))
    for name in datasets:
        ta, tb = read_embedding_table(a / name), read_embedding_table(b / name)
        oa, ob = (np.arange(len(ta.ids)), np.arange(len(tb.ids))) if same_order else (np.argsort(ta.ids),
                                                                                      np.argsort(tb.ids))
        assert [ta.ids[i] for i in oa] == [tb.ids[i] for i in ob]
        np.testing.assert_allclose(ta.embeddings[oa], tb.embeddings[ob], atol=1e-5)
        for col, values in ta.columns.items():  # path, sha256, split, labels
            assert [values[i] for i in oa] == [tb.columns[col][i] for i in ob]
        schema = pq.read_schema(part_files(a / name)[0])
        assert all(pq.read_schema(p).equals(schema, check_metadata=True) for p in part_files(b / name))
    assert pq.read_table(a / "errors.parquet").to_pylist() == pq.read_table(b / "errors.parquet").to_pylist()


def test_ray_engine_equals_local_engine(local_ray, tiny_models, paired_folder, tmp_path):
    d = paired_folder / "ward_a" / "cases"
    (d / "empty.jpg").write_bytes(b"")
    (d / "notimage.png").write_text("hello")
    good = (d / "case01.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 3])
    shutil.copy(d / "case01.jpg", d / "copy01.jpg")  # same sha256: embedded once, written under both ids
    (d / "copy01.txt").write_text("   \n")  # an empty report
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    extract(paired_folder, local, _cfg(tiny_models))
    res = extract(paired_folder, on_ray, _cfg(tiny_models, engine="ray"))
    _assert_same_output(local, on_ray)
    assert res.modalities["image"].rows_embedded == 9 and res.modalities["image"].unique_inputs_embedded == 8
    errors = {(e["path"].split("/")[-1], e["stage"]) for e in pq.read_table(on_ray / "errors.parquet").to_pylist()}
    assert {("empty.jpg", "decode"), ("notimage.png", "decode"), ("truncated.jpg", "decode"),
            ("copy01.txt", "read")} <= errors


def test_a_dying_actor_is_restarted_and_resume_embeds_only_new_inputs(local_ray, tiny_models, paired_folder,
                                                                     tmp_path, monkeypatch):
    out = tmp_path / "emb"
    extract(paired_folder, out, _cfg(tiny_models, text_model=None))  # the local engine's rows are reused
    for i in range(20, 24):
        make_image(paired_folder / f"new{i}.png", i)
    (paired_folder / "broken.jpg").write_text("not an image")
    local_ray.touch()  # the first batch kills its actor
    monkeypatch.setattr(ray_engine, "Embedder", DyingEmbedder)
    res = extract(paired_folder, out, _cfg(tiny_models, engine="ray", text_model=None, batch_size=2))
    assert not local_ray.exists()  # an actor did die
    assert res.modalities["image"].rows_reused == 8 and res.modalities["image"].rows_embedded == 4
    extract(paired_folder, tmp_path / "fresh", _cfg(tiny_models, text_model=None))
    _assert_same_output(tmp_path / "fresh", out, same_order=False)  # every good input once, the broken one recorded


def test_without_ray_the_error_is_one_line(tiny_models, paired_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail as if it were not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(EmbedkitError, match=r"^--engine ray needs Ray Data: pip install 'embedkit\[ray\]'$"):
        extract(paired_folder, tmp_path / "emb", _cfg(tiny_models, engine="ray"))
    with pytest.raises(EmbedkitError, match="unknown engine 'spark'"):
        extract(paired_folder, tmp_path / "emb", _cfg(tiny_models, engine="spark"))


def test_ray_actors_run_the_backend_the_local_engine_runs(local_ray, tiny_models, paired_folder, tmp_path):
    pytest.importorskip("onnxruntime", reason="pip install 'embedkit[onnx]'")
    kw = dict(backend="onnxruntime", precision="fp32")
    extract(paired_folder, tmp_path / "local", _cfg(tiny_models, **kw))
    res = extract(paired_folder, tmp_path / "ray", _cfg(tiny_models, engine="ray", **kw))
    _assert_same_output(tmp_path / "local", tmp_path / "ray")
    for modality in ("image", "text"):
        prov = res.modalities[modality].provenance
        assert prov["backend"] == "onnxruntime" and prov["parity_min_cosine"] >= 0.9999


def test_dicom_frames_and_windows_reach_the_actors(local_ray, tiny_models, tmp_path):
    # each frame is its own row: an actor must decode the frame and window the driver planned, not the default
    from embedkit.bench.dicom_data import write_dicom
    from embedkit.items import SourceOptions

    rng = np.random.default_rng(1)
    frames = rng.integers(0, 4000, (4, 40, 40)).astype(np.uint16)
    write_dicom(tmp_path / "data" / "mf.dcm", frames, bits_stored=12, window=[(500, 400), (2000, 4000)])
    # one salt for both folders, so the patient pseudonyms (groups) match too
    source = SourceOptions(dicom_frames="all", dicom_window="2", dicom_salt_file=tmp_path / "salt.key")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    extract(tmp_path / "data", local, _cfg(tiny_models, text_model=None, batch_size=4), source=source)
    extract(tmp_path / "data", on_ray, _cfg(tiny_models, engine="ray", text_model=None, batch_size=4), source=source)
    _assert_same_output(local, on_ray)
    table = read_embedding_table(next(on_ray.glob("image__*")))
    assert sorted(table.ids) == [f"mf#frame{k}" for k in range(4)]
    assert len({v.tobytes() for v in table.embeddings}) == 4  # four frames, four vectors
