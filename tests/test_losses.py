"""SFT losses against float64 references."""

from __future__ import annotations

import pytest
import torch

from monet.train.losses import alignment_loss, route_through_latents, target_rows, weighted_ce_sum


def naive_weighted_ce(hidden, weight, labels, weights):
    """float64, full logits, explicit loops."""
    total, wsum = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    B, L = labels.shape
    for b in range(B):
        for p in range(1, L):
            t = int(labels[b, p])
            if t == -100:
                continue
            logits = hidden[b, p - 1].double() @ weight.double().t()
            ce = torch.logsumexp(logits, 0) - logits[t]
            total = total + weights[b, p].double() * ce
            wsum = wsum + weights[b, p].double()
    return total, wsum


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_weighted_ce_matches_float64_reference(chunk):
    torch.manual_seed(chunk)
    B, L, D, V = 3, 11, 16, 50
    hidden = torch.randn(B, L, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (B, L))
    labels[torch.rand(B, L) < 0.3] = -100
    weights = torch.where(torch.rand(B, L) < 0.3, 4.0, 1.0)
    s, w = weighted_ce_sum(hidden, weight, labels, weights, chunk_size=chunk)
    (s / w).backward()
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    rs, rw = naive_weighted_ce(h64, w64, labels, weights)
    (rs / rw).backward()
    torch.testing.assert_close(s.double(), rs, rtol=1e-5, atol=1e-6)
    assert float(w) == float(rw)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_target_rows_shift():
    labels = torch.tensor([[-100, 5, -100, 7]])
    b, p, t, w = target_rows(labels)
    assert p.tolist() == [0, 2] and t.tolist() == [5, 7] and w.tolist() == [1.0, 1.0]


def test_ce_without_targets_is_zero_with_graph():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    s, w = weighted_ce_sum(hidden, torch.randn(10, 8), torch.full((1, 4), -100))
    assert float(s) == 0.0 and float(w) == 0.0 and s.requires_grad


def naive_alignment(student, teacher, axis):
    s, t = student.double(), teacher.double()
    vals = []
    if axis == "hidden":
        for layer in range(s.shape[0]):
            for p in range(s.shape[1]):
                a, b = s[layer, p], t[layer, p]
                vals.append(1 - (a @ b) / (a.norm() * b.norm()))
    else:
        for layer in range(s.shape[0]):
            for d in range(s.shape[2]):
                a, b = s[layer, :, d], t[layer, :, d]
                vals.append(1 - (a @ b) / (a.norm() * b.norm()))
    return torch.stack(vals).mean()


@pytest.mark.parametrize("axis", ["hidden", "token"])
def test_alignment_matches_float64_reference(axis):
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 6, 16), torch.randn(4, 6, 16).to(torch.bfloat16)
    got = alignment_loss(student, teacher, axis)
    torch.testing.assert_close(got.double(), naive_alignment(student, teacher.float(), axis), rtol=1e-5, atol=1e-6)


def test_alignment_errors():
    with pytest.raises(ValueError, match="differ"):
        alignment_loss(torch.randn(2, 3, 4), torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="alignment_axis"):
        alignment_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), "layer")


def test_route_through_latents_keeps_only_the_latent_path():
    """Toy model: src = A x (produces the latents); loss pass out = B [latent-inserted seq]."""
    torch.manual_seed(0)
    A = torch.randn(4, 4, requires_grad=True)
    Bm = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(5, 4)
    src = x @ A  # latent source [5, 4]
    seq = torch.cat([x[:2], src[2:3], x[3:]])  # row 2's input is a latent taken from src
    out = seq @ Bm
    loss = (out[3:] ** 2).sum() + (out[2] * 3).sum()
    (gA_ref,) = torch.autograd.grad(loss, [A], retain_graph=True)  # A reaches the loss only via src
    surrogate = route_through_latents(loss, src, scale=2.0)
    gA, gB = torch.autograd.grad(surrogate, [A, Bm], allow_unused=True)
    # expected: 2 x d loss / dA through src only; nothing for B
    torch.testing.assert_close(gA, 2.0 * gA_ref)
    assert gB is None or torch.count_nonzero(gB) == 0


@pytest.mark.parametrize("chunk,min_chunks", [(4, 0), (4, 7), (1024, 3)])
def test_weighted_ce_with_the_head_module_calls_it_per_chunk(chunk, min_chunks):
    """The module form of the head (what DeepSpeed ZeRO-3 needs: its hooks gather the weight) gives
    the tensor form's values and gradients (float64 reference); the module is called once per chunk
    in forward and again in each chunk's backward recomputation; ``min_chunks`` adds empty chunks
    that change nothing."""
    torch.manual_seed(7)
    B, L, D, V = 2, 9, 8, 30
    hidden = torch.randn(B, L, D, requires_grad=True)
    labels = torch.randint(0, V, (B, L))
    labels[torch.rand(B, L) < 0.3] = -100
    weights = torch.where(torch.rand(B, L) < 0.3, 4.0, 1.0)
    head = torch.nn.Linear(D, V, bias=False)
    calls = []
    head.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    s, w = weighted_ce_sum(hidden, head, labels, weights, chunk_size=chunk, min_chunks=min_chunks)
    n_targets = int((labels[:, 1:] != -100).sum())
    n_chunks = max(-(-n_targets // chunk), min_chunks)
    assert len(calls) == n_chunks and sum(calls) == n_targets
    (s / w).backward()
    assert len(calls) == 2 * n_chunks  # recomputed in backward: never more than chunk x V logits alive
    h64 = hidden.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    rs, rw = naive_weighted_ce(h64, w64, labels, weights)
    (rs / rw).backward()
    torch.testing.assert_close(s.double(), rs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_ce_without_targets_still_calls_the_head_when_asked():
    head = torch.nn.Linear(8, 10, bias=False)
    calls = []
    head.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    s, w = weighted_ce_sum(hidden, head, torch.full((1, 4), -100), min_chunks=1)
    assert calls == [0] and float(s) == 0.0 and float(w) == 0.0 and s.requires_grad
    s.backward()
    assert float(hidden.grad.abs().sum()) == 0.0
