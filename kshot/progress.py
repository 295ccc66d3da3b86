"""Progress bars that draw on a terminal and stay quiet everywhere else.

A tqdm bar redraws itself several times a second. On a terminal that is one line updating in place; written
to a log file, a pipe or a CI job's output, every redraw becomes more text, and a long training run fills its
log with bars. tqdm's `disable=None` turns a bar off when its output stream is not a TTY, so every bar in
kshot goes through `progress_bar`, which passes `disable=None` unless the caller switched progress off.
(In Jupyter, `tqdm.auto` picks the notebook bar, which treats `None` as "show".)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A `tqdm.auto.tqdm` bar over `iterable` (or a manual one, with `total=`), shown only when `enabled` and
    its output (`file=`, standard error by default) is a terminal. Other keyword arguments go to tqdm."""
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
