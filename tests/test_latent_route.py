"""monet.eval.latent_route: the teacher-forced probes that locate where a latent route breaks."""

from __future__ import annotations

import pytest
import torch

from monet.data import build_stage_example, load_sft_dataset
from monet.data.synth_keys import synthesize_keys
from monet.eval.latent_route import (answer_positions, helper_sensitivity, score_predictions,
                                     teacher_forced_accuracy, teacher_forced_predictions)

K = 2


@pytest.fixture(scope="module")
def keys_samples(tmp_path_factory):
    ds = synthesize_keys(tmp_path_factory.mktemp("keys"), n=4, n_eval=0, seed=5)
    samples, _ = load_sft_dataset(ds.train_json, ds.root)
    return samples


def test_answer_positions_are_the_boxed_answer_tokens(tiny_on, keys_samples):
    _, proc = tiny_on("cpu")
    tok = proc.tokenizer
    for s in keys_samples:
        ref = s.assistant.content[-1].text.split("\\boxed{")[1].split("}")[0]
        for stage in (1, 2, 3):
            ex = build_stage_example(s, proc, stage, K)
            pos = answer_positions(ex, tok)
            text = tok.decode(ex.input_ids[pos].tolist())
            assert text.strip(" {") == ref, (stage, text, ref)
            assert bool(ex.target_mask[pos].all())


def test_score_predictions_counts_hand_made_predictions(tiny_on, keys_samples):
    _, proc = tiny_on("cpu")
    examples = [build_stage_example(s, proc, 2, K) for s in keys_samples]
    perfect = [ex.input_ids.clone() for ex in examples]
    r = score_predictions(examples, perfect, proc.tokenizer)
    assert r.answer_accuracy == 1.0 and r.observation_token_accuracy == 1.0 and r.n == len(examples)
    # poison: one sample's answer token, two observation tokens of another
    preds = [p.clone() for p in perfect]
    a = answer_positions(examples[1], proc.tokenizer)[0]
    preds[1][a] = preds[1][a] + 1
    obs = (examples[2].observation_mask & examples[2].target_mask).nonzero().flatten()
    preds[2][obs[:2]] = -7
    r = score_predictions(examples, preds, proc.tokenizer)
    n_obs = sum(int((ex.observation_mask & ex.target_mask).sum()) for ex in examples)
    assert r.answer_correct == [True, False, True, True]
    assert r.answer_accuracy == 0.75
    assert r.observation_token_accuracy == pytest.approx((n_obs - 2) / n_obs)


def test_stage1_predictions_match_the_plain_hf_forward(tiny_on, keys_samples):
    """Independent reference: the transformers model's own forward (causal, no latents) gives the
    same argmax at every position of a stage-1 example."""
    from monet.data.collate import StageCollator

    model, proc = tiny_on("cpu")
    examples = [build_stage_example(s, proc, 1, K) for s in keys_samples[:2]]
    preds = teacher_forced_predictions(model, proc, examples, batch_size=1)
    for ex, pred in zip(examples, preds):
        b = StageCollator(proc)([ex])
        with torch.no_grad():
            # mm_token_type_ids as the processor returns them: without it transformers falls back to
            # 1-D positions instead of M-RoPE
            types = (b.input_ids == model.config.image_token_id).int()
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.pixel_values,
                           image_grid_thw=b.image_grid_thw, mm_token_type_ids=types).logits[0]
        top2 = logits[:-1].topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-5  # a random model has near-ties; fp order may flip those
        ref = logits.argmax(-1)[:-1]
        assert clear.float().mean() > 0.95
        assert torch.equal(pred[1:][clear], ref[clear]), "teacher-forced predictions differ from the HF forward"
    r = teacher_forced_accuracy(model, proc, keys_samples[:2], 1, K)
    assert r.answer_correct == score_predictions(examples, preds, proc.tokenizer).answer_correct


def test_helper_sensitivity_follows_the_stage_masks(tiny_on, keys_samples):
    model, proc = tiny_on("cpu")
    s1 = helper_sensitivity(model, proc, keys_samples[:2], 1, K)
    s2 = helper_sensitivity(model, proc, keys_samples[:2], 2, K)
    for s in (s1, s2):
        assert s.before == 0.0  # causal: nothing before the poisoned image moves
        assert s.image_tokens > 0
    assert s1.text_after > 0  # stage 1: the text after the image attends to it
    assert s2.latents > 0  # stage 2: the latent positions see their helper image
    assert s2.text_after > 0  # ... and the text after them sees it through them
    with pytest.raises(ValueError, match="stage 1 or 2"):
        helper_sensitivity(model, proc, keys_samples[:1], 3, K)


def test_stage2_text_sees_the_helper_only_through_latent_positions(tiny_on, keys_samples):
    """The probe's premise: in the stage-2 mask, a position after the span attends to no helper-image
    token. Checked on the 4-D mask the training forward uses, independently of the probe."""
    from monet.data.collate import StageCollator
    from monet.model.training import attention_mask_4d

    model, proc = tiny_on("cpu")
    ex = build_stage_example(keys_samples[0], proc, 2, K)
    lb = StageCollator(proc)([ex]).to_latent_batch()
    allowed = attention_mask_4d(model, lb, torch.float32)[0, 0] == 0  # [L, L]
    img = (ex.input_ids == model.config.image_token_id).nonzero().flatten()
    helper = img[img >= ex.answer_start]
    after = ex.latent_positions[-1] + 2  # past the last span's END
    assert not bool(allowed[after:, helper].any())
    assert bool(allowed[ex.latent_positions][:, helper].any())
