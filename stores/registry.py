"""A store is a URL: from its scheme to the backend that opens it.

Backends are found in the ``cag.stores`` entry-point group, one entry point per URL
scheme, each naming a factory ``factory(url: str, home: Path) -> CacheStore`` (``home``
is the cache home, where a remote backend keeps its local copy). cag declares
``file``, ``redis`` and ``rediss``; a third party adds a scheme from its own package::

    [project.entry-points."cag.stores"]
    s3 = "cag_s3:open_store"

``open_store`` opens what a user gave (a URL, a store object, or nothing: then
``$CAG_STORE``, else the local store under the cache home). Nothing outside
``cag.stores`` knows which backend it got.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from cag.errors import StoreError
from cag.home import cag_home, store_dir

__all__ = ["ENTRY_POINT_GROUP", "ENV", "backends", "default_url", "open_store", "parse_size", "redact"]

ENTRY_POINT_GROUP = "cag.stores"
ENV = "CAG_STORE"
# The backends cag ships, also used when the package metadata is not installed (a source tree on sys.path).
_BUILTIN = {
    "file": "cag.stores.local:open_file_store",
    "redis": "cag.stores.redis:open_redis_store",
    "rediss": "cag.stores.redis:open_redis_store",
}
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def backends() -> dict[str, EntryPoint]:
    """URL scheme -> entry point of its factory: cag's own, then those installed packages register."""
    found = {name: EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in _BUILTIN.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name.lower()] = ep
    return found


def default_url(home: str | os.PathLike | None = None) -> str:
    """``$CAG_STORE`` if set, else the local store under the cache home."""
    return os.environ.get(ENV, "").strip() or store_dir(home).resolve().as_uri()


def open_store(store=None, home: str | os.PathLike | None = None):
    """The store a URL names (``file:///…``, ``redis://…``, or a plain folder path), or ``store`` itself
    if it already is one; None means ``default_url(home)``."""
    if store is not None and not isinstance(store, (str, os.PathLike)):
        return store
    url = default_url(home) if store is None or not str(store).strip() else str(store).strip()
    match = _SCHEME.match(url)
    if match is None:  # a folder
        return _factory("file")(Path(url).expanduser().resolve().as_uri(), cag_home(home))
    return _factory(match.group(1).lower(), url)(url, cag_home(home))


def _factory(scheme: str, url: str = "") -> Callable:
    found = backends()
    if scheme not in found:
        raise StoreError(
            f"no store backend for {scheme}:// in {redact(url)!r} (known: {', '.join(sorted(found))}): use file:///PATH "
            f"or redis://HOST:PORT/DB, or install a package that registers {scheme!r} in the {ENTRY_POINT_GROUP!r} entry points"
        )
    try:
        return found[scheme].load()
    except Exception as exc:  # a broken third-party plugin: say which
        raise StoreError(f"cannot load the store backend for {scheme}:// ({found[scheme].value}): {exc}") from exc


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (user names are kept), for printing."""
    text = _QUERY_PASSWORD.sub(r"\1***", str(url))
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return re.sub(r"//[^/]*@", "//***@", text)
    if password is None:
        return text
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """'2GB', '500M', '1.5GiB', '1048576' -> bytes (binary units); ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: use e.g. 500MB, 2GB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
