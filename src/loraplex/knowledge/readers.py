"""One document file -> its plain text, with a clear error per file that cannot be read.

Markdown and plain text are read as UTF-8 (GB18030 as the fallback, common for Chinese files),
HTML through BeautifulSoup, PDF through pypdf, DOCX through python-docx. This module does not chunk,
segment or index (chunking.py, store.py do), and never runs OCR: a scanned PDF without a text layer
is reported as having no text.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from loraplex.errors import UserError

TEXT = {".md", ".markdown", ".txt", ".text"}
HTML = {".html", ".htm"}
SUPPORTED = sorted(TEXT | HTML | {".pdf", ".docx"})
MAX_BYTES = 50 * 1024 * 1024


def read_document(path: Path, max_bytes: int = MAX_BYTES) -> str:
    """The text of `path`; a UserError naming the file and the reason otherwise."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise UserError(f"{path}: unsupported file type {suffix or '(none)'!r}; supported: {', '.join(SUPPORTED)}")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    if size > max_bytes:
        raise UserError(f"{path}: {size / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB limit per file")
    if suffix in TEXT:
        text = _plain(path)
    elif suffix in HTML:
        text = _html(path)
    elif suffix == ".pdf":
        text = _pdf(path)
    else:
        text = _docx(path)
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).strip()
    if not text:
        more = " (a scanned PDF needs OCR first)" if suffix == ".pdf" else ""
        raise UserError(f"{path}: the document has no text{more}")
    return text


def _decode(path: Path, raw: bytes) -> str:
    if b"\0" in raw[:8192]:
        raise UserError(f"{path}: this is a binary file, not text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        first = e
    try:
        return raw.decode("gb18030")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 (nor GB18030) text: bad byte at offset {first.start}") from None


def _plain(path: Path) -> str:
    return _decode(path, path.read_bytes())


def _html(path: Path) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(_decode(path, path.read_bytes()), "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    return soup.get_text("\n")


def _pdf(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):  # an owner-password-only PDF opens with ""
            raise UserError(f"{path}: the PDF is encrypted; save an unencrypted copy to add it")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except UserError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as e:  # what pypdf raises on damaged files
        raise UserError(f"{path}: not a readable PDF: {e}") from None


def _docx(path: Path) -> str:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        doc = docx.Document(str(path))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError, ValueError) as e:
        raise UserError(f"{path}: not a readable DOCX file: {e}") from None
    parts = [p.text for p in doc.paragraphs]
    for table in doc.tables:
        for row in table.rows:
            parts.append(" | ".join(cell.text.strip() for cell in row.cells))
    return "\n".join(parts)
