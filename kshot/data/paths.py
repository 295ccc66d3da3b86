"""Where kshot keeps downloaded and converted data: an explicit root, else $KSHOT_DATA, else the platform's
user cache folder for kshot (`platformdirs.user_cache_dir`): `$XDG_CACHE_HOME/kshot` on Linux, which is
`~/.cache/kshot` when XDG_CACHE_HOME is unset; `~/Library/Caches/kshot` on macOS; `%LOCALAPPDATA%\\kshot\\Cache`
on Windows."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

DATA_ENV = "KSHOT_DATA"


def default_data_root() -> Path:
    """The platform's user cache folder for kshot (not created)."""
    return Path(platformdirs.user_cache_dir("kshot", appauthor=False))


def data_root(root: str | Path | None = None) -> Path:
    """The data folder to use (created if missing): `root`, else $KSHOT_DATA, else `default_data_root()`."""
    chosen = Path(root) if root is not None else Path(os.environ.get(DATA_ENV) or default_data_root())
    chosen = chosen.expanduser()
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen
