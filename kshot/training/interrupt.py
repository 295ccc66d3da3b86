"""Stopping a training run on Ctrl-C or SIGTERM without losing it: the first signal asks the trainer to stop at
the end of the current step, where it saves its `last` checkpoint and raises `TrainingInterrupted`; a second
Ctrl-C stops at once, as Python normally does (losing only what the checkpoint cadence had not saved)."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal after saving its `last` checkpoint; the message says how to resume."""


class StopRequest:
    """Context manager: while active (in the main thread), SIGINT and SIGTERM set `signal_name` instead of
    killing the process; elsewhere (another thread, where handlers cannot be installed) it never fires."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step to end
        self.signal_name = signal.Signals(number).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
