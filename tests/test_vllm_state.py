"""The vLLM runner's device state (monet.vllm.state / settings) without an engine."""

from __future__ import annotations

import random

import pytest
import torch

from monet.layout import SpanLayout
from monet.ops import reference
from monet.vllm.settings import (EngineSettings, RequestSettings, replay_latent_positions, request_extra_args,
                                 request_settings)
from monet.vllm.state import LatentState

PAD, START, END = 1, 2, 3
ENGINE = EngineSettings(pad_id=PAD, start_id=START, end_id=END, latent_size=4, max_latents_per_request=6)


def _state(max_num_reqs=2, D=8):
    return LatentState(ENGINE, hidden_size=D, dtype=torch.float32, device=torch.device("cpu"),
                       max_num_reqs=max_num_reqs, max_num_tokens=16)


@pytest.mark.parametrize("monet_v1", [False, True])
@pytest.mark.parametrize("K", [1, 3])
def test_replay_matches_the_counter_state_machine(K, monet_v1):
    rng = random.Random(K + 10 * monet_v1)
    for trial in range(50):
        ends = trial % 2 == 0
        remaining = torch.tensor([K + 1 if ends else 0], dtype=torch.int32)
        prev = torch.zeros(1, 2)
        toks, latent = [], []
        for j in range(30):
            t = torch.tensor([rng.choice([START, 5, 6, 7])])
            reference.latent_advance_(t, torch.zeros(1, 2), torch.tensor([0]), remaining, prev, START, PAD, END,
                                      SpanLayout(K, "monet-v1" if monet_v1 else "standard"))
            toks.append(int(t))
            if 1 <= int(remaining[0]) <= K:
                latent.append(j)
        assert replay_latent_positions(toks, prompt_ends_in_start=ends, latent_size=K, monet_v1=monet_v1,
                                       start_id=START) == latent


def test_mixed_latent_sizes_in_one_step_match_per_request_runs():
    st = _state(max_num_reqs=3)
    combos = [(1, False), (3, True), (2, False)]
    for i, (k, v1) in enumerate(combos):
        st.add_request(f"r{i}", RequestSettings(k, v1), [9, START])
    st.sync_batch(["r0", "r1", "r2"])
    solo = [(torch.tensor([k + 1], dtype=torch.int32), torch.zeros(1, 8)) for k, _ in combos]
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
        st.add_request(n, RequestSettings(2, False, return_latents=True, tag=n), [START])
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
    st.add_request("a", RequestSettings(4, False, return_latents=True, tag="t"), [START])
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
    assert request_settings(ENGINE, None) == RequestSettings(4, False)
    assert request_settings(ENGINE, request_extra_args(latent_size=2, layout="monet-v1", return_latents=True,
                                                       tag="x")) == RequestSettings(2, True, True, "x")
    assert request_settings(ENGINE, {"monet_latent_size": "3", "monet_layout": "monet-v1"}) == RequestSettings(3, True)
    with pytest.raises(ValueError, match="latent_size must be >= 1"):
        request_settings(ENGINE, {"monet_latent_size": 0})
    with pytest.raises(ValueError, match="layout must be one of"):
        request_extra_args(layout="v2")


def test_general_plugin_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("monet_latent") == "monet.vllm.plugin:register", "reinstall: pip install -e . --no-build-isolation"
    from monet.vllm.plugin import register

    register()
