"""monet.data.stage_layout / image_budget: sequences, targets and image plans per stage."""

from __future__ import annotations

import pytest
import torch

from data_fixtures.samples import (
    FINAL,
    OBSERVATION,
    QUESTION,
    REASON,
    SYSTEM,
    good_sample,
    load_hand_samples,
    tiny_processor,
    two_helper_sample,
)
from monet.data import IGNORE_INDEX, ImageBudget, LayoutTokens, build_stage_example, plan_image_tokens
from monet.data.image_budget import STAGE_BUDGETS, ProcessorGeometry

K = 3
FACTOR = 4.0


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def ids(processor):
    return LayoutTokens.from_processor(processor)


@pytest.fixture()
def hand(tmp_path):
    return load_hand_samples(tmp_path, good_sample("s0"), two_helper_sample("s2"))


def expected(processor, ids, stage, rule="decodable"):
    """Hand-built (ids, labels, weights, observation positions, latent positions, answer_start)
    of ``good_sample`` for ``stage`` under label rule ``rule``: pieces tokenised separately, the
    target flag of every piece spelled out."""
    emitted = rule == "decodable"  # tokens the model must emit itself that the research code skips
    tok = processor.tokenizer

    def enc(text):
        return tok.encode(text, add_special_tokens=False)

    lt = ids.latent
    rows = []  # (token ids, is target, inside observation)

    def add(tokens, target, obs=False):
        rows.extend((t, target, obs) for t in tokens)

    add(enc(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"), False)
    add([ids.vision_start] + [ids.image_pad] * 16 + [ids.vision_end], False)  # 112x112 -> 4x4 tokens
    add(enc(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n"), False)
    answer_start = len(rows)
    add(enc(REASON), True)
    if stage in (1, 2):
        add([ids.vision_start], emitted)  # opens the helper image: the model asks for it
        add([ids.image_pad] * 4 + [ids.vision_end], False)  # 56x56 -> 2x2, inserted with the image
    if stage in (2, 3):
        add([lt.start], True)
        add([lt.pad] * K + [lt.end], False)  # forced by the latent decoder
    add([lt.observation_start], emitted)
    add(enc(OBSERVATION), True, obs=True)
    add([lt.observation_end], emitted)
    add(enc(FINAL), True)
    add([ids.im_end], True)
    add(enc("\n"), False)
    tokens = torch.tensor([r[0] for r in rows])
    target = torch.tensor([r[1] for r in rows])
    obs = torch.tensor([r[2] for r in rows])
    labels = torch.where(target, tokens, torch.full_like(tokens, IGNORE_INDEX))
    weights = target.float() * torch.where(obs, FACTOR, 1.0)
    latent = (tokens == lt.pad).nonzero().flatten()
    return tokens, labels, weights, obs.nonzero().flatten(), latent, answer_start


@pytest.mark.parametrize("rule", ["decodable", "research"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_hand_sample_tokens_and_targets(processor, ids, hand, stage, rule):
    kw = {} if rule == "decodable" else {"labels": rule}  # decodable is the default
    ex = build_stage_example(hand[0], processor, stage, K, **kw)
    tokens, labels, weights, obs_pos, latent_pos, answer_start = expected(processor, ids, stage, rule)
    assert ex.input_ids.tolist() == tokens.tolist()
    assert ex.labels.tolist() == labels.tolist()
    assert torch.equal(ex.weights(FACTOR), weights)
    assert ex.observation_positions.tolist() == obs_pos.tolist()
    assert ex.latent_positions.tolist() == latent_pos.tolist()
    assert ex.answer_start == answer_start
    lt = ids.latent
    target_ids = set(ex.labels[ex.target_mask].tolist())
    for never in (lt.pad, lt.end, ids.image_pad, ids.vision_end):
        assert never not in target_ids
    for tag in (lt.observation_start, lt.observation_end):
        assert (tag in target_ids) == (rule == "decodable")
    assert (ids.vision_start in target_ids) == (rule == "decodable" and stage != 3)
    assert (lt.start in target_ids) == (stage != 1)
    # The token after every span END / helper <|vision_end|> is a target iff the rule is decodable.
    closers = ((ex.input_ids == lt.end) | (ex.input_ids == ids.vision_end)) & (torch.arange(len(ex)) >= ex.answer_start)
    after = ex.target_mask[1:][closers[:-1]]
    assert after.numel() >= 1
    if stage != 2:  # stage 2: the helper image's <|vision_end|> is followed by START (always a target)
        assert after.all().item() == (rule == "decodable")
    assert not ex.target_mask[:ex.answer_start].any()
    # Emphasised weights only on observation targets, 1 on the others.
    w = ex.weights(FACTOR)
    assert set(w[ex.observation_mask].tolist()) == {FACTOR}
    assert set(w[ex.target_mask & ~ex.observation_mask].tolist()) == {1.0}


def test_images_and_pixels_follow_sequence_order(processor, ids, hand):
    s2 = hand[1]
    for stage, n_images in ((1, 4), (2, 4), (3, 2)):
        ex = build_stage_example(s2, processor, stage, K)
        assert [p.role for p in ex.images] == ["question"] * 2 + ["helper"] * (n_images - 2)
        assert [p.file for p in ex.images][:2] == [str(im.file) for im in s2.question_images]
        assert ex.image_grid_thw.tolist() == [list(p.grid_thw) for p in ex.images]
        assert ex.pixel_values.shape[0] == int(ex.image_grid_thw.prod(-1).sum())
        assert int((ex.input_ids == ids.vision_start).sum()) == n_images
        per_image = (ex.image_grid_thw.prod(-1) // 4).tolist()
        assert int((ex.input_ids == ids.image_pad).sum()) == sum(per_image)
    # Pixels are what the processor gives for the same image.
    ex = build_stage_example(s2, processor, 1, K)
    from PIL import Image

    ref = processor.image_processor(images=[Image.open(s2.question_images[1].file).convert("RGB")],
                                    return_tensors="pt")
    assert ex.images[1].grid_thw == (1, 4, 6)  # 84x56 -> 6x4 patches
    assert torch.allclose(ex.pixel_values[64:64 + 24], ref["pixel_values"])


def test_stage2_has_k_pads_after_each_helper_image(processor, ids, hand):
    for k in (1, 3, 8):
        ex = build_stage_example(hand[1], processor, 2, k)
        seq = ex.input_ids.tolist()
        lt = ids.latent
        helper_ends = [i for i, t in enumerate(seq) if t == ids.vision_end and i >= ex.answer_start]
        assert len(helper_ends) == 2
        for e in helper_ends:
            assert seq[e + 1:e + k + 3] == [lt.start] + [lt.pad] * k + [lt.end]
        assert seq.count(lt.pad) == 2 * k and seq.count(lt.start) == 2 and seq.count(lt.end) == 2
        assert ex.latent_positions.numel() == 2 * k


def test_stage3_has_no_helper_image_tokens(processor, ids, hand):
    ex = build_stage_example(hand[1], processor, 3, K)
    answer = ex.input_ids[ex.answer_start:]
    for t in (ids.vision_start, ids.image_pad, ids.vision_end):
        assert not (answer == t).any()
    assert int((answer == ids.latent.pad).sum()) == 2 * K
    assert [p.role for p in ex.images] == ["question", "question"]


def test_alignment_positions_correspond_across_stages(processor, hand):
    """Observation tokens (teacher in stage 1, student in stage 2) and latent positions (stage 2
    teacher, stage 3 student) line up one to one."""
    s1, s2, s3 = (build_stage_example(hand[1], processor, st, K) for st in (1, 2, 3))
    o1, o2 = s1.observation_positions, s2.observation_positions
    assert o1.numel() == o2.numel() > 0
    assert torch.equal(s1.input_ids[o1], s2.input_ids[o2])
    assert s2.latent_positions.numel() == s3.latent_positions.numel() == 2 * K
    assert s1.latent_positions.numel() == 0


def test_no_placeholder_text_in_any_stage(processor, ids, hand):
    for stage in (1, 2, 3):
        ex = build_stage_example(hand[0], processor, stage, K)
        text = processor.tokenizer.decode(ex.input_ids)
        assert "<abs_vis_token></abs_vis_token>" not in text
        assert text.count("<abs_vis_token>") == (0 if stage == 1 else 1)


def test_budget_split_rule():
    geo = ProcessorGeometry(patch_size=14, merge_size=2, min_pixels=3136)  # Qwen2.5-VL
    b1 = STAGE_BUDGETS[1]
    # Small images are kept at native size.
    assert plan_image_tokens([(280, 280), (56, 56)], b1, geo) == [100, 4]
    # One huge image is capped per image.
    assert plan_image_tokens([(2800, 2800)], b1, geo) == [1280]
    # Over the total: caps scale together (relative sizes kept), sum within budget.
    caps = plan_image_tokens([(2800, 2800), (2800, 2800), (560, 560)], b1, geo)
    assert caps == [int(1280 * 2000 / 2960)] * 2 + [int(400 * 2000 / 2960)]
    assert sum(caps) <= 2000
    for cap, (w, h) in zip(caps, [(2800, 2800), (2800, 2800), (560, 560)]):
        assert geo.tokens(geo.grid(w, h, cap)) <= cap
    # Never below the processor minimum.
    assert plan_image_tokens([(2800, 2800)] * 3, ImageBudget(total=6, per_image=10), geo) == [4, 4, 4]


def test_budget_applied_to_sample(processor, hand):
    budget = ImageBudget(total=12, per_image=16)
    ex = build_stage_example(hand[1], processor, 1, K, budget=budget)
    tokens = (ex.image_grid_thw.prod(-1) // 4).tolist()
    assert ex.images[0].max_tokens < 16 and sum(tokens) <= 4 * 4  # 4 images at the minimum 4
    assert all(t <= p.max_tokens for t, p in zip(tokens, ex.images))


def test_bad_arguments(processor, hand):
    with pytest.raises(ValueError, match="stage"):
        build_stage_example(hand[0], processor, 4, K)
    with pytest.raises(ValueError, match="latent_size"):
        build_stage_example(hand[0], processor, 2, 0)


def test_two_helper_sample_targets_per_rule(processor, ids, hand):
    """Two helper images: every helper <|vision_start|> (stages 1-2), every START (2-3) and every
    observation tag is a target under the decodable rule; the two rules differ in exactly those."""
    lt = ids.latent
    for stage in (1, 2, 3):
        dec = build_stage_example(hand[1], processor, stage, K, labels="decodable")
        res = build_stage_example(hand[1], processor, stage, K, labels="research")
        assert torch.equal(dec.input_ids, res.input_ids)
        answer = torch.arange(len(dec)) >= dec.answer_start
        differ = dec.target_mask != res.target_mask
        assert not (res.target_mask & ~dec.target_mask).any()  # decodable only adds targets
        extra = set(dec.input_ids[differ].tolist())
        assert extra == {lt.observation_start, lt.observation_end} | ({ids.vision_start} if stage != 3 else set())
        assert int(differ.sum()) == 4 + (2 if stage != 3 else 0)  # 2 observations, 2 helper images
        helper_vs = (dec.input_ids == ids.vision_start) & answer
        assert dec.target_mask[helper_vs].all() and int(helper_vs.sum()) == (2 if stage != 3 else 0)
        question_vs = (dec.input_ids == ids.vision_start) & ~answer
        assert int(question_vs.sum()) == 2 and not dec.target_mask[question_vs].any()
        # Observation weights are unchanged by the rule: the tags lie outside observation_mask.
        assert torch.equal(dec.observation_mask, res.observation_mask)


def test_label_rule_is_checked(processor, hand):
    with pytest.raises(ValueError, match="labels must be one of"):
        build_stage_example(hand[0], processor, 3, K, labels="other")
