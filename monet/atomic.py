"""Atomic file writes: write a temporary file next to the target, then ``os.replace`` it, so a
reader (or a resumed run) never sees a partly written file; and the one error type for a full disk
(:class:`DiskFullError`), so every writer reports ``ENOSPC`` the same way, naming the path."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if is_disk_full(e):
            raise disk_full_error(e, path, path.name) from e
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and is_disk_full(e):
            raise disk_full_error(e, path, path.name) from e
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = None) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=indent is not None) + "\n")


class DiskFullError(OSError):
    """A write failed because the file system is full (``ENOSPC``); the message names the path."""


def is_disk_full(err: BaseException) -> bool:
    """True for ``ENOSPC``, also when a library re-raised it as its own error type (safetensors
    reports write failures as ``SafetensorError("... No space left on device (os error 28)")``)."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    text = str(err)
    return "No space left on device" in text or "os error 28" in text


def disk_full_error(err: BaseException, path: str | os.PathLike, what: str) -> DiskFullError:
    """The :class:`DiskFullError` to raise for ``err`` while writing ``what`` at ``path``."""
    return DiskFullError(errno.ENOSPC, f"no space left on device while writing {what}: {path} "
                                       f"(free space there, or write elsewhere) [{type(err).__name__}: {err}]")
