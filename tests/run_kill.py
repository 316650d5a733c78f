"""Test helper: SIGKILL a training subprocess once it has committed a given checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from monet.rl.checkpoint import latest_checkpoint


def sigkill_at_checkpoint(proc: subprocess.Popen, out_dir: Path, name: str, timeout: float) -> None:
    """Poll ``out_dir`` until its latest checkpoint is ``name``, SIGKILL ``proc`` (started with
    ``stderr=PIPE``, text mode), wait for it and check it died of the signal. Fails if the run ends
    first or nothing appears within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    try:
        while latest_checkpoint(out_dir) is None or latest_checkpoint(out_dir).name != name:
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, f"no {name} within {timeout} s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
