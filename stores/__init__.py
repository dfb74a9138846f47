"""Cache stores: the protocol cag uses, the registry from URL to backend, and the backends cag ships."""

from .base import CacheStore, Entry, PrefixMatch, VerifyReport
from .local import LocalStore, validate_name
from .registry import backends, default_url, open_store, redact

__all__ = ["CacheStore", "Entry", "PrefixMatch", "VerifyReport", "LocalStore", "validate_name", "backends",
           "default_url", "open_store", "redact", "RedisStore"]


def __getattr__(name: str):
    if name == "RedisStore":  # imports the redis client on first use only
        from .redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
