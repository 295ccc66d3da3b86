"""A training run's folder: an exclusive lock held by the one trainer that writes into it, and an old run set
aside (never deleted up front) until the run that replaces it has saved its first checkpoint.

Layout: `checkpoints/` (best, last), `metrics.jsonl`, whatever the pipeline adds (results.json, curves.png), the
lock file `.lock` (holding the pid of the trainer that has the folder), and, while a replacement has not yet
checkpointed, the replaced run's files in `.replaced/`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kshot.training.checkpoint import has_checkpoint, recover_checkpoints

try:  # POSIX: flock; Windows: msvcrt's byte-range lock on the file's first byte, with the same meaning here
    import fcntl

    def _try_lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
except ImportError:  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as error:
            raise BlockingIOError(str(error)) from error

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

CHECKPOINTS = "checkpoints"
LOCK = ".lock"
SET_ASIDE = ".replaced"


class RunExistsError(FileExistsError):
    """Training into a folder that already holds a run, without asking to resume or overwrite it."""


class RunLockedError(RunExistsError):
    """Another trainer (this process or another) is training into the same folder right now."""


class RunLock:
    """An exclusive `flock` on `run_dir/.lock`, which holds the owner's pid so a refused trainer can name it.

    flock locks belong to an open file, so a second trainer is refused whether it runs in another process or in
    another thread of this one; the kernel drops the lock when its process dies, so a killed run never leaves
    a folder locked."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _try_lock(fd)
        except BlockingIOError:
            try:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            except OSError:  # Windows refuses reads of a locked byte range
                holder = "unknown"
            os.close(fd)
            folder = self.path.parent
            raise RunLockedError(f"{folder} is in use by another training process (pid {holder}, lock "
                                 f"{self.path}); wait for it to finish, or train into another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            _unlock(self.fd)
            os.close(self.fd)
            self.fd = None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _own_entries(run_dir: Path) -> list[Path]:
    """Everything in the folder that belongs to a run (all but the lock and the set-aside folder)."""
    return [path for path in Path(run_dir).iterdir() if path.name not in (LOCK, SET_ASIDE)]


def set_aside(run_dir: Path) -> bool:
    """Move every file of the folder's old run (checkpoints, logs, results, plots) into `.replaced/`, so that a
    new run starts in an empty folder while the old one can still come back (`put_back`). False if empty."""
    entries = _own_entries(run_dir)
    if not entries:
        return False
    aside = Path(run_dir) / SET_ASIDE
    aside.mkdir()
    for path in entries:
        os.replace(path, aside / path.name)
    return True


def put_back(run_dir: Path) -> None:
    """Undo `set_aside`: delete what the new run wrote and move the old run's files back."""
    aside = Path(run_dir) / SET_ASIDE
    if not aside.is_dir():
        return
    for path in _own_entries(run_dir):
        _remove(path)
    for path in aside.iterdir():
        os.replace(path, Path(run_dir) / path.name)
    aside.rmdir()


def discard_set_aside(run_dir: Path) -> None:
    """Delete the replaced run for good (the new run has saved a checkpoint)."""
    shutil.rmtree(Path(run_dir) / SET_ASIDE, ignore_errors=True)


def recover(run_dir: Path) -> None:
    """Finish what a killed trainer left half done (call under the lock): a run set aside by a replacement
    that was killed before its first checkpoint comes back (one whose replacement checkpointed is deleted),
    and partial checkpoint folders of interrupted saves are removed."""
    if (Path(run_dir) / SET_ASIDE).is_dir():
        if has_checkpoint(Path(run_dir) / CHECKPOINTS):
            discard_set_aside(run_dir)
        else:
            put_back(run_dir)
    recover_checkpoints(Path(run_dir) / CHECKPOINTS)


def holds_checkpoint(run_dir: Path) -> bool:
    """Whether the folder holds a run that got as far as a checkpoint (only such a run can be resumed)."""
    return has_checkpoint(Path(run_dir) / CHECKPOINTS)
