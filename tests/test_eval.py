"""Answer extraction, latent diagnostics and the held-out evaluation loop."""

from __future__ import annotations

import itertools

import pytest
import torch

import monet
from monet.data.synth import synthesize_dataset
from monet.eval import evaluate_sft_file, extract_boxed, normalize_answer
from monet.eval.evaluate import mean_pairwise_cosine
from monet.model.outputs import LatentGeneration
from monet.testing import build_tiny_checkpoint


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{red}.", "red"),
    ("\\boxed{a} then \\boxed{b}", "b"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{x} and a cut \\boxed{unfinished", "x"),
    ("no answer", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_normalize_answer():
    assert normalize_answer(" $\\text{Red}$. ") == "red"
    assert normalize_answer(None) is None


def test_mean_pairwise_cosine_matches_loop():
    torch.manual_seed(0)
    vs = [torch.randn(8) for _ in range(5)]
    ref = [torch.nn.functional.cosine_similarity(a, b, dim=0) for a, b in itertools.permutations(vs, 2)]
    assert mean_pairwise_cosine(vs) == pytest.approx(float(torch.stack(ref).mean()), rel=1e-5)
    assert mean_pairwise_cosine(vs[:1]) is None


def test_evaluate_counts_correct_answers(tmp_path, monkeypatch):
    data = synthesize_dataset(tmp_path / "d", n=0, n_eval=4, seed=3)
    import json

    refs = [extract_boxed(s["data"][-1]["content"][-1]["text"]) for s in json.loads(data.eval_json.read_text())]
    answers = [f"\\boxed{{{refs[0]}}}", "\\boxed{wrong}", "no box", f"It is \\boxed{{{refs[3].upper()}}}"]
    calls = []

    def fake_generate(model, processor, requests, **kw):
        calls.append(requests)
        outs = []
        for i, _ in enumerate(requests):
            a = answers[len(calls[:-1]) * 2 + i] if kw["max_new_tokens"] else ""
            lat = torch.randn(2, 4) if i == 0 else torch.zeros(0, 4)
            outs.append(LatentGeneration(a, a, [1], [0, 1] if i == 0 else [], lat, 3, "stop"))
        return outs

    monkeypatch.setattr("monet.model.decoding.generate", fake_generate)
    rep = evaluate_sft_file(None, None, data.eval_json, batch_size=2, progress=False)
    assert rep.n == 4 and rep.accuracy == 0.5 and rep.answered == 0.75
    assert rep.latent_usage == 0.5 and rep.mean_pairwise_latent_cosine is not None
    # prompts are the system + user turns with absolute image paths
    msgs = calls[0][0]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[1]["content"][0]["image"].startswith(str(data.root))


def test_evaluate_runs_on_tiny_model(tmp_path):
    data = synthesize_dataset(tmp_path / "d", n=0, n_eval=3, seed=1)
    model, processor = monet.load_model(build_tiny_checkpoint(cache=True), latent_size=2)
    rep = evaluate_sft_file(model, processor, data.eval_json, max_new_tokens=8, batch_size=2, progress=False)
    assert rep.n == 3 and 0.0 <= rep.accuracy <= 1.0 and len(rep.samples) == 3
