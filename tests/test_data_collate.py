"""monet.data.collate: right padding, weights, image concatenation, stage-2 kind/step metadata."""

from __future__ import annotations

import pytest
import torch

from data_fixtures.samples import good_sample, load_hand_samples, tiny_processor, two_helper_sample
from monet import ops
from monet.data import IGNORE_INDEX, StageCollator, build_stage_example

K = 3


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture()
def hand(tmp_path):
    return load_hand_samples(tmp_path, two_helper_sample("long"), good_sample("short"))


def _examples(processor, hand, stage):
    return [build_stage_example(s, processor, stage, K) for s in hand]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_padding_and_fields(processor, hand, stage):
    exs = _examples(processor, hand, stage)
    batch = StageCollator(processor, ce_emphasize_factor=3.0)(exs)
    lengths = [len(e) for e in exs]
    B, L = batch.input_ids.shape
    assert B == 2 and L == max(lengths) and lengths[0] != lengths[1]
    pad_id = processor.tokenizer.pad_token_id
    for i, (ex, n) in enumerate(zip(exs, lengths)):
        assert torch.equal(batch.input_ids[i, :n], ex.input_ids)
        assert (batch.input_ids[i, n:] == pad_id).all()
        assert batch.attention_mask[i].tolist() == [1] * n + [0] * (L - n)
        assert torch.equal(batch.labels[i, :n], ex.labels) and (batch.labels[i, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch.weights[i, :n], ex.weights(3.0)) and (batch.weights[i, n:] == 0).all()
        assert torch.equal(batch.latent_mask[i, :n], ex.latent_mask) and not batch.latent_mask[i, n:].any()
        assert torch.equal(batch.observation_mask[i, :n], ex.observation_mask)
    assert batch.answer_start.tolist() == [e.answer_start for e in exs]
    assert batch.keys == ["Hand/long", "Hand/short"]
    assert batch.weights.dtype == torch.float32 and set(batch.weights.unique().tolist()) == {0.0, 1.0, 3.0}
    assert ((batch.weights > 0) == (batch.labels != IGNORE_INDEX)).all()
    assert torch.equal(batch.pixel_values, torch.cat([e.pixel_values for e in exs]))
    assert torch.equal(batch.image_grid_thw, torch.cat([e.image_grid_thw for e in exs]))
    image_pad = processor.image_token_id
    assert int((batch.input_ids == image_pad).sum()) == int(batch.image_grid_thw.prod(-1).sum()) // 4
    if stage == 2:
        assert batch.kind.shape == (B, L) and batch.step.shape == (B, L)
    else:
        assert batch.kind is None and batch.step is None
        with pytest.raises(ValueError, match="stage 2 only"):
            batch.stage_attention_mask()


def test_stage2_metadata_and_mask(processor, hand):
    exs = _examples(processor, hand, 2)
    batch = StageCollator(processor, pad_to_multiple_of=16)(exs)
    L = batch.input_ids.shape[1]
    assert L % 16 == 0
    kind, step = batch.kind, batch.step
    for i, ex in enumerate(exs):
        n = len(ex)
        assert (kind[i, n:] == ops.KIND_PAD).all()
        assert torch.equal(kind[i, :n] == ops.KIND_LATENT, ex.latent_mask)
        lat_steps = step[i][kind[i] == ops.KIND_LATENT].tolist()
        n_help = sum(p.role == "helper" for p in ex.images)
        assert lat_steps == [s for s in range(n_help) for _ in range(K)]
        helper_steps = sorted(set(step[i][kind[i] == ops.KIND_HELPER_IMAGE].tolist()))
        assert helper_steps == list(range(n_help))
        assert (kind[i, :ex.answer_start][batch.attention_mask[i, :ex.answer_start] == 1]
                != ops.KIND_HELPER_IMAGE).all()
    assert batch.weights[batch.observation_mask].unique().tolist() == [4.0]  # stage-2 default factor
    mask = batch.stage_attention_mask()
    assert mask.shape == (2, 1, L, L) and mask.dtype == torch.bool
    # Text after the first latent block does not see the first helper image; its latents do.
    i, ex = 0, exs[0]
    helper0 = ((kind[i] == ops.KIND_HELPER_IMAGE) & (step[i] == 0)).nonzero().flatten()
    latent0 = ((kind[i] == ops.KIND_LATENT) & (step[i] == 0)).nonzero().flatten()
    obs0 = ex.observation_positions[0]
    assert mask[i, 0, latent0][:, helper0].all()
    assert not mask[i, 0, obs0, helper0].any()
    assert mask[i, 0, obs0, latent0].all()
    additive = batch.stage_attention_mask(torch.float32)
    assert torch.equal(additive == 0, mask)


def test_latent_batch_view_and_errors(processor, hand):
    exs = _examples(processor, hand, 2)
    lb = StageCollator(processor)(exs).to_latent_batch()
    assert lb.attention == "stage2" and torch.equal(lb.answer_start, torch.tensor([e.answer_start for e in exs]))
    with pytest.raises(ValueError, match="mixed batch"):
        StageCollator(processor)([exs[0], build_stage_example(hand[1], processor, 3, K)])
    no_pixels = build_stage_example(hand[1], processor, 2, K, with_pixels=False)
    with pytest.raises(ValueError, match="no pixel_values"):
        StageCollator(processor)([no_pixels])
    with pytest.raises(ValueError, match="empty"):
        StageCollator(processor)([])


def test_batches_run_through_the_latent_training_forward(processor, hand):
    """Collated batches fit the training forward: image pads match the pixels, latent rows
    and the stage-2 mask are accepted, and the weighted CE is finite."""
    import monet
    from monet.model.training import latent_forward
    from monet.testing import build_tiny_checkpoint

    model, _ = monet.load_model(build_tiny_checkpoint(cache=True), dtype="float32")
    for stage in (1, 2, 3):
        batch = StageCollator(processor)(_examples(processor, hand, stage))
        with torch.no_grad():
            out = latent_forward(model, batch.to_latent_batch())
        assert out.latents.shape[0] == int(batch.latent_mask.sum()) == (0 if stage == 1 else 3 * K)
        logits = model.lm_head(out.hidden)[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels[:, 1:].flatten(),
                                               ignore_index=IGNORE_INDEX, reduction="none")
        w = batch.weights[:, 1:].flatten()
        assert torch.isfinite((w * ce).sum() / w.sum())
