"""cag: prompt caching and Cache-Augmented Generation.

Prefill documents once into a KV cache, store it as safetensors, and answer many
questions against the restored cache::

    import cag
    kb = cag.build(["docs/"], name="handbook")   # or cag.load("handbook")
    print(kb.ask("What is the refund policy?").text)
"""

from .documents import Document, load_documents
from .errors import (
    CacheMismatchError,
    CacheNotFoundError,
    CagError,
    ContextTooLongError,
    CorruptCacheError,
    DocumentError,
    InvalidNameError,
    ModelError,
    PromptError,
    StoreError,
)
from .knowledge import Answer, BuildReport, KnowledgeBase, build, load
from .model import DEFAULT_MODEL, LoadedModel, load_model, wrap_model
from .prompt_cache import CachedGeneration, PromptCache

__version__ = "0.1.0"

__all__ = [
    "build",
    "load",
    "KnowledgeBase",
    "Answer",
    "BuildReport",
    "PromptCache",
    "CachedGeneration",
    "load_model",
    "wrap_model",
    "LoadedModel",
    "DEFAULT_MODEL",
    "Document",
    "load_documents",
    "CagError",
    "DocumentError",
    "ModelError",
    "PromptError",
    "ContextTooLongError",
    "CacheNotFoundError",
    "CacheMismatchError",
    "CorruptCacheError",
    "StoreError",
    "InvalidNameError",
]
