"""Online difficulty sampling: selection boundaries, FIFO batches, bounded buffer, exact JSON resume."""

from __future__ import annotations

import json
import random

import pytest

from monet.rl import DifficultySampler, VLPOConfig


def test_selection_boundaries():
    s = DifficultySampler(groups_per_batch=2, buffer_groups=10, select_acc_threshold=0.6)
    assert s.offer("a", [0, 0, 0, 0, 0]) == "all_wrong"
    assert s.offer("b", [1, 0, 0, 0, 0]) == "kept"          # 0.2
    assert s.offer("c", [1, 1, 1, 0, 0]) == "kept"          # 0.6 exactly: inclusive
    assert s.offer("d", [1, 1, 1, 1, 0]) == "too_easy"      # 0.8
    assert s.offer("e", [1, 1, 1, 1, 1]) == "too_easy"
    assert s.offer("f", [0.05, 0, 0, 0]) == "kept"          # partial credit counts as > 0
    assert s.offer("g", [0.6, 0.61]) == "too_easy"          # mean 0.605
    assert s.counts == {"offered": 7, "kept": 3, "all_wrong": 1, "too_easy": 3, "overflow": 0, "batches": 0}
    assert [g.group_id for g in s.buffer] == ["b", "c", "f"]


def test_fifo_batches_and_overflow():
    s = DifficultySampler.from_config(VLPOConfig(groups_per_batch=2, buffer_groups=3))
    assert not s.ready()
    with pytest.raises(RuntimeError, match="only 0 of 2 groups"):
        s.pop_batch()
    for i in range(5):
        s.offer(f"g{i}", [1, 0], payload={"i": i})
    assert s.counts["kept"] == 3 and s.counts["overflow"] == 2
    batch = s.pop_batch()
    assert [g.group_id for g in batch] == ["g0", "g1"] and batch[1].payload == {"i": 1}
    assert not s.ready() and [g.group_id for g in s.buffer] == ["g2"]
    s.offer("g5", [0.5, 0.5])
    assert [g.group_id for g in s.pop_batch()] == ["g2", "g5"] and s.counts["batches"] == 2


def test_bad_input_is_named():
    s = DifficultySampler(2, 4)
    with pytest.raises(ValueError, match=r"group 'x', rollout 1: accuracy must be a number in \[0, 1\]"):
        s.offer("x", [1, 2])
    with pytest.raises(ValueError, match="group 'y': no rollouts"):
        s.offer("y", [])
    with pytest.raises(ValueError, match="buffer_groups must be an int >= groups_per_batch"):
        DifficultySampler(4, 2)
    s.offer("t", [1, 0], payload=object())
    with pytest.raises(TypeError, match="group 't': payload is not JSON-serialisable"):
        s.state_dict()
    with pytest.raises(ValueError, match="unsupported version"):
        DifficultySampler.from_state({"version": 99})


def test_json_round_trip_resumes_exactly():
    rng = random.Random(3)
    stream = [(f"p{i}", [rng.choice([0.0, 1.0, 0.5]) for _ in range(4)], {"rollouts": f"store/{i}"})
              for i in range(60)]
    s = DifficultySampler(groups_per_batch=3, buffer_groups=5, select_acc_threshold=0.6)
    for gid, acc, payload in stream[:25]:
        s.offer(gid, acc, payload)
        if s.ready() and rng.random() < 0.5:
            s.pop_batch()
    assert s.buffer, "the snapshot should hold waiting groups"
    text = s.to_json()
    r = DifficultySampler.from_json(text)
    assert r.state_dict() == json.loads(text) == s.state_dict()
    # both continue identically
    for gid, acc, payload in stream[25:]:
        assert s.offer(gid, acc, payload) == r.offer(gid, acc, payload)
        if s.ready():
            assert s.pop_batch() == r.pop_batch()
    assert s.state_dict() == r.state_dict()
    assert sum(s.counts[k] for k in ("kept", "all_wrong", "too_easy", "overflow")) == s.counts["offered"] == 60
