"""DICOM images: pixels as a viewer shows them, one image per series, frames as rows, pseudonyms, and no
identifying value in any output byte. Files are written with pydicom (embedkit/bench/dicom_data.py) or taken
from pydicom's own bundled test files; the extraction runs the real efficientnet-lite0 through the CLI once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedkit.bench.dicom_data import IDENTIFYING, identifying_values, write_dicom
from embedkit.dicom import DicomReadError, dicom_rgb, pseudonym, read_header
from embedkit.errors import EmbedkitError
from embedkit.items import DicomFrame, SourceOptions
from embedkit.sources import scan_source

from conftest import REPO

pydicom = pytest.importorskip("pydicom")
BUNDLED = Path(pydicom.__file__).parent / "data" / "test_files"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
RAMP = np.tile(np.arange(256, dtype=np.uint8), (16, 1))


def window_reference(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window onto 0..255, written out here as the reference."""
    c, w = center - 0.5, width - 1
    y = ((hu - c) / w + 0.5) * 255
    return np.rint(np.clip(np.where(hu <= c - w / 2, 0, np.where(hu > c + w / 2, 255, y)), 0, 255)).astype(np.uint8)


# ---------------------------------------------------------------- pixels


def test_monochrome1_is_inverted_to_match_its_monochrome2_twin(tmp_path):
    m2 = dicom_rgb(write_dicom(tmp_path / "m2.dcm", RAMP))
    m1 = dicom_rgb(write_dicom(tmp_path / "m1.dcm", 255 - RAMP, photometric="MONOCHROME1"))
    assert np.array_equal(m1, m2) and m2[0, 10, 0] == 10 and m2.shape == (16, 256, 3)


def test_rescale_then_window_matches_the_standard_formula(tmp_path):
    hu = np.tile(np.arange(-1000, 1000, 8, dtype=np.int16), (4, 1))
    stored = (hu + 1024).astype(np.int16)  # CT: stored values, HU = stored * 1 - 1024
    got = dicom_rgb(write_dicom(tmp_path / "ct.dcm", stored, rescale=(1.0, -1024.0), window=[(40, 400)]))
    assert np.array_equal(got[..., 0], window_reference(hu.astype(float), 40, 400))
    twin = dicom_rgb(write_dicom(tmp_path / "hu.dcm", hu, window=[(40, 400)]))  # HU stored as they are
    assert np.array_equal(got, twin)
    # the second window, and one given on the command line, replace the first
    two = write_dicom(tmp_path / "two.dcm", stored, rescale=(1.0, -1024.0), window=[(40, 400), (-600, 1500)])
    lung = window_reference(hu.astype(float), -600, 1500)
    assert np.array_equal(dicom_rgb(two, DicomFrame(0, "2"))[..., 0], lung)
    assert np.array_equal(dicom_rgb(two, DicomFrame(0, "-600,1500"))[..., 0], lung)
    with pytest.raises(DicomReadError, match="--dicom-window 3: the file has 2 window"):
        dicom_rgb(two, DicomFrame(0, "3"))
    full = dicom_rgb(two, DicomFrame(0, "minmax"))[0, :, 0]
    assert full[0] == 0 and full[-1] == 255 and np.all(np.diff(full.astype(int)) >= 0)


def test_bit_depths_signedness_lut_palette_and_rgb(tmp_path):
    b12 = np.tile((np.arange(256) * 16).astype(np.uint16), (4, 1))  # 0..4080 in 12 bits stored
    assert dicom_rgb(write_dicom(tmp_path / "b12.dcm", b12, bits_stored=12))[0, [0, 128, 255], 0].tolist() == \
        [0, 128, 255]  # no window: the file's full range
    signed = (b12.astype(np.int16) - 2048)
    assert np.array_equal(dicom_rgb(write_dicom(tmp_path / "s.dcm", signed)), dicom_rgb(tmp_path / "b12.dcm"))
    lut = np.clip(np.arange(4096) // 16, 0, 255)  # a VOI LUT (8 bits per entry over 12-bit input)
    with_lut = dicom_rgb(write_dicom(tmp_path / "lut.dcm", b12, bits_stored=12, voi_lut=(0, 8, lut)))
    assert np.array_equal(with_lut[0, :, 0], lut[b12[0]].astype(np.uint8))
    pal = dicom_rgb(write_dicom(tmp_path / "pal.dcm", RAMP, photometric="PALETTE COLOR", palette=True))
    assert pal[0, 0].tolist() == [0, 255, 0] and pal[0, 255].tolist() == [255, 0, 127]
    rgb = np.stack([RAMP, 255 - RAMP, RAMP // 2], axis=-1)
    assert np.array_equal(dicom_rgb(write_dicom(tmp_path / "rgb.dcm", rgb)), rgb)


def test_compressed_syntaxes_decode_to_the_same_pixels(tmp_path):
    hu = np.tile(np.arange(-512, 512, 16, dtype=np.int16), (64, 1))
    plain = dicom_rgb(write_dicom(tmp_path / "plain.dcm", hu))
    assert np.array_equal(dicom_rgb(write_dicom(tmp_path / "rle.dcm", hu, syntax="rle")), plain)
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg (embedkit[dicom]) encodes JPEG 2000")
    assert np.array_equal(dicom_rgb(write_dicom(tmp_path / "j2k.dcm", hu, syntax="j2k")), plain)
    rgb = np.stack([np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))] * 3, axis=-1)
    jpeg = dicom_rgb(write_dicom(tmp_path / "jpeg.dcm", rgb, syntax="jpeg"))  # lossy: close, not equal
    assert np.abs(jpeg.astype(int) - rgb).mean() < 3


def test_pydicoms_bundled_files(tmp_path):
    if not (BUNDLED / "MR_small.dcm").is_file():
        pytest.skip("this pydicom wheel ships no test files")
    mr = dicom_rgb(BUNDLED / "MR_small.dcm")
    for twin in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"):
        assert np.array_equal(dicom_rgb(BUNDLED / twin), mr), twin
    ybr = dicom_rgb(BUNDLED / "SC_ybr_full_422_uncompressed.dcm")
    assert np.abs(ybr.astype(int) - dicom_rgb(BUNDLED / "SC_rgb_dcmtk_+eb+cr.dcm")).mean() < 3
    assert dicom_rgb(BUNDLED / "examples_palette.dcm").std(axis=2).mean() > 1  # colour, not grey
    ct = read_header(BUNDLED / "CT_small.dcm", b"k" * 32)
    assert ct.columns["dicom_modality"] == "CT" and ct.columns["dicom_patient"].startswith("p-")
    with pytest.raises(DicomReadError, match=r"holds no image \(SOP class RT Plan Storage\)"):
        read_header(BUNDLED / "rtplan.dcm", b"k" * 32)


def test_an_undecodable_syntax_is_refused_at_scan_naming_syntax_and_package():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = BUNDLED / "MR_small_jpeg_ls_lossless.dcm"
    if not path.is_file():
        pytest.skip("this pydicom wheel ships no test files")
    with pytest.raises(DicomReadError) as e:
        read_header(path, b"k" * 32)
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in str(e.value)
    assert "install python-gdcm" in str(e.value) and "pyjpegls" in str(e.value)


# ---------------------------------------------------------------- scan: choice, groups, tables


def _series(root: Path, patient: int, study: str, series: str, n: int, series_number: int, folder: str):
    for i in range(n):
        write_dicom(root / folder / f"IM{i:02d}.dcm", RAMP + i, patient=patient, study_uid=study, series_uid=series,
                    instance=i + 1, series_number=series_number)


def test_one_image_per_series_by_default_and_per_study_or_every_file(tmp_path):
    data = tmp_path / "data"
    _series(data, 1, "1.2.3.1", "1.2.3.1.1", 5, 1, "a/s1")
    _series(data, 1, "1.2.3.1", "1.2.3.1.2", 3, 2, "a/s2")
    _series(data, 2, "1.2.3.2", "1.2.3.2.1", 2, 1, "b/s1")
    salt = tmp_path / "salt.key"
    scan = scan_source(data, SourceOptions(dicom_salt_file=salt))
    assert sorted(it.id for it in scan.items) == ["a/s1/IM02", "a/s2/IM01", "b/s1/IM01"]  # the middle instance
    assert scan.dicom_not_chosen == 7 and scan.counts()["dicom_files_not_chosen"] == 7
    assert any("7 files not embedded: one image per series" in n for n in scan.notes)
    assert scan.group_col == "dicom_patient"
    key = bytes.fromhex(salt.read_text().strip())
    by_id = {it.id: it for it in scan.items}
    assert by_id["a/s1/IM02"].group == by_id["a/s2/IM01"].group == pseudonym(key, "p", "ZQPID778101")
    assert by_id["b/s1/IM01"].group != by_id["a/s1/IM02"].group
    assert by_id["a/s1/IM02"].meta["dicom_series"] != by_id["a/s2/IM01"].meta["dicom_series"]
    study = scan_source(data, SourceOptions(dicom_salt_file=salt, dicom_per="study"))
    assert sorted(it.id for it in study.items) == ["a/s1/IM02", "b/s1/IM01"]  # the lowest series number
    assert len(scan_source(data, SourceOptions(dicom_salt_file=salt, dicom_per="image")).items) == 10
    other = scan_source(data, SourceOptions(dicom_salt_file=tmp_path / "other.key"))
    assert {it.group for it in other.items}.isdisjoint({it.group for it in scan.items})  # salted
    with pytest.raises(EmbedkitError, match="--dicom-window 'soft': choose auto"):
        scan_source(data, SourceOptions(dicom_window="soft"))


def test_uid_named_files_without_extension_are_found_by_their_preamble(tmp_path):
    data = tmp_path / "data"
    write_dicom(data / "1.2.840.99.7", RAMP, patient=1)
    write_dicom(data / "1.2.840.99.8", RAMP, patient=2)
    (data / "notes.bin").write_bytes(b"\0" * 200)
    scan = scan_source(data, SourceOptions(dicom_salt_file=tmp_path / "k"))
    assert sorted(it.id for it in scan.items) == ["1.2.840.99.7", "1.2.840.99.8"]  # whole names: no collapse
    assert [s.path for s in scan.skipped] == ["notes.bin"]


def test_a_table_of_dicom_paths_gets_columns_for_templates_and_the_patient_group(tmp_path):
    data = tmp_path / "data"
    write_dicom(data / "x1.dcm", RAMP, patient=3, modality="DX", tags={"ViewPosition": "AP"})
    write_dicom(data / "x2.dcm", RAMP, patient=4, modality="CT")
    (data / "t.csv").write_text("image,finding\nx1.dcm,effusion\nx2.dcm,normal\n")
    scan = scan_source(data, SourceOptions(metadata=data / "t.csv", image_col="image", label_cols=["finding"],
                                           text_template="{dicom_modality} {dicom_view_position}, age "
                                                         "{dicom_patient_age}", dicom_salt_file=tmp_path / "k"))
    by_id = {it.id: it for it in scan.items}
    assert by_id["x1"].text.startswith("DX AP, age 43") and by_id["x1"].meta["dicom_study_year"] == 2019
    assert by_id["x1"].group.startswith("p-") and by_id["x1"].group != by_id["x2"].group
    assert by_id["x1"].dicom == DicomFrame(0, "auto") and scan.group_col == "dicom_patient"


# ---------------------------------------------------------------- extraction through the CLI, and privacy


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """One CLI run over a folder of twins, a multi-frame file and bad files, every file carrying identifying
    values; stdout and stderr kept for the byte search."""
    root = tmp_path_factory.mktemp("dicom_run")
    data = root / "data"
    rng = np.random.default_rng(0)
    img = (np.clip(rng.normal(0, 1, (80, 80)).cumsum(0).cumsum(1) / 40, -1, 1) * 127 + 128).astype(np.uint8)
    write_dicom(data / "m2.dcm", img, patient=1)
    write_dicom(data / "m1.dcm", 255 - img, photometric="MONOCHROME1", patient=1)
    hu = (img.astype(np.int16) * 4 - 500).astype(np.int16)
    write_dicom(data / "ct_rescaled.dcm", (hu + 1024).astype(np.int16), rescale=(1.0, -1024.0),
                window=[(0, 700)], patient=2, syntax="rle")
    write_dicom(data / "ct_hu.dcm", hu, window=[(0, 700)], patient=2)
    frames = np.stack([np.roll(img, 25 * k, axis=k % 2) for k in range(3)])
    write_dicom(data / "multi.dcm", frames, patient=3, modality="MR")
    write_dicom(data / "frame2.dcm", frames[2], patient=3, modality="MR")
    # malformed values, one in a tag that is read (age): pydicom's warning would quote it on stderr
    write_dicom(data / "bad_birthdate.dcm", img, patient=4,
                tags={"PatientBirthDate": IDENTIFYING["PatientBirthDate"] + " (" + IDENTIFYING["PatientName"] + ")",
                      "PatientAge": IDENTIFYING["PatientID"] + "04", "StudyDate": IDENTIFYING["AccessionNumber"]})
    write_dicom(data / "jpegls.dcm", img, syntax="jpegls", patient=5)
    write_dicom(data / "sr.dcm", None, patient=6)
    truncated = write_dicom(data / "truncated.dcm", img, patient=7)
    truncated.write_bytes(truncated.read_bytes()[:-3000])
    out = root / "out"
    r = subprocess.run([sys.executable, "-m", "embedkit.cli", "extract", str(data), "--out", str(out), "--text-model",
                        "none", "--dicom-frames", "all", "--dicom-per", "image", "--no-progress"],
                       capture_output=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    import embedkit

    df = embedkit.load(out).set_index("id")
    return {"out": out, "stdout": r.stdout, "stderr": r.stderr, "df": df}


def _cos(df, a: str, b: str) -> float:
    u, v = np.asarray(df.loc[a, "image_embedding"], float), np.asarray(df.loc[b, "image_embedding"], float)
    return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))


def test_monochrome1_twin_and_rescaled_twin_embed_alike(extracted):
    df = extracted["df"]
    assert _cos(df, "m1", "m2") >= 0.999
    assert _cos(df, "ct_rescaled", "ct_hu") >= 0.999
    assert _cos(df, "m2", "ct_hu") < 0.999  # the model does tell different pixels apart


def test_every_frame_is_a_row_with_its_index(extracted):
    df = extracted["df"]
    rows = df.loc[[f"multi#frame{k}" for k in range(3)]]
    assert rows["dicom_frame"].tolist() == [0, 1, 2] and set(rows["dicom_frames"]) == {3}
    assert _cos(df, "multi#frame2", "frame2") >= 0.999  # frame 2 is frame 2's pixels
    assert _cos(df, "multi#frame0", "multi#frame2") < 0.999 and _cos(df, "multi#frame0", "multi#frame1") < 0.999


def test_bad_files_are_recorded_skips_naming_why(extracted):
    errors = pq.read_table(extracted["out"] / "errors.parquet").to_pylist()
    reasons = {Path(e["path"]).name: e["reason"] for e in errors}
    assert "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)" in reasons["jpegls.dcm"]
    assert "install python-gdcm" in reasons["jpegls.dcm"]
    assert reasons["sr.dcm"] == "DICOM file holds no image (SOP class Basic Text SR Storage)"
    assert "truncated.dcm" in reasons
    df = extracted["df"]
    assert df.loc["bad_birthdate", "dicom_patient_age"] != df.loc["bad_birthdate", "dicom_patient_age"]  # NaN
    assert "bad_birthdate" in df.index and df.loc["m1", "group"] == df.loc["m2", "group"] != df.loc["ct_hu", "group"]
    assert (df["group"] == df["dicom_patient"]).all() and df["group"].str.fullmatch(r"p-[0-9a-f]{20}").all()


def test_no_identifying_value_reaches_any_output_byte(extracted):
    out = extracted["out"]
    values = set()
    for p in range(8):
        values |= set(identifying_values(p).values())
    values |= {"19470611", "Quixote", "Zebulon", "ZQPID7781"}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and (out / "errors.parquet").is_file()
    blobs = {"stdout": extracted["stdout"], "stderr": extracted["stderr"]}
    for p in files:
        blobs[str(p.relative_to(out))] = p.read_bytes()
        if p.suffix == ".parquet":  # compressed pages hide bytes: search the decoded values and metadata too
            table = pq.read_table(p)
            blobs[f"{p.name} decoded"] = (json.dumps(table.to_pylist(), default=str)
                                          + str(table.schema.metadata)).encode()
    # the study, series and SOP instance UIDs are identifiers too: none is stored in clear
    uids = set()
    for f in (p for p in (out.parent / "data").iterdir() if p.name not in ("sr.dcm",)):
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        uids |= {str(ds.get(k)) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if ds.get(k)}
    leaks = [(v, where) for v in sorted(values | uids) for where, blob in blobs.items()
             if v.encode() in blob or v.upper().encode() in blob]
    assert not leaks, leaks[:5]
    assert b"dicom_patient" in blobs["stderr"] or b"DICOM" in blobs["stderr"]  # the notes were printed
