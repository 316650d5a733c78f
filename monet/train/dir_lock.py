"""Exclusive ownership of a directory by one process: an advisory ``flock`` on a lock file.

The kernel drops an ``flock`` when its holder exits in any way (including SIGKILL or a power
loss), so a lock file left behind by a dead process is never stale: the next process simply takes
it. The file records the holder (pid, host, start time) only so that a refusal can name it.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path


class DirectoryBusy(RuntimeError):
    """Another live process holds the lock. ``holder`` is what it recorded (may be empty)."""

    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by another process" + (f" ({holder})" if holder else ""))


class DirectoryLock:
    """Hold ``root/name`` exclusively (non-blocking; raises :class:`DirectoryBusy` when taken).

    On systems without ``fcntl`` (non-POSIX) nothing is locked.
    """

    def __init__(self, root: str | os.PathLike, name: str):
        self.path = Path(root) / name
        self._f = open(self.path, "a+b")
        try:
            import fcntl
        except ImportError:  # non-POSIX: no locking
            return
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.seek(0)
            holder = self._f.read(200).decode("utf-8", "replace").strip()
            self._f.close()
            raise DirectoryBusy(self.path, holder) from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._f.flush()

    @property
    def held(self) -> bool:
        return not self._f.closed

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock); idempotent."""
        if not self._f.closed:
            self._f.close()
