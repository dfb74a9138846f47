"""cag: prompt caching and Cache-Augmented Generation.

Prefill documents once into a KV cache, store it as safetensors, and answer many
questions against the restored cache::

    import cag
    kb = cag.build(["docs/"], name="handbook")   # or cag.load("handbook")
    answer = kb.ask("What is the refund policy?").text
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import (
    CacheMismatchError,
    CacheNotFoundError,
    CagError,
    CompositionError,
    ContextTooLongError,
    CorruptCacheError,
    DocumentError,
    InvalidNameError,
    ModelError,
    PassageError,
    PromptError,
    StoreError,
)

# The heavy parts (torch, transformers) load on first use, so `cag --help` and
# `import cag.errors` stay fast.
_LAZY = {
    "Document": "documents",
    "load_documents": "documents",
    "Answer": "knowledge",
    "BuildReport": "knowledge",
    "KnowledgeBase": "knowledge",
    "build": "knowledge",
    "load": "knowledge",
    "DEFAULT_MODEL": "model",
    "LoadedModel": "model",
    "load_model": "model",
    "wrap_model": "model",
    "CachedGeneration": "prompt_cache",
    "PromptCache": "prompt_cache",
    "ComposedAnswer": "passages",
    "PassageCollection": "passages",
    "build_passages": "passages",
    "load_passages": "passages",
}

if TYPE_CHECKING:
    from .documents import Document, load_documents
    from .knowledge import Answer, BuildReport, KnowledgeBase, build, load
    from .model import DEFAULT_MODEL, LoadedModel, load_model, wrap_model
    from .passages import ComposedAnswer, PassageCollection, build_passages, load_passages
    from .prompt_cache import CachedGeneration, PromptCache


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cag' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "build",
    "load",
    "KnowledgeBase",
    "Answer",
    "BuildReport",
    "PromptCache",
    "CachedGeneration",
    "build_passages",
    "load_passages",
    "PassageCollection",
    "ComposedAnswer",
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
    "CompositionError",
    "PassageError",
]
