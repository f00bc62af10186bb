"""Atomic file writes: another process sees the old file or the whole new one, never a part."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` through a temporary file in the same directory, fsync, `os.replace`.

    For the workspace's own files: missing parent directories are made, and whatever is at
    `path` is replaced. A path the user named goes through `esper.library.write_output`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data, mode)


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """The atomic write itself, into a directory that exists: temporary file, fsync, chmod,
    `os.replace`, fsync of the directory. The temporary file never outlives a failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


@contextmanager
def held(lock_path: Path, timeout_s: float, timed_out: Callable[[str], Exception]) -> Iterator[None]:
    """Hold the file lock at `lock_path` (released with the process if it dies), waiting at
    most `timeout_s` for another process; past that, raise `timed_out(lock_path)`."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise timed_out(str(lock_path)) from None
    try:
        yield
    finally:
        lock.release()
