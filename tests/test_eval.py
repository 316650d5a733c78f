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
    from data_fixtures.samples import tiny_processor

    rep = evaluate_sft_file(None, tiny_processor(), data.eval_json, batch_size=2, progress=False)
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


def _capture_generate(monkeypatch, reply=lambda i, req: ""):
    """Replace monet.generate inside evaluate by a recorder answering ``reply(i, request)``."""
    calls = []

    def fake(model, processor, requests, **kw):
        calls.append((processor, list(requests), kw))
        outs = []
        for i, r in enumerate(requests):
            text = reply(len(calls) - 1, i, r)
            ids = processor.tokenizer.encode(text, add_special_tokens=False) if text else []
            outs.append(LatentGeneration(processor.tokenizer.decode(ids, skip_special_tokens=True), text, ids,
                                         [], torch.zeros(0, 4), 3, "stop"))
        return outs

    monkeypatch.setattr("monet.model.decoding.generate", fake)
    return calls


def test_eval_prompts_are_the_training_prompts(tmp_path, monkeypatch):
    """Token ids and pixels of every eval prompt equal the stage-3 training sequence up to the
    answer, including an image larger than the processor's own default maximum (the tiny
    processor caps at 64 tokens; training's stage-3 budget gives this 280x280 image 100)."""
    from data_fixtures.samples import good_sample, tiny_processor, write_images, write_json
    from monet.data import build_stage_example, load_sft_dataset
    from monet.model.requests import as_requests, encode_requests
    from monet.testing import synthetic_image

    processor = tiny_processor()
    data = synthesize_dataset(tmp_path / "d", n=0, n_eval=3, seed=5)
    write_images(tmp_path / "h")
    synthetic_image(9, (280, 280)).save(tmp_path / "h" / "img" / "big.png")
    big = good_sample("big")
    big["data"][1]["content"][0]["image"] = "img/big.png"
    hand = write_json(tmp_path / "h" / "hand.json", [big])
    for path in (data.eval_json, hand):
        calls = _capture_generate(monkeypatch, lambda *a: "\\boxed{x}")
        evaluate_sft_file(None, processor, path, batch_size=2, progress=False)
        samples, _ = load_sft_dataset(path)
        requests = [r for _, rs, _ in calls for r in rs]
        assert len(requests) == len(samples)
        for sample, req, (proc, _, _) in zip(samples, requests, [c for c in calls for _ in c[1]]):
            ex = build_stage_example(sample, processor, 3, 2)
            enc, _ = encode_requests(proc, as_requests([req]))
            assert enc["input_ids"][0].tolist() == ex.input_ids[:ex.answer_start].tolist()
            assert torch.equal(enc["image_grid_thw"], ex.image_grid_thw)
            assert torch.allclose(enc["pixel_values"], ex.pixel_values, atol=1e-6)
    # Without the budget the processor's default would have shrunk the big image.
    from monet.model.requests import LatentRequest

    big_req = LatentRequest(prompt="q", images=[str(tmp_path / "h" / "img" / "big.png")])
    default, _ = encode_requests(processor, [big_req])
    assert default["image_grid_thw"].tolist() == [[1, 16, 16]] and ex.image_grid_thw.tolist() == [[1, 20, 20]]


def test_helper_images_are_inserted_when_the_model_asks(tmp_path, monkeypatch):
    from data_fixtures.samples import tiny_processor

    processor = tiny_processor()
    data = synthesize_dataset(tmp_path / "d", n=0, n_eval=2, seed=4)
    import json

    refs = [extract_boxed(s["data"][-1]["content"][-1]["text"]) for s in json.loads(data.eval_json.read_text())]

    def reply(call, i, req):
        if call == 0:  # first round: reasoning, then the model opens a helper image (and rambles on)
            return "Zoom in.<|vision_start|><|image_pad|>junk" if i == 0 else "No zoom \\boxed{none}<|im_end|>"
        return f"<observation>seen</observation> \\boxed{{{refs[0]}}}<|im_end|>"

    calls = _capture_generate(monkeypatch, reply)
    rep = evaluate_sft_file(None, processor, data.eval_json, batch_size=2, progress=False, helper_images=True,
                            max_new_tokens=64)
    assert len(calls) == 2 and len(calls[1][1]) == 1  # only sample 0 continues
    first, second = calls[0][1][0], calls[1][1][0]
    assert second.raw_prompt and second.prompt == first.prompt + "Zoom in.<|vision_start|><|image_pad|><|vision_end|>"
    assert second.images[:-1] == first.images and second.images[-1].endswith("000000_zoom.png")
    row0, row1 = rep.samples
    assert row0["helper_images"] == 1 and row0["correct"] and "junk" not in row0["output"]
    assert row1["helper_images"] == 0 and not row1["correct"]
    assert rep.accuracy == 0.5 and rep.mean_helper_images == 0.5 and rep.helper_images
    # the answer budget covers all rounds
    assert calls[1][2]["max_new_tokens"] == 64 - len(processor.tokenizer.encode("Zoom in.")) - 1


def test_evaluate_with_helper_images_on_tiny_model(tmp_path):
    data = synthesize_dataset(tmp_path / "d", n=0, n_eval=3, seed=1)
    model, processor = monet.load_model(build_tiny_checkpoint(cache=True), latent_size=2)
    bias = {processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"): 100.0}
    import monet.model.decoding as dec

    real = dec.generate
    rounds = []

    def biased(*a, **kw):  # the random model never opens an image by itself: make it do so first
        rounds.append(1)
        return real(*a, logit_bias=bias if len(rounds) == 1 else None, **kw)

    dec.generate = biased
    try:
        rep = evaluate_sft_file(model, processor, data.eval_json, max_new_tokens=8, batch_size=3, progress=False,
                                helper_images=True)
    finally:
        dec.generate = real
    assert rep.n == 3 and rep.mean_helper_images >= 1.0 and len(rounds) >= 2
