"""Teacher-forced policy log-probabilities against an independent prefix-by-prefix loop.

The reference knows which positions are actions from how the test built the rollout (not from
monet.rl.actions) and recomputes every action's hidden state ``h[p - 1]`` by running the model on
the prefix ``[0, p)`` alone (latents written at the latent positions before ``p``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from latent_reference import full_hidden
from monet.layout import SpanLayout
from monet.rl import ActionTerms, RolloutBatch, VLPOConfig, explore_latents, merge_metrics, policy_logprobs, \
    vlpo_loss
from monet.testing import synthetic_image
from monet.tokens import LatentTokenIds

K = 3
T = 0.7
SIGMA = 10.0


@dataclass
class Rollout:
    ids: list[int]
    prompt_len: int
    pixel_values: torch.Tensor | None
    grid: torch.Tensor | None
    text_pos: list[int]       # sampled response tokens
    latent_pos: list[int]     # positions whose input is a latent
    forced_first: bool
    latents: torch.Tensor | None = None


def build_rollout(processor, kind: str, segments: list, seed: int, forced_first: bool = False,
                  image: bool = True) -> Rollout:
    """``segments``: strings (sampled text) and ``"SPAN"`` / ``"SPAN_CUT"`` (a span, cut after 2 tokens)."""
    tok = processor.tokenizer
    ids = LatentTokenIds.from_tokenizer(tok)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": ([{"type": "image"}] if image else [])
          + [{"type": "text", "text": f"what is shown {seed}?"}]}],
        add_generation_prompt=True)
    images = [synthetic_image(seed, size=(56 + 28 * seed, 56))] if image else None
    enc = processor(text=[prompt], images=images, return_tensors="pt")
    seq = enc["input_ids"][0].tolist()
    P = len(seq)
    text_pos, latent_pos = [], []
    for i, seg in enumerate(segments):
        if seg.startswith("SPAN"):
            s = len(seq)
            if not (forced_first and i == 0):
                text_pos.append(s)  # START sampled
            if kind == "standard":
                span = [ids.start] + [ids.pad] * K + [ids.end]
                lat = list(range(s + 1, s + 1 + K))
            else:
                span = [ids.start] + [ids.pad] * (K - 1) + [ids.end]
                lat = list(range(s, s + K))
            if seg == "SPAN_CUT":
                span = span[:2]
                lat = [p for p in lat if p < s + 2]
            seq += span
            latent_pos += lat
        else:
            new = tok.encode(seg, add_special_tokens=False)
            text_pos += list(range(len(seq), len(seq) + len(new)))
            seq += new
    return Rollout(seq, P, enc.get("pixel_values"), enc.get("image_grid_thw"), text_pos, latent_pos, forced_first)


def rollouts(processor, kind: str, images: bool = True) -> list[Rollout]:
    """Four rollouts: two spans; a span cut by the length limit; a forced first START; no image."""
    im_end = "<|im_end|>"
    return [
        build_rollout(processor, kind, ["look at the", "SPAN", " red circle", "SPAN", " so \\boxed{red}" + im_end], 0,
                      image=images),
        build_rollout(processor, kind, ["zoom in", "SPAN", " corner", "SPAN_CUT"], 1, image=images),
        build_rollout(processor, kind, ["SPAN", " it is red" + im_end], 2, forced_first=True, image=images),
        build_rollout(processor, kind, ["the", "SPAN", " shape is red" + im_end], 3, image=False),
    ]


def collate(rs: list[Rollout], pad_id: int = 0, extra: int = 0) -> RolloutBatch:
    L = max(len(r.ids) for r in rs) + extra
    ids = torch.full((len(rs), L), pad_id, dtype=torch.long)
    am = torch.zeros(len(rs), L, dtype=torch.long)
    for b, r in enumerate(rs):
        ids[b, :len(r.ids)] = torch.tensor(r.ids)
        am[b, :len(r.ids)] = 1
    with_images = [r for r in rs if r.pixel_values is not None]
    return RolloutBatch(ids, am, torch.tensor([r.prompt_len for r in rs]), [r.latents for r in rs],
                        torch.cat([r.pixel_values for r in with_images]) if with_images else None,
                        torch.cat([r.grid for r in with_images]) if with_images else None,
                        torch.tensor([r.forced_first for r in rs]))


def score(model, processor, batch, kind, **kw):
    kw = {"temperature": T, "sigma": SIGMA} | kw
    return policy_logprobs(model, batch, layout=SpanLayout(K, kind),
                           token_ids=LatentTokenIds.from_tokenizer(processor.tokenizer), **kw)


def fixed_point_latents(model, processor, rs, kind):
    """Latents equal to the policy's own means (what noise-free decoding feeds): iterate z <- mu."""
    D = model.config.text_config.hidden_size
    for r in rs:
        r.latents = torch.zeros(len(r.latent_pos), D)
    for _ in range(2 * K + 3):
        with torch.no_grad():
            out = score(model, processor, collate(rs), kind)
        mus = out.mu.split([len(r.latent_pos) for r in rs])
        if all(torch.equal(r.latents, m) for r, m in zip(rs, mus)):
            return
        for r, m in zip(rs, mus):
            r.latents = m.clone()
    raise AssertionError("z <- mu did not reach a fixed point")


@pytest.fixture(scope="module")
def tiny(tiny_on):
    return tiny_on("cpu")


@pytest.mark.parametrize("images", [True, False], ids=["images", "text-only"])
@pytest.mark.parametrize("kind", ["standard", "monet-v1"])
def test_matches_prefix_by_prefix_reference(tiny, kind, images):
    model, processor = tiny
    rs = rollouts(processor, kind, images)
    g = torch.Generator().manual_seed(1)
    D = model.config.text_config.hidden_size
    for r in rs:
        r.latents = torch.randn(len(r.latent_pos), D, generator=g)
    batch = collate(rs)
    with torch.no_grad():
        out = score(model, processor, batch, kind)
        out_c = score(model, processor, batch, kind, latent_logp_constant=True)
    assert out.text_logp.dtype == out.latent_logp.dtype == torch.float32
    head = model.get_output_embeddings()
    for b, r in enumerate(rs):
        assert out.masks.text[b].nonzero().flatten().tolist() == r.text_pos
        assert out.masks.latent[b].nonzero().flatten().tolist() == r.latent_pos
        lat = dict(zip(r.latent_pos, r.latents))
        with torch.no_grad():
            for p in range(r.prompt_len, len(r.ids)):
                h = full_hidden(model, r.ids[:p], {q: v for q, v in lat.items() if q < p}, r.pixel_values, r.grid)[-1]
                want_t = torch.log_softmax(head(h).double() / T, -1)[r.ids[p]] if p in r.text_pos else 0.0
                want_l = (-((lat[p].double() - h.double()) ** 2).sum() / (2 * SIGMA ** 2)
                          if p in lat else 0.0)
                assert abs(float(out.text_logp[b, p]) - float(want_t)) < 2e-4, (b, p)
                assert abs(float(out.latent_logp[b, p]) - float(want_l)) < 2e-4 * max(1.0, abs(float(want_l))), (b, p)
        assert not bool(out.text_logp[b, :r.prompt_len].any()) and not bool(out.text_logp[b, len(r.ids):].any())
    const = -0.5 * D * math.log(2 * math.pi * SIGMA ** 2)
    torch.testing.assert_close(out_c.latent_logp, torch.where(out.masks.latent, out.latent_logp + const, 0.0))
    assert int(out.masks.latent.sum()) == out.mu.shape[0] == sum(len(r.latent_pos) for r in rs) > 0
    # entropy of softmax(logits / T) at text actions, 0 elsewhere
    p = rs[0].text_pos[2]  # before the first span: the prefix holds no latent
    with torch.no_grad():
        h = full_hidden(model, rs[0].ids[:p], {}, rs[0].pixel_values, rs[0].grid)[-1]
        lp = torch.log_softmax(head(h).double() / T, -1)
    assert abs(float(out.entropy[0, p]) + float((lp.exp() * lp).sum())) < 1e-4
    assert not bool(out.entropy[~out.masks.text].any())


@pytest.mark.parametrize("kind", ["standard", "monet-v1"])
def test_latent_gradient_zero_without_noise_and_gaussian_with_noise(tiny, kind):
    model, processor = tiny
    rs = rollouts(processor, kind)
    fixed_point_latents(model, processor, rs, kind)
    params = [p for p in model.parameters() if p.requires_grad]

    out = score(model, processor, collate(rs), kind)
    torch.testing.assert_close(out.z, out.mu.detach(), rtol=0, atol=0)  # z == mu at theta_old
    g_text = torch.autograd.grad(out.text_logp.sum(), params, retain_graph=True, allow_unused=True)
    g_lat = torch.autograd.grad(out.latent_logp.sum(), params, allow_unused=True)
    lat_norm = math.sqrt(sum(float((g ** 2).sum()) for g in g_lat if g is not None))
    text_norm = math.sqrt(sum(float((g ** 2).sum()) for g in g_text if g is not None))
    assert text_norm > 1e-3 and lat_norm < 1e-10 * text_norm

    gen = torch.Generator().manual_seed(7)
    for r in rs:
        r.latents = explore_latents(r.latents, 0.5, gen)
    out = score(model, processor, collate(rs), kind)
    total = out.latent_logp.sum()
    (g_mu,) = torch.autograd.grad(total, out.mu, retain_graph=True)
    analytic = (out.z - out.mu.detach()) / SIGMA ** 2
    assert analytic.abs().max() > 1e-3
    torch.testing.assert_close(g_mu, analytic, rtol=1e-6, atol=1e-9)
    g_theta = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
    chain = torch.autograd.grad(out.mu, params, grad_outputs=analytic, allow_unused=True)
    n_nonzero = 0
    for gt, gc in zip(g_theta, chain):
        if gc is None:
            assert gt is None or not bool(gt.any())
            continue
        n_nonzero += int(bool(gc.any()))
        assert (gt - gc).norm() <= 1e-5 * gc.norm() + 1e-12  # fp32 sums in different orders
    assert n_nonzero > 10


def test_bf16_model_gives_fp32_latent_term(tiny_on):
    model, processor = tiny_on("cpu", "bfloat16")
    kind = "standard"
    rs = rollouts(processor, kind)[:2]
    fixed_point_latents(model, processor, rs, kind)
    gen = torch.Generator().manual_seed(3)
    for r in rs:  # fp32 recorded latents a little off the bf16 means (about bf16 resolution)
        scale = 4e-3 * r.latents.float().abs()
        r.latents = r.latents.float() + scale * torch.randn(r.latents.shape, generator=gen)
    with torch.no_grad():
        out = score(model, processor, collate(rs), kind)
    assert out.latent_logp.dtype == out.text_logp.dtype == out.mu.dtype == torch.float32
    assert torch.equal(out.mu.bfloat16().float(), out.mu)  # the model's bf16 output, upcast
    want = -((out.z.double() - out.mu.double()) ** 2).sum(-1) / (2 * SIGMA ** 2)
    got = out.latent_logp[out.masks.latent]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-12)
    naive_bf16 = -((out.z.bfloat16() - out.mu.bfloat16()) ** 2).sum(-1).float() / (2 * SIGMA ** 2)
    assert ((naive_bf16.double() - want) / want).abs().max() > 0.05  # bf16 arithmetic would be wrong


def test_micro_batches_give_full_batch_gradient(tiny):
    """2 micro-batches (own padding, own images) with global counts == 1 full batch, end to end."""
    model, processor = tiny
    kind = "monet-v1"
    rs = rollouts(processor, kind)
    g = torch.Generator().manual_seed(5)
    D = model.config.text_config.hidden_size
    for r in rs:
        r.latents = torch.randn(len(r.latent_pos), D, generator=g)
    full = collate(rs)
    with torch.no_grad():
        old = score(model, processor, full, kind)
    noise = {k: 0.3 * torch.randn(full.input_ids.shape, generator=g) for k in ("to", "tr", "lo", "lr")}
    adv = torch.randn(len(rs), generator=g)
    cfg = VLPOConfig(temperature=T, sigma=SIGMA, latent_weight=0.5)
    n_text, n_lat = int(old.masks.text.sum()), int(old.masks.latent.sum())
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(rows):
        batch = collate([rs[i] for i in rows])
        L = batch.input_ids.shape[1]
        cur = score(model, processor, batch, kind)
        sel = lambda t: t[rows, :L]  # noqa: E731
        text = ActionTerms(cur.text_logp, sel(old.text_logp + noise["to"]), sel(old.text_logp + noise["tr"]),
                           cur.masks.text)
        latent = ActionTerms(cur.latent_logp, sel(old.latent_logp + noise["lo"]), sel(old.latent_logp + noise["lr"]),
                             cur.masks.latent)
        return vlpo_loss(text, latent, adv[rows], config=cfg, n_text=n_text, n_latent=n_lat, entropy=cur.entropy)

    out_full = loss_of([0, 1, 2, 3])
    g_full = torch.autograd.grad(out_full.loss, params, allow_unused=True)
    assert out_full.metrics["text/clip_high_frac"] + out_full.metrics["text/clip_low_frac"] > 0
    parts, acc = [], None
    for rows in ([0, 2], [1, 3]):
        out = loss_of(rows)
        parts.append(out.metrics)
        gs = torch.autograd.grad(out.loss, params, allow_unused=True)
        acc = gs if acc is None else [a if b is None else (b if a is None else a + b) for a, b in zip(acc, gs)]
    for a, b in zip(acc, g_full):
        if b is None:
            assert a is None
            continue
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-9
    merged = merge_metrics(parts)
    for k in merged:
        torch.testing.assert_close(merged[k], out_full.metrics[k], rtol=1e-4, atol=1e-6, msg=k)


def test_bad_latents_are_named(tiny):
    model, processor = tiny
    rs = rollouts(processor, "standard")[:2]
    D = model.config.text_config.hidden_size
    rs[0].latents = torch.zeros(len(rs[0].latent_pos), D)
    rs[1].latents = torch.zeros(len(rs[1].latent_pos) + 1, D)
    with pytest.raises(ValueError, match=rf"sequence 1: latents must be \[{len(rs[1].latent_pos)}, {D}\]"):
        score(model, processor, collate(rs), "standard")
    rs[1].latents = torch.full((len(rs[1].latent_pos), D), float("nan"))
    with pytest.raises(ValueError, match="sequence 1: latents hold non-finite values"):
        score(model, processor, collate(rs), "standard")


def test_padding_content_is_ignored(tiny):
    """Poisoned padding (START ids, extra columns) changes nothing at valid positions."""
    model, processor = tiny
    rs = rollouts(processor, "monet-v1")
    g = torch.Generator().manual_seed(2)
    for r in rs:
        r.latents = torch.randn(len(r.latent_pos), model.config.text_config.hidden_size, generator=g)
    start = LatentTokenIds.from_tokenizer(processor.tokenizer).start
    with torch.no_grad():
        a = score(model, processor, collate(rs), "monet-v1")
        b = score(model, processor, collate(rs, pad_id=start, extra=5), "monet-v1")
    L = a.text_logp.shape[1]
    assert not bool(b.text_logp[:, L:].any()) and not bool(b.masks.latent[:, L:].any())
    torch.testing.assert_close(b.text_logp[:, :L], a.text_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.latent_logp[:, :L], a.latent_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.mu, a.mu, rtol=1e-5, atol=1e-5)
