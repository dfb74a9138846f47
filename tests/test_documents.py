"""Tests for cag.documents: formats, folders, globs, stdin, and every error message."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from cag.documents import SUPPORTED_SUFFIXES, Document, load_documents
from cag.errors import DocumentError


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Relative inputs make the source names short and predictable.
    monkeypatch.chdir(tmp_path)


def write(path: str, content: str | bytes) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8", newline="")
    return p


def sources(docs: list[Document]) -> list[str]:
    return [d.source for d in docs]


# --- plain text formats ----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".txt", ".md", ".markdown", ".rst", ".TXT"])
def test_plain_text_formats_load_as_is(suffix: str) -> None:
    write(f"notes{suffix}", "# Title\n\n  indented *text*\n")
    assert load_documents([f"notes{suffix}"]) == [Document(f"notes{suffix}", "# Title\n\n  indented *text*")]


def test_crlf_normalised_and_trailing_whitespace_stripped_but_leading_kept() -> None:
    write("a.txt", "  first\r\nsecond\rthird  \r\n\r\n\t ")
    assert load_documents(["a.txt"])[0].text == "  first\nsecond\nthird"


def test_utf8_bom_is_dropped() -> None:
    write("bom.txt", "\ufeffcafé".encode("utf-8"))
    assert load_documents(["bom.txt"])[0].text == "café"


def test_pathlike_inputs_and_single_string() -> None:
    write("a.md", "alpha")
    assert load_documents([Path("a.md")]) == [Document("a.md", "alpha")]
    assert load_documents("a.md") == [Document("a.md", "alpha")]  # not iterated per character


# --- JSONL and JSON ----------------------------------------------------------------


def test_jsonl_one_document_per_record_with_line_numbers_and_named_sources() -> None:
    lines = [
        json.dumps({"text": "first"}),
        "",
        json.dumps({"text": "third", "title": "Handbook"}),
        json.dumps({"text": "fourth", "id": 7}),
        json.dumps({"text": "fifth", "source": "wiki/page", "title": "ignored"}),
        "   ",
    ]
    write("data.jsonl", "\n".join(lines) + "\n")
    docs = load_documents(["data.jsonl"])
    assert docs == [
        Document("data.jsonl#1", "first"),
        Document("Handbook", "third"),
        Document("7", "fourth"),
        Document("wiki/page", "fifth"),
    ]


def test_jsonl_text_with_unicode_line_separator_stays_one_record() -> None:
    # U+2028 is legal unescaped inside a JSON string; str.splitlines() would cut there.
    write("data.jsonl", '{"text": "a\u2028b"}\n{"text": "c"}\n')
    assert [d.text for d in load_documents(["data.jsonl"])] == ["a\u2028b", "c"]


def test_jsonl_missing_text_names_the_line() -> None:
    write("data.jsonl", '{"text": "ok"}\n\n{"title": "no text here"}\n')
    with pytest.raises(DocumentError, match=r"line 3 of data\.jsonl has no 'text' field"):
        load_documents(["data.jsonl"])


def test_jsonl_invalid_json_names_the_line() -> None:
    write("data.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DocumentError, match=r"line 2 of data\.jsonl is not valid JSON"):
        load_documents(["data.jsonl"])


def test_jsonl_non_object_and_non_string_text() -> None:
    write("list.jsonl", '["text"]\n')
    with pytest.raises(DocumentError, match=r"line 1 of list\.jsonl is not a JSON object"):
        load_documents(["list.jsonl"])
    write("num.jsonl", '{"text": 3}\n')
    with pytest.raises(DocumentError, match=r"line 1 of num\.jsonl has a 'text' field that is not a string"):
        load_documents(["num.jsonl"])


def test_jsonl_empty_record_and_empty_file() -> None:
    write("blank.jsonl", '{"text": "ok"}\n{"text": "  ", "title": "T"}\n')
    with pytest.raises(DocumentError, match=r"document is empty: line 2 of blank\.jsonl"):
        load_documents(["blank.jsonl"])
    write("none.jsonl", "\n\n")
    with pytest.raises(DocumentError, match=r"document is empty: none\.jsonl"):
        load_documents(["none.jsonl"])


def test_json_object_and_list() -> None:
    write("one.json", json.dumps({"text": "single"}))
    write("many.json", json.dumps([{"text": "a"}, {"text": "b", "title": "B"}]))
    assert load_documents(["one.json", "many.json"]) == [
        Document("one.json", "single"),
        Document("many.json#1", "a"),
        Document("B", "b"),
    ]


def test_json_errors() -> None:
    write("bad.json", "{not json")
    with pytest.raises(DocumentError, match=r"bad\.json is not valid JSON"):
        load_documents(["bad.json"])
    write("str.json", '"just a string"')
    with pytest.raises(DocumentError, match=r"str\.json must hold a JSON object with a 'text' field"):
        load_documents(["str.json"])
    write("item.json", json.dumps([{"text": "a"}, {"body": "b"}]))
    with pytest.raises(DocumentError, match=r"item 2 of item\.json has no 'text' field"):
        load_documents(["item.json"])
    write("empty.json", "[]")
    with pytest.raises(DocumentError, match=r"document is empty: empty\.json"):
        load_documents(["empty.json"])


# --- HTML --------------------------------------------------------------------------


def test_html_keeps_visible_text_only() -> None:
    html = """<!DOCTYPE html>
<html><head><title>Page title</title><style>p { color: red }</style>
<script>var secret = "do not show";</script></head>
<body>
  <h1>Travel   policy</h1>
  <p>Fish &amp; chips cost &pound;5 &#8212; caf&eacute;
     receipts <b>required</b>.</p>
  <script type="text/javascript">alert("hidden");</script>
  <!-- a comment -->
  <ul><li>one</li><li>two</li></ul>line<br>break
  <table><tr><td>cell1</td><td>cell2</td></tr></table>
</body></html>"""
    write("page.html", html)
    text = load_documents(["page.html"])[0].text
    assert text == (
        "Travel policy\n"
        "Fish & chips cost £5 — café receipts required.\n"
        "one\ntwo\nline\nbreak\n"
        "cell1 cell2"
    )
    for hidden in ("secret", "hidden", "color", "Page title", "comment"):
        assert hidden not in text


def test_htm_without_closed_head_still_shows_body() -> None:
    write("old.htm", "<html><head><title>t</title><body><p>visible</p>")
    assert load_documents(["old.htm"])[0].text == "visible"


def test_html_with_only_markup_is_empty() -> None:
    write("blank.html", "<html><head><title>x</title></head><body><script>x()</script> </body></html>")
    with pytest.raises(DocumentError, match=r"document is empty: blank\.html"):
        load_documents(["blank.html"])


# --- PDF ---------------------------------------------------------------------------


def _minimal_pdf(text: str) -> bytes:
    """A one-page PDF with `text` in Helvetica, xref offsets computed exactly."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_pdf_without_pypdf_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pypdf", None)  # makes `import pypdf` raise ImportError
    write("paper.pdf", _minimal_pdf("Hello"))
    with pytest.raises(DocumentError, match=r"paper\.pdf.*install pypdf to read PDF files: pip install pypdf"):
        load_documents(["paper.pdf"])


def test_pdf_text_is_extracted_when_pypdf_is_installed() -> None:
    pytest.importorskip("pypdf")
    write("paper.pdf", _minimal_pdf("Hello PDF world"))
    assert load_documents(["paper.pdf"]) == [Document("paper.pdf", "Hello PDF world")]


def test_damaged_pdf_is_a_document_error() -> None:
    pytest.importorskip("pypdf")
    write("broken.pdf", b"this is not a pdf")
    with pytest.raises(DocumentError, match=r"cannot read PDF broken\.pdf"):
        load_documents(["broken.pdf"])


# --- folders -----------------------------------------------------------------------


def make_tree() -> None:
    write("docs/zeta.md", "zeta")
    write("docs/alpha.txt", "alpha")
    write("docs/policies/travel.md", "travel")
    write("docs/policies/b/deep.rst", "deep")
    write("docs/a-b.md", "a-b")
    write("docs/.hidden.md", "hidden file")
    write("docs/.git/config.txt", "hidden folder")
    write("docs/image.png", "not text")
    write("docs/Makefile", "all:")


def test_folder_is_recursive_sorted_and_skips_hidden_and_unsupported() -> None:
    make_tree()
    assert sources(load_documents(["docs"])) == [
        "docs/a-b.md",
        "docs/alpha.txt",
        "docs/policies/b/deep.rst",
        "docs/policies/travel.md",
        "docs/zeta.md",
    ]


def test_folder_source_names_follow_the_folder_as_given() -> None:
    make_tree()
    assert sources(load_documents(["docs/policies/"])) == ["docs/policies/b/deep.rst", "docs/policies/travel.md"]
    assert sources(load_documents(["./docs/policies"]))[1] == "docs/policies/travel.md"


def test_same_inputs_give_the_same_list_in_input_order() -> None:
    make_tree()
    write("first.md", "first")
    inputs = ["first.md", "docs/policies", "docs/zeta.md"]
    once = load_documents(inputs)
    assert once == load_documents(inputs)
    assert sources(once) == ["first.md", "docs/policies/b/deep.rst", "docs/policies/travel.md", "docs/zeta.md"]


def test_folder_without_documents_is_an_error() -> None:
    write("empty/.hidden.md", "x")
    write("empty/photo.jpg", "x")
    with pytest.raises(DocumentError, match=r"no documents found in folder empty/ \(looked for \.txt, \.md"):
        load_documents(["empty/"])


def test_explicit_hidden_file_is_loaded() -> None:
    write("docs/.hidden.md", "hidden file")
    assert load_documents(["docs/.hidden.md"]) == [Document("docs/.hidden.md", "hidden file")]


# --- globs -------------------------------------------------------------------------


def test_glob_is_sorted_and_recursive() -> None:
    make_tree()
    assert sources(load_documents(["docs/*.md"])) == ["docs/a-b.md", "docs/zeta.md"]
    assert sources(load_documents(["docs/**/*.md"])) == ["docs/a-b.md", "docs/policies/travel.md", "docs/zeta.md"]


def test_glob_skips_unsupported_and_folders() -> None:
    make_tree()
    assert sources(load_documents(["docs/*"])) == ["docs/a-b.md", "docs/alpha.txt", "docs/zeta.md"]


def test_glob_without_matches_is_an_error() -> None:
    with pytest.raises(DocumentError, match=r"glob 'x/\*\.md' matched no files"):
        load_documents(["x/*.md"])
    write("d/report.docx", "x")
    with pytest.raises(DocumentError, match=r"glob 'd/\*' matched 1 file\(s\) but none of a supported type"):
        load_documents(["d/*"])


def test_existing_file_with_glob_characters_is_a_file() -> None:
    write("notes[1].md", "bracketed")
    assert load_documents(["notes[1].md"]) == [Document("notes[1].md", "bracketed")]


# --- stdin -------------------------------------------------------------------------


def test_stdin_dash() -> None:
    write("a.md", "from file")
    docs = load_documents(["a.md", "-"], stdin=io.StringIO("from stdin\r\n\n"))
    assert docs == [Document("a.md", "from file"), Document("stdin", "from stdin")]


def test_stdin_defaults_to_sys_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("piped"))
    assert load_documents(["-"]) == [Document("stdin", "piped")]


def test_empty_stdin_is_an_error() -> None:
    with pytest.raises(DocumentError, match=r"document is empty: stdin"):
        load_documents(["-"], stdin=io.StringIO("  \n"))


# --- dedup -------------------------------------------------------------------------


def test_same_file_twice_is_loaded_once() -> None:
    make_tree()
    docs = load_documents(["docs/zeta.md", "./docs/zeta.md", "docs", "docs/*.md", "-", "-"],
                          stdin=io.StringIO("s"))
    assert sources(docs) == [
        "docs/zeta.md",
        "docs/a-b.md",
        "docs/alpha.txt",
        "docs/policies/b/deep.rst",
        "docs/policies/travel.md",
        "stdin",
    ]


def test_symlink_to_a_loaded_file_is_skipped() -> None:
    target = write("real.md", "real")
    link = Path("link.md")
    try:
        link.symlink_to(target)
    except OSError:
        pytest.skip("symlinks not available")
    assert sources(load_documents(["real.md", "link.md"])) == ["real.md"]


# --- other errors ------------------------------------------------------------------


def test_no_inputs() -> None:
    with pytest.raises(DocumentError, match=r"no documents given"):
        load_documents([])


def test_missing_path() -> None:
    with pytest.raises(DocumentError, match=r"^no such file or folder: docs/x\.md$"):
        load_documents(["docs/x.md"])


def test_explicit_unsupported_file() -> None:
    write("report.docx", "binary")
    with pytest.raises(DocumentError, match=r"unsupported file type '\.docx' for report\.docx \(supported: \.txt, "):
        load_documents(["report.docx"])
    write("Makefile", "all:")
    with pytest.raises(DocumentError, match=r"unsupported file type \(no suffix\) for Makefile"):
        load_documents(["Makefile"])


def test_empty_file() -> None:
    write("notes.md", " \n\t\r\n")
    with pytest.raises(DocumentError, match=r"^document is empty: notes\.md$"):
        load_documents(["notes.md"])


def test_undecodable_file_names_the_file() -> None:
    write("latin.txt", "caf\xe9".encode("latin-1"))
    with pytest.raises(DocumentError, match=r"latin\.txt is not valid UTF-8 .*re-save it as UTF-8"):
        load_documents(["latin.txt"])


def test_errors_are_one_line() -> None:
    write("data.jsonl", '{"text": \n')
    with pytest.raises(DocumentError) as info:
        load_documents(["data.jsonl"])
    assert "\n" not in str(info.value)


def test_supported_suffixes_list() -> None:
    assert SUPPORTED_SUFFIXES == (".txt", ".md", ".markdown", ".rst", ".jsonl", ".json", ".html", ".htm", ".pdf")
