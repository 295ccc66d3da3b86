"""Where kshot keeps downloaded and converted data: an explicit root, else $KSHOT_DATA, else ~/.cache/kshot."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "KSHOT_DATA"


def data_root(root: str | Path | None = None) -> Path:
    """The data folder to use (created if missing)."""
    chosen = Path(root) if root is not None else Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "kshot")
    chosen = chosen.expanduser()
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen
