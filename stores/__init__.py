"""Cache stores: the protocol cag uses and the local disk store."""

from .base import CacheStore, Entry, PrefixMatch, VerifyReport
from .local import LocalStore, validate_name

__all__ = ["CacheStore", "Entry", "PrefixMatch", "VerifyReport", "LocalStore", "validate_name"]
