"""SpanLayout: the one definition of span rules, against hand-written sequences and naive loops."""

from __future__ import annotations

import random

import pytest
import torch

from monet.layout import FORCE_START, SpanLayout

S, P, E, T = 100, 101, 102, 7  # START, PAD, END, a text token


def test_defaults_and_validation():
    assert SpanLayout() == SpanLayout(8, "standard")
    assert SpanLayout.of("4", None) == SpanLayout(4, "standard")  # CLI / HTTP strings
    assert SpanLayout.of(None, "monet-v1", default=SpanLayout(3)) == SpanLayout(3, "monet-v1")
    with pytest.raises(ValueError, match="latent_size must be >= 1"):
        SpanLayout(0)
    with pytest.raises(TypeError, match="latent_size must be an int"):
        SpanLayout(2.5)
    with pytest.raises(TypeError, match="latent_size must be an int"):
        SpanLayout(True)
    with pytest.raises(ValueError, match="layout must be one of"):
        SpanLayout(4, "v2")
    with pytest.raises(ValueError, match="latent_size must be >= 1"):
        SpanLayout.of("-1", None)
    with pytest.raises(AttributeError):
        SpanLayout().latent_size = 3  # frozen


@pytest.mark.parametrize("K", [1, 4])
def test_counter_values_by_hand(K):
    std, v1 = SpanLayout(K), SpanLayout(K, "monet-v1")
    assert (std.counter_on_start, v1.counter_on_start) == (K + 1, K)
    assert (std.span_length, v1.span_length) == (K + 2, K + 1)
    assert (std.first_latent_offset, v1.first_latent_offset) == (1, 0)
    assert (std.num_pads, v1.num_pads) == (K, K - 1)
    for lay in (std, v1):
        assert [lay.is_latent_input(r) for r in (FORCE_START, 0, 1, K, K + 1)] == [False, False, True, True, False]
        assert lay.is_latent_input(torch.tensor([-1, 0, 1, K, K + 1])).tolist() == [False, False, True, True, False]


def _run(layout, sampled, initial=0):
    """Emitted tokens and counters after each step, folding SpanLayout.advance."""
    out, r = [], initial
    for t in sampled:
        tok, r = layout.advance(r, t, start_id=S, pad_id=P, end_id=E)
        out.append((tok, r))
    return out


def test_advance_by_hand():
    K = 2
    # standard: START embedded, K PADs take latents, END
    assert _run(SpanLayout(K), [T, S, T, T, T, T]) == [(T, 0), (S, 3), (P, 2), (P, 1), (E, 0), (T, 0)]
    # monet-v1: START's position takes the first latent, K-1 PADs, END
    assert _run(SpanLayout(K, "monet-v1"), [T, S, T, T, T]) == [(T, 0), (S, 2), (P, 1), (E, 0), (T, 0)]
    # FORCE_START emits START whatever was sampled, then exactly as a sampled START
    for lay in (SpanLayout(K), SpanLayout(K, "monet-v1")):
        forced = _run(lay, [T, T, T, T, T], initial=FORCE_START)
        sampled = _run(lay, [S, T, T, T, T])
        assert forced == sampled


@pytest.mark.parametrize("kind", ["standard", "monet-v1"])
@pytest.mark.parametrize("K", [1, 3])
def test_replay_matches_state_machine(kind, K):
    lay = SpanLayout(K, kind)
    rng = random.Random(K)
    for trial in range(50):
        sampled = [rng.choice([S, T, T, T]) for _ in range(25)]
        initial = FORCE_START if trial % 3 == 0 else 0
        steps = _run(lay, sampled, initial)
        emitted = [t for t, _ in steps]
        expect = [j for j, (_, r) in enumerate(steps) if 1 <= r <= K]
        assert lay.replay_latent_positions(emitted, start_id=S, initial=initial) == expect
        if initial == FORCE_START:  # the emitted START makes the replay from 0 identical
            assert lay.replay_latent_positions(emitted, start_id=S) == expect


def _naive_mask(ids, layout):
    out = [False] * len(ids)
    for p, t in enumerate(ids):
        if t == S:
            for k in range(layout.latent_size):
                q = p + layout.first_latent_offset + k
                if q < len(ids):
                    out[q] = True
    return out


@pytest.mark.parametrize("kind", ["standard", "monet-v1"])
@pytest.mark.parametrize("K", [1, 4])
def test_latent_input_mask(kind, K):
    lay = SpanLayout(K, kind)
    # a hand-made sequence: text, span, text, span truncated by the end
    seq = [T, T, S] + [P] * (K if kind == "standard" else K - 1) + [E, T, S, P]
    mask = lay.latent_input_mask(torch.tensor(seq), start_id=S).tolist()
    start = 2
    first = start + (1 if kind == "standard" else 0)
    expect = [first <= p < first + K for p in range(len(seq))]
    s2 = seq.index(S, start + 1)
    for p in range(s2 + lay.first_latent_offset, min(len(seq), s2 + lay.first_latent_offset + K)):
        expect[p] = True
    assert mask == expect
    # the positions that take latents are exactly those a decoder replay marks
    gen_mask = lay.replay_latent_positions(seq, start_id=S)
    assert [p for p, m in enumerate(mask) if m] == gen_mask
    # batched random sequences against the naive loop
    g = torch.Generator().manual_seed(K)
    ids = torch.randint(0, 4, (5, 40), generator=g)
    ids = torch.where(ids == 0, S, T)
    got = lay.latent_input_mask(ids, start_id=S)
    for b in range(5):
        assert got[b].tolist() == _naive_mask(ids[b].tolist(), lay)
