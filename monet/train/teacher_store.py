"""Teacher-state stores: all-layer hidden states per sample, sharded safetensors plus an index.

Replaces the research code's one ``.pt`` per sample (``[29, N, 3584]`` bf16, TB scale). On disk::

    STORE/index.json               header + key -> {shard, tensor, num_positions}
    STORE/shard-00000.safetensors  tensors "<sanitised key>.<hash>" of shape [layers_kept, N, D]
                                   (and "<name>.positions" [N] int64 when given)

Shards are written to a temporary file and renamed; the index is rewritten atomically after each
shard, so a crash loses at most the unflushed buffer and a restarted writer (same settings) skips
the keys already stored. Keys are ``dataset_name/sample_id``. Layer numbers are the model's
hidden-state indices (0 = embeddings, last = final norm).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from monet.atomic import atomic_write_json

INDEX = "index.json"
FORMAT_VERSION = 1
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class TeacherStoreError(ValueError):
    """A store is missing, inconsistent, or lacks what a batch needs."""


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise TeacherStoreError(f"teacher store dtype must be one of {sorted(_DTYPES)}, got {dtype}")


def tensor_name(key: str) -> str:
    """A safetensors-safe, unique tensor name for a sample key."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:80]
    return f"{safe}.{hashlib.sha1(key.encode('utf-8')).hexdigest()[:12]}"


_write_json_atomic = atomic_write_json


class TeacherStoreWriter:
    """Append teacher states to a store (context manager; resumable).

    Args: ``num_layers_total`` hidden-state layers of the model (N + 1); ``layers`` the ones kept
    (None = all); ``dtype`` on disk; ``hidden_size`` D; ``kind`` ``"observation_reps"`` or
    ``"latents"``; ``shard_max_bytes`` flush threshold. Adding a key twice is an error.
    """

    def __init__(self, root: str | os.PathLike, *, num_layers_total: int, layers: Sequence[int] | None = None,
                 dtype: torch.dtype = torch.bfloat16, hidden_size: int, kind: str,
                 shard_max_bytes: int = 1 << 30, meta: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        layers = list(range(num_layers_total)) if layers is None else [int(x) for x in layers]
        bad = [x for x in layers if not 0 <= x < num_layers_total]
        if bad:
            raise TeacherStoreError(f"layers {bad} out of range for a model with {num_layers_total} hidden-state layers")
        self.header = {"format_version": FORMAT_VERSION, "kind": kind, "layers": layers, "dtype": _dtype_name(dtype),
                       "hidden_size": int(hidden_size), "num_layers_total": int(num_layers_total), "meta": meta or {}}
        self.dtype, self.shard_max_bytes = dtype, shard_max_bytes
        self.entries: dict[str, dict] = {}
        self.shards: list[str] = []
        index = self.root / INDEX
        if index.is_file():
            old = json.loads(index.read_text())
            for field in ("kind", "layers", "dtype", "hidden_size", "num_layers_total"):
                if old["header"].get(field) != self.header[field]:
                    raise TeacherStoreError(f"{self.root} was written with {field}={old['header'].get(field)!r}, "
                                            f"this run uses {self.header[field]!r}; use another directory")
            self.entries, self.shards = old["entries"], old["shards"]
        self._buffer: dict[str, torch.Tensor] = {}
        self._pending: dict[str, dict] = {}
        self._bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self.entries or key in self._pending

    def __len__(self) -> int:
        return len(self.entries) + len(self._pending)

    def add(self, key: str, states: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Store ``states`` [layers_kept, N, D] for ``key`` (cast to the store dtype)."""
        if key in self:
            raise TeacherStoreError(f"teacher store {self.root} already has an entry for {key!r}")
        L, D = len(self.header["layers"]), self.header["hidden_size"]
        if states.dim() != 3 or states.shape[0] != L or states.shape[2] != D:
            raise TeacherStoreError(f"{key!r}: states must be [layers={L}, N, hidden={D}], got {tuple(states.shape)}")
        if positions is not None and positions.shape != (states.shape[1],):
            raise TeacherStoreError(f"{key!r}: positions {tuple(positions.shape)} do not match N={states.shape[1]}")
        name = tensor_name(key)
        self._buffer[name] = states.detach().to("cpu", self.dtype).contiguous()
        if positions is not None:
            self._buffer[name + ".positions"] = positions.detach().to("cpu", torch.int64).contiguous()
        self._pending[key] = {"tensor": name, "num_positions": int(states.shape[1])}
        self._bytes += self._buffer[name].numel() * self._buffer[name].element_size()
        if self._bytes >= self.shard_max_bytes:
            self.flush()

    def flush(self) -> None:
        """Write buffered entries as one new shard and update the index."""
        if not self._pending:
            return
        from safetensors.torch import save_file

        shard = f"shard-{len(self.shards):05d}.safetensors"
        tmp = self.root / f".{shard}.tmp"
        save_file(self._buffer, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
        os.replace(tmp, self.root / shard)
        self.shards.append(shard)
        for key, e in self._pending.items():
            self.entries[key] = {**e, "shard": shard}
        self._buffer, self._pending, self._bytes = {}, {}, 0
        _write_json_atomic(self.root / INDEX, {"header": self.header, "shards": self.shards, "entries": self.entries})

    def close(self) -> None:
        self.flush()
        if not (self.root / INDEX).is_file():  # an empty store still gets a header
            _write_json_atomic(self.root / INDEX, {"header": self.header, "shards": self.shards, "entries": self.entries})

    def __enter__(self) -> "TeacherStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was complete; the buffer of a failed run is dropped
            self._buffer, self._pending = {}, {}


class TeacherStore:
    """Read teacher states (memory-mapped shards, opened lazily and cached)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        index = self.root / INDEX
        if not index.is_file():
            raise TeacherStoreError(f"no teacher store at {self.root} (missing {index}); "
                                    "run `monet precompute teacher-reps` / `teacher-latents` first")
        data = json.loads(index.read_text())
        self.header, self.entries = data["header"], data["entries"]
        self._handles: dict[str, Any] = {}

    @property
    def layers(self) -> list[int]:
        return list(self.header["layers"])

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def _handle(self, shard: str):
        if shard not in self._handles:
            from safetensors import safe_open

            path = self.root / shard
            if not path.is_file():
                raise TeacherStoreError(f"teacher store shard missing: {path}")
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
            except Exception as e:
                raise TeacherStoreError(f"teacher store shard {path} is unreadable: {e}") from None
        return self._handles[shard]

    def get(self, key: str, *, layers: Sequence[int] | None = None, dtype: torch.dtype | None = None,
            expected_positions: int | None = None) -> torch.Tensor:
        """``[n_layers, N, D]`` for ``key``; ``layers`` selects stored model layers by index."""
        e = self.entries.get(key)
        if e is None:
            raise TeacherStoreError(f"teacher store {self.root} has no entry for {key!r}; rerun "
                                    f"`monet precompute` on the same data (it resumes and fills the gaps)")
        if expected_positions is not None and e["num_positions"] != expected_positions:
            raise TeacherStoreError(f"teacher store {self.root}: {key!r} has {e['num_positions']} positions, the batch "
                                    f"expects {expected_positions} (different data, layout or latent_size?)")
        try:
            t = self._handle(e["shard"]).get_tensor(e["tensor"])
        except TeacherStoreError:
            raise
        except Exception as err:
            raise TeacherStoreError(f"teacher store {self.root}: cannot read {key!r} from {e['shard']}: {err}") from None
        if layers is not None:
            stored = self.header["layers"]
            missing = [x for x in layers if x not in stored]
            if missing:
                raise TeacherStoreError(f"teacher store {self.root} keeps layers {stored}; {missing} were not stored")
            t = t[[stored.index(x) for x in layers]]
        return t.to(dtype) if dtype is not None else t

    def get_batch(self, keys: Sequence[str], **kw) -> list[torch.Tensor]:
        return [self.get(k, **kw) for k in keys]


def verify(root: str | os.PathLike) -> dict:
    """Read every entry once; returns ``{"entries", "ok", "errors": [...]}``."""
    store = TeacherStore(root)
    errors = []
    L, D = len(store.header["layers"]), store.header["hidden_size"]
    for key, e in store.entries.items():
        try:
            t = store.get(key)
            if tuple(t.shape) != (L, e["num_positions"], D):
                errors.append(f"{key}: shape {tuple(t.shape)}, index says {(L, e['num_positions'], D)}")
        except TeacherStoreError as err:
            errors.append(str(err))
    return {"entries": len(store.entries), "ok": len(store.entries) - len(errors), "errors": errors}
