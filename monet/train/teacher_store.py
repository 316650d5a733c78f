"""Teacher-state stores: all-layer hidden states per sample, sharded safetensors plus an index.

Replaces the research code's one ``.pt`` per sample (``[29, N, 3584]`` bf16, TB scale). On disk::

    STORE/index.json               header + shard list + key -> entry (see below)
    STORE/shard-00000.safetensors  one tensor per sample, "<sanitised key>.<sha1[:12]>",
    STORE/shard-00001.safetensors  shape [layers_kept, N, D] in the store dtype, plus
    ...                            "<name>.positions" [N] int64 when the writer was given positions
    STORE/.writer.lock             flock held by the (single) open writer

``index.json`` = ``{"header": {format_version, kind, layers, dtype, hidden_size, num_layers_total,
meta}, "shards": [file, ...], "shard_info": {file: {bytes, crc32, entries}}, "entries": {key:
{shard, tensor, num_positions, positions}}}``. Keys are ``dataset_name/sample_id`` (any string:
``/``, spaces, unicode); the tensor name is a sanitised prefix plus a hash, and the index maps back.
``layers`` are the model's hidden-state indices (0 = embedding output, last = final norm) that were
kept; ``kind`` is ``"observation_reps"`` (stage-2 targets) or ``"latents"`` (stage-3 targets).

Crash safety: a shard is written to ``.shard-XXXXX.safetensors.tmp``, fsynced and renamed; then the
index is rewritten atomically. A crash therefore loses at most the writer's unflushed buffer; a
restarted writer on the same directory (same settings) reopens the index, skips stored keys
(``key in writer``) and appends new shards. Files not named by the index (a shard renamed just
before a crash, stale ``.tmp`` files) are never read; the next writer removes or replaces them.

Integrity: a reader checks each shard's size and CRC32 against the index the first time it opens
the shard (once per reader), and fails naming the shard and the sample it was reading. A
restarted writer checks every indexed shard the same way and drops the entries of a shard that
fails (deleting the file), so rerunning ``monet precompute`` recomputes exactly those samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch

from monet.atomic import atomic_write_json, disk_full_error, is_disk_full
from monet.train.dir_lock import DirectoryBusy, DirectoryLock
from monet.train.teacher_targets import STORE_KINDS, for_store_kind

INDEX = "index.json"
LOCK = ".writer.lock"
FORMAT_VERSION = 1
KINDS = STORE_KINDS
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")


class TeacherStoreError(ValueError):
    """A store is missing, inconsistent, or lacks what a batch needs."""


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise TeacherStoreError(f"teacher store dtype must be one of {sorted(_DTYPES)}, got {dtype}")


def tensor_name(key: str) -> str:
    """A safetensors-safe, unique tensor name for a sample key (sanitised prefix + sha1 prefix)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:80]
    return f"{safe}.{hashlib.sha1(key.encode('utf-8')).hexdigest()[:12]}"


def _file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _read_index(root: Path) -> dict:
    path = root / INDEX
    if not path.is_file():
        raise TeacherStoreError(f"no teacher store at {root} (missing {path}); "
                                "run `monet precompute teacher-reps` / `teacher-latents` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        header, entries = data["header"], data["entries"]
        version = header["format_version"]
    except (ValueError, KeyError, TypeError) as e:
        raise TeacherStoreError(f"teacher store index {path} is corrupt ({type(e).__name__}: {e}); "
                                "rerun `monet precompute` into a fresh directory") from None
    if version > FORMAT_VERSION:
        raise TeacherStoreError(f"teacher store {root} has format_version {version}; this monet reads up to "
                                f"{FORMAT_VERSION} (upgrade monet)")
    data.setdefault("shards", sorted({e["shard"] for e in entries.values()}))
    data.setdefault("shard_info", {})
    return data


def _lock(root: Path) -> DirectoryLock:
    """The writer's exclusive lock on ``root/.writer.lock`` (released when the process dies)."""
    try:
        return DirectoryLock(root, LOCK)
    except DirectoryBusy as e:
        raise TeacherStoreError(f"another writer holds {root / LOCK} ({e.holder or 'unknown holder'}); one writer "
                                "per teacher store (give each precompute job its own directory)") from None


def shard_problem(root: Path, shard: str, info: dict) -> str | None:
    """Why ``shard`` does not match what the index recorded for it (missing, size, CRC32), or None."""
    path = root / shard
    if not path.is_file():
        return f"teacher store shard missing: {path} (listed in {root / INDEX})"
    expected = info.get("bytes")
    size = path.stat().st_size
    if expected is not None and size != expected:
        return (f"teacher store shard {path} is corrupt: {size} bytes, the index recorded {expected} "
                "(truncated or overwritten?)")
    if "crc32" in info:
        crc = _file_crc32(path)
        if crc != info["crc32"]:
            return (f"teacher store shard {path} is corrupt: CRC32 {crc:08x} differs from the index's "
                    f"{info['crc32']:08x} (bytes changed on disk)")
    return None


class TeacherStoreWriter:
    """Append teacher states to a store (context manager; resumable; one writer per directory).

    Args: ``num_layers_total`` the model's hidden-state layers (decoder layers + 1); ``layers`` the
    ones kept (None = all); ``dtype`` on disk (bf16 / fp16 / fp32); ``hidden_size`` D; ``kind``
    ``"observation_reps"`` or ``"latents"``; ``shard_max_bytes`` buffer size that triggers a flush;
    ``meta`` free-form JSON stored in the header (on resume the first run's meta is kept).

    Reopening an existing store checks kind / layers / dtype / hidden_size / num_layers_total and
    raises on any difference. Adding a key that is already stored (or buffered) raises: test
    ``key in writer`` first to skip finished samples. Leaving the ``with`` block, normally or by an
    exception, flushes the buffer (every buffered entry is complete); a killed process loses it.
    """

    def __init__(self, root: str | os.PathLike, *, num_layers_total: int, layers: Sequence[int] | None = None,
                 dtype: torch.dtype = torch.bfloat16, hidden_size: int, kind: str,
                 shard_max_bytes: int = 1 << 30, meta: dict | None = None):
        self.root = Path(root)
        if kind not in KINDS:
            raise TeacherStoreError(f"teacher store kind must be one of {KINDS}, got {kind!r}")
        if num_layers_total < 1 or hidden_size < 1 or shard_max_bytes < 1:
            raise TeacherStoreError(f"num_layers_total ({num_layers_total}), hidden_size ({hidden_size}) and "
                                    f"shard_max_bytes ({shard_max_bytes}) must be positive")
        layers = list(range(num_layers_total)) if layers is None else [int(x) for x in layers]
        bad = [x for x in layers if not 0 <= x < num_layers_total]
        if bad or not layers or len(set(layers)) != len(layers):
            raise TeacherStoreError(f"layers {layers} must be distinct and within 0..{num_layers_total - 1} "
                                    f"(a model with {num_layers_total} hidden-state layers)")
        self.header = {"format_version": FORMAT_VERSION, "kind": kind, "layers": layers, "dtype": _dtype_name(dtype),
                       "hidden_size": int(hidden_size), "num_layers_total": int(num_layers_total), "meta": meta or {}}
        self.dtype, self.shard_max_bytes = dtype, int(shard_max_bytes)
        self.entries: dict[str, dict] = {}
        self.shards: list[str] = []
        self.shard_info: dict[str, dict] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock: DirectoryLock | None = _lock(self.root)
        self.repaired: dict[str, str] = {}
        try:
            if (self.root / INDEX).is_file():
                self._resume(_read_index(self.root))
            for stale in list(self.root.glob(".shard-*.tmp")) + list(self.root.glob(f".{INDEX}.*.tmp")):
                stale.unlink(missing_ok=True)  # left by a crashed flush; we hold the lock
        except BaseException:
            self._lock.release()
            raise
        self._names = {e["tensor"]: k for k, e in self.entries.items()}
        self._next = 1 + max((int(m.group(1)) for s in self.shards if (m := _SHARD_RE.match(s))), default=-1)
        self._buffer: dict[str, torch.Tensor] = {}
        self._pending: dict[str, dict] = {}
        self._bytes = 0

    def _resume(self, old: dict) -> None:
        for field in ("kind", "layers", "dtype", "hidden_size", "num_layers_total"):
            if old["header"].get(field) != self.header[field]:
                raise TeacherStoreError(f"teacher store {self.root} was written with {field}="
                                        f"{old['header'].get(field)!r}, this run asks for {self.header[field]!r}; "
                                        "use the same settings to resume, or another directory")
        self.header["meta"] = old["header"].get("meta", {})
        self.entries, self.shards, self.shard_info = old["entries"], old["shards"], old["shard_info"]
        # repair: a shard that no longer matches the index loses its entries (they are recomputed)
        for shard in list(self.shards):
            problem = shard_problem(self.root, shard, self.shard_info.get(shard, {}))
            if problem is None:
                continue
            self.repaired[shard] = problem
            self.entries = {k: e for k, e in self.entries.items() if e["shard"] != shard}
            self.shards.remove(shard)
            self.shard_info.pop(shard, None)
            (self.root / shard).unlink(missing_ok=True)
        if self.repaired:
            self._write_index()

    @property
    def closed(self) -> bool:
        return self._lock is None

    def __contains__(self, key: str) -> bool:
        return key in self.entries or key in self._pending

    def __len__(self) -> int:
        return len(self.entries) + len(self._pending)

    def add(self, key: str, states: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Buffer ``states`` [layers_kept, N, D] (any float dtype, any device; cast to the store dtype)
        and optional ``positions`` [N] (sequence positions the states came from) for ``key``."""
        if self.closed:
            raise TeacherStoreError(f"teacher store writer for {self.root} is closed")
        if not isinstance(key, str) or not key:
            raise TeacherStoreError(f"teacher store keys are non-empty strings ('dataset/sample_id'), got {key!r}")
        if key in self:
            raise TeacherStoreError(f"teacher store {self.root} already has an entry for {key!r} "
                                    "(check `key in writer` to skip finished samples)")
        L, D = len(self.header["layers"]), self.header["hidden_size"]
        if not isinstance(states, torch.Tensor) or not states.is_floating_point():
            raise TeacherStoreError(f"{key!r}: states must be a floating-point tensor, got "
                                    f"{getattr(states, 'dtype', type(states).__name__)}")
        if states.dim() != 3 or states.shape[0] != L or states.shape[2] != D:
            raise TeacherStoreError(f"{key!r}: states must be [layers={L}, N, hidden={D}], got {tuple(states.shape)}")
        if positions is not None and (positions.shape != (states.shape[1],) or positions.is_floating_point()):
            raise TeacherStoreError(f"{key!r}: positions must be an integer tensor [N={states.shape[1]}], got "
                                    f"{positions.dtype} {tuple(positions.shape)}")
        name = tensor_name(key)
        if name in self._names:  # a 48-bit hash collision on identical sanitised prefixes
            raise TeacherStoreError(f"{key!r} and {self._names[name]!r} map to the same tensor name {name!r}")
        t = states.detach().to(device="cpu", dtype=self.dtype, memory_format=torch.contiguous_format, copy=True)
        if not bool(torch.isfinite(t).all()):
            raise TeacherStoreError(f"{key!r}: states contain NaN/inf (after the cast to {self.header['dtype']})")
        self._buffer[name] = t
        if positions is not None:
            self._buffer[name + ".positions"] = positions.detach().to("cpu", torch.int64, copy=True).contiguous()
        self._pending[key] = {"tensor": name, "num_positions": int(states.shape[1]), "positions": positions is not None}
        self._names[name] = key
        self._bytes += t.numel() * t.element_size()
        if self._bytes >= self.shard_max_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered entries as one new shard (tmp + fsync + rename), then the index."""
        if not self._pending:
            return
        from safetensors.torch import save_file

        shard = f"shard-{self._next:05d}.safetensors"
        path, tmp = self.root / shard, self.root / f".{shard}.tmp"
        try:
            save_file(self._buffer, str(tmp), metadata={"format_version": str(FORMAT_VERSION),
                                                        "kind": self.header["kind"]})
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            info = {"bytes": tmp.stat().st_size, "crc32": _file_crc32(tmp), "entries": len(self._pending)}
            os.replace(tmp, path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, Exception) and is_disk_full(e):
                raise disk_full_error(e, path, "a teacher store shard") from e
            if isinstance(e, Exception):
                raise TeacherStoreError(f"writing teacher store shard {path} failed: {e}") from e
            raise
        self._next += 1
        self.shards.append(shard)
        self.shard_info[shard] = info
        for key, e in self._pending.items():
            self.entries[key] = {**e, "shard": shard}
        self._buffer, self._pending, self._bytes = {}, {}, 0
        self._write_index()

    def _write_index(self) -> None:
        atomic_write_json(self.root / INDEX, {"header": self.header, "shards": self.shards,
                                              "shard_info": self.shard_info, "entries": self.entries})

    def close(self) -> None:
        """Flush, write the index (also for an empty store) and release the directory lock."""
        if self.closed:
            return
        try:
            self.flush()
            if not (self.root / INDEX).is_file():
                self._write_index()
        finally:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "TeacherStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # keep the complete buffered entries; never mask the original exception
            self.close()
        except Exception:
            pass


class TeacherStore:
    """Read teacher states: shards memory-mapped lazily via ``safe_open``, open handles cached (LRU).

    ``device``: where ``get`` returns tensors; ``kind``: when given, the store must be of that kind
    (``"observation_reps"`` for stage 2, ``"latents"`` for stage 3); ``verify_checksums``: check
    each shard's CRC32 against the index the first time this reader opens it (one sequential read
    of the shard; its size is always checked).
    """

    def __init__(self, root: str | os.PathLike, *, device: str | torch.device = "cpu", kind: str | None = None,
                 max_open_shards: int = 64, verify_checksums: bool = True):
        self.root = Path(root)
        data = _read_index(self.root)
        self.header, self.entries, self.shard_info = data["header"], data["entries"], data["shard_info"]
        if kind is not None and self.header.get("kind") != kind:
            raise TeacherStoreError(f"teacher store {self.root} holds {self.header.get('kind')!r} states, this run "
                                    f"needs {kind!r} (teacher-reps for stage 2, teacher-latents for stage 3)")
        self.device = torch.device(device)
        self.max_open_shards = max(1, int(max_open_shards))
        self.verify_checksums = verify_checksums
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._verified: set[str] = set()

    @property
    def layers(self) -> list[int]:
        """Model hidden-state indices kept, in stored order."""
        return list(self.header["layers"])

    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.header["dtype"]]

    @property
    def hidden_size(self) -> int:
        return int(self.header["hidden_size"])

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The ``keys`` without an entry (a pre-flight check before training)."""
        return [k for k in keys if k not in self.entries]

    def _repair_hint(self) -> str:
        target = for_store_kind(self.header.get("kind"))
        cmd = target.precompute if target else "teacher-reps / teacher-latents"
        return f"rerun `monet precompute {cmd}` on the same data into {self.root} to rewrite its entries"

    def _handle(self, shard: str, key: str | None = None):
        h = self._handles.get(shard)
        if h is not None:
            self._handles.move_to_end(shard)
            return h
        from safetensors import safe_open

        path = self.root / shard
        reading = f" (reading {key!r})" if key is not None else ""
        if shard not in self._verified:
            info = dict(self.shard_info.get(shard, {}))
            if not self.verify_checksums:
                info.pop("crc32", None)
            problem = shard_problem(self.root, shard, info)
            if problem is not None:
                raise TeacherStoreError(f"{problem}{reading}; {self._repair_hint()}")
            self._verified.add(shard)
        try:
            h = safe_open(str(path), framework="pt", device=str(self.device))
        except Exception as e:
            raise TeacherStoreError(f"teacher store shard {path} is unreadable{reading}: {e}; "
                                    f"{self._repair_hint()}") from None
        self._handles[shard] = h
        while len(self._handles) > self.max_open_shards:
            self._handles.popitem(last=False)
        return h

    def _entry(self, key: str) -> dict:
        e = self.entries.get(key)
        if e is None:
            target = for_store_kind(self.header.get("kind"))
            cmd = target.precompute if target else "teacher-reps / teacher-latents"
            raise TeacherStoreError(f"teacher store {self.root} has no entry for {key!r} — run `monet precompute "
                                    f"{cmd}` on the same data into it (it resumes and fills only missing keys)")
        return e

    def get(self, key: str, *, layers: Sequence[int] | None = None, dtype: torch.dtype | None = None,
            expected_positions: int | None = None) -> torch.Tensor:
        """``[n_layers, N, D]`` for ``key``. ``layers`` picks stored model layers by index (None = all
        stored, in stored order); ``dtype`` casts; ``expected_positions`` checks N."""
        e = self._entry(key)
        n = int(e["num_positions"])
        if expected_positions is not None and n != int(expected_positions):
            raise TeacherStoreError(f"teacher store {self.root}: {key!r} has {n} positions, the batch expects "
                                    f"{expected_positions} (different data, layout or latent_size?)")
        stored = self.header["layers"]
        idx = None
        if layers is not None:
            missing = [x for x in layers if x not in stored]
            if missing:
                raise TeacherStoreError(f"teacher store {self.root} keeps layers {stored}; {missing} were not stored "
                                        f"(requested for {key!r})")
            idx = [stored.index(x) for x in layers]
        h = self._handle(e["shard"], key)
        try:
            if idx is None:
                t = h.get_tensor(e["tensor"])
            else:
                sl = h.get_slice(e["tensor"])
                if idx == list(range(idx[0], idx[0] + len(idx))):
                    t = sl[idx[0]:idx[0] + len(idx)]
                else:
                    t = torch.cat([sl[j:j + 1] for j in idx])
        except Exception as err:
            raise TeacherStoreError(f"teacher store {self.root}: cannot read {key!r} from "
                                    f"{self.root / e['shard']}: {err}") from None
        want = (len(stored) if idx is None else len(idx), n, self.hidden_size)
        if tuple(t.shape) != want or t.dtype != self.dtype:
            raise TeacherStoreError(f"teacher store {self.root}: {key!r} in {self.root / e['shard']} is "
                                    f"{t.dtype} {tuple(t.shape)}, the index says {self.dtype} {want}")
        return t.to(dtype) if dtype is not None else t

    def positions(self, key: str) -> torch.Tensor | None:
        """``[N]`` int64 sequence positions stored with ``key`` (None when the writer had none)."""
        e = self._entry(key)
        if not e.get("positions"):
            return None
        try:
            return self._handle(e["shard"], key).get_tensor(e["tensor"] + ".positions")
        except Exception as err:
            raise TeacherStoreError(f"teacher store {self.root}: cannot read positions of {key!r} from "
                                    f"{self.root / e['shard']}: {err}") from None

    def get_batch(self, keys: Sequence[str], *, layers: Sequence[int] | None = None, dtype: torch.dtype | None = None,
                  expected_positions: Sequence[int] | None = None) -> list[torch.Tensor]:
        """``[get(k) for k in keys]``; ``expected_positions`` gives one N per key."""
        if expected_positions is not None and len(expected_positions) != len(keys):
            raise TeacherStoreError(f"{len(keys)} keys but {len(expected_positions)} expected_positions")
        ns = [None] * len(keys) if expected_positions is None else expected_positions
        return [self.get(k, layers=layers, dtype=dtype, expected_positions=n) for k, n in zip(keys, ns)]

    def close(self) -> None:
        """Drop the cached shard handles (unmaps the files)."""
        self._handles.clear()

    def __enter__(self) -> "TeacherStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def verify(root: str | os.PathLike, *, checksums: bool = False) -> dict:
    """Check that every index entry reads back as ``[layers, N, D]`` in the store dtype (and its
    positions as ``[N]``); with ``checksums`` also compare each shard's CRC32 with the index.

    Returns ``{"root", "entries", "ok", "errors": [str], "unindexed": [file]}``; ``errors`` name
    the file or key; ``unindexed`` lists stray shard / tmp files the index does not reference.
    """
    store = TeacherStore(root, verify_checksums=checksums)
    errors: list[str] = []
    bad_shards: set[str] = set()
    for shard in store.shard_info:
        try:
            store._handle(shard)
        except TeacherStoreError as err:
            errors.append(str(err))
            bad_shards.add(shard)
    ok = 0
    for key, e in store.entries.items():
        if e["shard"] in bad_shards:
            continue
        try:
            store.get(key)
            p = store.positions(key)
            if p is not None and tuple(p.shape) != (e["num_positions"],):
                raise TeacherStoreError(f"{key!r}: positions {tuple(p.shape)}, index says ({e['num_positions']},)")
            ok += 1
        except TeacherStoreError as err:
            errors.append(str(err))
    listed = set(store.shard_info) | {e["shard"] for e in store.entries.values()}
    unindexed = sorted(p.name for p in store.root.iterdir()
                       if (_SHARD_RE.match(p.name) and p.name not in listed) or p.name.endswith(".tmp"))
    store.close()
    return {"root": str(store.root), "entries": len(store.entries), "ok": ok, "errors": errors,
            "unindexed": unindexed}
