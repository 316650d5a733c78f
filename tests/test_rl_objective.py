"""The clipped VLPO objective: hand-computed clip / dual clip / k3, global normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from monet.rl import ActionTerms, VLPOConfig, clipped_surrogate, k3_kl, merge_metrics, vlpo_loss

CFG = VLPOConfig()


def test_clip_and_dual_clip_hand_computed():
    #            A:    +1    +1    +1   -1    -1    -1   -2    +2
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -2.0, 2.0], dtype=torch.float64)
    ratio = torch.tensor([1.5, 0.5, 1.2, 0.5, 1.2, 5.0, 4.0, 1.25], dtype=torch.float64)
    lr = ratio.log().requires_grad_()
    pg, flags = clipped_surrogate(lr, adv, clip_low=0.2, clip_high=0.3, dual_clip=3.0)
    expect = [
        -1.3,   # A>0, ratio above 1.3: clipped to -A*1.3
        -0.5,   # A>0, ratio below 0.8: not clipped (min of the two objectives)
        -1.2,   # inside the band
        0.8,    # A<0, ratio below 0.8: clipped to -A*0.8
        1.2,    # A<0, ratio above 1.3 is not clipped by the band...
        3.0,    # ...but capped by the dual clip at -A*3
        6.0,    # A=-2, ratio 4: max(8, 2.6)=8 capped at 6
        -2.5,   # A=2 inside the band
    ]
    torch.testing.assert_close(pg, torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert flags["clip_high"].tolist() == [True, False, False, False, False, False, False, False]
    assert flags["clip_low"].tolist() == [False, False, False, True, False, False, False, False]
    assert flags["dual_clip"].tolist() == [False, False, False, False, False, True, True, False]
    # d pg / d log_ratio = -A * ratio where the unclipped branch is active, 0 where clipped
    (g,) = torch.autograd.grad(pg.sum(), lr)
    expect_g = [0.0, -0.5, -1.2, 0.0, 1.2, 0.0, 0.0, -2.5]
    torch.testing.assert_close(g, torch.tensor(expect_g, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_k3_hand_computed_and_gradient():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.0, -2.0 + math.log(2.0), -1.5, -3.0 + 100.0], dtype=torch.float64)
    k = k3_kl(logp, ref)
    # d = ref - logp: 0 -> 0; ln2 -> 2 - ln2 - 1; -1 -> e^-1 + 1 - 1; 100 clamped to 20
    expect = [0.0, 1.0 - math.log(2.0), math.exp(-1.0), math.exp(20.0) - 21.0]
    torch.testing.assert_close(k, torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(k[:3].sum(), logp)
    # d k3 / d logp = 1 - exp(ref - logp)
    torch.testing.assert_close(g, torch.tensor([0.0, 1.0 - 2.0, 1.0 - math.exp(-1.0), 0.0], dtype=torch.float64))


def test_vlpo_loss_hand_computed():
    # one rollout, 6 positions: text actions at 1, 2, 4; latent actions at 2, 3 (monet-v1 START at 2)
    tmask = torch.tensor([[0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    lmask = torch.tensor([[0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    nan = float("nan")  # masked-out entries must not leak
    t_logp = torch.tensor([[nan, math.log(0.6), math.log(0.3), nan, math.log(0.9), nan]], requires_grad=True)
    t_old = torch.tensor([[nan, math.log(0.4), math.log(0.3), nan, math.log(0.9), nan]])
    t_ref = torch.tensor([[nan, math.log(0.4), math.log(0.6), nan, math.log(0.9), nan]])
    l_logp = torch.tensor([[0, 0, -1.0, -2.0, 0, 0]], requires_grad=True)
    l_old = torch.tensor([[0, 0, -1.0, -2.5, 0, 0]])
    l_ref = torch.tensor([[0, 0, -1.0, -2.0, 0, 0]])
    adv = torch.tensor([0.5])
    cfg = VLPOConfig(latent_weight=2.0)
    out = vlpo_loss(ActionTerms(t_logp, t_old, t_ref, tmask), ActionTerms(l_logp, l_old, l_ref, lmask), adv,
                    config=cfg, n_text=6, n_latent=4)
    # text: ratios 1.5 (clipped at 1.3), 1, 1; k3: d = ln(0.4/0.6), ln 2, 0
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    text = (-0.5 * 1.3 + 0.01 * k3(math.log(0.4 / 0.6))) + (-0.5 + 0.01 * k3(math.log(2.0))) + (-0.5)
    # latent: ratios 1 and e^0.5 = 1.6487 (clipped at 1.3); k3 = 0 for both
    latent = -0.5 + (-0.5 * 1.3)
    expect = text / 6 + 2.0 * latent / 4
    assert abs(out.loss.item() - expect) < 1e-6
    m = out.metrics
    assert abs(m["text/loss"].item() - text / 6) < 1e-6 and abs(m["latent/loss"].item() - latent / 4) < 1e-6
    assert abs(m["text/clip_high_frac"].item() - 1 / 6) < 1e-7 and abs(m["latent/clip_high_frac"].item() - 1 / 4) < 1e-7
    assert m["text/count"].item() == 3 and m["latent/count"].item() == 2
    assert abs(m["latent/ratio_max"].item() - math.exp(0.5)) < 1e-6 and abs(m["text/ratio_min"].item() - 1.0) < 1e-6
    share = abs(2 * latent / 4) / (abs(text / 6) + abs(2 * latent / 4))
    assert abs(m["latent/share"].item() - share) < 1e-6
    out.loss.backward()
    # gradient wrt logp: unclipped text actions -A*ratio / N_text + k3' * coef / N_text
    gt = t_logp.grad[0]
    assert abs(gt[1].item() - 0.01 * (1 - 0.4 / 0.6) / 6) < 1e-7  # clipped: only the KL gradient
    assert abs(gt[2].item() - (-0.5 + 0.01 * (1 - 2.0)) / 6) < 1e-7
    assert abs(gt[4].item() - (-0.5 / 6)) < 1e-7
    assert bool(torch.isfinite(t_logp.grad).all()) and gt[0].item() == 0 and gt[3].item() == 0
    gl = l_logp.grad[0]
    assert abs(gl[2].item() - 2.0 * (-0.5) / 4) < 1e-7 and gl[3].item() == 0.0


def test_no_latent_actions_and_no_kl():
    mask = torch.tensor([[1, 1]], dtype=torch.bool)
    none = torch.zeros(1, 2, dtype=torch.bool)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    z = torch.zeros(1, 2)
    cfg = VLPOConfig(kl_coef=0.0)
    out = vlpo_loss(ActionTerms(logp, logp.detach(), None, mask), ActionTerms(z, z, None, none),
                    torch.tensor([1.0]), config=cfg, n_text=2, n_latent=0)
    assert abs(out.loss.item() + 1.0) < 1e-7 and out.metrics["latent/loss"].item() == 0
    assert out.metrics["latent/share"].item() == 0
    with pytest.raises(ValueError, match="needs ref_logp"):
        vlpo_loss(ActionTerms(logp, logp, None, mask), ActionTerms(z, z, None, none), torch.tensor([1.0]),
                  config=CFG, n_text=2, n_latent=0)
    with pytest.raises(ValueError, match="micro-batch has 2 actions but the global count is 1"):
        vlpo_loss(ActionTerms(logp, logp, None, mask), ActionTerms(z, z, None, none), torch.tensor([1.0]),
                  config=cfg, n_text=1, n_latent=0)


def _random_terms(g, B, L, p_text=0.6, p_lat=0.3):
    tmask = torch.rand(B, L, generator=g) < p_text
    lmask = (torch.rand(B, L, generator=g) < p_lat)
    def kind():
        logp = (-3 * torch.rand(B, L, generator=g, dtype=torch.float64)).requires_grad_()
        old = logp.detach() + 0.4 * torch.randn(B, L, generator=g, dtype=torch.float64)
        ref = logp.detach() + 0.4 * torch.randn(B, L, generator=g, dtype=torch.float64)
        return logp, old, ref
    return tmask, lmask, kind(), kind()


def test_micro_batches_with_global_counts_equal_full_batch():
    g = torch.Generator().manual_seed(0)
    B, L = 6, 9
    tmask, lmask, (tl, to, tr), (ll, lo, lr) = _random_terms(g, B, L)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    ent = torch.rand(B, L, generator=g, dtype=torch.float64)
    nt, nl = int(tmask.sum()), int(lmask.sum())
    full = vlpo_loss(ActionTerms(tl, to, tr, tmask), ActionTerms(ll, lo, lr, lmask), adv, config=CFG,
                     n_text=nt, n_latent=nl, entropy=ent)
    gt_full, gl_full = torch.autograd.grad(full.loss, (tl, ll))
    total, parts = 0.0, []
    grads_t, grads_l = torch.zeros_like(tl), torch.zeros_like(ll)
    for sl in (slice(0, 2), slice(2, 6)):
        out = vlpo_loss(ActionTerms(tl[sl], to[sl], tr[sl], tmask[sl]), ActionTerms(ll[sl], lo[sl], lr[sl], lmask[sl]),
                        adv[sl], config=CFG, n_text=nt, n_latent=nl, entropy=ent[sl])
        a, b = torch.autograd.grad(out.loss, (tl, ll))
        grads_t += a
        grads_l += b
        total = total + out.loss.detach()
        parts.append(out.metrics)
    torch.testing.assert_close(total, full.loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads_t, gt_full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads_l, gl_full, rtol=1e-10, atol=1e-12)
    merged = merge_metrics(parts)
    assert merged.keys() == full.metrics.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], full.metrics[k], rtol=1e-10, atol=1e-12, msg=k)
    # per-micro-batch normalisation (the wrong way) would give a different gradient
    wrong = torch.zeros_like(tl)
    for sl in (slice(0, 2), slice(2, 6)):
        out = vlpo_loss(ActionTerms(tl[sl], to[sl], tr[sl], tmask[sl]), ActionTerms(ll[sl], lo[sl], lr[sl], lmask[sl]),
                        adv[sl], config=CFG, n_text=int(tmask[sl].sum()), n_latent=int(lmask[sl].sum()))
        wrong += torch.autograd.grad(out.loss, tl)[0] / 2
    assert not torch.allclose(wrong, gt_full)


def test_far_off_policy_action_gives_finite_gradient():
    mask = torch.ones(1, 2, dtype=torch.bool)
    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-500.0, -1.0]])  # log-ratio 500: exp would overflow
    out = vlpo_loss(ActionTerms(logp, old, old, mask), ActionTerms(logp, old, old, torch.zeros_like(mask)),
                    torch.tensor([1.0]), config=CFG, n_text=2, n_latent=0)
    out.loss.backward()
    assert bool(torch.isfinite(logp.grad).all()) and bool(torch.isfinite(out.loss))


def test_constant_offset_cancels_and_old_ref_adv_are_constants():
    """A shared constant (the Gaussian normaliser) changes neither loss nor gradient; old / ref /
    advantages never receive gradient."""
    g = torch.Generator().manual_seed(4)
    B, L = 3, 5
    tmask, lmask, (tl, to, tr), (ll, lo, lr) = _random_terms(g, B, L)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    base = vlpo_loss(ActionTerms(tl, to, tr, tmask), ActionTerms(ll, lo, lr, lmask), adv, config=CFG,
                     n_text=int(tmask.sum()), n_latent=int(lmask.sum()))
    (g0,) = torch.autograd.grad(base.loss, ll)
    c = -0.5 * 3584 * math.log(2 * math.pi * 100.0)
    lo_c, lr_c, adv_c = (lo + c).requires_grad_(), (lr + c).requires_grad_(), adv.clone().requires_grad_()
    shifted = vlpo_loss(ActionTerms(tl, to, tr, tmask), ActionTerms(ll + c, lo_c, lr_c, lmask), adv_c, config=CFG,
                        n_text=int(tmask.sum()), n_latent=int(lmask.sum()))
    torch.testing.assert_close(shifted.loss, base.loss, rtol=1e-9, atol=1e-9)
    shifted.loss.backward()
    torch.testing.assert_close(ll.grad, g0, rtol=1e-7, atol=1e-9)
    assert lo_c.grad is None and lr_c.grad is None and adv_c.grad is None
