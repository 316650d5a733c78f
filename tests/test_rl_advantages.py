"""GRPO advantages, rewards and the VLPO config, against hand-computed values and a naive loop."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from monet.rl import LengthPenalty, VLPOConfig, broadcast_advantages, combine_rewards, grpo_advantages, \
    grpo_advantages_by_group, length_penalty


def test_hand_computed_sample_and_population_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    eps = 1e-6
    s = grpo_advantages(r, std="sample", eps=eps)
    # group 0: mean 0.5, deviations +-0.5, sample var = 4 * 0.25 / 3
    a0 = 0.5 / (math.sqrt(1 / 3) + eps)
    # group 2: mean 0.25, deviations 0.75 / -0.25, sample var = (0.5625 + 3 * 0.0625) / 3 = 0.25
    expect = torch.tensor([[a0, -a0, -a0, a0], [0, 0, 0, 0],
                           [0.75 / (0.5 + eps), -0.25 / (0.5 + eps), -0.25 / (0.5 + eps), -0.25 / (0.5 + eps)]],
                          dtype=torch.float64)
    torch.testing.assert_close(s, expect, rtol=1e-12, atol=1e-12)
    p = grpo_advantages(r, std="population", eps=eps)
    # population: group 0 std 0.5, group 2 std sqrt(0.75 / 4)
    sd2 = math.sqrt(0.1875)
    expect_p = torch.tensor([[0.5 / (0.5 + eps), -0.5 / (0.5 + eps), -0.5 / (0.5 + eps), 0.5 / (0.5 + eps)],
                             [0, 0, 0, 0], [0.75 / (sd2 + eps)] + [-0.25 / (sd2 + eps)] * 3], dtype=torch.float64)
    torch.testing.assert_close(p, expect_p, rtol=1e-12, atol=1e-12)
    assert grpo_advantages(r.float()).dtype == torch.float32


def test_ragged_groups_match_naive_loop():
    rng = random.Random(0)
    sizes = [2, 5, 8, 3, 8]
    ids = [100 + 7 * g for g, n in enumerate(sizes) for _ in range(n)]  # non-contiguous group ids
    perm = list(range(len(ids)))
    rng.shuffle(perm)  # groups interleaved
    ids = [ids[i] for i in perm]
    rewards = [rng.choice([0.0, 0.1, 0.9, 1.0]) for _ in ids]
    for std, fn in (("sample", statistics.stdev), ("population", statistics.pstdev)):
        got = grpo_advantages_by_group(torch.tensor(rewards, dtype=torch.float64), torch.tensor(ids), std=std)
        for i, (g, r) in enumerate(zip(ids, rewards)):
            grp = [rr for gg, rr in zip(ids, rewards) if gg == g]
            want = (r - statistics.fmean(grp)) / (fn(grp) + 1e-6)
            assert abs(float(got[i]) - want) < 1e-9, (std, i)


def test_advantage_errors():
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        grpo_advantages(torch.ones(3, 1))
    assert torch.equal(grpo_advantages(torch.tensor([[0.3]]), std="population"), torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"rollout 2 \(group 5\) is not finite"):
        grpo_advantages_by_group(torch.tensor([0.0, 1.0, float("nan")]), torch.tensor([5, 5, 5]))
    with pytest.raises(ValueError, match="std must be"):
        grpo_advantages(torch.ones(2, 2), std="unbiased")
    with pytest.raises(ValueError, match=r"\[groups, n\]"):
        grpo_advantages(torch.ones(4))


def test_broadcast_covers_text_and_latent_positions():
    adv = torch.tensor([0.5, -2.0])
    text = torch.tensor([[0, 1, 1, 0, 0, 1], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    latent = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    got = broadcast_advantages(adv, text | latent)
    expect = torch.tensor([[0, .5, .5, .5, .5, .5], [0, 0, -2, -2, 0, 0]])
    assert torch.equal(got, expect)


def test_rewards_and_length_penalty():
    cfg = VLPOConfig()
    r = combine_rewards(torch.tensor([1.0, 0.0, 0.5, 1.0]), torch.tensor([True, False, True, False]), cfg)
    torch.testing.assert_close(r, torch.tensor([1.0, 0.0, 0.55, 0.9], dtype=torch.float64))
    pen = LengthPenalty(max_tokens=100, buffer=20, weight=0.5)
    got = length_penalty(torch.tensor([10, 80, 90, 95, 100, 150]), pen)
    torch.testing.assert_close(got, torch.tensor([0, 0, -0.25, -0.375, -0.5, -0.5], dtype=torch.float64))
    cfg = VLPOConfig(length_penalty={"max_tokens": 100, "buffer": 20, "weight": 0.5})
    r = combine_rewards(torch.tensor([1.0, 1.0]), torch.tensor([1, 1]), cfg, lengths=torch.tensor([50, 90]))
    torch.testing.assert_close(r, torch.tensor([1.0, 0.75], dtype=torch.float64))
    with pytest.raises(ValueError, match="pass the response lengths"):
        combine_rewards(torch.tensor([1.0]), torch.tensor([1]), cfg)
    with pytest.raises(ValueError, match=r"accuracy of rollout 1 is 1.5"):
        combine_rewards(torch.tensor([1.0, 1.5]), torch.tensor([1, 1]), VLPOConfig())
    with pytest.raises(ValueError, match=r"format_ok of rollout 0 is 2.0"):
        combine_rewards(torch.tensor([1.0]), torch.tensor([2]), VLPOConfig())


def test_config_defaults_and_validation():
    c = VLPOConfig()
    assert (c.n, c.clip_low, c.clip_high, c.dual_clip, c.kl_coef, c.latent_weight, c.sigma, c.latent_noise,
            c.select_acc_threshold, c.accuracy_weight, c.format_weight, c.length_penalty, c.adv_std) == \
        (8, 0.2, 0.3, 3.0, 0.01, 1.0, 10.0, 0.0, 0.6, 0.9, 0.1, None, "sample")
    assert VLPOConfig.from_dict(c.to_dict()) == c
    for kwargs, msg in [({"n": 1}, r"VLPOConfig.n must be >= 2"), ({"clip_low": 1.0}, "clip_low"),
                        ({"dual_clip": 1.0}, "dual_clip"), ({"sigma": 0}, "sigma"),
                        ({"temperature": -1}, "temperature"), ({"select_acc_threshold": 0}, "select_acc_threshold"),
                        ({"buffer_groups": 4, "groups_per_batch": 8}, "buffer_groups"),
                        ({"adv_std": "biased"}, "adv_std"), ({"latent_noise": -0.1}, "latent_noise")]:
        with pytest.raises(ValueError, match=msg):
            VLPOConfig(**kwargs)
    with pytest.raises(TypeError, match=r"VLPOConfig.kl_coef must be a finite number"):
        VLPOConfig(kl_coef=float("nan"))
    with pytest.raises(TypeError, match=r"VLPOConfig.n must be an int"):
        VLPOConfig(n=8.0)
    with pytest.raises(ValueError, match=r"rl.yaml: unknown fields \['clip'\]"):
        VLPOConfig.from_dict({"clip": 0.2}, where="rl.yaml")
    with pytest.raises(ValueError, match="buffer <= max_tokens"):
        LengthPenalty(max_tokens=10, buffer=20)
