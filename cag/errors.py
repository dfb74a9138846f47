"""Exceptions raised by cag. Each message says what went wrong and how to fix it.

The library raises these; only the CLI turns them into one line and an exit code, and
only the server (``cag serve``) into an OpenAI-style error object and an HTTP status.
"""

from __future__ import annotations

__all__ = [
    "CagError",
    "DocumentError",
    "ModelError",
    "ContextTooLongError",
    "PromptError",
    "CacheNotFoundError",
    "CacheMismatchError",
    "CorruptCacheError",
    "StoreError",
    "InvalidNameError",
    "StoreUnreachableError",
    "StoreAuthError",
    "EntryTooBigError",
    "DatasetError",
    "RetrieverError",
    "EmbeddingModelError",
    "BenchError",
    "PeerError",
    "CompositionError",
    "PassageError",
    "RequestError",
    "ModelNotFoundError",
    "AuthenticationError",
    "CacheMemoryError",
]


class CagError(Exception):
    """Base class of every error cag raises on purpose."""


class DocumentError(CagError):
    """A document is missing, empty, unreadable or of an unsupported type."""


class ModelError(CagError):
    """The model or its tokenizer cannot be loaded or used."""


class PromptError(CagError):
    """The prompt cannot be built (for example, a chat template that cannot be split)."""


class ContextTooLongError(CagError):
    """The documents do not fit into the model's context window."""


class CacheNotFoundError(CagError):
    """No cache is stored under that name or key."""


class CacheMismatchError(CagError):
    """A cache was built by another model, tokenizer or KV dtype than the one in use."""


class CorruptCacheError(CagError):
    """A cache file is truncated, malformed or fails its checksum."""


class StoreError(CagError):
    """The cache store cannot be read or written."""


class InvalidNameError(StoreError):
    """A cache name that could escape the store or is otherwise unusable."""


class StoreUnreachableError(StoreError):
    """A remote store cannot be reached (refused, timed out, name not resolved)."""


class StoreAuthError(StoreError):
    """A remote store refused the credentials in its URL."""


class EntryTooBigError(StoreError):
    """A cache is bigger than the store accepts; refused before anything was written."""


class DatasetError(CagError):
    """An evaluation dataset is missing, unreadable or lacks a required field."""


class RetrieverError(CagError):
    """A retriever cannot be built (e.g. a missing optional package)."""


class EmbeddingModelError(ModelError):
    """The embedding model (all-MiniLM-L6-v2) is not installed or cannot be loaded."""


class BenchError(CagError):
    """The benchmark cannot run as asked (no questions, no plotting library...)."""


class PeerError(CagError):
    """The llama.cpp peer cannot run (not installed, or llama.cpp refused the model or state)."""


class CompositionError(ModelError):
    """Passage caches cannot be composed for this model: its positions are not RoPE, or not re-rotatable exactly."""


class PassageError(CagError):
    """A passage collection is missing, empty, or asked for something it cannot do."""


class RequestError(CagError):
    """A request asks for something cag cannot do as asked (e.g. several choices, an unknown option)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(CacheNotFoundError):
    """A request names a model that is neither the served model nor a knowledge base in the store."""


class AuthenticationError(CagError):
    """A request to the server lacks the API key it was started with, or brings another one."""


class CacheMemoryError(CagError):
    """A cache does not fit into the memory the server may hold caches in (``--cache-ram``)."""
