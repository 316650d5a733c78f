"""The three-pass latent training forward against the sequential research-style reference."""

from __future__ import annotations

import pytest
import torch

import monet
from latent_reference import sequential_latent_forward
from monet.model.training import LatentBatch, attention_mask_4d, latent_forward
from monet.testing import build_tiny_checkpoint, synthetic_image

VISION = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def tiny():
    model, processor = monet.load_model(build_tiny_checkpoint(cache=True), dtype="float32")
    return model, processor


def make_batch(processor, model, K, spans_per_sample, attention, helper_images=True, seed=0):
    """Right-padded batch of samples: question image, assistant text with helper image(s) each
    followed by START + K*PAD + END (stage-2 style), or without helper images (stage-3 style)."""
    tok = processor.tokenizer
    g = torch.Generator().manual_seed(seed)
    texts, images = [], []
    words = ["look", "closer", "the", "shape", "is", "red", "circle", "zoom", "in", "on", "corner"]
    for i, n_spans in enumerate(spans_per_sample):
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"question {i}?"}]}],
            add_generation_prompt=True)
        images.append(synthetic_image(10 * seed + i))
        answer = ""
        for s in range(n_spans):
            n = int(torch.randint(1, 6, (1,), generator=g))
            answer += " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=g))
            if helper_images:
                answer += VISION
                images.append(synthetic_image(100 + 10 * i + s, size=(56, 84)))
            answer += "<abs_vis_token>" + "<abs_vis_token_pad>" * K + "</abs_vis_token>"
            answer += "<observation>it is red</observation>"
        answer += " so \\boxed{red}<|im_end|>"
        texts.append(prompt + answer)
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="right")
    ids, am = enc["input_ids"], enc["attention_mask"]
    # answer starts after the last "<|im_start|>assistant\n" of each row
    assistant = tok.encode("<|im_start|>assistant\n")
    starts = []
    for row in ids.tolist():
        for p in range(len(row) - len(assistant), -1, -1):
            if row[p:p + len(assistant)] == assistant:
                starts.append(p + len(assistant))
                break
    answer_start = torch.tensor(starts)
    pos = torch.arange(ids.shape[1])
    latent_mask = (ids == model.monet_config.token_ids.pad) & (pos >= answer_start[:, None]) & am.bool()
    return LatentBatch(ids, am, latent_mask, enc["pixel_values"], enc["image_grid_thw"], attention, answer_start)


def per_sample(batch, b, processor):
    """Unpadded sample b of the batch, with its own pixel rows and grid."""
    n = int(batch.attention_mask[b].sum())
    grid = batch.image_grid_thw
    per_image = grid.prod(-1).tolist()
    counts = []  # images per sample, in order
    vs = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    for r in range(batch.input_ids.shape[0]):
        counts.append(int((batch.input_ids[r] == vs).sum()))
    first = sum(counts[:b])
    rows_before = sum(per_image[:first])
    rows = sum(per_image[first:first + counts[b]])
    return LatentBatch(batch.input_ids[b:b + 1, :n], batch.attention_mask[b:b + 1, :n], batch.latent_mask[b:b + 1, :n],
                       batch.pixel_values[rows_before:rows_before + rows], grid[first:first + counts[b]],
                       batch.attention, batch.answer_start[b:b + 1])


def loss_of(model, hidden, batch, weights):
    """A loss touching every valid position through the LM head (like CE) and a hidden projection."""
    logits = model.lm_head(hidden).float()
    valid = batch.attention_mask.bool()
    lse = torch.logsumexp(logits, -1)
    return (lse * valid).sum() / valid.sum() + (hidden * weights[: hidden.shape[1]] * valid[..., None]).sum() * 1e-2


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention,helper", [("stage2", True), ("causal", False), ("causal", True)])
@pytest.mark.parametrize("K", [1, 4])
def test_latent_forward_matches_sequential_reference(tiny, attention, helper, K):
    model, processor = tiny
    batch = make_batch(processor, model, K, [1, 2, 1], attention, helper_images=helper, seed=K)
    assert int(batch.latent_mask.sum()) == 4 * K
    torch.manual_seed(0)
    weights = torch.randn(batch.input_ids.shape[1], model.config.text_config.hidden_size)

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
        torch.testing.assert_close(out.hidden[b, :n], hidden[0], rtol=1e-5, atol=1e-5)
        ref_latents.append(zt)
        # same loss, written per sample (sum over the batch's valid positions / batch count)
        lse = torch.logsumexp(model.lm_head(hidden).float(), -1)
        total = total + lse.sum() / n_valid_total + (hidden[0] * weights[:n]).sum() * 1e-2
    total.backward()
    ref = grads(model)
    torch.testing.assert_close(out.latents, torch.cat(ref_latents), rtol=1e-5, atol=1e-5)
    assert ours.keys() == ref.keys() and len(ref) > 10
    for name in ref:
        err = (ours[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)
        assert err < 1e-5, f"{name}: relative gradient error {err:.2e}"


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
