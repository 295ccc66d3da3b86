"""Reading pickled NumPy data without running pickled code.

Unpickling calls whatever callable the file names (`os.system`, `builtins.exec`, ...), so a pickle from the
internet can run anything. Datasets distributed as pickles (miniImageNet's `mini-imagenet-cache-*.pkl`) only hold
NumPy arrays inside plain dicts and lists, so `safe_load` resolves only the handful of globals those need and
refuses every other one with a one-line `UnsafePickleError`, before calling anything.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import pickle
from pathlib import Path
from typing import Any, BinaryIO

ALLOWED_GLOBALS = frozenset({
    # NumPy arrays, dtypes and scalars (numpy 1.x writes numpy.core.*, numpy 2 writes numpy._core.*)
    ("numpy._core.multiarray", "_reconstruct"),  # ndarray.__reduce__ (pickle protocols 0-4)
    ("numpy._core.numeric", "_frombuffer"),      # ndarray.__reduce_ex__ (pickle protocol 5)
    ("numpy._core.multiarray", "scalar"),        # NumPy scalars such as np.int64(3)
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # bytes in protocol 0-2 pickles written by Python 3; containers without an opcode of their own
    ("_codecs", "encode"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "complex"),
    ("collections", "OrderedDict"),
})


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle that names a callable other than those NumPy arrays and plain containers need."""


class RestrictedUnpickler(pickle.Unpickler):
    """A `pickle.Unpickler` that resolves only `ALLOWED_GLOBALS` (Python 2 pickles are read as latin-1)."""

    def __init__(self, file: BinaryIO, source: str = "pickle") -> None:
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (__builtin__.set, ...), as pickle itself maps them; no Python 3 module has these names.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        canonical = module.replace("numpy.core.", "numpy._core.", 1) if module.startswith("numpy.core.") else module
        if (canonical, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(f"{self.source}: refusing to load {module}.{name}; kshot only unpickles NumPy "
                                    f"arrays and plain containers (this file may try to run code; do not open it "
                                    f"with pickle.load)")
        try:
            return getattr(importlib.import_module(canonical), name)
        except (ImportError, AttributeError):  # numpy 1.x before numpy._core existed
            return getattr(importlib.import_module(module), name)


def safe_load(file: str | Path | BinaryIO) -> Any:
    """Unpickle a file (a path or an open binary file) allowing only NumPy arrays and plain containers."""
    if isinstance(file, (str, Path)):
        with open(file, "rb") as handle:
            return RestrictedUnpickler(handle, str(file)).load()
    return RestrictedUnpickler(file, getattr(file, "name", "pickle")).load()


def safe_loads(data: bytes) -> Any:
    """`safe_load` for pickled bytes."""
    return RestrictedUnpickler(io.BytesIO(data)).load()
