"""Native latent ops (monet._C) vs their PyTorch references vs a naive plain-PyTorch composite.

Run: ``.venv/bin/python -m pytest benchmarks/bench_ops.py -q -p no:cacheprovider``
(``--bench-out PATH`` for the JSON, ``--bench-budget S`` per-benchmark time budget, ``--bench-threads N``
torch threads, default 1: see benchmarks/conftest.py).

Implementations per case:
  native     monet.ops.<op>(..., check_indices=False): the public API, Python validation included
  native_op  torch.ops.monet.<op> directly (decode ops only: shows the wrapper's share)
  reference  monet.ops.<op>(..., force_reference=True): monet.ops.reference (semantics definition)
  composite  written here the way one would in plain PyTorch without our ops (torch.where + index
             ops; vectorised, so latent_advance_ is not the Python-loop reference)
Every case first checks that all implementations agree exactly on its inputs. Ratios are
``impl / native`` of medians from one run (only side-by-side ratios mean anything on shared machines); the goal below is reported, not asserted.
"""

from __future__ import annotations

import functools

import pytest
import torch

from monet import ops
from monet.layout import FORCE_START, SpanLayout
from monet.ops import native as _native
from monet.ops import reference as ref
from monet.ops.reference import KIND_HELPER_IMAGE, KIND_LATENT, KIND_PAD, KIND_QUESTION_IMAGE, KIND_TEXT
from report import Goal

pytestmark = pytest.mark.skipif(not _native.available(), reason="monet._C is not built")

DECODE_BATCH = (1, 16, 64, 256)
DECODE_HIDDEN = (128, 1024, 3584)
NUM_SLOTS = 256  # request slots (max_num_seqs)
VOCAB = 8192
K = 8  # latent_size
LAYOUT = SpanLayout(K, "standard")
DTYPE = torch.bfloat16
START, PAD, END = VOCAB - 3, VOCAB - 2, VOCAB - 1  # special ids inside the (reduced) vocabulary
IMG, VS, VE = VOCAB - 6, VOCAB - 5, VOCAB - 4
IDS = dict(vision_start_id=VS, vision_end_id=VE, latent_start_id=START, latent_pad_id=PAD)

SCATTER_SIZES = ((2, 512, 1024), (4, 1024, 1024), (4, 2048, 1024))  # B, L, D
SEGMENT_SIZES = ((2, 512), (4, 1024), (4, 2048))  # B, L
MASK_SIZES = ((2, 512, None), (2, 1024, torch.bfloat16), (1, 2048, None))  # B, L, dtype

DECODE_OPS = ("latent_embed_", "latent_advance_")
GOAL = Goal("native decode ops >= 2x faster than the composite at batch >= 16 on CPU",
            ratio="composite/native", threshold=2.0,
            applies=lambda c: c.op in DECODE_OPS and c.params.get("B", 0) >= 16)

IMPLS = ("native", "reference", "composite")
DECODE_IMPLS = ("native", "native_op", "reference", "composite")


@pytest.fixture
def report(bench_report):
    return bench_report("ops", baseline="native", others=("native_op", "reference", "composite"),
                        goals=(GOAL,), note=f"rows in {DTYPE}; latent_size={K}; slots={NUM_SLOTS}; vocab={VOCAB}; "
                                           f"native = monet.ops with check_indices=False")


def _time(benchmark, bench_run, report, case, op, params, impl, fn, setup=None):
    benchmark.group = case
    benchmark.extra_info.update(op=op, impl=impl, **{k: str(v) for k, v in params.items()})
    timing = bench_run(benchmark, fn, setup)
    if timing is not None:
        report.record(case, impl, timing[0], min_s=timing[1], op=op, params=params)


_CHECKED: set[str] = set()


def _check_once(case: str, check) -> None:
    if case not in _CHECKED:
        check()
        _CHECKED.add(case)


def _equal(a, b, what: str) -> None:
    if isinstance(a, (tuple, list)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{what}[{i}]")
        return
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    assert torch.equal(a, b), f"{what}: implementations disagree"


# --------------------------------------------------------------------------------------------
# Composites: plain PyTorch, no monet ops
# --------------------------------------------------------------------------------------------


def composite_embed_(out, token_ids, slots, remaining, prev_hidden, embed_weight, latent_size):
    s = slots.clamp(min=0)
    r = remaining[s]
    latent = (slots >= 0) & (r >= 1) & (r <= latent_size)
    out.copy_(torch.where(latent.unsqueeze(1), prev_hidden[s], embed_weight[token_ids]))
    return out


def composite_advance_(tokens, hidden, slots, remaining, prev_hidden, start_id, pad_id, end_id, latent_size,
                       counter_on_start):
    valid = slots >= 0
    s = slots.clamp(min=0)
    r = remaining[s]
    opens = (r == -1) | ((r == 0) & (tokens == start_id))  # -1: START forced after a prompt ending in START
    new_r = torch.where(opens, counter_on_start, torch.where(r > 1, r - 1, 0)).to(r.dtype)
    forced = torch.where(r == -1, start_id, torch.where(r > 1, pad_id, torch.where(r == 1, end_id, tokens)))
    tokens.copy_(torch.where(valid, forced, tokens))
    remaining[s[valid]] = new_r[valid]
    latent = valid & (new_r >= 1) & (new_r <= latent_size)
    prev_hidden[s[latent]] = hidden[latent]
    return tokens


def composite_scatter(emb, hidden, mask):
    # position 0 is never a latent, so rolling the last row to the front is harmless
    return torch.where(mask.unsqueeze(-1), hidden.roll(1, dims=1), emb)


def composite_segments(input_ids, attention_mask, answer_start, vision_start_id, vision_end_id, latent_start_id,
                       latent_pad_id):
    vs, ve = input_ids == vision_start_id, input_ids == vision_end_id
    in_image = (vs.int().cumsum(1) - ve.int().cumsum(1) + ve.int()) > 0
    in_answer = torch.arange(input_ids.shape[1]).unsqueeze(0) >= answer_start.unsqueeze(1)
    latent = (input_ids == latent_pad_id) & in_answer & ~in_image
    helper = in_image & in_answer
    pad = attention_mask == 0
    kind = torch.where(pad, KIND_PAD, torch.where(latent, KIND_LATENT, torch.where(
        helper, KIND_HELPER_IMAGE, torch.where(in_image, KIND_QUESTION_IMAGE, KIND_TEXT)))).to(torch.int8)
    helper_step = (vs & in_answer).int().cumsum(1) - 1
    latent_step = ((input_ids == latent_start_id) & in_answer).int().cumsum(1) - 1
    step = torch.where(pad, -1, torch.where(latent, latent_step, torch.where(helper, helper_step, -1)))
    return kind, step.to(torch.int32)


def composite_mask(kind, step, dtype=None):
    L = kind.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril_()
    helper_key = (kind == KIND_HELPER_IMAGE).unsqueeze(1)
    sees_helper = ((kind == KIND_LATENT) | (kind == KIND_HELPER_IMAGE)).unsqueeze(2)
    same_step = step.unsqueeze(2) == step.unsqueeze(1)
    allowed = causal & (kind != KIND_PAD).unsqueeze(1) & (~helper_key | (sees_helper & same_step))
    allowed = torch.where((kind == KIND_PAD).unsqueeze(2), torch.eye(L, dtype=torch.bool), allowed).unsqueeze(1)
    if dtype is None:
        return allowed
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))


# --------------------------------------------------------------------------------------------
# Decode: latent_embed_, latent_advance_
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _weight(d):
    return torch.randn(VOCAB, d, generator=torch.Generator().manual_seed(d)).to(DTYPE)


def _decode_state(b, d, seed):
    """A mid-decode batch: ~30% of slots inside a span, some just opened, some at FORCE_START, ~5% rows
    without a slot."""
    g = torch.Generator().manual_seed(seed)
    remaining = torch.zeros(NUM_SLOTS, dtype=torch.int32)
    u = torch.rand(NUM_SLOTS, generator=g)
    remaining[u < 0.3] = torch.randint(1, K + 1, (int((u < 0.3).sum()),), generator=g, dtype=torch.int32)
    remaining[(u >= 0.3) & (u < 0.35)] = K + 1
    remaining[(u >= 0.35) & (u < 0.38)] = FORCE_START
    slots = torch.randperm(NUM_SLOTS, generator=g)[:b].long()
    slots[torch.rand(b, generator=g) < 0.05] = -1
    tokens = torch.randint(0, VOCAB, (b,), generator=g)
    tokens[torch.rand(b, generator=g) < 0.1] = START
    prev = torch.randn(NUM_SLOTS, d, generator=g).to(DTYPE)
    hidden = torch.randn(b, d, generator=g).to(DTYPE)
    return tokens, slots, remaining, prev, hidden


@functools.lru_cache(maxsize=4)
def _embed_inputs(b, d):
    tokens, slots, remaining, prev, _ = _decode_state(b, d, seed=b * 7 + d)
    return tokens, slots, remaining, prev, _weight(d), torch.empty(b, d, dtype=DTYPE)


def _embed_fns(b, d):
    tokens, slots, remaining, prev, weight, out = _embed_inputs(b, d)
    return {
        "native": lambda o=out: ops.latent_embed_(o, tokens, slots, remaining, prev, weight, LAYOUT,
                                                  check_indices=False),
        "native_op": lambda o=out: torch.ops.monet.latent_embed_(o, tokens, slots, remaining, prev, weight, K),
        "reference": lambda o=out: ops.latent_embed_(o, tokens, slots, remaining, prev, weight, LAYOUT,
                                                     check_indices=False, force_reference=True),
        "composite": lambda o=out: composite_embed_(o, tokens, slots, remaining, prev, weight, K),
    }


@pytest.mark.parametrize("impl", DECODE_IMPLS)
@pytest.mark.parametrize("d", DECODE_HIDDEN)
@pytest.mark.parametrize("b", DECODE_BATCH)
def test_latent_embed(benchmark, bench_run, report, b, d, impl):
    case = f"embed B={b} D={d}"
    fns = _embed_fns(b, d)

    def check():
        outs = {}
        for name, fn in fns.items():
            o = torch.full((b, d), float("nan"), dtype=DTYPE)
            fn(o)
            outs[name] = o
        assert not outs["native"].isnan().any()
        for name in fns:
            _equal(outs[name], outs["reference"], f"{case} {name}")

    _check_once(case, check)
    _time(benchmark, bench_run, report, case, "latent_embed_", {"B": b, "D": d}, impl, fns[impl])


class _AdvanceState:
    """Pristine decode state plus working buffers that each timed call mutates (restored in setup)."""

    def __init__(self, b, d):
        self.tokens0, self.slots, self.rem0, self.prev0, self.hidden = _decode_state(b, d, seed=b * 11 + d)
        self.tokens, self.rem, self.prev = self.tokens0.clone(), self.rem0.clone(), self.prev0.clone()

    def reset(self):
        self.tokens.copy_(self.tokens0)
        self.rem.copy_(self.rem0)
        self.prev.copy_(self.prev0)

    def fns(self):
        t, h, s, r, p = self.tokens, self.hidden, self.slots, self.rem, self.prev
        kw = dict(start_id=START, pad_id=PAD, end_id=END, layout=LAYOUT)
        on_start = LAYOUT.counter_on_start
        return {
            "native": lambda: ops.latent_advance_(t, h, s, r, p, **kw, check_indices=False),
            "native_op": lambda: torch.ops.monet.latent_advance_(t, h, s, r, p, START, PAD, END, K, on_start),
            "reference": lambda: ops.latent_advance_(t, h, s, r, p, **kw, check_indices=False, force_reference=True),
            "composite": lambda: composite_advance_(t, h, s, r, p, START, PAD, END, K, on_start),
        }


@functools.lru_cache(maxsize=2)
def _advance_state(b, d):
    return _AdvanceState(b, d)


@pytest.mark.parametrize("impl", DECODE_IMPLS)
@pytest.mark.parametrize("d", DECODE_HIDDEN)
@pytest.mark.parametrize("b", DECODE_BATCH)
def test_latent_advance(benchmark, bench_run, report, b, d, impl):
    case = f"advance B={b} D={d}"
    st = _advance_state(b, d)
    fns = st.fns()

    def check():
        results = {}
        for name, fn in fns.items():
            st.reset()
            fn()
            results[name] = (st.tokens.clone(), st.rem.clone(), st.prev.clone())
        for name in fns:
            _equal(results[name], results["reference"], f"{case} {name}")
        if b >= 16:
            assert not torch.equal(results["reference"][1], st.rem0), "the case should change some counters"

    _check_once(case, check)
    _time(benchmark, bench_run, report, case, "latent_advance_", {"B": b, "D": d}, impl, fns[impl], setup=st.reset)


# --------------------------------------------------------------------------------------------
# Training: latent_scatter (fwd + bwd), latent_segments, latent_attention_mask
# --------------------------------------------------------------------------------------------


def _scatter_mask(b, l, g):
    """Spans of K latents (each preceded by a START) at random places; never at position 0."""
    mask = torch.zeros(b, l, dtype=torch.bool)
    for i in range(b):
        p = int(torch.randint(16, 64, (1,), generator=g))
        while p + K < l:
            mask[i, p:p + K] = True
            p += K + int(torch.randint(32, 160, (1,), generator=g))
    return mask


@functools.lru_cache(maxsize=1)
def _scatter_inputs(b, l, d):
    g = torch.Generator().manual_seed(b * l + d)
    emb = torch.randn(b, l, d, generator=g).to(DTYPE).requires_grad_()
    hidden = torch.randn(b, l, d, generator=g).to(DTYPE).requires_grad_()
    grad = torch.randn(b, l, d, generator=g).to(DTYPE)
    return emb, hidden, _scatter_mask(b, l, g), grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,l,d", SCATTER_SIZES)
def test_latent_scatter_fwd_bwd(benchmark, bench_run, report, b, l, d, impl):
    case = f"scatter fwd+bwd B={b} L={l} D={d}"
    emb, hidden, mask, grad = _scatter_inputs(b, l, d)
    forward = {
        "native": lambda: ops.latent_scatter(emb, hidden, mask, check_indices=False),
        "reference": lambda: ops.latent_scatter(emb, hidden, mask, check_indices=False, force_reference=True),
        "composite": lambda: composite_scatter(emb, hidden, mask),
    }

    def fwd_bwd(name):
        out = forward[name]()
        return (out, *torch.autograd.grad(out, (emb, hidden), grad))

    def check():
        results = {name: fwd_bwd(name) for name in forward}
        for name in forward:
            _equal(results[name], results["reference"], f"{case} {name}")

    _check_once(case, check)
    _time(benchmark, bench_run, report, case, "latent_scatter", {"B": b, "L": l, "D": d}, impl,
          lambda: fwd_bwd(impl))


def _stage2_row(g, l):
    """Token ids of one stage-2 sample, ~90% of ``l`` long: question images, then an answer with
    helper images each followed by a latent span."""
    seq = [1, 2, 3]
    for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
        seq += [10] * 8 + [VS] + [IMG] * int(torch.randint(32, 128, (1,), generator=g)) + [VE]
    seq += [11] * 16
    answer_start = len(seq)
    target = int(0.9 * l)
    while len(seq) < target:
        seq += [12] * int(torch.randint(8, 40, (1,), generator=g))
        if torch.rand(1, generator=g) < 0.5:
            seq += [VS] + [IMG] * int(torch.randint(16, 64, (1,), generator=g)) + [VE]
        seq += [START] + [PAD] * K + [END]
    return seq[: l - 2], answer_start


@functools.lru_cache(maxsize=4)
def _stage2_batch(b, l):
    g = torch.Generator().manual_seed(b * 1000 + l)
    ids = torch.zeros(b, l, dtype=torch.long)
    am = torch.zeros(b, l, dtype=torch.long)
    ans = torch.zeros(b, dtype=torch.long)
    for i in range(b):
        seq, a = _stage2_row(g, l)
        n = len(seq) - int(torch.randint(0, l // 8, (1,), generator=g))  # ragged lengths
        ids[i, :n] = torch.tensor(seq[:n])
        am[i, :n] = 1
        ans[i] = a
    return ids, am, ans


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,l", SEGMENT_SIZES)
def test_latent_segments(benchmark, bench_run, report, b, l, impl):
    case = f"segments B={b} L={l}"
    ids, am, ans = _stage2_batch(b, l)
    fns = {
        "native": lambda: ops.latent_segments(ids, am, ans, **IDS),
        "reference": lambda: ops.latent_segments(ids, am, ans, **IDS, force_reference=True),
        "composite": lambda: composite_segments(ids, am, ans, *IDS.values()),
    }

    def check():
        results = {name: fn() for name, fn in fns.items()}
        for name in fns:
            _equal(results[name], results["reference"], f"{case} {name}")
        kinds = set(results["native"][0].unique().tolist())
        assert {KIND_TEXT, KIND_QUESTION_IMAGE, KIND_HELPER_IMAGE, KIND_LATENT} <= kinds, kinds

    _check_once(case, check)
    _time(benchmark, bench_run, report, case, "latent_segments", {"B": b, "L": l}, impl, fns[impl])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,l,dtype", MASK_SIZES,
                         ids=lambda v: "bool" if v is None else str(v).replace("torch.", ""))
def test_latent_attention_mask(benchmark, bench_run, report, b, l, dtype, impl):
    dname = "bool" if dtype is None else str(dtype).replace("torch.", "")
    case = f"mask B={b} L={l} {dname}"
    kind, step = ref.latent_segments(*_stage2_batch(b, l), *IDS.values())
    fns = {
        "native": lambda: ops.latent_attention_mask(kind, step, dtype),
        "reference": lambda: ops.latent_attention_mask(kind, step, dtype, force_reference=True),
        "composite": lambda: composite_mask(kind, step, dtype),
    }

    def check():
        results = {name: fn() for name, fn in fns.items()}
        for name in fns:
            _equal(results[name], results["reference"], f"{case} {name}")

    _check_once(case, check)
    _time(benchmark, bench_run, report, case, "latent_attention_mask", {"B": b, "L": l, "dtype": dname}, impl,
          fns[impl])
