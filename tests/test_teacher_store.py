"""Teacher stores: round trip, shards, resume, settings checks, clear errors, verify."""

from __future__ import annotations

import json

import pytest
import torch

from monet.train.teacher_store import TeacherStore, TeacherStoreError, TeacherStoreWriter, verify

KEYS = ["Visual_CoT/1", "CogCoM/a b", "Zebra/äöü/7", "x" * 200]


def states(i, n=None, layers=4, d=8):
    g = torch.Generator().manual_seed(i)
    return torch.randn(layers, n or (i % 3 + 1), d, generator=g)


def write(root, keys, dtype=torch.bfloat16, shard_max_bytes=200, layers=None, close=True):
    w = TeacherStoreWriter(root, num_layers_total=4, layers=layers, dtype=dtype, hidden_size=8, kind="latents",
                           shard_max_bytes=shard_max_bytes)
    for i, k in enumerate(keys):
        if k not in w:
            n_layers = 4 if layers is None else len(layers)
            w.add(k, states(i, layers=n_layers), positions=torch.arange(i % 3 + 1))
    if close:
        w.close()
    return w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_across_shards(tmp_path, dtype):
    write(tmp_path, KEYS, dtype=dtype)
    store = TeacherStore(tmp_path)
    assert sorted(store.keys()) == sorted(KEYS)
    assert len(set(e["shard"] for e in store.entries.values())) > 1  # tiny shard size -> several shards
    for i, k in enumerate(KEYS):
        got = store.get(k, expected_positions=i % 3 + 1)
        assert got.dtype == dtype
        assert torch.equal(got, states(i).to(dtype))
    assert not list(tmp_path.glob(".*tmp"))


def test_layer_subsets(tmp_path):
    write(tmp_path, KEYS[:2], layers=[0, 2, 3])
    store = TeacherStore(tmp_path)
    full = states(1, layers=3).to(torch.bfloat16)
    assert torch.equal(store.get(KEYS[1], layers=[3, 0]), full[[2, 0]])
    with pytest.raises(TeacherStoreError, match="\\[1\\] were not stored"):
        store.get(KEYS[1], layers=[1])


def test_resume_after_crash_equals_uninterrupted(tmp_path):
    write(tmp_path / "straight", KEYS)
    w = write(tmp_path / "crash", KEYS[:3], close=False)  # flushed shards survive, the buffer does not
    w.flush()
    w.add("lost", states(9))  # never flushed: lost in the "crash"
    del w
    again = TeacherStoreWriter(tmp_path / "crash", num_layers_total=4, dtype=torch.bfloat16, hidden_size=8,
                               kind="latents", shard_max_bytes=200)
    assert "lost" not in again and all(k in again for k in KEYS[:3])
    again.close()
    write(tmp_path / "crash", KEYS)  # the rerun fills the gaps only
    a, b = TeacherStore(tmp_path / "straight"), TeacherStore(tmp_path / "crash")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in KEYS:
        assert torch.equal(a.get(k), b.get(k))


def test_settings_mismatch_on_resume(tmp_path):
    write(tmp_path, KEYS[:1])
    with pytest.raises(TeacherStoreError, match="hidden_size=8.*16"):
        TeacherStoreWriter(tmp_path, num_layers_total=4, dtype=torch.bfloat16, hidden_size=16, kind="latents")
    with pytest.raises(TeacherStoreError, match="kind='latents'"):
        TeacherStoreWriter(tmp_path, num_layers_total=4, dtype=torch.bfloat16, hidden_size=8, kind="observation_reps")


def test_errors_name_the_sample(tmp_path):
    with pytest.raises(TeacherStoreError, match="no teacher store .*monet precompute"):
        TeacherStore(tmp_path / "none")
    write(tmp_path, KEYS[:2])
    store = TeacherStore(tmp_path)
    with pytest.raises(TeacherStoreError, match="no entry for 'ds/404'"):
        store.get("ds/404")
    with pytest.raises(TeacherStoreError, match="'CogCoM/a b' has 2 positions, the batch expects 7"):
        store.get("CogCoM/a b", expected_positions=7)
    w = TeacherStoreWriter(tmp_path / "w", num_layers_total=4, dtype=torch.bfloat16, hidden_size=8, kind="latents")
    with pytest.raises(TeacherStoreError, match="'k'.*\\[layers=4, N, hidden=8\\]"):
        w.add("k", torch.zeros(3, 2, 8))
    w.add("k", torch.zeros(4, 2, 8))
    with pytest.raises(TeacherStoreError, match="already has an entry for 'k'"):
        w.add("k", torch.zeros(4, 2, 8))


def test_verify_catches_a_truncated_shard(tmp_path):
    write(tmp_path, KEYS)
    assert verify(tmp_path)["errors"] == []
    shard = tmp_path / json.loads((tmp_path / "index.json").read_text())["shards"][0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    report = verify(tmp_path)
    assert report["errors"] and str(shard) in report["errors"][0]
