"""What goes into extract, and what the store keeps of it: groups, the embedded text, paths kept inside the
data folder, labels that follow an edited table, repeated ids, and a manifest's leakage fields."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedkit.errors import EmbedkitError
from embedkit.extract import ExtractConfig, extract
from embedkit.items import SourceOptions
from embedkit.manifests import load_manifest
from embedkit.sources import scan_source
from embedkit.store import part_files, read_embedding_table

from conftest import REPO, make_image

OUTSIDE = "outside the data folder"


def _cfg(tiny_models, **kw) -> ExtractConfig:
    kw.setdefault("image_model", str(tiny_models["dinov2"]))
    kw.setdefault("text_model", str(tiny_models["bert"]))
    return ExtractConfig(progress=False, **kw)


def _write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "embedkit.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def _provenance(directory: Path) -> dict:
    return json.loads(pq.read_schema(part_files(directory)[0]).metadata[b"embedkit"])


def _errors(out: Path) -> list[dict]:
    return pq.read_table(out / "errors.parquet").to_pylist()


# ---------------------------------------------------------------- groups and stored text

def test_group_column_and_the_embedded_text_are_stored(tiny_models, tmp_path):
    root = tmp_path / "clinic"
    (root / "reports").mkdir(parents=True)
    (root / "reports" / "a.txt").write_text("  Findings: left lobe opacity.\n\n")
    (root / "reports" / "b.txt").write_text("Findings: clear.")
    (root / "reports" / "c.txt").write_text("\ufeffFindings: mild effusion, right.")  # a BOM is not text
    _write_csv(root / "meta.csv", [
        {"id": "a", "patient": "P1", "report": "reports/a.txt", "dx": "1", "site": "x"},
        {"id": "b", "patient": "P1", "report": "reports/b.txt", "dx": "0", "site": "y"},
        {"id": "c", "patient": "", "report": "reports/c.txt", "dx": "1", "site": "x"}])
    src = SourceOptions(metadata=root / "meta.csv", id_col="id", text_file_col="report", label_cols=["dx"],
                        group_col="patient")
    out = tmp_path / "emb"
    extract(root, out, _cfg(tiny_models), source=src)
    directory = out / "text__tiny-bert"
    t = read_embedding_table(directory)
    by_id = {i: n for n, i in enumerate(t.ids)}
    assert [t.columns["group"][by_id[i]] for i in "abc"] == ["P1", "P1", None]  # an empty cell is no group
    assert [t.columns["text"][by_id[i]] for i in "abc"] == [
        "Findings: left lobe opacity.", "Findings: clear.", "Findings: mild effusion, right."]
    schema = pq.read_schema(part_files(directory)[0])
    assert "patient" not in schema.names  # the group column is not also a metadata column
    assert str(schema.field("group").type) == str(schema.field("text").type) == "string"
    prov = _provenance(directory)
    assert prov["group_col"] == "patient" and prov["metadata_columns"] == ["site"] and prov["label_columns"] == ["dx"]

    # the stored text is what the encoder embedded: embedding it again gives the stored vector
    from embedkit.encoders import create_encoder, resolve_spec

    encoder = create_encoder(resolve_spec(str(tiny_models["bert"]), "text"), "text", device="cpu")
    for i in "abc":
        again, _ = encoder.embed([t.columns["text"][by_id[i]]])
        np.testing.assert_allclose(again[0], t.embeddings[by_id[i]], atol=1e-5)


def test_folder_layouts_have_no_group_and_image_tables_no_text(tiny_models, paired_folder, tmp_path):
    out = tmp_path / "emb"
    extract(paired_folder, out, _cfg(tiny_models))
    image, text = read_embedding_table(out / "image__tiny-dinov2"), read_embedding_table(out / "text__tiny-bert")
    assert image.columns["group"] == [None] * 8 and "text" not in image.columns
    report = (paired_folder / "ward_a" / "cases" / "case01.txt").read_text()
    assert text.columns["text"][text.ids.index("ward_a/cases/case01")] == report.strip()
    assert _provenance(out / "image__tiny-dinov2")["group_col"] is None


def test_empty_group_cells_are_no_group(tmp_path):
    rows = [{"id": str(i), "text": "x", "patient": g} for i, g in enumerate(["", "  ", None, float("nan"), 12, " P7 "])]
    scan = scan_source(tmp_path, SourceOptions(id_col="id", text_col="text", group_col="patient"), rows=rows)
    assert [it.group for it in scan.items] == [None, None, None, None, "12", "P7"]


def test_group_col_must_be_a_column(tmp_path):
    _write_csv(tmp_path / "m.csv", [{"id": "a", "text": "x"}])
    with pytest.raises(EmbedkitError, match=r"column 'patient' \(--group-col\) is not in the table"):
        scan_source(tmp_path, SourceOptions(metadata=tmp_path / "m.csv", id_col="id", text_col="text",
                                            group_col="patient"))


# ---------------------------------------------------------------- paths stay inside DATA

@pytest.fixture
def escaping_table(tmp_path) -> tuple[Path, Path]:
    """DATA with one good image and paths that all lead to real files outside it."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "a").mkdir(parents=True)
    outside.mkdir()
    make_image(data / "in.jpg", 1)
    make_image(outside / "x.jpg", 2)
    (outside / "r.txt").write_text("a report outside the data folder")
    (data / "link.jpg").symlink_to(outside / "x.jpg")
    (data / "in.txt").write_text("a report inside")
    _write_csv(data / "meta.csv", [
        {"id": "good", "image": "in.jpg", "report": "in.txt"},
        {"id": "absolute_inside", "image": str(data / "in.jpg"), "report": ""},
        {"id": "dotdot", "image": "../outside/x.jpg", "report": "../outside/r.txt"},
        {"id": "absolute", "image": str(outside / "x.jpg"), "report": str(outside / "r.txt")},
        {"id": "collapsed", "image": "a/../../outside/x.jpg", "report": ""},
        {"id": "symlink", "image": "link.jpg", "report": ""}])
    return data, outside


def test_table_paths_outside_the_data_folder_are_skipped(escaping_table):
    data, _ = escaping_table
    scan = scan_source(data, SourceOptions(metadata=data / "meta.csv", id_col="id", image_col="image",
                                           text_file_col="report"))
    images = {it.id for it in scan.items if it.image_path is not None}
    reports = {it.id for it in scan.items if it.text_path is not None}
    assert images == {"good", "absolute_inside"} and reports == {"good"}
    outside = sorted((s.id, s.stage) for s in scan.skipped if s.reason == OUTSIDE)
    assert outside == sorted([(i, "scan") for i in ("dotdot", "absolute", "collapsed", "symlink")]
                             + [("dotdot", "scan"), ("absolute", "scan")])  # their report paths too


def test_outside_paths_end_up_in_errors_parquet(tiny_models, escaping_table, tmp_path):
    data, _ = escaping_table
    out = tmp_path / "emb"
    extract(data, out, _cfg(tiny_models, text_model=None),
            source=SourceOptions(metadata=data / "meta.csv", id_col="id", image_col="image"))
    assert sorted(read_embedding_table(out / "image__tiny-dinov2").ids) == ["absolute_inside", "good"]
    assert sorted(e["id"] for e in _errors(out) if e["reason"] == OUTSIDE) == [
        "absolute", "collapsed", "dotdot", "symlink"]


def test_folder_scan_skips_symlinks_out_of_the_data_folder(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    data.mkdir()
    make_image(data / "in.jpg", 1)
    make_image(outside / "x.jpg", 2)
    make_image(outside / "sub" / "y.jpg", 3)
    (data / "link.jpg").symlink_to(outside / "x.jpg")
    (data / "linkdir").symlink_to(outside / "sub", target_is_directory=True)
    make_image(data / "other.jpg", 4)
    (data / "inner.jpg").symlink_to(data / "other.jpg")  # a symlink within DATA is fine
    scan = scan_source(data)
    assert sorted(it.id for it in scan.items) == ["in", "inner", "other"]
    assert [(s.path, s.reason) for s in scan.skipped if s.reason == OUTSIDE] == [("link.jpg", OUTSIDE)]


@pytest.mark.parametrize("column", ["image", "report"])
def test_a_path_column_naming_no_existing_file_is_an_error(tmp_path, column):
    _write_csv(tmp_path / "m.csv", [{"id": str(i), "image": f"imgs/{i}.jpg", "report": f"txt/{i}.txt"}
                                    for i in range(3)])
    opts = SourceOptions(metadata=tmp_path / "m.csv", id_col="id",
                         **{"image_col" if column == "image" else "text_file_col": column})
    with pytest.raises(EmbedkitError) as e:
        scan_source(tmp_path, opts)
    example = "imgs/0.jpg" if column == "image" else "txt/0.txt"
    assert f"none of the 3 paths in column '{column}' is a file" in str(e.value) and f"'{example}'" in str(e.value)
    assert "\n" not in str(e.value)
    (tmp_path / example).parent.mkdir()  # one file that exists: a partial table is recorded, not refused
    (tmp_path / example).write_bytes(b"x")
    scan = scan_source(tmp_path, opts)
    assert len(scan.items) == 1 and len(scan.skipped) == 2


# ---------------------------------------------------------------- labels follow the table

def _rows(**edits) -> list[dict]:
    rows = [{"id": k, "patient": f"P{n // 2}", "text": f"report {k}: " + "opacity " * n, "dx": str(n % 2),
             "site": "ab"[n % 2], "split": "train"} for n, k in enumerate("abcdef")]
    for k, change in edits.items():
        rows["abcdef".index(k)].update(change)
    return rows


def _stored(directory: Path) -> dict[str, dict]:
    t = read_embedding_table(directory)
    return {i: {**{c: v[n] for c, v in t.columns.items()}, "embedding": t.embeddings[n].tobytes()}
            for n, i in enumerate(t.ids)}


def _stat(directory: Path) -> dict[str, tuple]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in part_files(directory)}


def test_an_edited_table_relabels_stored_rows_without_re_embedding(tiny_models, tmp_path):
    table = tmp_path / "meta.csv"
    cfg = _cfg(tiny_models, image_model=None, rows_per_part=2, batch_size=2)

    def run(rows, **opts):
        _write_csv(table, rows)
        src = SourceOptions(metadata=table, id_col="id", text_col="text", label_cols=["dx"], split_col="split",
                            **{"group_col": "patient", **opts})
        return extract(tmp_path, tmp_path / "emb", cfg, source=src).modalities["text"]

    directory = tmp_path / "emb" / "text__tiny-bert"
    run(_rows())
    before, files = _stored(directory), _stat(directory)
    assert len(files) == 3

    # one label: one part rewritten, the others untouched; nothing embedded
    r = run(_rows(c={"dx": "9"}))
    assert (r.rows_embedded, r.rows_relabelled, r.rows_reused) == (0, 1, 6)
    after = _stored(directory)
    assert after["c"]["dx"] == 9 and {k: v for k, v in after.items() if k != "c"} == \
        {k: v for k, v in before.items() if k != "c"}
    assert after["c"]["embedding"] == before["c"]["embedding"]
    changed = [name for name, st in _stat(directory).items() if st != files[name]]
    assert len(changed) == 1

    # split and group edited, a column removed, another added: every part, embeddings byte-identical
    rows = [{k: v for k, v in row.items() if k != "site"} | {"ward": "w1"} for row in _rows(a={"patient": "P9"},
                                                                                               b={"split": "test"})]
    r = run(rows)
    assert (r.rows_embedded, r.rows_relabelled) == (0, 6)
    after = _stored(directory)
    assert after["a"]["group"] == "P9" and after["b"]["split"] == "test" and after["c"]["dx"] == 0
    assert all("site" not in v and v["ward"] == "w1" for v in after.values())
    assert all(after[k]["embedding"] == before[k]["embedding"] for k in before)
    prov = _provenance(directory)
    assert prov["metadata_columns"] == ["ward"] and prov["label_columns"] == ["dx"] and prov["group_col"] == "patient"
    assert all(json.loads(pq.read_schema(p).metadata[b"embedkit"])["metadata_columns"] == ["ward"]
               for p in part_files(directory))

    # nothing changed: nothing rewritten
    files = _stat(directory)
    r = run(rows)
    assert r.rows_relabelled == 0 and _stat(directory) == files

    # groups turned off, and a new row at the same time: the new row is embedded, the old ones relabelled
    r = run(rows + [{**rows[0], "id": "g", "text": "a new report"}], group_col=None)
    assert (r.rows_embedded, r.rows_relabelled) == (1, 6)
    after = _stored(directory)
    assert all(v["group"] is None for v in after.values()) and _provenance(directory)["group_col"] is None
    assert all(after[k]["embedding"] == before[k]["embedding"] for k in before)
    schemas = {str(pq.read_schema(p).remove_metadata()) for p in part_files(directory)}
    assert len(schemas) == 1  # relabelled and new parts agree


def test_parts_written_before_group_and_text_existed_get_them(tiny_models, tmp_path):
    _write_csv(tmp_path / "meta.csv", _rows())
    src = SourceOptions(metadata=tmp_path / "meta.csv", id_col="id", text_col="text", group_col="patient")
    out = tmp_path / "emb"
    extract(tmp_path, out, _cfg(tiny_models, image_model=None), source=src)
    directory = out / "text__tiny-bert"
    before = _stored(directory)
    for p in part_files(directory):  # an output of the previous embedkit
        pq.write_table(pq.read_table(p).drop_columns(["group", "text"]), p)
    r = extract(tmp_path, out, _cfg(tiny_models, image_model=None), source=src).modalities["text"]
    assert r.rows_embedded == 0
    assert _stored(directory) == before


RELABEL_KILL = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from embedkit import store
    from embedkit.extract import ExtractConfig, extract
    from embedkit.items import SourceOptions
    root, out, model = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    src = SourceOptions(metadata=root / "meta.csv", id_col="id", text_col="text", label_cols=["dx"])
    cfg = ExtractConfig(image_model=None, text_model=model, rows_per_part=2, batch_size=2, progress=False)
    def half_then_die(table, where, **kw):  # a kill -9 in the middle of rewriting a part
        Path(where).write_bytes(b"PAR1 half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    store.pq.write_table = half_then_die
    extract(root, out, cfg, source=src)
""")


def test_kill_9_while_relabelling_leaves_whole_parts(tiny_models, tmp_path):
    _write_csv(tmp_path / "meta.csv", _rows())
    src = SourceOptions(metadata=tmp_path / "meta.csv", id_col="id", text_col="text", label_cols=["dx"])
    cfg = _cfg(tiny_models, image_model=None, rows_per_part=2, batch_size=2)
    out = tmp_path / "emb"
    extract(tmp_path, out, cfg, source=src)
    directory = out / "text__tiny-bert"
    before = _stored(directory)
    _write_csv(tmp_path / "meta.csv", _rows(a={"dx": "5"}, f={"dx": "5"}))
    (tmp_path / "kill.py").write_text(RELABEL_KILL)
    proc = subprocess.run([sys.executable, tmp_path / "kill.py", tmp_path, out, tiny_models["bert"]],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert _stored(directory) == before  # every part whole, and as it was
    r = extract(tmp_path, out, cfg, source=src).modalities["text"]
    assert (r.rows_embedded, r.rows_relabelled) == (0, 2)
    after = _stored(directory)
    assert after["a"]["dx"] == after["f"]["dx"] == 5 and not list(directory.glob("*.tmp"))


# ---------------------------------------------------------------- columns named like embedkit's own

def test_table_columns_named_like_embedkit_columns(tmp_path):
    _write_csv(tmp_path / "m.csv", [{"id": "a", "note": "x", "split": "test", "group": "g1", "site": "s"}])
    scan = scan_source(tmp_path, SourceOptions(metadata=tmp_path / "m.csv", id_col="id", text_col="note"))
    assert scan.not_carried == ["group", "split"] and scan.items[0].meta == {"site": "s"}
    assert scan.items[0].split is None and scan.items[0].group is None  # a stray column is not the split
    with pytest.raises(EmbedkitError, match="label column 'group' has the name of one of embedkit's own columns"):
        scan_source(tmp_path, SourceOptions(metadata=tmp_path / "m.csv", id_col="id", text_col="note",
                                            label_cols=["group"]))


# ---------------------------------------------------------------- repeated ids

def test_many_repeated_ids_fail_a_few_are_recorded(tmp_path):
    rows = [{"patient_id": f"P{i}", "text": f"note {i}"} for i in range(200)]
    rows[5]["patient_id"] = rows[7]["patient_id"] = "P1"  # 2 of 200 rows: 1 %, recorded
    _write_csv(tmp_path / "m.csv", rows)
    opts = SourceOptions(metadata=tmp_path / "m.csv", id_col="patient_id", text_col="text")
    scan = scan_source(tmp_path, opts)
    assert scan.duplicate_ids == 2 and len(scan.items) == 198
    assert sum(s.reason.startswith("duplicate id") for s in scan.skipped) == 2
    rows[9]["patient_id"] = "P1"  # 3 of 200
    _write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(EmbedkitError) as e:
        scan_source(tmp_path, opts)
    assert str(e.value) == ("3 of 200 rows repeat an id in column 'patient_id': ids must be unique per row; for a "
                            "patient column use --group-col")
    make_image(tmp_path / "x.jpg", 0)  # no id column: the image path is the id, and two questions share one
    _write_csv(tmp_path / "q.csv", [{"image": "x.jpg", "question": q} for q in ("left?", "right?", "both?")])
    with pytest.raises(EmbedkitError, match=r"^2 of 3 rows repeat an id in column 'image' \(the id is the image "
                                            r"path\): ids must be unique per row; name a row id column with --id-col, "
                                            r"or pass --id-col @row to make each row its own sample \(2 of the "
                                            r"repeated rows come with different text or labels\)$"):
        scan_source(tmp_path, SourceOptions(metadata=tmp_path / "q.csv", image_col="image", text_col="question"))


def test_repeated_ids_are_counted_on_the_console_and_fail_the_cli(tiny_models, tmp_path, capsys):
    rows = [{"id": f"r{i}", "text": f"note {i}"} for i in range(200)]
    rows[3]["id"] = rows[4]["id"] = "r0"
    _write_csv(tmp_path / "few.csv", rows)
    extract(tmp_path, tmp_path / "emb", _cfg(tiny_models, image_model=None),
            source=SourceOptions(metadata=tmp_path / "few.csv", id_col="id", text_col="text"))
    assert "2 table rows dropped because their id repeats" in capsys.readouterr().err
    _write_csv(tmp_path / "many.csv", [{"patient_id": f"P{i // 3}", "text": "x"} for i in range(600)])
    r = _cli("extract", tmp_path, "--out", tmp_path / "emb2", "--metadata", tmp_path / "many.csv", "--id-col",
             "patient_id", "--text-col", "text", "--image-model", "none", "--no-progress")
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: 400 of 600 rows repeat an id in column 'patient_id': ids must be unique per row; for "
                      "a patient column use --group-col"]


# ---------------------------------------------------------------- a manifest's leakage fields

MANIFEST = """\
name = "clinic"
description = "notes"
license = "CC0"
access = "open"

[metadata]
files = ["meta.csv"]
columns = ["id", "patient", "age", "confirm", "grade", "text"]
id_col = "id"

[text]
template = "Age {age}.{TAIL}"

[[labels]]
name = "severe"
column = "grade"
task = "binary"
derive = { map = { "0" = 0, "1" = 0, "2" = 1 } }

[split]
group_col = "patient"

[leakage]
fields = ["confirm"]
"""


def _clinic(tmp_path, tail: str = "") -> Path:
    _write_csv(tmp_path / "data" / "meta.csv", [
        {"id": str(i), "patient": f"P{i // 2}", "age": str(40 + i), "confirm": "histo" if i % 2 else "follow_up",
         "grade": str(i % 3), "text": f"note {i}"} for i in range(4)])
    path = tmp_path / "clinic.toml"
    path.write_text(MANIFEST.replace("{TAIL}", tail))
    return path


def _scan_manifest(path: Path, root: Path, **override):
    m = load_manifest(path)
    opts = m.source_options()
    for k, v in override.items():
        setattr(opts, k, v)
    return scan_source(root, opts, rows=m.load_rows(root))


def test_a_template_naming_a_leakage_field_is_refused(tmp_path):
    path = _clinic(tmp_path, " Confirmed by {confirm}.")
    with pytest.raises(EmbedkitError, match=r"^the text template names 'confirm', listed as leaking") as e:
        _scan_manifest(path, tmp_path / "data")
    assert "--allow-leakage" in str(e.value) and "\n" not in str(e.value)
    scan = _scan_manifest(path, tmp_path / "data", allow_leakage=True)
    assert scan.items[1].text == "Age 41. Confirmed by histo."
    # a label's raw column is refused the same way (the label's name already is, at load time)
    with pytest.raises(EmbedkitError, match="names 'grade'"):
        _scan_manifest(_clinic(tmp_path), tmp_path / "data", text_template="Grade {grade}.")


def test_cli_manifest_group_default_override_and_leakage(tiny_models, tmp_path):
    path = _clinic(tmp_path)
    data, bert = tmp_path / "data", tiny_models["bert"]
    base = ("extract", data, "--manifest", path, "--image-model", "none", "--text-model", bert, "--no-progress")
    r = _cli(*base, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    t = read_embedding_table(tmp_path / "a" / "text__tiny-bert")
    assert t.columns["group"] == ["P0", "P0", "P1", "P1"] and "patient" not in t.columns  # [split].group_col
    r = _cli(*base, "--out", tmp_path / "a", "--group-col", "none")
    assert r.returncode == 0, r.stderr
    assert read_embedding_table(tmp_path / "a" / "text__tiny-bert").columns["group"] == [None] * 4
    assert "4 stored rows relabelled" in r.stderr  # the summary says what changed
    r = _cli(*base, "--out", tmp_path / "b", "--text-template", "Seen by {confirm}.")
    assert r.returncode == 2 and "error: the text template names 'confirm'" in r.stderr
    r = _cli(*base, "--out", tmp_path / "b", "--text-template", "Seen by {confirm}.", "--allow-leakage",
             "--group-col", "age")
    assert r.returncode == 0, r.stderr
    t = read_embedding_table(tmp_path / "b" / "text__tiny-bert")
    assert t.columns["text"][t.ids.index("1")] == "Seen by histo." and t.columns["group"][0] == "40"
