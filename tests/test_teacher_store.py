"""Teacher stores: round trip, shards, layer subsets, resume after a crash, settings checks, clear
errors naming the sample or file, verify()."""

from __future__ import annotations

import json
import re

import pytest
import torch

from monet.train.teacher_store import TeacherStore, TeacherStoreError, TeacherStoreWriter, tensor_name, verify

# slashes, spaces, unicode, keys that sanitise to the same prefix, an over-long key
KEYS = ["Visual_CoT/1", "CogCoM/a b", "Zebra/äöü/7", "Zebra/ööö/7", "ReFocus/x/y/z", "x" * 200]
L, D = 4, 8


def n_pos(i: int) -> int:
    return i % 3 + 1


def states(i: int, layers: int = L) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(layers, n_pos(i), D, generator=g) * 3


def writer(root, *, dtype=torch.bfloat16, layers=None, shard_max_bytes=200, kind="latents", hidden_size=D):
    return TeacherStoreWriter(root, num_layers_total=L, layers=layers, dtype=dtype, hidden_size=hidden_size,
                              kind=kind, shard_max_bytes=shard_max_bytes, meta={"what": "test"})


def write(root, keys, *, dtype=torch.bfloat16, layers=None, shard_max_bytes=200, close=True):
    w = writer(root, dtype=dtype, layers=layers, shard_max_bytes=shard_max_bytes)
    n_layers = L if layers is None else len(layers)
    for k in keys:
        i = KEYS.index(k) if k in KEYS else 99
        if k not in w:
            w.add(k, states(i, n_layers), positions=torch.arange(n_pos(i)) * 10)
    if close:
        w.close()
    return w


def index(root) -> dict:
    return json.loads((root / "index.json").read_text())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_across_shards(tmp_path, dtype):
    write(tmp_path, KEYS, dtype=dtype)
    store = TeacherStore(tmp_path)
    assert sorted(store.keys()) == sorted(KEYS) and len(store) == len(KEYS)
    assert len(set(e["shard"] for e in store.entries.values())) > 1  # tiny shard size -> several shards
    assert len({tensor_name(k) for k in KEYS}) == len(KEYS)
    for i, k in enumerate(KEYS):
        got = store.get(k, expected_positions=n_pos(i))
        assert got.dtype == dtype and got.shape == (L, n_pos(i), D)
        assert torch.equal(got, states(i).to(dtype))  # exact: the reference is cast the same way
        assert torch.equal(store.positions(k), torch.arange(n_pos(i)) * 10)
    batch = store.get_batch(KEYS[:3], dtype=torch.float32, expected_positions=[1, 2, 3])
    assert [b.dtype for b in batch] == [torch.float32] * 3
    assert torch.equal(batch[2], states(2).to(dtype).float())
    h = index(tmp_path)["header"]
    assert h["kind"] == "latents" and h["layers"] == [0, 1, 2, 3] and h["hidden_size"] == D
    assert h["meta"] == {"what": "test"} and h["num_layers_total"] == L
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert verify(tmp_path) == {"root": str(tmp_path), "entries": len(KEYS), "ok": len(KEYS), "errors": [],
                                "unindexed": []}


def test_layer_subsets_and_empty_entries(tmp_path):
    write(tmp_path, KEYS[:2], layers=[0, 2, 3], shard_max_bytes=1 << 20)
    with writer(tmp_path, layers=[0, 2, 3]) as w:
        w.add("ds/empty", torch.zeros(3, 0, D))  # a sample without aligned positions
    store = TeacherStore(tmp_path)
    full = states(1, 3).to(torch.bfloat16)
    assert torch.equal(store.get(KEYS[1]), full)
    assert torch.equal(store.get(KEYS[1], layers=[3, 0]), full[[2, 0]])  # stored index order [0, 2, 3]
    assert torch.equal(store.get(KEYS[1], layers=[2, 3]), full[1:])
    assert store.get("ds/empty", expected_positions=0).shape == (3, 0, D)
    assert store.positions("ds/empty") is None
    with pytest.raises(TeacherStoreError, match=r"keeps layers \[0, 2, 3\]; \[1\] were not stored.*'CogCoM/a b'"):
        store.get(KEYS[1], layers=[1])


def test_resume_after_crash_equals_uninterrupted(tmp_path):
    write(tmp_path / "straight", KEYS)
    crash = tmp_path / "crash"
    w = write(crash, KEYS[:3], shard_max_bytes=1 << 20, close=False)
    w.flush()  # KEYS[:3] reach disk
    w.add("lost", states(9))  # buffered only: lost in the "crash"
    flushed = list(index(crash)["entries"])
    del w  # the process dies without close()
    (crash / ".shard-00007.safetensors.tmp").write_bytes(b"half a shard")  # a flush killed midway
    assert sorted(TeacherStore(crash).keys()) == sorted(flushed) == sorted(KEYS[:3])
    again = writer(crash)
    assert "lost" not in again and all(k in again for k in KEYS[:3]) and len(again) == 3
    assert not list(crash.glob("*.tmp"))  # the restarted writer cleared the stale tmp file
    again.close()
    write(crash, KEYS)  # the rerun fills the gaps only, in new shards
    assert len(index(crash)["shards"]) > 1
    a, b = TeacherStore(tmp_path / "straight"), TeacherStore(crash)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in KEYS:
        assert torch.equal(a.get(k), b.get(k)) and torch.equal(a.positions(k), b.positions(k))
    assert verify(crash)["errors"] == []


def test_exception_in_with_block_keeps_complete_entries(tmp_path):
    with pytest.raises(RuntimeError, match="teacher forward failed"):
        with writer(tmp_path, shard_max_bytes=1 << 20) as w:
            w.add("ds/1", states(1))
            raise RuntimeError("teacher forward failed")
    assert TeacherStore(tmp_path).keys() == ["ds/1"]
    writer(tmp_path).close()  # the lock was released


def test_writer_copies_its_input(tmp_path):
    x = states(0).to(torch.bfloat16)
    with writer(tmp_path, shard_max_bytes=1 << 20) as w:
        w.add("ds/1", x)
        x.zero_()
    assert torch.equal(TeacherStore(tmp_path).get("ds/1"), states(0).to(torch.bfloat16))


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 16}, "hidden_size=8, this run asks for 16"),
    ({"kind": "observation_reps"}, "kind='latents', this run asks for 'observation_reps'"),
    ({"layers": [0, 3]}, r"layers=\[0, 1, 2, 3\], this run asks for \[0, 3\]"),
    ({"dtype": torch.float32}, "dtype='bfloat16', this run asks for 'float32'"),
])
def test_settings_mismatch_on_resume(tmp_path, change, message):
    write(tmp_path, KEYS[:1])
    with pytest.raises(TeacherStoreError, match=message):
        writer(tmp_path, **change)
    writer(tmp_path).close()  # a refused writer leaves no lock behind


def test_one_writer_per_directory(tmp_path):
    w = writer(tmp_path)
    with pytest.raises(TeacherStoreError, match="another writer holds"):
        writer(tmp_path)
    w.close()
    writer(tmp_path).close()


def test_writer_argument_errors(tmp_path):
    with pytest.raises(TeacherStoreError, match="kind must be one of"):
        writer(tmp_path / "a", kind="reps")
    with pytest.raises(TeacherStoreError, match="must be distinct and within 0..3"):
        writer(tmp_path / "b", layers=[0, 4])
    with pytest.raises(TeacherStoreError, match="dtype must be one of"):
        writer(tmp_path / "c", dtype=torch.int8)
    w = writer(tmp_path / "d")
    with pytest.raises(TeacherStoreError, match=r"'k'.*\[layers=4, N, hidden=8\], got \(3, 2, 8\)"):
        w.add("k", torch.zeros(3, 2, 8))
    with pytest.raises(TeacherStoreError, match=r"'k'.*\[layers=4, N, hidden=8\], got \(4, 2, 5\)"):
        w.add("k", torch.zeros(4, 2, 5))
    with pytest.raises(TeacherStoreError, match="'k': states must be a floating-point tensor, got torch.int64"):
        w.add("k", torch.zeros(4, 2, 8, dtype=torch.long))
    with pytest.raises(TeacherStoreError, match="'k': positions must be an integer tensor"):
        w.add("k", torch.zeros(4, 2, 8), positions=torch.arange(3))
    bad = torch.zeros(4, 2, 8)
    bad[1, 0, 3] = float("nan")
    with pytest.raises(TeacherStoreError, match="'k': states contain NaN"):
        w.add("k", bad)
    w.add("k", torch.zeros(4, 2, 8))
    with pytest.raises(TeacherStoreError, match="already has an entry for 'k'"):
        w.add("k", torch.zeros(4, 2, 8))
    w.close()
    with pytest.raises(TeacherStoreError, match="already has an entry for 'k'"):
        writer(tmp_path / "d").add("k", torch.zeros(4, 2, 8))


def test_reader_errors_name_the_sample_or_file(tmp_path):
    with pytest.raises(TeacherStoreError, match=r"no teacher store .*missing .*none/index\.json.*monet precompute"):
        TeacherStore(tmp_path / "none")
    write(tmp_path, KEYS)
    store = TeacherStore(tmp_path)
    with pytest.raises(TeacherStoreError, match="has no entry for 'ds/404' — run `monet precompute teacher-latents`"):
        store.get("ds/404")
    assert store.missing(["ds/404", KEYS[0]]) == ["ds/404"]
    with pytest.raises(TeacherStoreError, match="'CogCoM/a b' has 2 positions, the batch expects 7"):
        store.get("CogCoM/a b", expected_positions=7)
    with pytest.raises(TeacherStoreError, match="holds 'latents' states, this run needs 'observation_reps'"):
        TeacherStore(tmp_path, kind="observation_reps")
    shard = store.entries[KEYS[0]]["shard"]
    (tmp_path / shard).unlink()
    with pytest.raises(TeacherStoreError, match=f"shard missing: .*{shard}"):
        TeacherStore(tmp_path).get(KEYS[0])
    other = store.entries[KEYS[-1]]["shard"]
    (tmp_path / other).write_bytes(b"\0" * 100)
    with pytest.raises(TeacherStoreError, match=f"shard .*{other} is corrupt"):
        TeacherStore(tmp_path).get(KEYS[-1])
    (tmp_path / "index.json").write_text('{"header": ')
    with pytest.raises(TeacherStoreError, match=r"index .*index\.json is corrupt"):
        TeacherStore(tmp_path)


def test_verify_catches_a_truncated_shard_and_flipped_bytes(tmp_path):
    write(tmp_path, KEYS)
    shards = index(tmp_path)["shards"]
    first = tmp_path / shards[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    report = verify(tmp_path)
    assert len(report["errors"]) == 1 and str(first) in report["errors"][0]
    assert report["ok"] == len(KEYS) - index(tmp_path)["shard_info"][shards[0]]["entries"]
    last = tmp_path / shards[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF  # same size, still parses: only the checksum notices
    last.write_bytes(bytes(data))
    assert len(verify(tmp_path)["errors"]) == 1
    report = verify(tmp_path, checksums=True)
    assert len(report["errors"]) == 2 and str(last) in report["errors"][1] and "CRC32" in report["errors"][1]
    (tmp_path / "shard-00999.safetensors").write_bytes(b"")
    assert verify(tmp_path)["unindexed"] == ["shard-00999.safetensors"]


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, still parses: only the checksum notices
    path.write_bytes(bytes(data))


def test_reader_verifies_each_shard_checksum_on_first_open(tmp_path):
    write(tmp_path, KEYS)
    idx = index(tmp_path)
    bad = idx["shards"][-1]
    victim = next(k for k, e in idx["entries"].items() if e["shard"] == bad)
    healthy = next(k for k, e in idx["entries"].items() if e["shard"] != bad)
    _flip_last_byte(tmp_path / bad)
    store = TeacherStore(tmp_path)
    assert torch.equal(store.get(healthy), states(KEYS.index(healthy)).to(torch.bfloat16))
    with pytest.raises(TeacherStoreError, match=rf"shard .*{bad} is corrupt: CRC32 .* \(reading {re.escape(repr(victim))}\)"
                                                r".*rerun `monet precompute teacher-latents`"):
        store.get(victim)
    with pytest.raises(TeacherStoreError, match="CRC32"):
        store.positions(victim)  # still refused: a failed shard is never marked verified
    # opting out reads the bytes as they are (what verify(checksums=False) relies on)
    assert TeacherStore(tmp_path, verify_checksums=False).get(victim).shape[0] == L


def test_reopened_writer_drops_entries_of_a_corrupt_shard_and_rewrites_them(tmp_path):
    write(tmp_path / "ref", KEYS)
    root = tmp_path / "store"
    write(root, KEYS)
    idx = index(root)
    bad = idx["shards"][0]
    lost = sorted(k for k, e in idx["entries"].items() if e["shard"] == bad)
    (root / idx["shards"][1]).unlink()  # a missing shard is repaired the same way
    lost += sorted(k for k, e in idx["entries"].items() if e["shard"] == idx["shards"][1])
    _flip_last_byte(root / bad)
    w = writer(root)
    assert set(w.repaired) == {bad, idx["shards"][1]} and "CRC32" in w.repaired[bad]
    assert sorted(k for k in KEYS if k not in w) == sorted(lost) and not (root / bad).exists()
    w.close()
    assert sorted(TeacherStore(root).keys()) == sorted(set(KEYS) - set(lost))  # the index no longer lists them
    write(root, KEYS)  # the rerun recomputes exactly the dropped entries
    assert verify(root, checksums=True)["errors"] == []
    a, b = TeacherStore(tmp_path / "ref"), TeacherStore(root)
    for k in KEYS:
        assert torch.equal(a.get(k), b.get(k)) and torch.equal(a.positions(k), b.positions(k))


def test_busy_writer_lock_names_its_holder(tmp_path):
    import os

    w = writer(tmp_path)
    with pytest.raises(TeacherStoreError, match=rf"another writer holds .*\.writer\.lock \(pid {os.getpid()} on "):
        writer(tmp_path)
    w.close()
