"""Identify the evaluated checkpoint: sha256 of its weight files, computed once per file version.

The digest of a checkpoint is the sha256 of the lines ``"<file name> <file sha256>\\n"`` over its
weight files (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth`` directly in the directory, sorted by
name). Hashing 15 GB takes minutes, so per-file digests are cached in a JSON file (the evaluation
output folder's ``checkpoint_hash.json``) keyed by file name, size and modification time (ns): an
unchanged file is not read again; a rewritten one (new size or mtime) is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from monet.atomic import atomic_write_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CHUNK = 8 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {d}")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ValueError(f"{d}: no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    return files


def checkpoint_hash(model_dir: str | os.PathLike, cache_path: str | os.PathLike | None = None) -> dict:
    """``{"sha256": digest, "files": {name: {"size", "mtime_ns", "sha256"}}, "rehashed": [names]}``.

    With ``cache_path`` the per-file digests of files whose size and mtime match the cache are
    reused and the cache is rewritten (atomically) with the current state."""
    cached: dict = {}
    if cache_path is not None and Path(cache_path).is_file():
        try:
            cached = json.loads(Path(cache_path).read_text()).get("files", {})
        except (json.JSONDecodeError, AttributeError):
            cached = {}  # a damaged cache only costs a re-hash
    files, rehashed = {}, []
    for p in weight_files(model_dir):
        st = p.stat()
        c = cached.get(p.name)
        if isinstance(c, dict) and c.get("size") == st.st_size and c.get("mtime_ns") == st.st_mtime_ns \
                and isinstance(c.get("sha256"), str):
            digest = c["sha256"]
        else:
            digest = file_sha256(p)
            rehashed.append(p.name)
        files[p.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    total = hashlib.sha256("".join(f"{n} {f['sha256']}\n" for n, f in sorted(files.items())).encode()).hexdigest()
    result = {"model": str(Path(model_dir).resolve()), "sha256": total, "files": files}
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_path, result, indent=1)
    return {**result, "rehashed": rehashed}
