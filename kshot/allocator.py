"""glibc malloc settings for training: keep large per-step buffers instead of returning them to the OS.

By default glibc serves blocks above a sliding threshold (at most 32 MiB) with mmap and unmaps them when freed, and
trims the heap's top whenever 128 KiB are free. A training step allocates and frees the same large activations
(Conv-4's first layer on a 60-way Omniglot episode is about 72 MB) every step, so each step page-faults them back
in: on this project's CPU that cost as much kernel time as the computation itself. Raising the mmap threshold to
256 MiB and the trim threshold to 4 GiB (what `MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=4294967296`
do) keeps those buffers in the process. glibc reads those variables only at start-up, so kshot's entry points call
`mallopt` instead; a user who set either variable, or KSHOT_MALLOC_TUNING=0, keeps glibc's behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 1024 * 1024
TRIM_THRESHOLD = 4 * 1024 * 1024 * 1024 - 1  # mallopt takes a C int: the largest value below 4 GiB
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Apply the settings above with glibc's `mallopt`; True if applied, False where they do not apply (not
    glibc, the user's own MALLOC_* variables, or KSHOT_MALLOC_TUNING=0)."""
    if os.environ.get("KSHOT_MALLOC_TUNING", "1") == "0" or any(v in os.environ for v in USER_VARIABLES):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = min(trim_threshold, 2**31 - 1)
    return bool(mallopt(M_MMAP_THRESHOLD, min(mmap_threshold, 2**31 - 1))) and bool(mallopt(M_TRIM_THRESHOLD, trim))
