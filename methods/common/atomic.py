"""Atomic writes: a kill at any moment leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_WORDS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


class DiskFull(OSError):
    """A write ran out of space (or quota); the message names the file being written."""

    def __init__(self, path: str | Path):
        super().__init__(errno.ENOSPC, f"no space left on device writing {path}")
        self.path = Path(path)

    def __str__(self) -> str:
        return self.strerror


def is_out_of_space(error: BaseException | None) -> bool:
    """True if ``error`` or an exception it was raised from or during is ENOSPC / EDQUOT
    (torch.save, for one, reports a full disk as a RuntimeError raised during the OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return True
        if any(words in str(error) for words in _NO_SPACE_WORDS):  # e.g. safetensors' own error
            return True
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return False


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over it.
    Running out of space raises :class:`DiskFull` naming ``path``; the old file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise DiskFull(path) from None
        raise
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)  # the rename itself survives a power cut
    except Exception as e:
        if is_out_of_space(e):
            raise DiskFull(path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[bool]:
    """Try to hold an exclusive lock on ``path`` (created if missing) while inside; yields True if
    this process holds it, False at once if another one does. The kernel drops a lock when its
    holder dies, so a killed process never leaves a stale lock (``flock``: works on local disks
    and on Linux NFS clients; without ``fcntl``, e.g. on Windows, there is no lock: True)."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
