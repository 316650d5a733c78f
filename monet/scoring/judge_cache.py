"""On-disk cache of LLM-judge verdicts (SQLite, one table).

Key: SHA-256 of the JSON list ``[judge model, endpoint, prompt version, question, reference answer,
prediction]``, so a verdict is reused only for the same judge asked the same thing. Stored per
key: the parsed verdict (``correct``/``incorrect``/``unparseable``) and the judge's raw reply.
Nothing else is written — in particular no API key (the key is not part of any input here).

Thread-safe: one connection guarded by a lock (``check_same_thread=False``). Each ``put`` is
committed at once, so an interrupted run keeps every verdict it paid for.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path


def cache_key(model: str, endpoint: str, prompt_version: str, question: str, answer: str,
              prediction: str) -> str:
    payload = json.dumps([model, endpoint, prompt_version, question, answer, prediction],
                         ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """``get(key) -> (verdict, reply) | None``; ``put(key, verdict, reply)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(str(self.path), check_same_thread=False)
            self._conn.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, "
                               "verdict TEXT NOT NULL, reply TEXT)")
            self._conn.commit()
        except sqlite3.DatabaseError as e:
            raise ValueError(f"judge cache {self.path} is not a usable SQLite file: {e}") from e

    def get(self, key: str) -> tuple[str, str | None] | None:
        with self._lock:
            row = self._conn.execute("SELECT verdict, reply FROM verdicts WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row[0], row[1])

    def put(self, key: str, verdict: str, reply: str | None) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO verdicts (key, verdict, reply) VALUES (?, ?, ?)",
                               (key, verdict, reply))
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
