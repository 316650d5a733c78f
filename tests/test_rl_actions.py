"""Action masks: every position's terms spelled out by hand for both span layouts."""

from __future__ import annotations

import pytest
import torch

from monet.layout import SpanLayout
from monet.rl.actions import action_masks
from monet.tokens import LatentTokenIds

IDS = LatentTokenIds(pad=90, start=91, end=92, observation_start=93, observation_end=94)
S, P_, E = IDS.start, IDS.pad, IDS.end
PROMPT = [10, 11, 12]  # response starts at position 3


def terms(rows, kind, K=2, forced_first=None, pad_to=None):
    """(position, kind) pairs per row, from action_masks on a right-padded batch."""
    L = pad_to or max(len(PROMPT) + len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    am = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        seq = PROMPT + r
        ids[b, :len(seq)] = torch.tensor(seq)
        am[b, :len(seq)] = 1
    ff = None if forced_first is None else torch.tensor(forced_first)
    m = action_masks(ids, am, torch.full((len(rows),), len(PROMPT)), layout=SpanLayout(K, kind),
                     token_ids=IDS, forced_first_start=ff)
    assert bool(((m.text | m.forced) == m.response).all()) and not bool((m.text & m.forced).any())
    out = []
    for b in range(len(rows)):
        pairs = [(p, "text") for p in m.text[b].nonzero().flatten().tolist()]
        pairs += [(p, "latent") for p in m.latent[b].nonzero().flatten().tolist()]
        out.append(sorted(pairs))
    return out, m


def test_standard_layout_hand_sequence():
    #          pos: 3   4  5   6   7  8   9
    response = [20, S, P_, P_, E, 21, 22]
    got, m = terms([response], "standard")
    assert got == [[(3, "text"), (4, "text"), (5, "latent"), (6, "latent"), (8, "text"), (9, "text")]]
    assert m.forced[0].nonzero().flatten().tolist() == [5, 6, 7]  # the PADs and END
    assert not bool(m.latent[0, 4])  # START's own input is its embedding


def test_monet_v1_layout_hand_sequence():
    #          pos: 3   4  5   6  7   8
    response = [20, S, P_, E, 21, 22]
    got, m = terms([response], "monet-v1")
    assert got == [[(3, "text"), (4, "latent"), (4, "text"), (5, "latent"), (7, "text"), (8, "text")]]
    assert m.forced[0].nonzero().flatten().tolist() == [5, 6]


def test_two_spans_k3_and_sampled_end_pad_outside_spans():
    # PAD / END sampled in text mode are ordinary actions; only the span machine forces tokens
    std = [P_, E, S, P_, P_, P_, E, 30, S, P_, P_, P_, E]
    #      3   4  5  6   7   8   9  10  11 12  13  14  15
    got, _ = terms([std], "standard", K=3)
    assert got == [[(3, "text"), (4, "text"), (5, "text"), (6, "latent"), (7, "latent"), (8, "latent"),
                    (10, "text"), (11, "text"), (12, "latent"), (13, "latent"), (14, "latent")]]
    v1 = [P_, E, S, P_, P_, E, 30, S, P_, P_, E]
    #     3   4  5  6   7   8  9   10 11  12  13
    got, _ = terms([v1], "monet-v1", K=3)
    assert got == [[(3, "text"), (4, "text"), (5, "latent"), (5, "text"), (6, "latent"), (7, "latent"),
                    (9, "text"), (10, "latent"), (10, "text"), (11, "latent"), (12, "latent")]]


def test_forced_first_start_has_no_text_term():
    got, _ = terms([[S, P_, P_, E, 20]], "standard", forced_first=[True])
    assert got == [[(4, "latent"), (5, "latent"), (7, "text")]]
    got, _ = terms([[S, P_, E, 20]], "monet-v1", forced_first=[True])
    assert got == [[(3, "latent"), (4, "latent"), (6, "text")]]
    # the same ids with a sampled START: START carries its text term
    got, _ = terms([[S, P_, E, 20]], "monet-v1", forced_first=[False])
    assert got == [[(3, "latent"), (3, "text"), (4, "latent"), (6, "text")]]


def test_truncated_span_and_padded_batch():
    rows = [[20, S, P_], [21, 22, 23, 24, 25, 26], [S]]
    got, m = terms(rows, "standard", K=2, pad_to=12)
    assert got[0] == [(3, "text"), (4, "text"), (5, "latent")]
    assert got[1] == [(p, "text") for p in range(3, 9)]
    assert got[2] == [(3, "text")]
    assert not bool(m.response[:, 9:].any()) and not bool(m.latent[:, 9:].any())
    got, _ = terms([[20, S, P_]], "monet-v1", K=3)
    assert got == [[(3, "text"), (4, "latent"), (4, "text"), (5, "latent")]]


def test_errors_name_sequence_and_position():
    with pytest.raises(ValueError, match=r"sequence 0, position 6: the decoder forces token 90"):
        terms([[20, S, P_, 21]], "standard", K=2)  # standard K=2: PAD expected at 6
    with pytest.raises(ValueError, match=r"sequence 1, position 3: the decoder forces token 91"):
        terms([[20], [20, 21]], "standard", forced_first=[False, True])
    ids = torch.tensor([[10, S, 12, 20]])
    with pytest.raises(ValueError, match=r"sequence 0: the prompt holds START at position 1"):
        action_masks(ids, torch.ones_like(ids), torch.tensor([3]), layout=SpanLayout(2), token_ids=IDS)
    with pytest.raises(ValueError, match="not right-padded"):
        action_masks(ids, torch.tensor([[0, 1, 1, 1]]), torch.tensor([1]), layout=SpanLayout(2), token_ids=IDS)
    with pytest.raises(ValueError, match=r"sequence 0: response_start 0"):
        action_masks(ids, torch.ones_like(ids), torch.tensor([0]), layout=SpanLayout(2), token_ids=IDS)


def simulate(kind, K, rng, forced_first, max_len):
    """An independent decoder: a queue of forced tokens per span; returns (tokens, sampled, latent)."""
    vocab = [20, 21, 22, S, S, P_, E]  # START drawn often; PAD / END may be sampled in text mode
    toks, sampled, latent, queue = [], [], [], []
    if forced_first:
        queue = [S]
    while len(toks) < max_len:
        p = len(PROMPT) + len(toks)
        if queue:
            t = queue.pop(0)
        else:
            t = rng.choice(vocab)
            sampled.append(p)
        toks.append(t)
        if t == S:  # only emitted in text mode (sampled) or as the forced first token: opens a span
            if kind == "standard":   # K PADs take latents after START's own embedded position
                queue += [P_] * K + [E]
                latent += [q for q in range(p + 1, p + 1 + K)]
            else:                    # START's own position + K - 1 PADs take latents
                queue += [P_] * (K - 1) + [E]
                latent += [q for q in range(p, p + K)]
    n = len(PROMPT) + len(toks)
    return toks, sampled, [q for q in latent if q < n]


@pytest.mark.parametrize("kind", ["standard", "monet-v1"])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_random_rollouts_match_simulated_decoder(kind, K):
    import random
    rng = random.Random(K)
    rows, expect, ff = [], [], []
    for i in range(40):
        forced_first = rng.random() < 0.3
        toks, sampled, latent = simulate(kind, K, rng, forced_first, rng.randint(1, 25))
        rows.append(toks)
        ff.append(forced_first)
        expect.append(sorted([(p, "text") for p in sampled] + [(p, "latent") for p in latent]))
    got, _ = terms(rows, kind, K=K, forced_first=ff)
    assert got == expect
