"""The three-pass latent training forward against the sequential research-style reference."""

from __future__ import annotations

import pytest
import torch

from latent_reference import sequential_latent_forward
from monet.model.training import LatentBatch, attention_mask_4d, latent_forward
from monet.testing.batches import latent_training_batch, split_batch
from monet.testing.memory import peak_live_bytes
from monet.train.losses import route_through_latents


@pytest.fixture(scope="module")
def tiny(tiny_on):
    return tiny_on("cpu")


def make_batch(processor, model, K, spans_per_sample, attention, helper_images=True, seed=0):
    return latent_training_batch(model, processor, K, spans_per_sample, attention, helper_images, seed)


def per_sample(batch, b, processor):
    return split_batch(batch, b, processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))


def loss_of(model, hidden, batch, weights):
    """A loss touching every valid position through the LM head (like CE) and a hidden projection."""
    logits = model.lm_head(hidden).float()
    valid = batch.attention_mask.bool()
    lse = torch.logsumexp(logits, -1)
    return (lse * valid).sum() / valid.sum() + (hidden * weights[: hidden.shape[1]] * valid[..., None]).sum() * 1e-2


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention,helper,spans", [("stage2", True, [1, 2, 1]), ("causal", False, [1, 2, 1]),
                                                    ("causal", True, [1, 2, 1]), ("stage2", True, [0, 3, 1])])
@pytest.mark.parametrize("K", [1, 4])
def test_latent_forward_matches_sequential_reference(tiny_on, device, attention, helper, spans, K):
    """Rows with different numbers of latents at different columns (one row with none)."""
    model, processor = tiny_on(device.type)
    tol = 1e-5 if device.type == "cpu" else 1e-4  # GPU kernels reduce in other orders
    batch = make_batch(processor, model, K, spans, attention, helper_images=helper, seed=K).to(device)
    assert int(batch.latent_mask.sum()) == sum(spans) * K
    torch.manual_seed(0)
    weights = torch.randn(batch.input_ids.shape[1], model.config.text_config.hidden_size).to(device)

    model.zero_grad(set_to_none=True)
    out = latent_forward(model, batch)
    loss_of(model, out.hidden, batch, weights).backward()
    ours = grads(model)

    model.zero_grad(set_to_none=True)
    total = 0.0
    ref_latents = []
    n_valid_total = batch.attention_mask.sum()
    for b in range(batch.input_ids.shape[0]):
        s = per_sample(batch, b, processor)
        mask4d = attention_mask_4d(model, s, torch.float32)
        hidden, zt = sequential_latent_forward(model, s.input_ids, s.attention_mask, s.latent_mask, mask4d,
                                               s.pixel_values, s.image_grid_thw)
        n = s.input_ids.shape[1]
        torch.testing.assert_close(out.hidden[b, :n], hidden[0], rtol=tol, atol=tol)
        ref_latents.append(zt)
        # same loss, written per sample (sum over the batch's valid positions / batch count)
        lse = torch.logsumexp(model.lm_head(hidden).float(), -1)
        total = total + lse.sum() / n_valid_total + (hidden[0] * weights[:n]).sum() * 1e-2
    total.backward()
    ref = grads(model)
    torch.testing.assert_close(out.latents, torch.cat(ref_latents), rtol=tol, atol=tol)
    assert ours.keys() == ref.keys() and len(ref) > 10
    for name in ref:
        err = (ours[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)
        assert err < tol, f"{name}: relative gradient error {err:.2e}"


def test_latent_forward_gradient_checkpointing_and_capture(tiny):
    model, processor = tiny
    batch = make_batch(processor, model, 3, [2, 1], "stage2", seed=5)
    b, p = batch.latent_mask.nonzero(as_tuple=True)
    weights = torch.randn(batch.input_ids.shape[1], model.config.text_config.hidden_size)

    def run():
        model.zero_grad(set_to_none=True)
        out = latent_forward(model, batch, capture=(b, p))
        (loss_of(model, out.hidden, batch, weights) + out.captured.pow(2).mean()).backward()
        return out, grads(model)

    plain_out, plain = run()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        ckpt_out, ckpt = run()
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    n_layers = model.config.text_config.num_hidden_layers
    assert plain_out.captured.shape == (n_layers + 1, b.numel(), model.config.text_config.hidden_size)
    # captured rows equal the output_hidden_states convention at those positions
    torch.testing.assert_close(plain_out.captured[-1], plain_out.hidden[b, p])
    torch.testing.assert_close(ckpt_out.captured, plain_out.captured)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


def test_latent_forward_without_latents_is_plain_forward(tiny):
    model, processor = tiny
    batch = make_batch(processor, model, 2, [1, 1], "causal", helper_images=False)
    batch.latent_mask = torch.zeros_like(batch.latent_mask)
    with torch.no_grad():
        out = latent_forward(model, batch)
        ref = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                          mm_token_type_ids=(batch.input_ids == model.config.image_token_id).int())
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(out.hidden[valid], ref.last_hidden_state[valid], rtol=1e-5, atol=1e-5)
    assert out.latents.shape[0] == 0


def test_latent_forward_validation(tiny):
    model, processor = tiny
    batch = make_batch(processor, model, 2, [1], "stage2")
    bad = LatentBatch(**{**batch.__dict__, "latent_mask": batch.latent_mask.long()})
    with pytest.raises(ValueError, match="latent_mask must be bool"):
        latent_forward(model, bad)
    bad = LatentBatch(**{**batch.__dict__, "answer_start": None})
    with pytest.raises(ValueError, match="needs answer_start"):
        latent_forward(model, bad)
    lm = batch.latent_mask.clone()
    lm[:, 0] = True
    with pytest.raises(ValueError, match="position 0"):
        latent_forward(model, LatentBatch(**{**batch.__dict__, "latent_mask": lm}))
    with pytest.raises(ValueError, match="latent_backward must be"):
        latent_forward(model, batch, latent_backward="both")


def _step(model, batch, weights, latent_backward, checkpointing):
    """CE-like loss + stage-2 style alignment routed through the latents; returns grads."""
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        b, p = batch.latent_mask.nonzero(as_tuple=True)
        out = latent_forward(model, batch, capture=(b, p), latent_backward=latent_backward)
        align = route_through_latents(out.captured.pow(2).mean(), out.latent_source, scale=0.5)
        (loss_of(model, out.hidden, batch, weights) + align).backward()
    finally:
        model.gradient_checkpointing_disable()
    return out.hidden.detach(), grads(model)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_nested_and_joint_latent_backward_agree(tiny, checkpointing):
    model, processor = tiny
    batch = make_batch(processor, model, 3, [2, 1, 0], "stage2", seed=3)
    weights = torch.randn(batch.input_ids.shape[1], model.config.text_config.hidden_size)
    h_joint, g_joint = _step(model, batch, weights, "joint", checkpointing)
    h_nested, g_nested = _step(model, batch, weights, "nested", checkpointing)
    torch.testing.assert_close(h_nested, h_joint, rtol=0, atol=0)
    assert g_nested.keys() == g_joint.keys() and len(g_joint) > 10
    for name in g_joint:
        torch.testing.assert_close(g_nested[name], g_joint[name], rtol=1e-6, atol=1e-9, msg=name)


def test_nested_latent_backward_lowers_peak_memory(tiny):
    """Joint: the loss pass's weight gradients wait in autograd's buffers for the latent pass's
    (a full copy of the decoder's weight gradients); nested: each pass accumulates into .grad."""
    model, processor = tiny
    batch = make_batch(processor, model, 3, [2, 1], "stage2", seed=4)
    weights = torch.randn(batch.input_ids.shape[1], model.config.text_config.hidden_size)

    def step(mode):
        out = latent_forward(model, batch, latent_backward=mode)
        loss_of(model, out.hidden, batch, weights).backward()

    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        step("joint")  # allocate .grad once: the measurement is about the step's transient memory
        peaks = {mode: peak_live_bytes(lambda: step(mode)) for mode in ("nested", "joint")}
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    decoder = sum(p.numel() * p.element_size() for p in model.model.language_model.layers.parameters())
    assert peaks["joint"] - peaks["nested"] > 0.5 * decoder, (peaks, decoder)


def test_nested_latent_backward_refuses_second_backward(tiny):
    model, processor = tiny
    batch = make_batch(processor, model, 2, [1], "causal", helper_images=False)
    out = latent_forward(model, batch)
    loss = out.hidden.pow(2).mean()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()


def test_nested_latent_backward_under_bf16_autocast(tiny):
    """The trainer's bf16 autocast: both passes share autocast's cached bf16 weight copies; nested
    backward sums their gradients per pass (joint: all uses in bf16 at once), so they agree to bf16."""
    model, processor = tiny
    batch = make_batch(processor, model, 3, [2, 1], "stage2", seed=2)
    res = {}
    for mode in ("joint", "nested"):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = latent_forward(model, batch, latent_backward=mode)
            loss = torch.logsumexp(model.lm_head(out.hidden).float(), -1).mean()
        loss.backward()
        res[mode] = grads(model)
    assert res["nested"].keys() == res["joint"].keys() and len(res["joint"]) > 10
    for name, g in res["joint"].items():
        err = (res["nested"][name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 1e-2, f"{name}: relative gradient difference {err:.2e}"


def test_nested_latent_backward_with_frozen_embeddings_and_vision(tiny):
    """The latent pass's inputs need no grad then, but its layers do: their gradients must not vanish."""
    model, processor = tiny
    batch = make_batch(processor, model, 3, [2, 1], "stage2", seed=6)
    weights = torch.randn(batch.input_ids.shape[1], model.config.text_config.hidden_size)
    frozen = list(model.get_input_embeddings().parameters()) + list(model.model.visual.parameters())
    for p in frozen:
        p.requires_grad_(False)
    try:
        _, g_joint = _step(model, batch, weights, "joint", checkpointing=False)
        _, g_nested = _step(model, batch, weights, "nested", checkpointing=False)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    assert g_nested.keys() == g_joint.keys() and len(g_joint) > 10
    for name in g_joint:
        torch.testing.assert_close(g_nested[name], g_joint[name], rtol=1e-6, atol=1e-9, msg=name)


def test_extra_decode_steps_change_nothing(tiny):
    """``min_decode_steps`` beyond the batch's latents (DeepSpeed ZeRO-3 lockstep: every rank makes
    the same number of model calls) runs dummy steps: hidden states, latents and gradients are the
    same as without them, and the model is really called more often."""
    model, processor = tiny
    batch = make_batch(processor, model, 2, [1, 2, 1], "stage2", seed=3)
    J = int(batch.latent_mask.sum(1).max())
    calls = []
    handle = model.model.language_model.register_forward_pre_hook(lambda *a: calls.append(1))
    results = []
    try:
        for extra in (0, 3):
            calls.clear()
            model.zero_grad(set_to_none=True)
            out = latent_forward(model, batch, latent_backward="joint", min_decode_steps=J + extra if extra else 0)
            (out.hidden.square().mean() + out.latents.sum() * 1e-3).backward()
            results.append((out.hidden.detach(), out.latents.detach(), grads(model), len(calls)))
    finally:
        handle.remove()
    (h0, z0, g0, n0), (h1, z1, g1, n1) = results
    assert n1 == n0 + 3  # three more decode calls of the text model
    torch.testing.assert_close(h1, h0, rtol=0, atol=0)
    torch.testing.assert_close(z1, z0, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=0, atol=0)
