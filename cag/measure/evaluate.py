"""Compare CAG with retrieval on a QA set, the way the CAG paper (arXiv 2412.15605) did.

Every question is answered by up to four systems:

- ``cag``: all documents of its context prefilled once into a stored KV cache; each
  question only prefills its own tokens on top of the cache;
- ``bm25``: sparse RAG, the top-k BM25 passages in the prompt, prefilled per question;
- ``dense``: dense RAG, the top-k passages by MiniLM embedding similarity;
- ``full``: all documents in the prompt, re-prefilled for every question (no cache);
- ``cached-bm25``, ``cached-dense``: cached passages (``cag.passages``): the top-k
  passages' stored caches composed behind the instruction prefix, keys re-rotated, at
  each ``recompute`` setting. Each is measured against the same passages prefilled in
  full (reported as ``prefilled-bm25`` / ``prefilled-dense``): the share of identical
  answers and the KL divergence of the first answer token's distribution.

Answers are scored against the references by exact match and token F1 (SQuAD's
normalisation), whether a reference is contained in the answer, and the cosine
similarity of all-MiniLM-L6-v2 embeddings (the score the paper's code computes).
With greedy decoding CAG must answer token for token what ``full`` answers; the
report says how often it did.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import string
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..documents import Document
from ..errors import DatasetError
from ..generate import generate
from ..knowledge import build, resolve_model
from ..model import LoadedModel
from ..passages import DEFAULT_PASSAGE_TOKENS, build_passages
from ..prefill import prefill
from ..prompt import PromptBuilder
from ..retrieval import DEFAULT_PASSAGE_WORDS, BM25Retriever, DenseRetriever, Embedder, Hit, split_passages

__all__ = [
    "SYSTEMS",
    "SYSTEM_LABELS",
    "AnswerRecord",
    "EvalReport",
    "QAFields",
    "QAItem",
    "SystemReport",
    "contains_answer",
    "exact_match",
    "load_qa",
    "normalize_answer",
    "check_systems",
    "run_eval",
    "select_items",
    "token_f1",
]

SYSTEMS: tuple[str, ...] = ("cag", "bm25", "dense", "cached-bm25", "cached-dense", "full")
DEFAULT_SYSTEMS: tuple[str, ...] = ("cag", "bm25", "dense", "full")
SYSTEM_LABELS = {
    "cag": "CAG (cached documents)",
    "bm25": "sparse RAG (BM25)",
    "dense": "dense RAG (MiniLM)",
    "cached-bm25": "cached passages (BM25)",
    "prefilled-bm25": "same passages prefilled (BM25)",
    "cached-dense": "cached passages (MiniLM)",
    "prefilled-dense": "same passages prefilled (MiniLM)",
    "full": "full prompt, no cache",
}
RAG_SYSTEMS = ("bm25", "dense")
CACHED_SYSTEMS = {"cached-bm25": "bm25", "cached-dense": "dense"}  # composed system -> its retriever

EvalProgress = Callable[[int, int, str], None]
"""Called with (answers done, answers total, what is being done) after each answer."""

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_QUESTION_FIELDS = ("question", "query")
_ANSWER_FIELDS = ("answers", "answer", "references", "reference")
_DOCUMENT_FIELDS = ("documents", "document", "contexts", "context")
_TEXT_KEYS = ("text", "content", "context")
_SOURCE_KEYS = ("source", "title", "id")


# --- metrics -----------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD token F1 of the prediction against its best-matching reference."""
    return max((_f1(normalize_answer(prediction).split(), normalize_answer(ref).split()) for ref in references), default=0.0)


def _f1(pred: list[str], ref: list[str]) -> float:
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains_answer(prediction: str, references: Sequence[str]) -> float:
    """1.0 if a normalised reference occurs in the normalised prediction as whole words."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(ref and f" {ref} " in pred for ref in map(normalize_answer, references)))


# --- the dataset ---------------------------------------------------------------------


@dataclass(frozen=True)
class QAItem:
    """One question with its reference answers and the documents it is asked about."""

    id: str
    context_id: str
    question: str
    answers: tuple[str, ...]
    documents: tuple[Document, ...]


@dataclass(frozen=True)
class QAFields:
    """Column names of a QA set; None picks the first of the usual names that exists."""

    question: str | None = None  # question, query
    answers: str | None = None  # answers, answer, references, reference
    documents: str | None = None  # documents, document, contexts, context
    context_id: str | None = None  # context_id; without it, rows with the same documents share a context
    id: str | None = None  # id; without it, the row number


def load_qa(
    dataset: str | os.PathLike,
    *,
    split: str | None = None,
    fields: QAFields | None = None,
) -> list[QAItem]:
    """Read a QA set from a json/jsonl/csv/parquet file, or a dataset name on the Hugging Face hub.

    Each row needs a question, one or more reference answers (a string, a list, a JSON
    list in a CSV cell, or SQuAD's ``{"text": [...]}``) and its documents (one string,
    a list of strings, or a list of ``{"source", "text"}`` objects). Raises DatasetError
    naming what is missing.
    """
    fields = fields or QAFields()
    table = _load_table(dataset, split)
    columns = list(table.column_names)
    where = os.fspath(dataset)
    question_col = _pick_column(fields.question, _QUESTION_FIELDS, columns, "question", "--question-field", where)
    answers_col = _pick_column(fields.answers, _ANSWER_FIELDS, columns, "answers", "--answers-field", where)
    documents_col = _pick_column(fields.documents, _DOCUMENT_FIELDS, columns, "documents", "--documents-field", where)
    context_col = _optional_column(fields.context_id, "context_id", columns, "--context-field", where)
    id_col = _optional_column(fields.id, "id", columns, "--id-field", where)

    items: list[QAItem] = []
    context_docs: dict[str, tuple[Document, ...]] = {}
    derived_ids: dict[tuple[Document, ...], str] = {}
    for number, row in enumerate(table, start=1):
        at = f"row {number} of {where}"
        documents = _parse_documents(row[documents_col], at)
        if context_col is not None and row[context_col] not in (None, ""):
            context_id = str(row[context_col])
        else:
            context_id = derived_ids.setdefault(documents, f"context-{len(derived_ids) + 1}")
        known = context_docs.setdefault(context_id, documents)
        if known != documents:
            raise DatasetError(f"{at} has context_id {context_id!r} but other documents than earlier rows with that id: "
                               "give every document set its own context_id")
        question = row[question_col]
        if not isinstance(question, str) or not question.strip():
            raise DatasetError(f"{at} has an empty question")
        items.append(QAItem(
            id=str(row[id_col]) if id_col is not None and row[id_col] not in (None, "") else str(number),
            context_id=context_id,
            question=question.strip(),
            answers=_parse_answers(row[answers_col], at),
            documents=known,
        ))
    if not items:
        raise DatasetError(f"{where} holds no questions")
    return items


def _load_table(dataset: str | os.PathLike, split: str | None):
    import datasets

    raw = os.fspath(dataset)
    path = Path(raw).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DatasetError(f"unsupported dataset file type '{path.suffix}' for {raw}: use .json, .jsonl, .csv or .parquet")
        return _call_datasets(lambda: datasets.load_dataset(builder, data_files=str(path), split="train"), raw)
    if path.exists():
        raise DatasetError(f"{raw} is a folder: pass one .json, .jsonl, .csv or .parquet file")
    if path.suffix.lower() in _FILE_BUILDERS or raw.startswith((".", "/", "~")):
        raise DatasetError(f"no such dataset file: {raw}")
    # Not a local file: a dataset name on the Hugging Face hub (needs a network).
    loaded = _call_datasets(lambda: datasets.load_dataset(raw), raw, hub=True)
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            split = next((s for s in ("test", "validation", "train") if s in loaded), next(iter(loaded)))
        if split not in loaded:
            raise DatasetError(f"dataset {raw} has no split {split!r} (it has: {', '.join(loaded)}): pass --split")
        return loaded[split]
    return loaded


def _call_datasets(load: Callable[[], Any], where: str, hub: bool = False):
    try:
        with _quiet_datasets():
            return load()
    except DatasetError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFound, DatasetGenerationError, HTTP errors...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = " (is the machine online? otherwise pass a local .jsonl/.csv/.parquet file)" if hub else ""
        raise DatasetError(f"cannot load dataset {where}: {first}{hint}") from exc


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide datasets' "Generating train split" bars and info logs: the library prints nothing."""
    import datasets

    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _pick_column(given: str | None, usual: Sequence[str], columns: list[str], what: str, option: str, where: str) -> str:
    if given is not None:
        if given not in columns:
            raise DatasetError(f"{where} has no {what} field {given!r} (fields: {', '.join(columns)})")
        return given
    found = next((c for c in usual if c in columns), None)
    if found is None:
        raise DatasetError(
            f"{where} has no {what} field: expected one of {', '.join(usual)} (fields: {', '.join(columns)}); "
            f"name it with {option}"
        )
    return found


def _optional_column(given: str | None, usual: str, columns: list[str], option: str, where: str) -> str | None:
    if given is not None and given not in columns:
        raise DatasetError(f"{where} has no field {given!r} for {option} (fields: {', '.join(columns)})")
    return given if given is not None else (usual if usual in columns else None)


def _parse_answers(value: Any, at: str) -> tuple[str, ...]:
    if isinstance(value, dict) and "text" in value:  # SQuAD: {"text": [...], "answer_start": [...]}
        value = value["text"]
    if isinstance(value, str) and value.lstrip().startswith("["):  # a JSON list in a CSV cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    answers = tuple(str(a).strip() for a in (value or []) if a is not None and str(a).strip())
    if not answers:
        raise DatasetError(f"{at} has no reference answer")
    return answers


def _parse_documents(value: Any, at: str) -> tuple[Document, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DatasetError(f"{at} has documents of type {type(value).__name__}: use a string or a list")
    documents = []
    for number, item in enumerate(value, start=1):
        if isinstance(item, str):
            source, text = ("document" if len(value) == 1 else f"document-{number}"), item
        elif isinstance(item, dict):
            text = next((item[k] for k in _TEXT_KEYS if isinstance(item.get(k), str)), None)
            if text is None:
                raise DatasetError(f"{at}: document {number} has no 'text' field")
            source = next((str(item[k]) for k in _SOURCE_KEYS if item.get(k) not in (None, "")), f"document-{number}")
        else:
            raise DatasetError(f"{at}: document {number} is a {type(item).__name__}: use a string or {{source, text}}")
        # Normalised as cag.load_documents does, so cache, prompts and passages see the same text.
        text = text.replace("\r\n", "\n").replace("\r", "\n").rstrip()
        if text.strip():
            documents.append(Document(source=source, text=text))
    if not documents:
        raise DatasetError(f"{at} has no documents (or only empty ones)")
    return tuple(documents)


def select_items(items: Sequence[QAItem], contexts: Sequence[str] | None = None, limit: int | None = None) -> list[QAItem]:
    """The items of the given contexts (all when None), at most ``limit`` of them."""
    items = list(items)
    if contexts:
        known = list(dict.fromkeys(item.context_id for item in items))
        unknown = [c for c in contexts if c not in known]
        if unknown:
            raise DatasetError(f"no context {', '.join(map(repr, unknown))} in the dataset (it has: {', '.join(known)})")
        items = [item for item in items if item.context_id in set(contexts)]
    if limit is not None:
        if limit < 1:
            raise DatasetError("limit must be at least 1")
        items = items[:limit]
    return items


# --- results -------------------------------------------------------------------------


@dataclass
class AnswerRecord:
    """One system's answer to one question, scored."""

    system: str
    top_k: int | None  # passages in the prompt (RAG only)
    id: str
    context_id: str
    question: str
    references: list[str]
    answer: str
    token_ids: list[int]
    retrieval_s: float
    generation_s: float  # prefill of whatever is not cached + decoding
    prompt_tokens: int
    reused_tokens: int  # prompt tokens restored from the cache instead of prefilled
    sources: list[str] = field(default_factory=list)  # retrieved passages' documents (RAG)
    em: float = 0.0
    f1: float = 0.0
    contains: float = 0.0
    similarity: float = 0.0
    identical_to_full: bool | None = None  # CAG only, when the full baseline ran
    ttft_s: float = 0.0  # time to first token: whatever prefill or composition precedes it, and the question's
    recompute: int | None = None  # cached passages: tokens recomputed at the start of each passage
    identical_to_prefill: bool | None = None  # cached passages: the same passages prefilled in full answered the same
    kl_first_token: float | None = None  # cached passages: KL(prefilled || composed) of the first answer token

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("token_ids")
        return d


@dataclass
class SystemReport:
    """Mean scores and times of one system (at one top-k)."""

    system: str
    top_k: int | None
    n: int
    em: float
    f1: float
    contains: float
    similarity: float
    retrieval_s: float  # mean per question
    generation_s: float  # mean per question
    prompt_tokens: float  # mean per question
    setup_s: float  # once for the whole run: cache prefill + store, or index building
    identical_to_full: float | None = None  # CAG: share of answers identical to the no-cache answers
    ttft_s: float = 0.0  # mean time to first token
    recompute: int | None = None  # cached passages
    identical_to_prefill: float | None = None  # cached passages: share identical to the same passages prefilled
    kl_first_token: float | None = None  # cached passages: mean KL of the first answer token's distribution

    @property
    def label(self) -> str:
        base = SYSTEM_LABELS.get(self.system, self.system)
        base = f"{base}, k={self.top_k}" if self.top_k is not None else base
        return f"{base}, recompute {self.recompute}" if self.recompute is not None else base

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.system != "cag":
            d.pop("identical_to_full")
        if self.system not in CACHED_SYSTEMS:
            for name in ("recompute", "identical_to_prefill", "kl_first_token"):
                d.pop(name)
        return d


@dataclass
class EvalReport:
    model: str
    dataset: str
    questions: int
    contexts: int
    max_new_tokens: int
    top_k: list[int]
    systems: list[SystemReport]
    answers: list[AnswerRecord]
    seconds: float

    def markdown(self, digits: int = 3) -> str:
        """The per-system table in Markdown (for notebooks and READMEs)."""
        head = "| system | EM | F1 | contains | similarity | retrieval s | generation s | prompt tokens |"
        composed = any(r.system in CACHED_SYSTEMS for r in self.systems)
        if composed:
            head += " first token s | same as prefilled | KL first token |"
        rows = [head, "|" + "---|" * (11 if composed else 8)]
        for r in self.systems:
            row = (
                f"| {r.label} | {r.em:.{digits}f} | {r.f1:.{digits}f} | {r.contains:.{digits}f} | {r.similarity:.{digits}f} "
                f"| {r.retrieval_s:.4f} | {r.generation_s:.3f} | {r.prompt_tokens:,.0f} |"
            )
            if composed:
                same = f"{r.identical_to_prefill:.{digits}f}" if r.identical_to_prefill is not None else "–"
                kl = f"{r.kl_first_token:.4f}" if r.kl_first_token is not None else "–"
                row += f" {r.ttft_s:.3f} | {same} | {kl} |"
            rows.append(row)
        return "\n".join(rows)


# --- answering -------------------------------------------------------------------------


def run_eval(
    lm: LoadedModel | str | None,
    dataset: str | os.PathLike | Sequence[QAItem],
    *,
    top_k: int | Sequence[int] = 3,
    systems: Sequence[str] = DEFAULT_SYSTEMS,
    max_new_tokens: int = 32,
    limit: int | None = None,
    contexts: Sequence[str] | None = None,
    split: str | None = None,
    fields: QAFields | None = None,
    passage_words: int = DEFAULT_PASSAGE_WORDS,
    recompute: int | Sequence[int] = 0,
    passage_tokens: int = DEFAULT_PASSAGE_TOKENS,
    home: str | os.PathLike | None = None,
    store=None,
    embedder: Embedder | None = None,
    on_progress: EvalProgress | None = None,
    dataset_name: str | None = None,
) -> EvalReport:
    """Answer every question with each system (greedy decoding) and score the answers.

    Questions are grouped by context: CAG builds one cache per context (kept in the
    store, so a second run reuses it) and answers all of that context's questions from it.
    ``top_k`` may be a list to sweep (the paper used 1, 3, 5 and 10). ``dataset`` is a
    file or hub name (see load_qa) or items already loaded; ``dataset_name`` names
    those in the report. The cached-passage systems cut passages of ``passage_tokens``
    tokens (text RAG's are ``passage_words`` words) and run at each ``recompute`` setting.
    """
    start = time.perf_counter()
    systems = check_systems(systems)
    ks = _check_top_k(top_k)
    rs = _check_recompute(recompute)
    if max_new_tokens < 1:
        raise DatasetError("max_new_tokens must be at least 1")
    items = list(dataset) if _is_items(dataset) else load_qa(dataset, split=split, fields=fields)
    items = select_items(items, contexts, limit)
    lm = resolve_model(lm, home)
    embedder = embedder or Embedder()
    groups = _group_by_context(items)

    per_question = sum(1 for s in systems if s not in RAG_SYSTEMS and s not in CACHED_SYSTEMS)
    per_question += len(ks) * sum(1 for s in systems if s in RAG_SYSTEMS)
    per_question += len(ks) * (len(rs) + 1) * sum(1 for s in systems if s in CACHED_SYSTEMS)
    total = per_question * len(items)
    done = 0
    setup: Counter[str] = Counter()
    records: list[AnswerRecord] = []
    prompt = PromptBuilder(lm.tokenizer)
    for context_id, group in groups.items():
        documents = group[0].documents
        kb = None
        if "cag" in systems or "full" in systems:
            kb = _build_cache(documents, lm, home, store)
            setup["cag"] += kb.report.seconds
        retrievers = _build_retrievers(documents, systems, passage_words, embedder, setup)
        collection = None
        if any(s in CACHED_SYSTEMS for s in systems):
            collection = build_passages(documents, _collection_name(documents), model=lm, home=home, store=store,
                                        passage_tokens=passage_tokens, embedder=embedder)
            for system, retriever in CACHED_SYSTEMS.items():
                if system in systems:
                    setup[system] += collection.report.seconds + collection.retriever(retriever).build_s
        for item in group:
            answers = chain(_answer_all(item, kb, retrievers, systems, ks, lm, prompt, max_new_tokens),
                            _answer_composed(item, collection, systems, ks, rs, max_new_tokens))
            for system, k, record in answers:
                records.append(record)
                done += 1
                if on_progress is not None:
                    on_progress(done, total, f"{context_id} · {SYSTEM_LABELS[system]}" + (f" k={k}" if k else ""))

    _score(records, embedder)
    return EvalReport(
        model=lm.name,
        dataset=dataset_name or _dataset_name(dataset),
        questions=len(items),
        contexts=len(groups),
        max_new_tokens=max_new_tokens,
        top_k=ks,
        systems=_summarise(records, systems, ks, rs, setup),
        answers=records,
        seconds=time.perf_counter() - start,
    )


def _is_items(dataset: Any) -> bool:
    return not isinstance(dataset, (str, os.PathLike)) and isinstance(dataset, Iterable)


def _dataset_name(dataset: Any) -> str:
    return "(in memory)" if _is_items(dataset) else os.fspath(dataset)


def check_systems(systems: Sequence[str]) -> list[str]:
    """The systems asked for, in the canonical order; DatasetError for an unknown one."""
    chosen = list(dict.fromkeys(s.strip().lower() for s in systems if s.strip()))
    unknown = [s for s in chosen if s not in SYSTEMS]
    if unknown or not chosen:
        raise DatasetError(f"unknown system {', '.join(unknown) or '(none)'}: choose from {', '.join(SYSTEMS)}")
    return [s for s in SYSTEMS if s in chosen]


def _check_recompute(recompute: int | Sequence[int]) -> list[int]:
    rs = [recompute] if isinstance(recompute, int) else list(recompute)
    if not rs or any(not isinstance(r, int) or r < 0 for r in rs):
        raise DatasetError(f"recompute must be whole numbers of tokens, 0 or more, got {recompute!r}")
    return sorted(set(rs))


def _check_top_k(top_k: int | Sequence[int]) -> list[int]:
    ks = [top_k] if isinstance(top_k, int) else list(top_k)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise DatasetError(f"top-k must be whole numbers of at least 1, got {top_k!r}")
    return sorted(set(ks))


def _group_by_context(items: Sequence[QAItem]) -> dict[str, list[QAItem]]:
    groups: dict[str, list[QAItem]] = {}
    for item in items:
        groups.setdefault(item.context_id, []).append(item)
    return groups


def _build_cache(documents: Sequence[Document], lm: LoadedModel, home, store):
    """cag.build over in-memory documents: written as a JSONL file whose records keep their sources."""
    with tempfile.TemporaryDirectory(prefix="cag-eval-") as folder:
        path = Path(folder) / "documents.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for doc in documents:
                f.write(json.dumps({"source": doc.source, "text": doc.text}, ensure_ascii=False) + "\n")
        return build([path], model=lm, home=home, store=store)


def _build_retrievers(documents, systems, passage_words: int, embedder: Embedder, setup: Counter) -> dict[str, Any]:
    if not any(s in RAG_SYSTEMS for s in systems):
        return {}
    passages = split_passages(documents, max_words=passage_words)
    retrievers: dict[str, Any] = {}
    if "bm25" in systems:
        retrievers["bm25"] = BM25Retriever(passages)
        setup["bm25"] += retrievers["bm25"].build_s
    if "dense" in systems:
        retrievers["dense"] = DenseRetriever(passages, embedder)
        setup["dense"] += retrievers["dense"].build_s
    return retrievers


def _answer_all(item: QAItem, kb, retrievers, systems, ks, lm, prompt, max_new_tokens):
    """Yield (system, top_k, record) for every answer to one question; full runs before CAG."""
    full = None
    if "full" in systems:
        answer = kb.ask(item.question, max_new_tokens=max_new_tokens, use_cache=False)
        full = _record(item, "full", None, answer.text, answer.token_ids, 0.0, answer.total_s, answer.prompt_tokens, 0)
        full.ttft_s = answer.ttft_s
        yield "full", None, full
    if "cag" in systems:
        answer = kb.ask(item.question, max_new_tokens=max_new_tokens)
        cag = _record(item, "cag", None, answer.text, answer.token_ids, 0.0, answer.total_s, answer.prompt_tokens,
                      answer.reused_tokens)
        cag.ttft_s = answer.ttft_s
        if full is not None:
            cag.identical_to_full = cag.token_ids == full.token_ids
        yield "cag", None, cag
    for k in ks:
        for system in RAG_SYSTEMS:
            if system in systems:
                yield system, k, _answer_rag(item, system, k, retrievers[system], lm, prompt, max_new_tokens)


def _answer_rag(item: QAItem, system: str, k: int, retriever, lm: LoadedModel, prompt: PromptBuilder,
                max_new_tokens: int) -> AnswerRecord:
    """Retrieve the top-k passages, then prefill them with the question and answer (no cache)."""
    start = time.perf_counter()
    hits: list[Hit] = retriever.search(item.question, k)
    retrieval_s = time.perf_counter() - start
    start = time.perf_counter()
    context_ids = prompt.context_ids([hit.passage.as_document() for hit in hits], lm.max_context)
    question_ids = prompt.question_ids(item.question)
    room = lm.max_context - len(context_ids) - len(question_ids)
    if room <= 0:
        raise DatasetError(f"question {item.id!r} with its top-{k} passages exceeds the model's window of "
                           f"{lm.max_context:,} tokens: use a smaller --top-k")
    cache = prefill(lm, context_ids).cache
    context_s = time.perf_counter() - start
    gen = generate(lm, cache, question_ids, max_new_tokens=min(max_new_tokens, room), temperature=0.0)
    generation_s = time.perf_counter() - start
    record = _record(item, system, k, gen.text.strip(), gen.token_ids, retrieval_s, generation_s,
                     len(context_ids) + len(question_ids), 0)
    record.sources = [hit.passage.source for hit in hits]
    record.ttft_s = context_s + gen.prefill_s
    return record


def _collection_name(documents: Sequence[Document]) -> str:
    """A store name for one context's passages: the same documents get the same collection."""
    digest = hashlib.sha256(json.dumps([[d.source, d.text] for d in documents]).encode()).hexdigest()[:16]
    return f"cag-eval-{digest}"


def _answer_composed(item: QAItem, collection, systems, ks, rs, max_new_tokens: int):
    """Yield (system, top_k, record) for the cached-passage systems: the same passages prefilled in full, then
    composed at each recompute setting, scored against it."""
    for k in ks if collection is not None else []:
        for system, retriever in CACHED_SYSTEMS.items():
            if system not in systems:
                continue
            start = time.perf_counter()
            chosen = [p for p, _ in collection.search(item.question, k, retriever)]
            retrieval_s = time.perf_counter() - start
            reference = collection.ask(item.question, passages=chosen, use_cache=False, first_logits=True,
                                       max_new_tokens=max_new_tokens)
            yield system, k, _composed_record(item, "prefilled-" + retriever, k, None, reference, retrieval_s, chosen)
            reference_log = torch.log_softmax(reference.first_logits.double(), dim=-1)  # float64: no rounding noise
            for r in rs:
                answer = collection.ask(item.question, passages=chosen, recompute=r, first_logits=True,
                                        max_new_tokens=max_new_tokens)
                record = _composed_record(item, system, k, r, answer, retrieval_s, chosen)
                record.identical_to_prefill = answer.token_ids == reference.token_ids
                log = torch.log_softmax(answer.first_logits.double(), dim=-1)
                record.kl_first_token = max(0.0, float((reference_log.exp() * (reference_log - log)).sum()))
                yield system, k, record


def _composed_record(item: QAItem, system: str, k: int, recompute: int | None, answer, retrieval_s: float,
                     chosen) -> AnswerRecord:
    record = _record(item, system, k, answer.text, answer.token_ids, retrieval_s, answer.total_s - answer.retrieval_s,
                     answer.prompt_tokens, answer.reused_tokens)
    record.sources = [p.passage.source for p in chosen]
    record.ttft_s = answer.ttft_s - answer.retrieval_s
    record.recompute = recompute
    return record


def _record(item: QAItem, system: str, k: int | None, text: str, token_ids: list[int], retrieval_s: float,
            generation_s: float, prompt_tokens: int, reused: int) -> AnswerRecord:
    return AnswerRecord(
        system=system, top_k=k, id=item.id, context_id=item.context_id, question=item.question,
        references=list(item.answers), answer=text, token_ids=list(token_ids), retrieval_s=retrieval_s,
        generation_s=generation_s, prompt_tokens=prompt_tokens, reused_tokens=reused,
    )


def _score(records: list[AnswerRecord], embedder: Embedder) -> None:
    """Fill in each record's metrics; embeddings are computed once per distinct text."""
    texts = list(dict.fromkeys([r.answer for r in records] + [ref for r in records for ref in r.references]))
    vectors = dict(zip(texts, embedder.encode(texts))) if texts else {}
    for r in records:
        r.em = exact_match(r.answer, r.references)
        r.f1 = token_f1(r.answer, r.references)
        r.contains = contains_answer(r.answer, r.references)
        # Cosines of unit vectors; clamped so rounding never leaves [0, 1] (negatives mean unrelated).
        r.similarity = max(0.0, min(1.0, max(float(vectors[r.answer] @ vectors[ref]) for ref in r.references)))


def _summarise(records: list[AnswerRecord], systems: Sequence[str], ks: Sequence[int], rs: Sequence[int],
               setup: Counter) -> list[SystemReport]:
    reports = []
    for system in systems:
        for k in (ks if system in RAG_SYSTEMS or system in CACHED_SYSTEMS else [None]):
            # A composed system's rows: the same passages prefilled in full, then each recompute setting.
            variants = [("prefilled-" + CACHED_SYSTEMS[system], None)] + [(system, r) for r in rs] \
                if system in CACHED_SYSTEMS else [(system, None)]
            for name, r in variants:
                rows = [a for a in records if a.system == name and a.top_k == k and a.recompute == r]
                if rows:
                    reports.append(_system_report(name, k, r, rows, setup.get(system, 0.0)))
    return reports


def _system_report(system: str, k: int | None, recompute: int | None, rows: list[AnswerRecord], setup_s: float) -> SystemReport:
    identical = [r.identical_to_full for r in rows if r.identical_to_full is not None]
    composed = system in CACHED_SYSTEMS
    return SystemReport(
        system=system, top_k=k, n=len(rows),
        em=_mean(r.em for r in rows), f1=_mean(r.f1 for r in rows), contains=_mean(r.contains for r in rows),
        similarity=_mean(r.similarity for r in rows), retrieval_s=_mean(r.retrieval_s for r in rows),
        generation_s=_mean(r.generation_s for r in rows), prompt_tokens=_mean(r.prompt_tokens for r in rows),
        setup_s=float(setup_s),
        identical_to_full=_mean(identical) if (system == "cag" and identical) else None,
        ttft_s=_mean(r.ttft_s for r in rows),
        recompute=recompute if composed else None,
        identical_to_prefill=_mean(float(bool(r.identical_to_prefill)) for r in rows) if composed else None,
        kl_first_token=_mean(r.kl_first_token or 0.0 for r in rows) if composed else None,
    )


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0

