"""Where cag keeps its files: converted models and the cache store."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cag_home", "models_dir", "store_dir"]


def cag_home(home: str | os.PathLike | None = None) -> Path:
    """The cache home: ``home`` if given, else ``$CAG_HOME``, else ``~/.cache/cag``."""
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get("CAG_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cag"


def models_dir(home: str | os.PathLike | None = None) -> Path:
    return cag_home(home) / "models"


def store_dir(home: str | os.PathLike | None = None) -> Path:
    return cag_home(home) / "store"
