"""Downloading files safely: progress bar, md5 check, and nothing half-written left behind on failure."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kshot.progress import progress_bar


class DownloadError(RuntimeError):
    """A download that failed or whose checksum did not match."""


def md5sum(path: Path) -> str:
    return file_digest(path, "md5")


def file_digest(path: Path, algorithm: str, chunk: int = 1 << 20) -> str:
    """Hex digest of a file read in chunks (never whole into memory)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it replaces `target` only if the block ends without error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.replace(temporary_path, target)
    finally:
        temporary_path.unlink(missing_ok=True)


def download(url: str, target: Path, md5: str | None, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download `url` to `target`, checking its md5; on any failure `target` is left as it was."""
    target = Path(target)
    with atomic_path(target) as partial:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with progress_bar(total=total, unit="B", unit_scale=True, desc=f"downloading {target.name}",
                                  enabled=progress, leave=False) as bar:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                        bar.update(len(block))
                if total is not None and out.tell() != total:
                    raise DownloadError(f"{url}: got {out.tell()} bytes of {total}; the transfer was cut short")
        except (OSError, http.client.HTTPException) as error:
            raise DownloadError(f"could not download {url}: {error}. Check the network, or place the file "
                                f"at {target} yourself") from error
        if md5 is not None:
            found = md5sum(partial)
            if found != md5:
                raise DownloadError(f"{url}: md5 {found} does not match the expected {md5}; the file is "
                                    f"corrupt or truncated and was not kept")
    return target


def given_or_env(given: str | Path | None, env: str) -> Path | None:
    """A user's local copy: the path given, else the one in environment variable `env`, else None."""
    chosen = given if given is not None else os.environ.get(env) or None
    return Path(chosen).expanduser() if chosen is not None else None


def local_or_download(given: str | Path | None, env: str, cached: Path, url: str, md5: str, download_missing: bool,
                      error: type[Exception], setting: str = "dataset.archive") -> Path:
    """A dataset archive: `given`, else $`env`, else the copy at `cached` (under the data root), else a download
    from `url` checked by `md5` and written atomically; a missing local copy is an `error` saying what to set."""
    path = given_or_env(given, env)
    if path is not None:
        if not path.is_file():
            raise error(f"{path} not found: point {setting} or {env} at {cached.name}")
        return path
    if cached.is_file():
        return cached
    if not download_missing:
        raise error(f"{cached} not found and download=False; pass download=True, or point {env} at a copy of "
                    f"{cached.name} ({url})")
    return download(url, cached, md5=md5)
