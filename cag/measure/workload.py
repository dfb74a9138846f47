"""What benchmarks run on: the bundled corpus and questions, and contexts cut to a token length."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

from ..documents import Document
from ..errors import BenchError, PromptError
from ..model import LoadedModel
from ..prompt import PromptBuilder

__all__ = ["bundled_corpus", "bundled_questions", "read_questions", "fit_lengths", "checked_questions", "context_of_length"]


def bundled_corpus() -> list[Document]:
    """The corpus shipped for benchmarks (a ~6,500-token report, in SmolLM2 tokens)."""
    path = resources.files("cag") / "data" / "bench" / "corpus.md"
    return [Document(source="corpus.md", text=path.read_text(encoding="utf-8"))]


def bundled_questions() -> list[str]:
    return read_questions(resources.files("cag") / "data" / "bench" / "questions.txt")


def read_questions(path) -> list[str]:
    """One question per line; blank lines and lines starting with # are skipped."""
    source = path if hasattr(path, "read_text") else Path(path)  # a Path, or a package resource
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise BenchError(f"cannot read questions file {path}: {exc.strerror or exc}") from exc
    questions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not questions:
        raise BenchError(f"questions file {path} holds no question: write one question per line")
    return questions


def fit_lengths(lm: LoadedModel, lengths: Sequence[int], questions: Sequence[str], max_new_tokens: int) -> list[int]:
    """The requested context lengths, sorted, each clipped so the longest question and its answer still fit."""
    if not lengths:
        raise BenchError("no context length given: pass e.g. --lengths 512,1024")
    if any(n <= 0 for n in lengths):
        raise BenchError(f"context lengths must be positive, got {list(lengths)}")
    builder = PromptBuilder(lm.tokenizer)
    longest_question = max(len(builder.question_ids(q)) for q in checked_questions(questions))
    room = lm.max_context - longest_question - max_new_tokens - 1
    return sorted({min(int(n), room) for n in lengths})


def checked_questions(questions: Sequence[str]) -> list[str]:
    questions = [q for q in questions if q.strip()]
    if not questions:
        raise BenchError("no questions to ask: pass a questions file with one question per line")
    return questions


def _cut(documents: Sequence[Document], chars: int) -> list[Document]:
    """The first ``chars`` characters of the documents.

    When they run short, their text repeats inside the last document rather than as
    new documents, whose wrappers would make the token count jump.
    """
    out: list[Document] = []
    left = chars
    for doc in documents:
        take = min(left, len(doc.text))
        out.append(Document(source=doc.source, text=doc.text[:take]))
        left -= take
        if left == 0:
            break
    if left > 0:
        filler = "\n\n" + "\n\n".join(d.text for d in documents)
        repeated = filler * (left // len(filler) + 1)
        out[-1] = Document(source=out[-1].source, text=out[-1].text + repeated[:left])
    return out


def context_of_length(builder: PromptBuilder, documents: Sequence[Document], tokens: int) -> list[int]:
    """Context token ids of the longest cut of the documents that fits in ``tokens`` tokens.

    Token counts grow with the number of characters (nearly monotonically, since BPE
    merges only locally), so a binary search over the cut finds it in ~15 encodes.
    """
    count = lambda chars: builder.context_ids(_cut(documents, chars))  # noqa: E731
    fixed = len(count(0))
    if fixed >= tokens:
        raise PromptError(
            f"a context of {tokens} tokens is shorter than the prompt's fixed part ({fixed} tokens: instructions "
            f"and chat template): ask for at least {fixed + 1}"
        )
    lo, hi = 0, max(1, sum(len(d.text) for d in documents))
    while len(count(hi)) <= tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(count(mid)) <= tokens:
            lo = mid
        else:
            hi = mid
    return count(lo)
