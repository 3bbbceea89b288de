"""Reports as files: plain text, and the documents clinics write (PDF, Word .docx, RTF, HTML).

`read_report(path)` -> (text, None) or (None, reason), the one reader every engine and the writer use (through
plan.read_item_text). The kind comes from the content where it has a signature (%PDF, a zip holding
word/document.xml, {\\rtf, the OLE header of a legacy .doc) and from the name otherwise (.html, .htm); a name
that promises a format the content does not hold is a recorded skip, never a guess.
  - PDF: the text layer, page by page (pypdf). A PDF without one (a scan) is a skip that says so: embedkit
    does no OCR.
  - .docx: paragraphs and tables in document order (python-docx); headers and footers are left out.
  - .rtf: striprtf; .html: the standard library's parser, scripts and styles dropped, blocks on new lines.
Plain text must be UTF-8 (a BOM is fine) and holds no NUL; every document's text goes through the same checks
and has its whitespace tidied. The size cap on report files (--max-report-mb) is applied before reading.
Reasons name the problem, never the text.
"""

from __future__ import annotations

import io
import re
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path

DOCUMENT_EXTS = {".pdf", ".docx", ".rtf", ".html", ".htm"}
MAX_DOCX_XML_BYTES = 64 * 2**20  # the unzipped document.xml: a zip bomb stops here, a real report is far smaller
_SIGNATURES = ((b"%PDF-", "pdf"), (b"PK\x03\x04", "zip"), (b"{\\rtf", "rtf"), (b"\xd0\xcf\x11\xe0", "ole"))
_NAMED = {".pdf": "pdf", ".docx": "docx", ".rtf": "rtf", ".html": "html", ".htm": "html"}


def read_report(path: Path) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        return None, f"cannot read report ({e.strerror or type(e).__name__})"
    kind = document_kind(path.suffix, raw)
    named = _NAMED.get(path.suffix.lower())
    if kind == "ole":
        return None, "legacy Word .doc (binary) is not read: save it as .docx or PDF"
    if named in ("pdf", "docx") and kind != named:
        return None, f"named {path.suffix} but its content is not a {named.upper()} file"
    if kind == "zip":
        return None, "a zip file that is not a Word .docx document"
    if kind == "text":
        text, reason = _plain_text(raw)
    else:  # parsed once per file version: the engine and the writer both ask
        st = path.stat()
        text, reason = _parsed(str(path), st.st_size, st.st_mtime_ns, kind)
    if reason:
        return None, reason
    if "\x00" in text:
        return None, "report looks binary (contains NUL bytes)"
    if not text.strip():
        return None, "empty report" if kind == "text" else f"empty report (the {kind.upper()} file holds no text)"
    return text, None


@lru_cache(maxsize=64)
def _parsed(path: str, size: int, mtime_ns: int, kind: str) -> tuple[str | None, str | None]:
    reader = {"pdf": _pdf_text, "docx": _docx_text, "rtf": _rtf_text, "html": _html_text}[kind]
    try:
        text, reason = reader(Path(path).read_bytes())
    except OSError as e:
        return None, f"cannot read report ({e.strerror or type(e).__name__})"
    return (None, reason) if reason else (tidy(text), None)


def document_kind(suffix: str, raw: bytes) -> str:
    """pdf | docx | zip | rtf | ole | html | text, by content signature first, then by name."""
    head = raw[:8]
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return "docx" if kind == "zip" and _is_docx(raw) else kind
    if suffix.lower() in (".html", ".htm"):
        return "html"
    start = raw[:256].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith((b"<!doctype html", b"<html")):
        return "html"
    return "text"


def _is_docx(raw: bytes) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            return "word/document.xml" in z.namelist()
    except zipfile.BadZipFile:
        return False


def tidy(text: str) -> str:
    """Unix line ends, no trailing spaces, runs of blank lines cut to one, no spaces doubled inside a line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\xa0", " ")
    lines = [re.sub(r"[ \t]{2,}", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _plain_text(raw: bytes) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError:
        return None, "report is not UTF-8 text"


def _decoded(raw: bytes, what: str) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        return None, f"{what} is not UTF-8 text"


def _pdf_text(raw: bytes) -> tuple[str | None, str | None]:
    import logging

    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings are about structure, and many
    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted and not reader.decrypt(""):
            return None, "encrypted PDF (it needs a password): save an unprotected copy"
        pages = [page.extract_text() or "" for page in reader.pages]
    except DependencyError:
        return None, "encrypted PDF (AES): pip install cryptography to read it"
    except FileNotDecryptedError:
        return None, "encrypted PDF (it needs a password): save an unprotected copy"
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        return None, f"not a readable PDF ({type(e).__name__})"
    text = "\n\n".join(pages)
    if not text.strip():
        return None, (f"PDF has no text layer ({len(pages)} page{'s' if len(pages) != 1 else ''}; a scanned "
                      f"document needs OCR first, which embedkit does not do)")
    return text, None


def _docx_text(raw: bytes) -> tuple[str | None, str | None]:
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            if z.getinfo("word/document.xml").file_size > MAX_DOCX_XML_BYTES:
                return None, f"Word document larger than {MAX_DOCX_XML_BYTES >> 20} MB unzipped"
        from docx import Document
        from docx.table import Table

        doc = Document(io.BytesIO(raw))
        blocks = []
        for block in doc.iter_inner_content():  # paragraphs and tables, in document order
            if isinstance(block, Table):
                blocks += [" | ".join(cell.text.strip() for cell in row.cells) for row in block.rows]
            else:
                blocks.append(block.text)
    except (zipfile.BadZipFile, KeyError, ValueError, AttributeError, TypeError) as e:
        return None, f"not a readable Word .docx document ({type(e).__name__})"
    except Exception as e:  # noqa: BLE001 - lxml and python-docx raise their own types for broken XML
        return None, f"not a readable Word .docx document ({type(e).__name__})"
    return "\n".join(blocks), None


def _rtf_text(raw: bytes) -> tuple[str | None, str | None]:
    from striprtf.striprtf import rtf_to_text

    # RTF is 7-bit text whose \'hh escapes name bytes of its code page; latin-1 keeps every byte as it is
    try:
        return rtf_to_text(raw.decode("latin-1"), encoding="cp1252", errors="replace"), None
    except (ValueError, IndexError, LookupError) as e:
        return None, f"not a readable RTF document ({type(e).__name__})"


class _HTMLText(HTMLParser):
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "section", "article",
              "ul", "ol", "pre", "blockquote", "hr", "dt", "dd", "header", "footer", "title"}
    SKIP = {"script", "style", "noscript", "template", "head"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS or tag in ("td", "th"):
            self.parts.append("\n" if tag not in ("td", "th") else " ")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:  # inside a block, source line breaks are spaces, as a browser shows them
            self.parts.append(re.sub(r"\s+", " ", data))


def _html_text(raw: bytes) -> tuple[str | None, str | None]:
    source, reason = _decoded(raw, "HTML report")
    if reason:
        return None, reason
    parser = _HTMLText()
    parser.feed(source)
    parser.close()
    return re.sub(r"\n[ \t]*(\n[ \t]*)+", "\n", "".join(parser.parts)), None  # a block's start and end: one break
