"""Data manifests: the shipped ones validate, bad ones fail with file/key/line, and real-looking layouts load."""

import csv
import gzip
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from embedkit.errors import EmbedkitError
from embedkit.manifests import ACCESS, find_manifest, list_manifests, load_manifest
from embedkit.templates import parse_template

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "data_manifests"
SHARED = Path(os.environ.get("EMBEDKIT_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
SHIPPED = ["brset", "ham10000", "iu_xray", "mimic_cxr", "vqa_rad"]


def write_csv(path: Path, rows: list[dict], gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def make_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 30)).save(path)


# --- the shipped manifests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_manifest_loads_and_is_consistent(name):
    m = load_manifest(MANIFESTS / f"{name}.toml")
    assert m.name == name and m.access in ACCESS and m.license and m.description and m.citation and m.obtain
    assert m.labels and m.modalities and m.leakage and m.split_recommended
    assert m.columns is not None and set(m.leakage_fields) <= set(m.columns)
    opts = m.source_options()
    assert opts.metadata is None and opts.label_cols == [lab.name for lab in m.labels]
    assert shipped_template_problems(m) == []


def shipped_template_problems(m) -> list[str]:
    """A shipped sentence may name no label column and no field its own manifest lists as leaking."""
    if not m.text_template:
        return []
    fields = parse_template(m.text_template).fields
    labels = {c for lab in m.labels for c in (lab.name, lab.column, *(lab.columns or ())) if c}
    return [f for f in fields if f in labels or f in m.leakage_fields]


def test_the_shipped_check_catches_a_template_naming_a_leakage_field():
    m = load_manifest(MANIFESTS / "ham10000.toml")
    m.text_template = "Patient diagnosed via {dx_type}. " + m.text_template  # the published sentence
    assert shipped_template_problems(m) == ["dx_type"]


def test_list_and_find_manifests(tmp_path):
    assert [m.name for m in list_manifests()] == SHIPPED
    assert (MANIFESTS / "SCHEMA.md").is_file()
    assert find_manifest("ham10000").name == "ham10000"
    assert find_manifest("VQA-RAD").name == "vqa_rad"
    assert find_manifest(str(MANIFESTS / "brset.toml")).name == "brset"
    with pytest.raises(EmbedkitError, match="no dataset manifest named 'nope'.*vqa_rad"):
        find_manifest("nope")
    with pytest.raises(EmbedkitError, match="not found"):
        find_manifest(tmp_path / "missing.toml")


# --- bad manifests: file, key and line ----------------------------------------------------------------------

GOOD = """\
name = "tiny"
description = "a tiny dataset"
license = "CC0"
access = "open"

[metadata]
files = ["meta.csv"]
columns = ["id", "age", "sex", "dx", "path"]
id_col = "id"

[[metadata.filters]]
column = "sex"
op = "notnull"

[image]
path_col = "path"

[text]
template = "Age {age}, sex {sex}."

[[labels]]
name = "dx"
column = "dx"
task = "multiclass"

[[labels]]
name = "mel"
column = "dx"
task = "binary"
derive = { map = { "mel" = 1 }, other = 0 }
"""

# (replace this, with that) -> the error must name this key; "# HERE" marks the line it must name
BAD = [
    ('id_col = "id"', 'id_col = "id"\ncolour = "red"  # HERE', "metadata.colour", "unknown key 'colour'"),
    ('access = "open"', 'access = "open"\nversion = 2  # HERE', "version", "unknown key 'version'"),
    ('access = "open"', 'access = "public"  # HERE', "access", "'public' is not one of: open, credentialed"),
    ('files = ["meta.csv"]', 'files = "meta.csv"  # HERE', "metadata.files", "must be a list of strings"),
    ('op = "notnull"', 'op = "contains"  # HERE', "metadata.filters[0].op", "'contains' is not one of"),
    ('task = "binary"', 'task = "ordinal"  # HERE', "labels[1].task", "'ordinal' is not one of"),
    ('template = "Age {age}, sex {sex}."', 'template = "Age {age}, weight {weight}."  # HERE', "text.template",
     "names column 'weight', which is not in metadata.columns"),
    ('template = "Age {age}, sex {sex}."', 'template = "Age {age}, {dx}."  # HERE', "text.template",
     "names the label column(s) dx"),
    ('template = "Age {age}, sex {sex}."', 'template = "Age {age"  # HERE', "text.template",
     "unclosed '{' at character 5"),
    ('derive = { map = { "mel" = 1 }, other = 0 }', 'derive = { map = { "mel" = 1, "nv" = 2 }, other = 0 }  # HERE',
     "labels[1].derive.map", "a binary label maps to 3 different values"),
    ('column = "sex"', 'column = "gender"  # HERE', "metadata.filters[0].column", "not in metadata.columns"),
    ('license = "CC0"\n', '', "(top level)", "missing required key 'license'"),
]


@pytest.mark.parametrize("old, new, key, problem", BAD)
def test_bad_manifest_names_file_key_and_line(tmp_path, old, new, key, problem):
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    lines = [n for n, line in enumerate(text.splitlines(), 1) if "# HERE" in line]
    with pytest.raises(EmbedkitError) as e:
        load_manifest(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}, line {lines[0] if lines else 1}, key {key}: "), msg
    assert problem in msg


def test_good_manifest_loads_and_syntax_error_names_line(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    assert load_manifest(path).name == "tiny"
    path.write_text(GOOD.replace('id_col = "id"', 'id_col = "id\n'))
    with pytest.raises(EmbedkitError, match=rf"^{path}, line 9: invalid TOML"):
        load_manifest(path)


def test_column_missing_from_data_names_manifest_key_line_and_data_file(tmp_path):
    text = GOOD.replace('columns = ["id", "age", "sex", "dx", "path"]\n', "")  # undeclared: checked on the data
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    write_csv(tmp_path / "data" / "meta.csv", [{"id": "a", "sex": "F", "dx": "mel", "path": "a.png"}])
    with pytest.raises(EmbedkitError) as e:
        load_manifest(path).load_rows(tmp_path / "data")
    line = text.splitlines().index('template = "Age {age}, sex {sex}."') + 1
    assert str(e.value) == (f"{path}, line {line}, key text.template: column 'age' is missing from data file "
                            f"meta.csv")
    with pytest.raises(EmbedkitError, match="data file meta.csv not found"):
        load_manifest(path).load_rows(tmp_path)


# --- layouts, on small generated folders --------------------------------------------------------------------

def test_ham10000_layout(tmp_path):
    rows = [
        {"lesion_id": "HAM_0000001", "image_id": "ISIC_0000001", "dx": "mel", "dx_type": "histo", "age": "80.0",
         "sex": "male", "localization": "back"},
        {"lesion_id": "HAM_0000001", "image_id": "ISIC_0000002", "dx": "mel", "dx_type": "histo", "age": "",
         "sex": "male", "localization": "back"},
        {"lesion_id": "HAM_0000002", "image_id": "ISIC_0000003", "dx": "nv", "dx_type": "follow_up",
         "age": "NaN", "sex": "unknown", "localization": "unknown"},
        {"lesion_id": "HAM_0000003", "image_id": "ISIC_0000004", "dx": "oops", "dx_type": "consensus",
         "age": "45", "sex": "female", "localization": "face"},
    ]
    write_csv(tmp_path / "HAM10000_metadata.csv", rows)
    for i, image_id in enumerate(r["image_id"] for r in rows):  # the images come split over two folders
        make_image(tmp_path / f"HAM10000_images_part_{1 + i % 2}" / f"{image_id}.jpg")
    m = find_manifest("ham10000")
    out = m.load_rows(tmp_path)
    assert [r["_image_path"] for r in out] == [
        "HAM10000_images_part_1/ISIC_0000001.jpg", "HAM10000_images_part_2/ISIC_0000002.jpg",
        "HAM10000_images_part_1/ISIC_0000003.jpg", "HAM10000_images_part_2/ISIC_0000004.jpg"]
    assert all((tmp_path / r["_image_path"]).is_file() for r in out)
    assert [r["dx"] for r in out] == ["mel", "mel", "nv", None]  # not one of the 7 classes -> no label
    t = parse_template(m.source_options().text_template)
    texts = [t.render(r) for r in out]
    assert texts[0] == "Age: 80 years. Sex: male. Localization: back."  # no dx_type: it leaks
    assert texts[1] == "Sex: male. Localization: back."
    assert all("nan" not in x.lower() for x in texts)

    for image in tmp_path.glob("HAM10000_images_part_*/*"):
        image.unlink()
    with pytest.raises(EmbedkitError, match=r"ham10000.toml, line \d+, key layout.expected_files: nothing under"):
        m.load_rows(tmp_path)


def test_brset_layout_derives_referable_dr_and_recodes_text(tmp_path):
    columns = load_manifest(MANIFESTS / "brset.toml").columns
    base = {c: "0" for c in columns}
    grades = ["0", "1", "2", "3", "4", "2.0", ""]
    rows = []
    for i, g in enumerate(grades):
        rows.append({**base, "image_id": f"img{i + 1:05d}", "patient_id": str(i // 2), "DR_ICDR": g,
                     "patient_age": "57", "patient_sex": "2" if i else "1", "exam_eye": "1", "insuline": "NA",
                     "comorbidities": "diabetes1", "diabetes_time_y": "10", "optic_disc": "1", "vessels": "1",
                     "macula": "2"})
        make_image(tmp_path / "fundus_photos" / f"img{i + 1:05d}.jpg")
    write_csv(tmp_path / "labels_brset.csv", rows)
    m = find_manifest("brset")
    out = m.load_rows(tmp_path)
    assert [r["referable_dr"] for r in out] == [0, 0, 1, 1, 1, 1, None]
    assert [r["dr_grade"] for r in out] == [0, 1, 2, 3, 4, 2, None]
    assert out[0]["_image_path"] == "fundus_photos/img00001.jpg"
    text = parse_template(m.text_template).render(out[0])
    assert text == ("A fundus photograph of the right eye of a male patient, aged 57 years, with comorbidities: "
                    "diabetes1, diabetic for 10 years. Optic disc normal, vessels normal, macula abnormal.")


def test_mimic_cxr_layout_joins_filters_and_multilabel(tmp_path):
    m = find_manifest("mimic_cxr")
    meta = [{"dicom_id": d, "subject_id": "10000032", "study_id": "50414267", "ViewPosition": v}
            for d, v in (("d1", "PA"), ("d2", "LATERAL"), ("d3", "AP"))]
    meta.append({"dicom_id": "d4", "subject_id": "10000032", "study_id": "59999999", "ViewPosition": "PA"})
    chexpert = [{"subject_id": "10000032", "study_id": "50414267",
                 **{c: "" for c in m.labels[0].columns}, "Edema": "1.0", "Atelectasis": "-1.0", "Fracture": "0.0"}]
    write_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz", meta, gz=True)
    write_csv(tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz", chexpert, gz=True)
    write_csv(tmp_path / "mimic-cxr-2.0.0-split.csv.gz",
              [{"dicom_id": d, "study_id": "x", "subject_id": "x", "split": "train"} for d in ("d1", "d2", "d3", "d4")],
              gz=True)
    study = tmp_path / "files" / "p10" / "p10000032"
    (study).mkdir(parents=True)
    (study / "s50414267.txt").write_text("FINDINGS: mild edema.")
    for d in ("d1", "d2", "d3"):
        make_image(study / "s50414267" / f"{d}.jpg")
    out = m.load_rows(tmp_path)
    # d2 is lateral (filtered out); d4's study has no CheXpert row (dropped by the inner join)
    assert [r["dicom_id"] for r in out] == ["d1", "d3"]
    assert out[0]["_image_path"] == "files/p10/p10000032/s50414267/d1.jpg"
    assert out[0]["_text_path"] == "files/p10/p10000032/s50414267.txt"
    assert all((tmp_path / r["_image_path"]).is_file() and (tmp_path / r["_text_path"]).is_file() for r in out)
    labels = dict(zip(m.labels[0].columns, out[0]["chexpert"]))
    assert labels["Edema"] == 1 and labels["Atelectasis"] == 0 and sum(labels.values()) == 1
    assert out[0]["split"] == "train" and out[0]["study_id"] == "50414267"  # the left table's value wins
    assert m.source_options().text_file_col == "_text_path"


def test_iu_xray_layout(tmp_path):
    write_csv(tmp_path / "indiana_projections.csv", [
        {"uid": "1", "filename": "1_IM-0001-4001.dcm.png", "projection": "Frontal"},
        {"uid": "1", "filename": "1_IM-0001-3001.dcm.png", "projection": "Lateral"},
        {"uid": "2", "filename": "2_IM-0652-1001.dcm.png", "projection": "Frontal"}])
    write_csv(tmp_path / "indiana_reports.csv", [
        {"uid": "1", "MeSH": "normal", "Problems": "normal", "image": "Xray Chest PA and Lateral",
         "indication": "Positive TB test", "comparison": "None.", "findings": "The lungs are clear.",
         "impression": "Normal chest x-XXXX."},
        {"uid": "2", "MeSH": "Cardiomegaly/borderline", "Problems": "Cardiomegaly", "image": "",
         "indication": "", "comparison": "", "findings": "", "impression": "Borderline cardiomegaly."}])
    for name in ("1_IM-0001-4001.dcm.png", "1_IM-0001-3001.dcm.png", "2_IM-0652-1001.dcm.png"):
        make_image(tmp_path / "images" / "images_normalized" / name)
    m = find_manifest("iu_xray")
    out = m.load_rows(tmp_path)
    assert [r["abnormal"] for r in out] == [0, 0, 1]
    t = parse_template(m.text_template)
    assert t.render(out[2]) == "Findings: none reported"  # no impression: it leaks
    assert all((tmp_path / r["_image_path"]).is_file() for r in out)


def test_filters_strip_jsonl_split_from_file_and_yes_no(tmp_path):
    (tmp_path / "m.toml").write_text("""\
name = "qa"
description = "questions"
license = "CC0"
access = "on request"
[metadata]
files = ["a.jsonl", "b.json"]
id_col = "qid"
split_from_file = { "a.jsonl" = "train", "b.json" = "test" }
filters = [
  { column = "kind", op = "==", value = "CLOSED" },
  { column = "organ", op = "not_in", value = ["FOOT"] },
  { column = "score", op = "!=", value = 3, strip = false },
  { column = "question", op = "notnull" },
]
[text]
col = "question"
[[labels]]
name = "yes"
column = "answer"
task = "binary"
derive = { yes_no = true, missing = 0 }
""")
    recs = [{"qid": 1, "kind": "CLOSED ", "organ": "HEAD", "score": 1, "question": "q1", "answer": " YES"},
            {"qid": 2, "kind": "OPEN", "organ": "HEAD", "score": 1, "question": "q2", "answer": "yes"},
            {"qid": 3, "kind": "closed", "organ": "foot", "score": 1, "question": "q3", "answer": "no"},
            {"qid": 4, "kind": "CLOSED", "organ": None, "score": "3.0", "question": "q4", "answer": "no"},
            {"qid": 5, "kind": "CLOSED", "organ": "CHEST", "score": None, "question": "NA", "answer": "no"},
            {"qid": 6, "kind": "CLOSED", "organ": "CHEST", "score": 2, "question": "q6", "answer": "Right"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs[:4]) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(recs[4:] + [{"qid": 7, "kind": "CLOSED", "organ": "CHEST",
                                                             "score": 2, "question": "q7", "answer": None}]))
    m = load_manifest(tmp_path / "m.toml")
    out = m.load_rows(tmp_path)
    assert [r["qid"] for r in out] == [1, 6, 7]
    assert out[0]["kind"] == "CLOSED"  # stripped in the rows, not just for the comparison
    assert [r["split"] for r in out] == ["train", "test", "test"]
    assert [r["yes"] for r in out] == [1, None, 0]  # 'Right' is not yes/no; a missing answer uses `missing`
    assert m.source_options().split_col == "split"

    (tmp_path / "b.json").write_text(json.dumps(recs[4:] + [{**recs[5]}]))  # qid 6 twice
    with pytest.raises(EmbedkitError, match=r"m.toml, line 7, key metadata.id_col: .*duplicate"):
        m.load_rows(tmp_path)


# --- the real VQA-RAD ---------------------------------------------------------------------------------------

def test_vqa_rad_on_the_real_data():
    root = SHARED / "vqa_rad"
    if not (root / "trainset.json").is_file():
        pytest.skip(f"VQA-RAD not found at {root} (set EMBEDKIT_SHARED_DATA to the folder holding vqa_rad/)")
    m = find_manifest("vqa_rad")
    rows = m.load_rows(root)
    raw = json.loads((root / "trainset.json").read_text()) + json.loads((root / "testset.json").read_text())
    closed = [r for r in raw if r["answer_type"].strip() == "CLOSED"]
    assert len(rows) == len(closed) > 2000
    assert {r["answer_type"] for r in rows} == {"CLOSED"}
    assert {r["split"] for r in rows} == {"train", "test"}
    n_test = sum(r["answer_type"].strip() == "CLOSED" for r in json.loads((root / "testset.json").read_text()))
    assert sum(r["split"] == "test" for r in rows) == n_test
    for r in rows:
        answer = r["answer"].strip().lower()
        assert r["answer_yes"] == {"yes": 1, "no": 0}.get(answer)
        assert r["organ"] in {"HEAD", "CHEST", "ABD"}
        assert (root / r["_image_path"]).is_file()
    assert sum(r["answer_yes"] is not None for r in rows) > 0.9 * len(rows)
    assert len({r["qid"] for r in rows}) == len(rows)
    opts = m.source_options()
    assert (opts.id_col, opts.image_col, opts.text_col, opts.split_col) == ("qid", "_image_path", "question", "split")
    assert opts.label_cols == ["answer_yes", "organ"]
