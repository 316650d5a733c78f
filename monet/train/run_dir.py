"""One SFT run owns its output directory.

Rules (enforced by :class:`RunDirectory`, held for the whole run):

* a run lock (``OUTPUT/.run.lock``, see :mod:`monet.train.dir_lock`): a second run on the same
  directory is refused while the first is alive; a lock file left by a killed run is free again;
* a fresh run (no ``resume``) needs a directory without an earlier run's files: otherwise it is
  refused with a message offering ``--resume`` (continue that run) or ``--overwrite`` (delete that
  run's files first). ``--overwrite`` deletes only files an SFT run writes; anything else in the
  directory is never deleted, and the run is refused;
* the preprocessing cache (``OUTPUT/cache``, reused by design) does not count as an earlier run;
* temporary checkpoint folders of a killed writer are removed at the start (under the lock).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from monet.train.checkpoint import remove_stale_temporaries
from monet.train.dir_lock import DirectoryBusy, DirectoryLock

RUN_LOCK = ".run.lock"
#: Entries a run writes into its output directory (--overwrite deletes exactly these).
_RUN_FILES = re.compile(r"^(checkpoint-\d+|\.checkpoint-.*|latest|\.latest\..*\.tmp|metrics\.jsonl|"
                        r"\.metrics\.jsonl\..*\.tmp|summary\.json|tensorboard|wandb)$")
#: Entries that never make a directory "used": the lock and the reusable preprocessing cache.
_NEUTRAL = {RUN_LOCK, "cache"}


class RunDirectoryError(ValueError):
    """The output directory belongs to another (live or earlier) run."""


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


class RunDirectory:
    """Take ``path`` for one run (see the module rules). ``release()`` (or the end of the
    process) frees it. ``removed_temporaries``: stale checkpoint folders deleted at the start."""

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        if resume and overwrite:
            raise RunDirectoryError("--resume continues the run in output_dir and --overwrite deletes it: pass one")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = DirectoryLock(self.path, RUN_LOCK)
        except DirectoryBusy as e:
            raise RunDirectoryError(f"output_dir {self.path} is in use by another run ({e.holder or 'unknown holder'}, "
                                    f"lock {e.path}); wait for it to finish or choose another output_dir") from None
        try:
            self.removed_temporaries = remove_stale_temporaries(self.path)
            if not resume:
                self._claim_fresh(overwrite)
        except BaseException:
            self._lock.release()
            raise

    def _claim_fresh(self, overwrite: bool) -> None:
        used = sorted(p.name for p in self.path.iterdir() if p.name not in _NEUTRAL)
        if not used:
            return
        foreign = [n for n in used if not _RUN_FILES.match(n)]
        if not overwrite:
            shown = ", ".join(used[:6]) + (", ..." if len(used) > 6 else "")
            raise RunDirectoryError(
                f"output_dir {self.path} already holds {'an earlier run' if not foreign else 'files'} ({shown}); "
                "pass --resume to continue that run, --overwrite to delete its files and start over, "
                "or choose another output_dir")
        if foreign:
            raise RunDirectoryError(f"output_dir {self.path} holds files that are not from an SFT run "
                                    f"({', '.join(foreign[:6])}); --overwrite only deletes a run's own files: "
                                    "choose an empty output_dir")
        for name in used:
            _remove(self.path / name)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
