"""Load documents (files, folders, globs or stdin) into plain text for the prompt.

Every document keeps a `source` name so the model can cite where an answer came
from. Bad input raises `DocumentError` with a one-line message that names the
path and says how to fix it; nothing here prints.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, TextIO

from cag.errors import DocumentError

__all__ = ["Document", "load_documents", "SUPPORTED_SUFFIXES"]

SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".txt", ".md", ".markdown", ".rst", ".jsonl", ".json", ".html", ".htm", ".pdf",
)
_SUPPORTED_LIST = ", ".join(SUPPORTED_SUFFIXES)
_GLOB_CHARS = frozenset("*?[")
# Record fields that name a JSON/JSONL record better than its line number, best first.
_SOURCE_FIELDS = ("source", "title", "id")


@dataclass(frozen=True)
class Document:
    """One document's text and the name the model sees, so answers can cite it.

    `source` is the path as given (files inside a folder keep the folder's name
    in front, e.g. "docs/policies/travel.md"), "stdin" for "-", and for JSON/JSONL
    records the record's "source"/"title"/"id" field or "data.jsonl#3" (line 3).
    """

    source: str
    text: str


def load_documents(
    inputs: Sequence[str | os.PathLike[str]], stdin: TextIO | None = None
) -> list[Document]:
    """Load every document named by `inputs`, in order.

    Each input is a file, a folder (searched recursively, hidden entries and
    unsupported file types skipped), a glob pattern (`*`, `?` or `[`, `**`
    recursive) or "-" for text read from `stdin` (default `sys.stdin`). Folders
    and globs are sorted, so the same inputs always give the same list. A file
    reached twice (same resolved path) is loaded once.

    Raises DocumentError for a missing path, an unsupported or unreadable file,
    an empty document, a malformed JSON/JSONL record, or no inputs at all.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # a lone path would otherwise be iterated character by character
    if not inputs:
        raise DocumentError("no documents given: pass at least one file, folder, glob or '-' (stdin)")

    documents: list[Document] = []
    seen: set[Path | str] = set()
    for item in inputs:
        for source, path in _expand(item):
            key = "-" if path is None else path.resolve()
            if key in seen:
                continue
            seen.add(key)
            documents.extend(_read_stdin(stdin) if path is None else _read_file(path, source))
    return documents


# --- turning inputs into (source, path) pairs -------------------------------------


def _expand(item: str | os.PathLike[str]) -> list[tuple[str, Path | None]]:
    """Files named by one input, as (source name, path); path None stands for stdin."""
    raw = os.fspath(item)
    if raw == "-":
        return [("stdin", None)]
    if not raw.strip():
        raise DocumentError("empty path given: pass a file, folder, glob or '-' (stdin)")
    path = Path(raw)
    if path.is_dir():
        return _folder_files(path, raw)
    if path.exists():  # a file, or a pipe such as /dev/stdin
        return [(path.as_posix(), path)]
    # An existing file whose name holds '[' was handled above, so only now try it as a glob.
    if _GLOB_CHARS.intersection(raw):
        return _glob_files(raw)
    raise DocumentError(f"no such file or folder: {raw}")


def _folder_files(root: Path, raw: str) -> list[tuple[str, Path]]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune hidden folders
        found.extend(
            Path(dirpath, name) for name in filenames if not name.startswith(".") and _supported(name)
        )
    if not found:
        raise DocumentError(
            f"no documents found in folder {raw} (looked for {_SUPPORTED_LIST}; hidden files are skipped)"
        )
    return [(p.as_posix(), p) for p in _sorted_paths(found)]


def _glob_files(pattern: str) -> list[tuple[str, Path]]:
    files = [Path(m) for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
    if not files:
        raise DocumentError(f"glob '{pattern}' matched no files: check the pattern and the current folder")
    supported = [p for p in files if _supported(p.name)]
    if not supported:
        raise DocumentError(
            f"glob '{pattern}' matched {len(files)} file(s) but none of a supported type ({_SUPPORTED_LIST})"
        )
    return [(p.as_posix(), p) for p in _sorted_paths(supported)]


def _sorted_paths(paths: Iterable[Path]) -> list[Path]:
    # Sorting by path components keeps a folder's files together ("a/z.md" before "a-b.md").
    return sorted(paths, key=lambda p: p.parts)


def _supported(name: str) -> bool:
    return Path(name).suffix.lower() in SUPPORTED_SUFFIXES


# --- reading one file --------------------------------------------------------------


def _read_stdin(stdin: TextIO | None) -> list[Document]:
    stream = stdin if stdin is not None else sys.stdin
    if stream is None:  # e.g. pythonw or a daemon with stdin closed
        raise DocumentError("cannot read '-': there is no stdin; pass a file instead")
    return [_document("stdin", stream.read())]


def _read_file(path: Path, source: str) -> list[Document]:
    suffix = path.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        kind = f"'{suffix}'" if suffix else "(no suffix)"
        raise DocumentError(f"unsupported file type {kind} for {source} (supported: {_SUPPORTED_LIST})")
    return reader(path, source)


def _read_plain(path: Path, source: str) -> list[Document]:
    return [_document(source, _decode(path, source))]


def _read_html(path: Path, source: str) -> list[Document]:
    return [_document(source, _html_to_text(_decode(path, source)))]


def _read_jsonl(path: Path, source: str) -> list[Document]:
    documents = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and similar separators.
    for number, line in enumerate(_decode(path, source).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"line {number} of {source}"
        record = _parse_json(line, where)
        documents.append(_record_document(record, f"{source}#{number}", where))
    if not documents:
        raise DocumentError(f"document is empty: {source} (no JSON records)")
    return documents


def _read_json(path: Path, source: str) -> list[Document]:
    data = _parse_json(_decode(path, source), source)
    if isinstance(data, dict):
        return [_record_document(data, source, source)]
    if isinstance(data, list):
        if not data:
            raise DocumentError(f"document is empty: {source} (an empty JSON list)")
        return [
            _record_document(record, f"{source}#{i}", f"item {i} of {source}")
            for i, record in enumerate(data, start=1)
        ]
    raise DocumentError(f"{source} must hold a JSON object with a 'text' field, or a list of them")


def _read_pdf(path: Path, source: str) -> list[Document]:
    try:
        import pypdf  # optional: most users never load PDFs
    except ImportError:
        raise DocumentError(
            f"cannot read {source}: install pypdf to read PDF files: pip install pypdf"
        ) from None
    try:
        pages = [page.extract_text() or "" for page in pypdf.PdfReader(path).pages]
    except Exception as exc:  # pypdf raises many exception types for damaged files
        raise DocumentError(f"cannot read PDF {source}: {_one_line(exc)}") from exc
    text = "\n\n".join(pages)
    if not text.strip():
        raise DocumentError(f"document is empty: {source} (no text layer; run OCR on scanned PDFs first)")
    return [_document(source, text)]


_READERS: dict[str, Callable[[Path, str], list[Document]]] = {
    ".txt": _read_plain,
    ".md": _read_plain,
    ".markdown": _read_plain,
    ".rst": _read_plain,
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".html": _read_html,
    ".htm": _read_html,
    ".pdf": _read_pdf,
}


# --- helpers -----------------------------------------------------------------------


def _decode(path: Path, source: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentError(f"cannot read {source}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8-sig")  # -sig: editors on Windows often add a BOM
    except UnicodeDecodeError as exc:
        raise DocumentError(
            f"{source} is not valid UTF-8 (bad byte at offset {exc.start}): re-save it as UTF-8"
        ) from exc


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DocumentError(f"{where} is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from exc


def _record_document(record: Any, default_source: str, where: str) -> Document:
    if not isinstance(record, dict):
        raise DocumentError(f"{where} is not a JSON object: expected {{\"text\": \"...\"}}")
    if "text" not in record:
        raise DocumentError(f"{where} has no 'text' field: add one holding the document text")
    text = record["text"]
    if not isinstance(text, str):
        raise DocumentError(f"{where} has a 'text' field that is not a string")
    source = next(
        (str(record[k]) for k in _SOURCE_FIELDS if record.get(k) not in (None, "")), default_source
    )
    return _document(source, text, where)


def _document(source: str, text: str, where: str | None = None) -> Document:
    """Normalise line endings and trailing space; refuse text with nothing in it."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").rstrip()
    if not text.strip():
        raise DocumentError(f"document is empty: {where or source}")
    return Document(source=source, text=text)


def _one_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# --- HTML to text ------------------------------------------------------------------

# Tags whose content a reader never sees as text.
_SKIP_TAGS = frozenset({"script", "style", "head"})
# Tags that start a new line when rendered; inline tags (a, b, span...) do not.
_BLOCK_TAGS = frozenset({
    "address", "article", "aside", "blockquote", "br", "caption", "dd", "div", "dl", "dt",
    "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header",
    "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "tbody", "thead",
    "tfoot", "tr", "ul", "title",
})
_CELL_TAGS = frozenset({"td", "th"})
_WHITESPACE = re.compile(r"\s+")


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # decodes &amp; &#233; etc. inside data
        self._parts: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip_depth += 1
        elif tag == "body":
            self._skip_depth = 0  # an unclosed <head> ends where <body> starts
        self._separate(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS and self._skip_depth:
            self._skip_depth -= 1
        self._separate(tag)

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            # Source line breaks are layout, not content; only block tags make lines.
            self._parts.append(_WHITESPACE.sub(" ", data))

    def _separate(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self._parts.append("\n")
        elif tag in _CELL_TAGS:
            self._parts.append(" ")

    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self._parts).split("\n"))
        return "\n".join(line for line in lines if line)


def _html_to_text(html: str) -> str:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.text()
