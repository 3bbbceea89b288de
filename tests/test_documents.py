"""Reports as documents (PDF, .docx, .rtf, .html) beside .txt, and tables without a row id (--id-col @row).

Documents are written with the libraries that read them (pypdf, python-docx) or by hand (RTF, HTML); the
extraction runs a tiny real BERT and a tiny DINOv2 (conftest.tiny_models) through `extract`."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedkit.documents import read_report
from embedkit.errors import EmbedkitError
from embedkit.extract import ExtractConfig, extract
from embedkit.items import SourceOptions
from embedkit.sources import scan_source

from conftest import make_image

FINDING = "Chest X-ray: small left pleural effusion."


def write_pdf(path, lines: list[str], password: str | None = None):
    """A one-page PDF with a real text layer (Helvetica text operators), as a report writer makes it."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    w = PdfWriter()
    page = w.add_blank_page(612, 792)
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
    ops = " 0 -16 Td ".join(f"({line}) Tj" for line in lines)
    content = DecodedStreamObject()
    content.set_data(f"BT /F1 12 Tf 72 720 Td {ops} ET".encode("latin-1"))
    page.replace_contents(content)
    if password:
        w.encrypt(password, algorithm="RC4-128")
    w.write(str(path))
    return path


def write_docx(path, paragraphs: list[str], table: list[list[str]] | None = None, header: str | None = None):
    from docx import Document

    doc = Document()
    if header:
        doc.sections[0].header.paragraphs[0].text = header
    for p in paragraphs:
        doc.add_paragraph(p)
    if table:
        t = doc.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, cell in enumerate(row):
                t.cell(r, c).text = cell
    doc.save(str(path))
    return path


RTF = (r"{\rtf1\ansi\ansicpg1252\deff0{\fonttbl{\f0 Arial;}}\f0\fs20 Chest X-ray: small left pleural "
       r"effusion.\par Fi\'e8vre, no pneumothorax.\par}")
HTML = ("<!DOCTYPE html><html><head><title>Report</title><style>p {color: red}</style>"
        "<script>var secret = 1;</script></head><body><h1>Findings</h1><p>Chest X-ray: small left\n   pleural "
        "effusion.</p><table><tr><td>Heart</td><td>normal &amp; unchanged</td></tr></table></body></html>")


def test_each_document_kind_gives_its_text(tmp_path):
    pdf = write_pdf(tmp_path / "r.pdf", [FINDING, "No pneumothorax."])
    assert read_report(pdf) == (f"{FINDING}\nNo pneumothorax.", None)
    docx = write_docx(tmp_path / "r.docx", [FINDING, "Impression: effusion."], table=[["Heart", "normal"]],
                      header="Saint Elsewhere Radiology, patient Quixote")
    text, _ = read_report(docx)
    assert text == f"{FINDING}\nImpression: effusion.\nHeart | normal" and "Quixote" not in text  # body only
    (tmp_path / "r.rtf").write_bytes(RTF.encode("ascii"))
    assert read_report(tmp_path / "r.rtf") == (f"{FINDING}\nFièvre, no pneumothorax.", None)
    (tmp_path / "r.html").write_text(HTML)
    text, _ = read_report(tmp_path / "r.html")
    assert text == f"Findings\n{FINDING}\nHeart normal & unchanged" and "secret" not in text and "color" not in text
    (tmp_path / "plain.txt").write_text(f"\ufeff  {FINDING}\n")
    assert read_report(tmp_path / "plain.txt") == (FINDING, None)  # text files read exactly as before
    (tmp_path / "rtf_in.txt").write_bytes(RTF.encode("ascii"))  # the content decides: RTF saved as .txt
    assert read_report(tmp_path / "rtf_in.txt")[0].startswith(FINDING)


def test_documents_that_cannot_be_read_say_why(tmp_path):
    from PIL import Image

    Image.new("L", (120, 160), 200).save(tmp_path / "scan.pdf")  # a scanned page: an image, no text layer
    assert read_report(tmp_path / "scan.pdf") == (None, "PDF has no text layer (1 page; a scanned document needs "
                                                        "OCR first, which embedkit does not do)")
    write_pdf(tmp_path / "locked.pdf", [FINDING], password="secret")
    assert "encrypted PDF" in read_report(tmp_path / "locked.pdf")[1]
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n garbage")
    assert read_report(tmp_path / "broken.pdf")[1].startswith("not a readable PDF")
    (tmp_path / "old.doc").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 600)
    (tmp_path / "old.docx").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 600)  # renamed .doc
    assert read_report(tmp_path / "old.docx")[1] == "legacy Word .doc (binary) is not read: save it as .docx or PDF"
    (tmp_path / "fake.pdf").write_text(FINDING)
    assert read_report(tmp_path / "fake.pdf") == (None, "named .pdf but its content is not a PDF file")
    write_docx(tmp_path / "empty.docx", [])
    assert read_report(tmp_path / "empty.docx") == (None, "empty report (the DOCX file holds no text)")
    (tmp_path / "latin.html").write_bytes("<p>fi\xe8vre</p>".encode("latin-1"))
    assert read_report(tmp_path / "latin.html") == (None, "HTML report is not UTF-8 text")
    for path in tmp_path.iterdir():  # a reason never quotes the text
        reason = read_report(path)[1]
        assert reason is None or "effusion" not in reason


def test_a_folder_of_documents_is_embedded_with_the_text_as_read(tiny_models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        make_image(data / f"case{i}.jpg", i)
    write_pdf(data / "case0.pdf", [FINDING, "No pneumothorax."])
    write_docx(data / "case1.docx", [FINDING])
    (data / "case2.rtf").write_bytes(RTF.encode("ascii"))
    (data / "case3.HTML").write_text(HTML)  # extensions in any case
    from PIL import Image

    Image.new("L", (50, 50), 90).save(data / "case4.pdf")  # scanned: recorded, the image still embedded
    (data / "big.pdf").write_bytes(b"%PDF-1.4\n" + b"0" * 60_000)
    out = tmp_path / "out"
    res = extract(data, out, ExtractConfig(image_model=str(tiny_models["dinov2"]), text_model=str(tiny_models["bert"]),
                                           progress=False, max_report_bytes=50_000))
    table = pq.read_table(next(out.glob("text__*")))
    stored = dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
    for case in ("case0", "case1", "case2", "case3"):
        path = next(p for p in data.iterdir() if p.stem == case and p.suffix.lower() != ".jpg")
        assert stored[case] == read_report(path)[0]
    assert set(stored) == {"case0", "case1", "case2", "case3"}
    errors = {(e["path"], e["stage"]): e["reason"] for e in pq.read_table(out / "errors.parquet").to_pylist()}
    assert errors[("case4.pdf", "read")].startswith("PDF has no text layer")
    assert errors[("big.pdf", "read")].startswith("report larger than 50000 bytes")  # the same cap as .txt files
    assert res.modalities["image"].rows_total == 5


# ---------------------------------------------------------------- --id-col @row


def _table(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_row_ids_for_a_table_without_an_id_column(tmp_path):
    # 60 rows, 5 of which reuse another row's image with a different note: 5 > 1% of 60
    for i in range(55):
        make_image(tmp_path / f"x{i}.jpg", i, size=(8, 8))
    rows = [{"image": f"x{i}.jpg", "note": f"note {i}", "label": i % 2} for i in range(55)]
    rows += [{"image": f"x{i}.jpg", "note": f"second reading {i}", "label": 1} for i in range(5)]
    _table(tmp_path / "t.csv", rows)
    opts = SourceOptions(metadata=tmp_path / "t.csv", image_col="image", text_col="note", label_cols=["label"])
    with pytest.raises(EmbedkitError, match=r"5 of 60 rows repeat an id in column 'image' .* pass --id-col @row to "
                                            r"make each row its own sample \(5 of the repeated rows come with "
                                            r"different text or labels\)"):
        scan_source(tmp_path, opts)
    opts.id_col = "@row"
    scan = scan_source(tmp_path, opts)
    assert len(scan.items) == 60 and scan.items[0].id == "row000000" and scan.items[55].id == "row000055"
    assert scan.items[55].text == "second reading 0" and scan.items[55].image_path == scan.items[0].image_path
    # rows sharing an image share a group: no split can put one image on both sides
    assert scan.items[0].group == scan.items[55].group == "x0.jpg" and scan.group_col == "image"
    assert any("5 rows share an image" in n or "10 rows share an image" in n for n in scan.notes)
    # identical repeated rows are copies, not samples: no @row suggestion
    _table(tmp_path / "copies.csv", rows[:55] + rows[:5])
    with pytest.raises(EmbedkitError) as e:
        scan_source(tmp_path, SourceOptions(metadata=tmp_path / "copies.csv", image_col="image", text_col="note"))
    assert "@row" not in str(e.value)
    np.testing.assert_equal(len({it.id for it in scan.items}), 60)


def test_pretrain_pairs_read_document_reports_and_dicom_frames(tmp_path):
    # the shared encoder reads inputs as extract does: a PDF report, each DICOM frame its own image
    from embedkit.bench.dicom_data import write_dicom
    from embedkit.shared_encoder.config import SharedEncoderConfig
    from embedkit.shared_encoder.runner import load_tokenizer
    from embedkit.shared_encoder.train import prepare_pairs

    rng = np.random.default_rng(0)
    write_dicom(tmp_path / "mf.dcm", rng.integers(0, 255, (3, 40, 40)).astype(np.uint8))
    write_pdf(tmp_path / "mf.pdf", [FINDING])
    (tmp_path / "t.csv").write_text("image,report\n" + "mf.dcm,mf.pdf\n")
    scan = scan_source(tmp_path, SourceOptions(metadata=tmp_path / "t.csv", image_col="image", text_file_col="report",
                                               dicom_frames="all", dicom_salt_file=tmp_path / "k"))
    data = prepare_pairs(scan.items, SharedEncoderConfig(image_size=32), load_tokenizer("minilm"))
    assert data["ids"] == ["mf#frame0", "mf#frame1", "mf#frame2"] and data["texts"] == [FINDING] * 3
    assert len({im.tobytes() for im in data["images"]}) == 3  # three frames, three images
