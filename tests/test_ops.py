"""Native latent ops (monet._C) against the pure-PyTorch references and hand-computed cases."""

from __future__ import annotations

import warnings

import pytest
import torch

from monet import ops
from monet.layout import FORCE_START, SpanLayout
from monet.ops import native, reference as ref

pytestmark = pytest.mark.skipif(not native.available(), reason="monet._C is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rand(*shape, dtype=torch.float32, device="cpu", gen=None):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# latent_embed_
# --------------------------------------------------------------------------------------------


def _layout(k, kind="standard"):
    return SpanLayout(k, kind)


def _embed_case(n, s, d, k, dtype, device, seed, latent_share=0.5, none_share=0.2):
    """Random decode step; counters mix FORCE_START (-1), text (0), latent (1..K) and K + 1."""
    g = torch.Generator().manual_seed(seed)
    vocab = 50
    weight = _rand(vocab, d, dtype=dtype, device=device, gen=g)
    prev = _rand(s, d, dtype=dtype, device=device, gen=g)
    remaining = torch.randint(FORCE_START, k + 2, (s,), generator=g, dtype=torch.int32)
    if s:
        flip = torch.rand(s, generator=g) < latent_share
        remaining[flip] = torch.randint(1, k + 1, (int(flip.sum()),), generator=g, dtype=torch.int32)
    if s >= 4:  # every counter state present whatever the draw
        remaining[:4] = torch.tensor([FORCE_START, 0, 1, k + 1], dtype=torch.int32)
    slots = torch.randperm(max(s, n), generator=g)[:n] % max(s, 1) if s else torch.full((n,), -1)
    slots = slots.long()
    slots[torch.rand(n, generator=g) < none_share] = -1
    tokens = torch.randint(0, vocab, (n,), generator=g)
    return weight, prev, remaining.to(device), slots.to(device), tokens.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,s,d,k", [(0, 4, 32, 3), (1, 1, 16, 1), (7, 9, 96, 4), (64, 80, 200, 8), (300, 300, 128, 10)])
@pytest.mark.parametrize("with_embed", [True, False])
def test_latent_embed_matches_reference(device, dtype, n, s, d, k, with_embed):
    weight, prev, remaining, slots, tokens = _embed_case(n, s, d, k, dtype, device, seed=n * 31 + d)
    if n >= 64:
        used = remaining[slots[slots >= 0]].tolist()
        assert FORCE_START in used and 0 in used and 1 in used, "rows should hit every counter state"
    poison = torch.full((n, d), float("nan"), dtype=dtype, device=device)
    got, want = poison.clone(), poison.clone()
    w = weight if with_embed else None
    ops.latent_embed_(got, tokens, slots, remaining, prev, w, _layout(k))
    ref.latent_embed_(want, tokens, slots, remaining, prev, w, _layout(k))
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    if with_embed:
        assert not got.isnan().any(), "every row must be written when embed_weight is given"


def test_latent_embed_hand_case():
    # slots 0..4 with remaining [0, 1, 3, 4, -1] and K = 3: slots 1 and 2 feed latents; slot 3 has
    # just emitted START in the standard layout (K + 1) and slot 4 is at FORCE_START: both embedded.
    d = 4
    weight = torch.arange(10 * d, dtype=torch.float32).view(10, d)
    prev = -torch.arange(1, 5 * d + 1, dtype=torch.float32).view(5, d)
    remaining = torch.tensor([0, 1, 3, 4, -1], dtype=torch.int32)
    slots = torch.tensor([3, 2, 1, 0, -1, 4])
    tokens = torch.tensor([9, 8, 7, 6, 5, 4])
    for force_reference in (False, True):
        out = torch.full((6, d), float("nan"))
        ops.latent_embed_(out, tokens, slots, remaining, prev, weight, _layout(3), force_reference=force_reference)
        assert torch.equal(out[0], weight[9])
        assert torch.equal(out[1], prev[2])
        assert torch.equal(out[2], prev[1])
        assert torch.equal(out[3], weight[6])
        assert torch.equal(out[4], weight[5])
        assert torch.equal(out[5], weight[4]), "FORCE_START embeds the (last prompt) token"


def test_latent_embed_all_and_no_rows_latent(device):
    d, s = 24, 6
    prev = torch.randn(s, d, device=device)
    weight = torch.randn(11, d, device=device)
    slots = torch.arange(s, device=device)
    tokens = torch.randint(0, 11, (s,), device=device)
    out = torch.full((s, d), float("nan"), device=device)
    ops.latent_embed_(out, tokens, slots, torch.full((s,), 2, dtype=torch.int32, device=device), prev, weight, _layout(2))
    assert torch.equal(out, prev)
    for r in (0, FORCE_START):
        out.fill_(float("nan"))
        rem = torch.full((s,), r, dtype=torch.int32, device=device)
        ops.latent_embed_(out, tokens, slots, rem, prev, weight, _layout(2))
        assert torch.equal(out, weight[tokens])


# --------------------------------------------------------------------------------------------
# latent_advance_
# --------------------------------------------------------------------------------------------

START, PAD, END = 101, 102, 103
KINDS = ["standard", "monet-v1"]


def _run_stream(sampled: list[int], layout: SpanLayout, force_reference=False, r0=0):
    """Feed one request's sampled ids through latent_advance_; return emitted ids, counters after
    each step and latent flags (the next input is a latent)."""
    d = 3
    remaining = torch.tensor([r0], dtype=torch.int32)
    prev = torch.full((1, d), float("nan"))
    emitted, counters, latent_next = [], [], []
    for t, tok in enumerate(sampled):
        tokens = torch.tensor([tok])
        hidden = torch.full((1, d), float(t))
        ops.latent_advance_(tokens, hidden, torch.tensor([0]), remaining, prev, start_id=START, pad_id=PAD,
                            end_id=END, layout=layout, force_reference=force_reference)
        emitted.append(int(tokens[0]))
        counters.append(int(remaining[0]))
        active = bool(layout.is_latent_input(remaining)[0])
        latent_next.append(active)
        if active:
            assert torch.equal(prev[0], hidden[0]), "the next input must be this step's hidden state"
    return emitted, counters, latent_next


@pytest.mark.parametrize("force_reference", [False, True])
def test_advance_standard_layout_hand_case(force_reference):
    # K = 2: START PAD PAD END; the EOS (7) sampled inside the span is ignored.
    emitted, _, latent = _run_stream([5, START, 7, 7, 7, 6, START, 9, 9, 9], _layout(2), force_reference)
    assert emitted == [5, START, PAD, PAD, END, 6, START, PAD, PAD, END]
    # inputs after: START is embedded; both PAD positions take latents; END embedded.
    assert latent == [False, False, True, True, False, False, False, True, True, False]


@pytest.mark.parametrize("force_reference", [False, True])
def test_advance_monet_v1_layout_hand_case(force_reference):
    # K = 2 in monet-v1: START's own position is latent, one PAD, then END (K + 1 tokens).
    emitted, _, latent = _run_stream([5, START, 7, 7, 6, START, 9, 9], _layout(2, "monet-v1"), force_reference)
    assert emitted == [5, START, PAD, END, 6, START, PAD, END]
    assert latent == [False, True, True, False, False, True, True, False]


@pytest.mark.parametrize("kind", KINDS)
def test_advance_k1_and_counter_k_plus_1(kind):
    emitted, _, latent = _run_stream([START, 4, 4, 4], _layout(1, kind))
    if kind == "monet-v1":
        assert emitted == [START, END, 4, 4] and latent == [True, False, False, False]
    else:
        assert emitted == [START, PAD, END, 4] and latent == [False, True, False, False]
    # A counter of K + 1 (START just emitted in the standard layout) counts down through K latents.
    emitted, _, latent = _run_stream([4, 4, 4, 4, 4], _layout(3, kind), r0=4)
    assert emitted == [PAD, PAD, PAD, END, 4]
    assert latent == [True, True, True, False, False]


# A request whose prompt ended with START starts at FORCE_START: the first emitted token is START
# whatever was sampled, then the span runs as if START had been sampled. Sampled stream: the START at
# index 1 falls inside the forced span (ignored), the one at index 7 opens a new span.
FORCE_SAMPLED = [5, START, 5, 5, 5, 5, 5, START]
FORCE_EXPECTED = {  # (kind, K): (emitted, counter after each step), written out by hand
    ("standard", 1): ([START, PAD, END, 5, 5, 5, 5, START], [2, 1, 0, 0, 0, 0, 0, 2]),
    ("standard", 4): ([START, PAD, PAD, PAD, PAD, END, 5, START], [5, 4, 3, 2, 1, 0, 0, 5]),
    ("monet-v1", 1): ([START, END, 5, 5, 5, 5, 5, START], [1, 0, 0, 0, 0, 0, 0, 1]),
    ("monet-v1", 4): ([START, PAD, PAD, PAD, END, 5, 5, START], [4, 3, 2, 1, 0, 0, 0, 4]),
}


@pytest.mark.parametrize("force_reference", [False, True])
@pytest.mark.parametrize("kind,k", list(FORCE_EXPECTED))
def test_advance_force_start_hand_case(kind, k, force_reference):
    want_tokens, want_counters = FORCE_EXPECTED[(kind, k)]
    emitted, counters, latent = _run_stream(FORCE_SAMPLED, _layout(k, kind), force_reference, r0=FORCE_START)
    assert emitted == want_tokens
    assert counters == want_counters
    assert latent == [1 <= c <= k for c in want_counters]
    # monet-v1: the forced START's own position is the first latent (fed this step's hidden state).
    assert latent[0] == (kind == "monet-v1")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 4])
def test_advance_force_start_equals_sampled_start(device, kind, k):
    """FORCE_START behaves exactly like a text-mode slot that sampled START (counter, token, prev)."""
    layout, d = _layout(k, kind), 5
    hidden = torch.randn(2, d, device=device)
    tokens = torch.tensor([77, START], device=device)  # slot 0 forced (sampled 77), slot 1 sampled START
    remaining = torch.tensor([FORCE_START, 0], dtype=torch.int32, device=device)
    prev = torch.full((2, d), float("nan"), device=device)
    ops.latent_advance_(tokens, hidden, torch.tensor([0, 1], device=device), remaining, prev, start_id=START,
                        pad_id=PAD, end_id=END, layout=layout)
    assert tokens.tolist() == [START, START]
    assert remaining.tolist() == [layout.counter_on_start] * 2
    if layout.is_latent_input(layout.counter_on_start):
        assert torch.equal(prev, hidden)
    else:
        assert prev.isnan().all(), "no latent follows START in the standard layout: prev_hidden untouched"


def _random_counters(s, layout, g):
    """Counters over every state: FORCE_START, text, in-span 1..K and (standard) K + 1."""
    return torch.randint(FORCE_START, layout.counter_on_start + 1, (s,), generator=g, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("b,s,d,k", [(0, 3, 16, 2), (1, 1, 8, 1), (16, 40, 64, 4), (256, 300, 160, 8)])
def test_advance_matches_reference_over_many_steps(device, dtype, kind, b, s, d, k):
    layout = _layout(k, kind)
    g = torch.Generator().manual_seed(b + d + k)
    remaining = _random_counters(s, layout, g)
    prev = torch.full((s, d), float("nan"), dtype=dtype)
    slots = (torch.randperm(s, generator=g)[:b]).long()
    if b:
        slots[torch.rand(b, generator=g) < 0.1] = -1
    state_ref = (remaining.clone(), prev.clone())
    state_dev = (remaining.to(device), prev.to(device))
    seen = set()
    for step in range(3 * k + 4):
        # new requests whose prompt ended with START arrive in text-mode slots
        arrive = (state_ref[0] == 0) & (torch.rand(s, generator=g) < 0.1)
        state_ref[0][arrive] = FORCE_START
        state_dev[0][arrive.to(device)] = FORCE_START
        seen |= set(state_ref[0][slots[slots >= 0]].tolist())
        sampled = torch.randint(0, 100, (b,), generator=g)
        sampled[torch.rand(b, generator=g) < 0.3] = START
        hidden = torch.randn(b, d, generator=g).to(dtype)
        t_ref, t_dev = sampled.clone(), sampled.to(device)
        ref.latent_advance_(t_ref, hidden, slots, *state_ref, START, PAD, END, layout)
        ops.latent_advance_(t_dev, hidden.to(device), slots.to(device), *state_dev, start_id=START,
                            pad_id=PAD, end_id=END, layout=layout)
        assert torch.equal(t_dev.cpu(), t_ref), f"step {step}: forced tokens differ"
        assert torch.equal(state_dev[0].cpu(), state_ref[0]), f"step {step}: counters differ"
        torch.testing.assert_close(state_dev[1].cpu(), state_ref[1], equal_nan=True, rtol=0, atol=0)
    if b >= 16:
        assert {FORCE_START, 0, 1, k} <= seen, f"the random stream should visit every counter state, saw {seen}"


def test_native_advance_matches_scalar_definition_on_every_counter():
    """One row per (layout, counter, sampled) combination against SpanLayout.advance directly."""
    for kind in KINDS:
        for k in (1, 2, 5):
            layout = _layout(k, kind)
            cases = [(r, t) for r in range(FORCE_START, layout.counter_on_start + 1) for t in (START, 9)]
            n = len(cases)
            tokens = torch.tensor([t for _, t in cases])
            remaining = torch.tensor([r for r, _ in cases], dtype=torch.int32)
            hidden = torch.randn(n, 3)
            prev = torch.full((n, 3), float("nan"))
            ops.latent_advance_(tokens, hidden, torch.arange(n), remaining, prev, start_id=START, pad_id=PAD,
                                end_id=END, layout=layout)
            for i, (r, t) in enumerate(cases):
                want_tok, want_r = layout.advance(r, t, start_id=START, pad_id=PAD, end_id=END)
                assert (int(tokens[i]), int(remaining[i])) == (want_tok, want_r), (kind, k, r, t)
                stored = not prev[i].isnan().any()
                assert stored == layout.is_latent_input(want_r), (kind, k, r, t)
                if stored:
                    assert torch.equal(prev[i], hidden[i])


# --------------------------------------------------------------------------------------------
# latent_scatter
# --------------------------------------------------------------------------------------------


def _scatter_mask(b, l, g, share=0.3):
    mask = torch.rand(b, l, generator=g) < share
    mask[:, 0] = False
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,l,d", [(1, 1, 8), (2, 5, 16), (3, 37, 64), (4, 128, 96)])
def test_scatter_forward_backward_match_reference(device, dtype, b, l, d):
    g = torch.Generator().manual_seed(b * l + d)
    emb = torch.randn(b, l, d, generator=g).to(device, dtype).requires_grad_()
    hid = torch.randn(b, l, d, generator=g).to(device, dtype).requires_grad_()
    mask = _scatter_mask(b, l, g).to(device)
    if l > 1:
        mask[:, -1] = True  # spans at sequence end
    out = ops.latent_scatter(emb, hid, mask)
    out_ref = ref.latent_scatter(emb, hid, mask)
    assert torch.equal(out, out_ref)
    grad = torch.randn(b, l, d, generator=g).to(device, dtype)
    ge, gh = torch.autograd.grad(out, (emb, hid), grad)
    ge_ref, gh_ref = torch.autograd.grad(out_ref, (emb, hid), grad)
    assert torch.equal(ge, ge_ref) and torch.equal(gh, gh_ref)


@pytest.mark.parametrize("force_reference", [False, True])
def test_scatter_gradcheck_and_gradgradcheck_float64(force_reference):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    hid = torch.randn(2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)

    def fn(e, h):
        return ops.latent_scatter(e, h, mask, force_reference=force_reference)

    assert torch.autograd.gradcheck(fn, (emb, hid))
    assert torch.autograd.gradgradcheck(fn, (emb, hid))


def test_scatter_is_differentiable_as_an_op():
    """The autograd formula is registered on torch.ops.monet.latent_scatter itself (no wrapper)."""
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 5, 2, generator=g, requires_grad=True)
    hid = torch.randn(1, 5, 2, generator=g, requires_grad=True)
    mask = torch.tensor([[False, True, True, False, True]])
    out = torch.ops.monet.latent_scatter(emb, hid, mask)
    assert out.grad_fn is not None
    grad = torch.randn(1, 5, 2, generator=g)
    ge, gh = torch.autograd.grad(out, (emb, hid), grad)
    # hand-derived: emb receives grad where mask is off; hid[p] receives grad[p + 1] where mask[p + 1]
    assert torch.equal(ge, grad * (~mask).unsqueeze(-1))
    want_gh = torch.zeros_like(grad)
    want_gh[0, 0], want_gh[0, 1], want_gh[0, 3] = grad[0, 1], grad[0, 2], grad[0, 4]
    assert torch.equal(gh, want_gh)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_out_poisoned(device, dtype):
    g = torch.Generator().manual_seed(5)
    emb, hid = (torch.randn(3, 9, 16, generator=g).to(device, dtype) for _ in range(2))
    mask = _scatter_mask(3, 9, g, 0.5).to(device)
    out = torch.full_like(emb, float("nan"))
    torch.ops.monet.latent_scatter.out(emb, hid, mask, out=out)
    assert torch.equal(out, ref.latent_scatter(emb, hid, mask)), "every row of out must be written"


def test_scatter_hand_case_and_no_latents(device):
    emb = torch.arange(12.0, device=device).view(1, 4, 3)
    hid = -torch.arange(12.0, device=device).view(1, 4, 3)
    mask = torch.tensor([[False, True, False, True]], device=device)
    out = ops.latent_scatter(emb, hid, mask)
    assert torch.equal(out[0, 0], emb[0, 0]) and torch.equal(out[0, 2], emb[0, 2])
    assert torch.equal(out[0, 1], hid[0, 0]) and torch.equal(out[0, 3], hid[0, 2])
    assert torch.equal(ops.latent_scatter(emb, hid, torch.zeros_like(mask)), emb)


def test_scatter_rejects_latent_at_position_zero():
    with pytest.raises(ValueError, match="position 0 of batch rows \\[1\\]"):
        ops.latent_scatter(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.tensor([[0, 1, 0], [1, 0, 0]]).bool())


# --------------------------------------------------------------------------------------------
# latent_segments + latent_attention_mask
# --------------------------------------------------------------------------------------------

IMG, VS, VE = 201, 202, 203
IDS = dict(vision_start_id=VS, vision_end_id=VE, latent_start_id=START, latent_pad_id=PAD)


def _sample_sequence(g, n_question, n_helper, k):
    """Random stage-2-like sequence; returns ids and the answer start."""
    seq = [1, 2]
    for _ in range(n_question):
        seq += [3, VS] + [IMG] * int(torch.randint(1, 5, (1,), generator=g)) + [VE]
    seq += [4, 5]
    answer_start = len(seq)
    for _ in range(n_helper):
        seq += [6] * int(torch.randint(0, 3, (1,), generator=g))
        seq += [VS] + [IMG] * int(torch.randint(1, 5, (1,), generator=g)) + [VE]
        seq += [START] + [PAD] * k + [END, 7, 8]
    seq += [9]
    return seq, answer_start


def _batch(g, b, k, left_pad):
    seqs = [_sample_sequence(g, int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(0, 4, (1,), generator=g)), k) for _ in range(b)]
    l = max(len(s) for s, _ in seqs) + 2
    ids = torch.zeros(b, l, dtype=torch.long)
    am = torch.zeros(b, l, dtype=torch.long)
    ans = torch.zeros(b, dtype=torch.long)
    for i, (s, a) in enumerate(seqs):
        off = l - len(s) if left_pad else 0
        ids[i, off:off + len(s)] = torch.tensor(s)
        am[i, off:off + len(s)] = 1
        ans[i] = a + off
    return ids, am, ans


def test_segments_hand_case():
    #        0  1   2    3   4  5  6   7    8    9    10   11  12
    ids = [[1, VS, IMG, VE, 4, VS, IMG, VE, START, PAD, PAD, END, 0]]
    ids = torch.tensor(ids)
    am = torch.tensor([[1] * 12 + [0]])
    kind, step = ops.latent_segments(ids, am, torch.tensor([5]), **IDS)
    T, Q, H, LT, P = ops.KIND_TEXT, ops.KIND_QUESTION_IMAGE, ops.KIND_HELPER_IMAGE, ops.KIND_LATENT, ops.KIND_PAD
    assert kind.tolist() == [[T, Q, Q, Q, T, H, H, H, T, LT, LT, T, P]]
    assert step.tolist() == [[-1, -1, -1, -1, -1, 0, 0, 0, -1, 0, 0, -1, -1]]


@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("b,k", [(1, 1), (3, 4), (8, 8)])
def test_segments_match_reference(device, left_pad, b, k):
    g = torch.Generator().manual_seed(b * 10 + k + left_pad)
    ids, am, ans = _batch(g, b, k, left_pad)
    kind, step = ops.latent_segments(ids.to(device), am.to(device), ans.to(device), **IDS)
    kind_ref, step_ref = ref.latent_segments(ids, am, ans, *IDS.values())
    assert torch.equal(kind.cpu(), kind_ref) and torch.equal(step.cpu(), step_ref)
    assert kind.dtype == torch.int8 and step.dtype == torch.int32


def _naive_mask(kind, step):
    """Entry-by-entry statement of the stage-2 rule (independent of the vectorised reference)."""
    B, L = kind.shape
    out = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                ki, kj = int(kind[b, i]), int(kind[b, j])
                if ki == ops.KIND_PAD:
                    ok = i == j
                elif j > i or kj == ops.KIND_PAD:
                    ok = False
                elif kj == ops.KIND_HELPER_IMAGE:
                    ok = ki in (ops.KIND_LATENT, ops.KIND_HELPER_IMAGE) and int(step[b, i]) == int(step[b, j])
                else:
                    ok = True
                out[b, 0, i, j] = ok
    return out


@pytest.mark.parametrize("left_pad", [False, True])
def test_mask_matches_naive_rule(device, left_pad):
    g = torch.Generator().manual_seed(7 + left_pad)
    ids, am, ans = _batch(g, 3, 3, left_pad)
    kind, step = ops.latent_segments(ids, am, ans, **IDS)
    naive = _naive_mask(kind, step)
    assert torch.equal(ref.latent_attention_mask(kind, step), naive)
    got = ops.latent_attention_mask(kind.to(device), step.to(device))
    assert torch.equal(got.cpu(), naive)
    # Text after a latent block must not see the helper image; the block's latents must.
    helper = kind == ops.KIND_HELPER_IMAGE
    assert helper.any()


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,k", [(1, 2), (5, 8)])
def test_mask_dtypes_and_out_poisoned(device, dtype, b, k):
    g = torch.Generator().manual_seed(b + k)
    ids, am, ans = _batch(g, b, k, left_pad=True)
    kind, step = ref.latent_segments(ids, am, ans, *IDS.values())
    want = ref.latent_attention_mask(kind, step, dtype)
    got = ops.latent_attention_mask(kind.to(device), step.to(device), dtype)
    assert got.dtype == (dtype or torch.bool)
    assert torch.equal(got.cpu(), want)
    L = kind.shape[1]
    out = torch.full((b, 1, L, L), True if dtype is None else float("nan"), dtype=dtype or torch.bool, device=device)
    if dtype is None:
        out.fill_(True)
        ops.latent_attention_mask(kind.to(device), step.to(device), out=out)
        assert torch.equal(out.cpu(), want)
        out.fill_(False)
    ops.latent_attention_mask(kind.to(device), step.to(device), dtype, out=out)
    assert torch.equal(out.cpu(), want), "every element of out must be written"


def test_mask_additive_rows_never_empty():
    g = torch.Generator().manual_seed(3)
    ids, am, ans = _batch(g, 4, 2, left_pad=True)
    kind, step = ops.latent_segments(ids, am, ans, **IDS)
    mask = ops.latent_attention_mask(kind, step, torch.float32)
    scores = torch.randn(mask.shape) + mask
    probs = scores.softmax(-1)
    assert torch.isfinite(probs).all()


# --------------------------------------------------------------------------------------------
# validation, fallback, tracing
# --------------------------------------------------------------------------------------------


def test_validation_errors_name_the_argument():
    out = torch.zeros(2, 4)
    prev = torch.zeros(3, 4)
    rem = torch.zeros(3, dtype=torch.int32)
    tok = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="slots must lie in"):
        ops.latent_embed_(out, tok, torch.tensor([0, 3]), rem, prev, None, _layout(2))
    with pytest.raises(ValueError, match="remaining must be torch.int32"):
        ops.latent_embed_(out, tok, torch.tensor([0, 1]), rem.long(), prev, None, _layout(2))
    with pytest.raises(ValueError, match="prev_hidden has hidden size 5"):
        ops.latent_embed_(out, tok, torch.tensor([0, 1]), rem, torch.zeros(3, 5), None, _layout(2))
    with pytest.raises(ValueError, match="token_ids must lie in"):
        ops.latent_embed_(out, torch.tensor([0, 9]), torch.tensor([0, 1]), rem, prev, torch.zeros(5, 4), _layout(2))
    with pytest.raises(ValueError, match="remaining must be >= -1"):
        ops.latent_embed_(out, tok, torch.tensor([0, 1]), torch.tensor([0, -2, 1], dtype=torch.int32), prev, None,
                          _layout(2))
    with pytest.raises(TypeError, match="layout must be a monet.layout.SpanLayout, got int"):
        ops.latent_embed_(out, tok, torch.tensor([0, 1]), rem, prev, None, 2)
    with pytest.raises(TypeError, match="layout must be a monet.layout.SpanLayout, got str"):
        ops.latent_advance_(tok, out, torch.tensor([0, 1]), rem, prev, start_id=1, pad_id=2, end_id=3, layout="standard")
    with pytest.raises(ValueError, match="remaining must be >= -1"):
        ops.latent_advance_(tok, out, torch.tensor([0, 1]), torch.tensor([0, -3, 1], dtype=torch.int32), prev,
                            start_id=1, pad_id=2, end_id=3, layout=_layout(2))
    with pytest.raises(ValueError, match="mask must be bool"):
        ops.latent_scatter(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2))


def test_native_errors_are_clear_without_python_checks():
    with pytest.raises(RuntimeError, match="slots\\[1\\] = 7 out of range"):
        torch.ops.monet.latent_embed_(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.tensor([0, 7]),
                                      torch.zeros(3, dtype=torch.int32), torch.zeros(3, 4), None, 2)
    advance = (torch.zeros(2, dtype=torch.long), torch.zeros(2, 4), torch.tensor([0, 1]),
               torch.zeros(3, dtype=torch.int32), torch.zeros(3, 4), START, PAD, END)
    with pytest.raises(RuntimeError, match="counter_on_start must be latent_size \\(monet-v1\\) or latent_size \\+ 1"):
        torch.ops.monet.latent_advance_(*advance, 3, 7)
    with pytest.raises(RuntimeError, match="latent_size must be >= 1, got 0"):
        torch.ops.monet.latent_advance_(*advance, 0, 1)


def test_fallback_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(native, "_load", lambda: (None, "ImportError: pretend"))
    native.warn_fallback.cache_clear()
    g = torch.Generator().manual_seed(0)
    emb, hid = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = _scatter_mask(2, 5, g, 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = ops.latent_scatter(emb, hid, mask)
        ops.latent_scatter(emb, hid, mask)
    msgs = [w for w in caught if "falls back" in str(w.message)]
    assert len(msgs) == 1
    native.warn_fallback.cache_clear()
    monkeypatch.undo()
    assert torch.equal(a, ops.latent_scatter(emb, hid, mask))


def test_ops_trace_with_fake_tensors():
    """Meta kernels let the ops run under torch.compile's fake-tensor tracing (aot_eager)."""

    def step(out, tokens, slots, remaining, prev, weight, kind, st):
        torch.ops.monet.latent_embed_(out, tokens, slots, remaining, prev, weight, 2)
        mask = torch.ops.monet.latent_attention_mask(kind, st, torch.float32)
        return out * 2, mask

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = torch.zeros(3, 8)
    args = (torch.tensor([1, 2, 3]), torch.tensor([0, -1, 1]), torch.tensor([1, 0], dtype=torch.int32),
            torch.randn(2, 8), torch.randn(5, 8), torch.zeros(2, 4, dtype=torch.int8), torch.full((2, 4), -1, dtype=torch.int32))
    got, mask = compiled(out.clone(), *args)
    want_out = out.clone()
    ops.latent_embed_(want_out, *args[:5], _layout(2))
    assert torch.equal(got, want_out * 2)
    assert mask.shape == (2, 1, 4, 4)
    meta = torch.ops.monet.latent_scatter(torch.empty(2, 3, 4, device="meta"), torch.empty(2, 3, 4, device="meta"),
                                          torch.empty(2, 3, dtype=torch.bool, device="meta"))
    assert meta.shape == (2, 3, 4) and meta.device.type == "meta"


# --------------------------------------------------------------------------------------------
# torch.library.opcheck: schema (mutation/aliasing), autograd registration, fake/meta kernels and
# AOT dispatch for every op and overload, on CPU and (when present) CUDA
# --------------------------------------------------------------------------------------------


def _opcheck_cases(device):
    g = torch.Generator().manual_seed(11)
    n, s, d, k = 6, 8, 16, 3
    layout = _layout(k)
    weight, prev, remaining, slots, tokens = _embed_case(n, s, d, k, torch.float32, device, seed=3)
    slots = torch.randperm(s, generator=g)[:n].long().to(device)  # advance: distinct slots
    slots[1] = -1
    hidden = torch.randn(n, d, generator=g).to(device)
    b, l = 2, 7
    emb, hid = (torch.randn(b, l, d, generator=g).to(device) for _ in range(2))
    mask = _scatter_mask(b, l, g, 0.5).to(device)
    ids, am, ans = _batch(g, 3, 2, left_pad=True)
    ids, am, ans = ids.to(device), am.to(device), ans.to(device)
    kind, step = ref.latent_segments(ids, am, ans, *IDS.values())
    L = kind.shape[1]
    monet = torch.ops.monet
    return {
        "latent_embed_": (monet.latent_embed_.default,
                          (torch.empty(n, d, device=device), tokens, slots, remaining, prev, weight, k)),
        "latent_embed_ no weight": (monet.latent_embed_.default,
                                    (torch.zeros(n, d, device=device), tokens, slots, remaining, prev, None, k)),
        "latent_advance_": (monet.latent_advance_.default,
                            (tokens.clone(), hidden, slots, remaining, prev, START, PAD, END, k,
                             layout.counter_on_start)),
        "latent_scatter": (monet.latent_scatter.default,
                           (emb.clone().requires_grad_(), hid.clone().requires_grad_(), mask)),
        "latent_scatter no grad": (monet.latent_scatter.default, (emb, hid, mask)),
        "latent_scatter.out": (monet.latent_scatter.out, (emb, hid, mask), {"out": torch.empty_like(emb)}),
        "latent_scatter_backward": (monet.latent_scatter_backward.default,
                                    (torch.randn(b, l, d, generator=g).to(device).requires_grad_(), mask)),
        "latent_segments": (monet.latent_segments.default, (ids, am, ans, *IDS.values())),
        "latent_attention_mask": (monet.latent_attention_mask.default, (kind, step)),
        "latent_attention_mask float": (monet.latent_attention_mask.default, (kind, step, torch.bfloat16)),
        "latent_attention_mask.out": (monet.latent_attention_mask.out, (kind, step),
                                      {"out": torch.empty(kind.shape[0], 1, L, L, dtype=torch.bool, device=device)}),
    }


OPCHECK_CASES = list(_opcheck_cases("cpu"))


def test_opcheck_covers_every_op():
    covered = {str(case[0]).split(".")[1] for case in _opcheck_cases("cpu").values()}
    schemas = torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
    native_ops = {name.split("::")[1].split(".")[0] for name in schemas if name.startswith("monet::")}
    assert native_ops and native_ops <= covered, f"ops without an opcheck case: {native_ops - covered}"


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(device, case):
    op, args, *rest = _opcheck_cases(device)[case]
    torch.library.opcheck(op, args, rest[0] if rest else {})


def test_extension_built_against_another_torch_is_refused():
    from monet.ops import native

    assert native.torch_mismatch("2.13.0+cu130", "2.13.0+cpu") is None  # same release, other build
    msg = native.torch_mismatch("2.13.0+cu130", "2.14.1")
    assert msg and "built against torch 2.13.0+cu130 but torch 2.14.1 is running" in msg
    info = native.build_info()
    assert info["native_ops"] and native.torch_mismatch(info["compiled_with_torch"], info["torch_version"]) is None
