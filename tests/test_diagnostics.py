"""Latent / accuracy diagnostics against naive float64 loops and hand-computed cases."""

import itertools
import math

import numpy as np
import pytest
import torch

from monet.eval.diagnostics import (answer_changed_share, chance_level, cosine_across_answers, cosine_within_answers,
                                    effective_rank, latent_norms, latent_span_rate, pairwise_cosines, wilson_interval)


def rand_answers(seed, counts, d=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=dtype) + 0.3 for n in counts]


def cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def naive_within(answers):
    per = []
    for x in answers:
        rows = x.double().numpy()
        if len(rows) >= 2:
            vals = [cos(rows[i], rows[j]) for i, j in itertools.combinations(range(len(rows)), 2)]
            per.append(sum(vals) / len(vals))
    return sum(per) / len(per) if per else None


def naive_across_pairs(answers):
    vecs = [(a, row) for a, x in enumerate(answers) for row in x.double().numpy()]
    return [cos(u, v) for (a, u), (b, v) in itertools.combinations(vecs, 2) if a != b]


def naive_within_pairs(answers):
    vecs = [(a, row) for a, x in enumerate(answers) for row in x.double().numpy()]
    return [cos(u, v) for (a, u), (b, v) in itertools.combinations(vecs, 2) if a == b]


@pytest.mark.parametrize("seed,counts", [(0, [3, 1, 4, 0, 2]), (1, [2, 2]), (2, [5]), (3, [1, 1, 1]), (4, [0, 6, 3])])
def test_cosines_match_naive(seed, counts):
    answers = rand_answers(seed, counts)
    w = cosine_within_answers(answers)
    nw = naive_within(answers)
    assert (w is None) == (nw is None) and (w is None or w == pytest.approx(nw, abs=1e-12))
    across = naive_across_pairs(answers)
    a = cosine_across_answers(answers)
    if sum(1 for c in counts if c) < 2:
        assert a is None
    else:
        assert a == pytest.approx(sum(across) / len(across), abs=1e-12)
    assert sorted(pairwise_cosines(answers, "across").tolist()) == pytest.approx(sorted(across), abs=1e-12)
    assert sorted(pairwise_cosines(answers, "within").tolist()) == pytest.approx(sorted(naive_within_pairs(answers)),
                                                                                abs=1e-12)


def test_cosine_hand_cases():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert cosine_across_answers([e1, e2]) == pytest.approx(0.0)
    assert cosine_across_answers([e1, 3 * e1]) == pytest.approx(1.0)       # identical directions
    assert cosine_within_answers([torch.tensor([[1.0, 0.0], [-1.0, 0.0]])]) == pytest.approx(-1.0)
    assert cosine_within_answers([e1, e2]) is None                          # no answer with 2 vectors


def test_pairwise_cosines_sampling_is_a_subset():
    answers = rand_answers(5, [6, 6, 6])
    full = pairwise_cosines(answers, "across", max_pairs=None)
    sub = pairwise_cosines(answers, "across", max_pairs=20, seed=3)
    assert full.numel() == 108 and sub.numel() == 20
    full_set = {round(v, 12) for v in full.tolist()}
    assert all(round(v, 12) in full_set for v in sub.tolist())
    assert torch.equal(sub, pairwise_cosines(answers, "across", max_pairs=20, seed=3))


def test_errors_name_the_answer():
    with pytest.raises(ValueError, match="answer 1: a latent vector has zero norm"):
        cosine_across_answers([torch.ones(2, 3), torch.zeros(1, 3)])
    with pytest.raises(ValueError, match="widths differ"):
        cosine_across_answers([torch.ones(2, 3), torch.ones(1, 4)])
    with pytest.raises(ValueError, match="answer 0: latents contain NaN"):
        latent_norms([torch.tensor([[float("nan"), 1.0]])])
    with pytest.raises(ValueError, match=r"answer 0: latents must have shape \[n, D\]"):
        latent_norms([torch.ones(2, 2, 2)])


def test_latent_norms_and_span_rate():
    answers = rand_answers(7, [2, 0, 3])
    st = latent_norms(answers)
    norms = np.array([np.linalg.norm(r) for x in answers for r in x.double().numpy()])
    assert st.n_vectors == 5
    assert (st.mean, st.std, st.min, st.max) == pytest.approx((norms.mean(), norms.std(), norms.min(), norms.max()))
    assert latent_norms([torch.zeros(0, 4)]) is None
    r = latent_span_rate([0, 2, 1, 0])
    assert (r.n_answers, r.share_with_span, r.spans_per_answer) == (4, 0.5, 0.75)
    with pytest.raises(ValueError):
        latent_span_rate([])


def test_effective_rank():
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0)
    assert effective_rank([torch.eye(3)[:2], torch.eye(3)[2:]]) == pytest.approx(3.0)   # stacked across answers
    assert effective_rank(torch.outer(torch.arange(1.0, 6.0), torch.tensor([1.0, -2.0, 0.5]))) == pytest.approx(1.0)
    p = np.array([0.75, 0.25])
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    s = np.linalg.svd(x.double().numpy(), compute_uv=False)
    q = s / s.sum()
    assert effective_rank(x) == pytest.approx(math.exp(-(q * np.log(q)).sum()), abs=1e-10)
    xc = x.double().numpy() - x.double().numpy().mean(0)
    s = np.linalg.svd(xc, compute_uv=False)
    q = s / s.sum()
    assert effective_rank(x, center=True) == pytest.approx(math.exp(-(q * np.log(q)).sum()), abs=1e-10)
    assert effective_rank(torch.zeros(3, 2)) == 0.0 and effective_rank([torch.zeros(0, 2)]) is None


def wilson_by_quadratic(k, n, z=1.959963984540054):
    # (p_hat - p)^2 = z^2 p (1 - p) / n  <=>  (1 + z^2/n) p^2 - (2 p_hat + z^2/n) p + p_hat^2 = 0
    ph = k / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    disc = math.sqrt(b * b - 4 * a * c)
    return (-b - disc) / (2 * a), (-b + disc) / (2 * a)


@pytest.mark.parametrize("k,n", [(8, 10), (0, 5), (5, 5), (1, 1), (37, 100), (500, 1000)])
def test_wilson_interval(k, n):
    lo, hi = wilson_interval(k, n)
    qlo, qhi = wilson_by_quadratic(k, n)
    assert (lo, hi) == pytest.approx((max(0.0, qlo), min(1.0, qhi)), abs=1e-12)
    assert lo <= k / n <= hi


def test_wilson_known_value_and_errors():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)   # hand-computed: centre 0.7168, half-width 0.2266
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_chance_and_answer_changed():
    assert chance_level([4, 2, 5]) == pytest.approx((0.25 + 0.5 + 0.2) / 3)
    with pytest.raises(ValueError):
        chance_level([4, 0])
    share, n = answer_changed_share({"a": "B", "b": "C", "c": None, "x": "A"},
                                    {"a": "B", "b": "D", "c": "A", "y": "A"})
    assert (share, n) == (pytest.approx(2 / 3), 3)
    with pytest.raises(ValueError, match="no sample id in common"):
        answer_changed_share({"a": "B"}, {"b": "B"})
