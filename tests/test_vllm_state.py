"""The vLLM runner's device state (monet.vllm.state / settings) without an engine."""

from __future__ import annotations

import random

import pytest
import torch

from monet.layout import FORCE_START, SpanLayout
from monet.ops import reference
from monet.vllm.settings import EngineSettings, RequestSettings, parse_request_settings
from monet.vllm.state import LatentState

PAD, START, END = 1, 2, 3
ENGINE = EngineSettings(pad_id=PAD, start_id=START, end_id=END, layout=SpanLayout(4), max_latents_per_request=6)


def _state(max_num_reqs=2, D=8):
    return LatentState(ENGINE, hidden_size=D, dtype=torch.float32, device=torch.device("cpu"),
                       max_num_reqs=max_num_reqs, max_num_tokens=16)


def _rs(K, v1=False, **kw):
    return RequestSettings(SpanLayout(K, "monet-v1" if v1 else "standard"), **kw)


@pytest.mark.parametrize("monet_v1", [False, True])
@pytest.mark.parametrize("K", [1, 3])
def test_replay_matches_the_counter_state_machine(K, monet_v1):
    """SpanLayout.replay_latent_positions (used after preemption and for results) against the op."""
    layout = SpanLayout(K, "monet-v1" if monet_v1 else "standard")
    rng = random.Random(K + 10 * monet_v1)
    for trial in range(50):
        initial = [0, FORCE_START, layout.counter_on_prompt_start][trial % 3]
        remaining = torch.tensor([initial], dtype=torch.int32)
        prev = torch.zeros(1, 2)
        toks, latent = [], []
        for j in range(30):
            t = torch.tensor([rng.choice([START, 5, 6, 7])])
            reference.latent_advance_(t, torch.zeros(1, 2), torch.tensor([0]), remaining, prev, START, PAD, END, layout)
            toks.append(int(t))
            if 1 <= int(remaining[0]) <= K:
                latent.append(j)
        assert layout.replay_latent_positions(toks, start_id=START, initial=initial) == latent


def test_mixed_latent_sizes_in_one_step_match_per_request_runs():
    st = _state(max_num_reqs=3)
    combos = [(1, False), (3, True), (2, False)]
    for i, (k, v1) in enumerate(combos):
        st.add_request(f"r{i}", _rs(k, v1, force_start=i != 1), [9, 5])
    st.sync_batch(["r0", "r1", "r2"])
    solo = [(torch.tensor([FORCE_START if i != 1 else 0], dtype=torch.int32), torch.zeros(1, 8)) for i in range(3)]
    for step in range(6):
        hidden = torch.randn(3, 8)
        sampled = torch.tensor([START, 5, START], dtype=torch.int32)
        want = []
        for i, ((k, v1), (rem, prev)) in enumerate(zip(combos, solo)):
            t = sampled[i:i + 1].long().clone()
            reference.latent_advance_(t, hidden[i:i + 1], torch.tensor([0]), rem, prev, START, PAD, END,
                                      SpanLayout(k, "monet-v1" if v1 else "standard"))
            want.append(int(t))
        slots = st.batch_slots(3, torch.zeros(3, dtype=torch.bool))
        emb = torch.zeros(3, 8)
        st.embed_(emb, 3, torch.arange(3), slots)
        st.advance_(sampled, hidden, slots)
        assert sampled.tolist() == want, step
        for i, (rem, prev) in enumerate(solo):
            assert int(st.remaining[st.reqs[f"r{i}"].slot]) == int(rem[0])


def test_slots_grow_free_and_results_are_copies():
    st = _state(max_num_reqs=1)  # 9 slots to start with
    names = [f"q{i}" for i in range(12)]
    for n in names:
        st.add_request(n, _rs(2, True, return_latents=True, tag=n, force_start=True), [9])  # monet-v1: START takes h
    assert st.S >= 12 and len({r.slot for r in st.reqs.values()}) == 12
    st.sync_batch(names[:1])
    h = torch.full((1, 8), 7.0)
    st.advance_(torch.tensor([0], dtype=torch.int32), h, st.batch_slots(1, torch.zeros(1, dtype=torch.bool)))
    st.finish_request("q0")
    slot = next(iter(st._free[-1:]))
    st.store[slot].fill_(-1.0)  # the slot is reused: the stored result must not change
    got = st.take_latents(["q0"])["q0"]
    assert len(got) == 1 and got[0].latents.shape == (1, 8) and bool((got[0].latents == 7.0).all())
    assert st.take_latents(["q0"]) == {"q0": []}
    for n in names[1:]:
        st.finish_request(n)
    assert not st.reqs and len(st._store.finished) == 11
    st.take_latents(names)
    assert not st._store.finished and not st._store.by_tag


def test_store_overflow_is_reported():
    st = _state()
    st.add_request("a", _rs(4, return_latents=True, tag="t", force_start=True), [9])
    st.sync_batch(["a"])
    for _ in range(10):  # span after span: more latents than max_latents_per_request (6)
        st.advance_(torch.tensor([START], dtype=torch.int32), torch.randn(1, 8),
                    st.batch_slots(1, torch.zeros(1, dtype=torch.bool)))
    (rec,) = st.take_latents(["t"])["t"]
    assert rec.overflow and rec.latents.shape[0] == 6


def test_settings():
    d = ENGINE.to_dict()
    assert EngineSettings.from_dict(d) == ENGINE
    with pytest.raises(ValueError, match="unknown keys"):
        EngineSettings.from_dict({**d, "k": 1})
    with pytest.raises(ValueError, match="token_ids"):
        EngineSettings.from_dict({"latent_size": 2})
    default = ENGINE.layout
    assert parse_request_settings(None, default) == _rs(4)
    st = _rs(2, True, return_latents=True, tag="x", force_start=True)
    assert parse_request_settings(st.extra_args(), default) == st  # round trip through extra_args
    assert parse_request_settings({"monet_latent_size": "3", "monet_layout": "monet-v1",
                                   "monet_force_start": "true"}, default) == _rs(3, True, force_start=True)
    assert parse_request_settings({"other_tool": 1}, default) == _rs(4)  # foreign keys pass
    for bad, pattern in [({"monet_latent_size": 0}, "latent_size must be >= 1"),
                         ({"monet_latent_size": "-2"}, "latent_size must be >= 1"),
                         ({"monet_layout": "v2"}, "layout must be one of"),
                         ({"monet_latent_sise": 3}, r"unknown Monet request settings \['monet_latent_sise'\]"),
                         ({"monet": {"k": 1}}, r"unknown Monet request settings \['monet_k'\]"),
                         ({"monet": [1]}, "must be an object"), ([1, 2], "extra_args must be an object"),
                         ({"monet_force_start": "maybe"}, "monet_force_start must be a boolean"),
                         ({"monet_tag": 5}, "monet_tag must be a string")]:
        with pytest.raises((TypeError, ValueError), match=pattern):
            parse_request_settings(bad, default)


def test_prompt_ending_in_start_reaching_the_runner_raw():
    """Front ends strip a trailing START; a raw engine prompt that still has one opens the span with
    START embedded as a prompt token (K latents follow), and monet-v1 warns."""
    st = _state()
    st.add_request("raw", _rs(2), [9, START])
    st.sync_batch(["raw"])
    assert int(st.remaining[st.reqs["raw"].slot]) == SpanLayout(2).counter_on_prompt_start


def test_general_plugin_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("monet_latent") == "monet.vllm.plugin:register", "reinstall: pip install -e . --no-build-isolation"
    from monet.vllm.plugin import register

    register()
