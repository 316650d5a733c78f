"""monet.generate (batched, KV-cached, native ops) against the naive full-recompute decoder."""

from __future__ import annotations

import json

import pytest
import torch

import monet
from monet.layout import SpanLayout
from latent_reference import naive_latent_decode
from monet.model.decoding import eos_token_ids
from monet.render import SPAN_PLACEHOLDER, render_latent_text, split_spans
from monet.testing import build_tiny_checkpoint
from monet.testing.requests import mixed_requests


@pytest.fixture(scope="module")
def tiny(tiny_on):
    return tiny_on("cpu")


@pytest.mark.parametrize("layout", ["standard", "monet-v1"])
@pytest.mark.parametrize("K", [1, 3, 8])
def test_generate_matches_naive_decoder(tiny_on, device, layout, K):
    model, processor = tiny_on(device.type)
    tol = 1e-5 if device.type == "cpu" else 1e-4  # GPU kernels reduce in other orders
    start = model.monet_config.token_ids.start
    bias = {start: 0.5}  # makes spans open at different steps in different requests
    reqs = mixed_requests()
    outs = monet.generate(model, processor, reqs, max_new_tokens=24, latent_size=K, layout=layout,
                          logit_bias=bias, return_latents=True)
    first_span = set()
    for i, (req, out) in enumerate(zip(reqs, outs)):
        gen, pos, vecs = naive_latent_decode(model, processor, req, latent_size=K, layout=layout, max_new_tokens=24,
                                             eos_ids=eos_token_ids(model, processor.tokenizer), logit_bias=bias)
        assert out.token_ids == gen, f"request {i}"
        assert out.latent_positions == pos, f"request {i}"
        assert out.latents.shape == vecs.shape
        torch.testing.assert_close(out.latents, vecs, rtol=tol, atol=tol)
        first_span.add(pos[0] if pos else None)
    # the batch really mixes requests entering latent mode at different steps (and none)
    assert len(first_span - {None}) >= 2 and SpanLayout(K, layout).first_latent_offset in first_span


@pytest.mark.parametrize("layout", ["standard", "monet-v1"])
@pytest.mark.parametrize("K", [1, 4])
def test_forced_start_equals_sampled_start(tiny, layout, K):
    """A prompt ending with START (raw, or force_latent) gives exactly the tokens and latents of the
    same prompt where the model itself samples START as its first token (sequential reference)."""
    from monet.model.requests import render_prompt
    from monet.testing.tiny_model import synthetic_image

    model, processor = tiny
    start = model.monet_config.token_ids.start
    eos = eos_token_ids(model, processor.tokenizer)
    base = monet.LatentRequest(prompt="Count the shapes", images=[synthetic_image(3)])
    text, images, forced = render_prompt(processor, base)
    assert not forced
    by_flag = monet.LatentRequest(prompt="Count the shapes", images=[synthetic_image(3)], force_latent=True)
    by_prompt = monet.LatentRequest(prompt=text + monet.LATENT_START, images=images, raw_prompt=True)
    n = K + 8
    outs = monet.generate(model, processor, [by_flag, by_prompt, "hello"], max_new_tokens=n, latent_size=K,
                          layout=layout, return_latents=True)
    ref_sampled = naive_latent_decode(model, processor, base, latent_size=K, layout=layout, max_new_tokens=n,
                                      eos_ids=eos, first_step_bias={start: 1e4})
    ref_forced = naive_latent_decode(model, processor, by_prompt, latent_size=K, layout=layout, max_new_tokens=n,
                                     eos_ids=eos)
    assert ref_sampled[0][0] == start  # the model really sampled START there
    assert ref_forced[0] == ref_sampled[0] and ref_forced[1] == ref_sampled[1]
    torch.testing.assert_close(ref_forced[2], ref_sampled[2], rtol=1e-5, atol=1e-5)
    for out in outs[:2]:
        assert out.token_ids == ref_sampled[0]
        assert out.latent_positions == ref_sampled[1]
        assert len(out.latent_positions) >= K
        torch.testing.assert_close(out.latents, ref_sampled[2], rtol=1e-5, atol=1e-5)
    assert outs[0].num_prompt_tokens == outs[1].num_prompt_tokens
    plain = monet.generate(model, processor, ["hello"], max_new_tokens=n, latent_size=K, layout=layout)[0]
    assert outs[2].token_ids == plain.token_ids


def _reference_ablation(ab, model):
    from monet.model.latent_hooks import ablated_latent

    start = model.get_input_embeddings().weight[model.monet_config.token_ids.start]
    gen = torch.Generator().manual_seed(ab.seed) if ab.mode in ("noise", "perturb") else None
    return lambda j, h: ablated_latent(ab, h, j, start, gen)


@pytest.mark.parametrize("layout", ["standard", "monet-v1"])
def test_latent_ablations_match_reference(tiny, layout):
    """Each ablation replaces exactly the fed latents (reference decoder with the same substitution);
    requests without spans are untouched; no ablation == plain decoding."""
    model, processor = tiny
    eos = eos_token_ids(model, processor.tokenizer)
    K, n = 3, 14
    D = model.config.text_config.hidden_size
    reqs = [monet.LatentRequest(prompt="Count the shapes", images=[mixed_requests()[0].images[0]], force_latent=True),
            monet.LatentRequest(prompt="a b c d e f g")]
    bias = {model.monet_config.token_ids.start: -1e4}  # no spans beyond the forced one
    plain = monet.generate(model, processor, reqs, max_new_tokens=n, latent_size=K, layout=layout,
                           return_latents=True, logit_bias=bias)
    assert len(plain[0].latent_positions) == K and not plain[1].latent_positions
    other = torch.randn(K - 1, D, generator=torch.Generator().manual_seed(5))  # fewer vectors than latents
    changed = 0
    for ab in (monet.LatentAblation("zeros"), monet.LatentAblation("start"), monet.LatentAblation("noise", seed=3),
               monet.LatentAblation("replace", vectors=other), monet.LatentAblation("perturb", seed=1, scale=0.5)):
        outs = monet.generate(model, processor, reqs, max_new_tokens=n, latent_size=K, layout=layout,
                              return_latents=True, logit_bias=bias, ablations=[ab, ab])
        gen, pos, vecs = naive_latent_decode(model, processor, reqs[0], latent_size=K, layout=layout,
                                             max_new_tokens=n, eos_ids=eos, logit_bias=bias,
                                             ablate=_reference_ablation(ab, model))
        assert outs[0].token_ids == gen and outs[0].latent_positions == pos, ab.mode
        torch.testing.assert_close(outs[0].latents, vecs, rtol=1e-5, atol=1e-5, msg=ab.mode)
        assert outs[1].token_ids == plain[1].token_ids  # no latent fed: nothing to replace
        changed += outs[0].token_ids != plain[0].token_ids
        if ab.mode == "zeros":
            assert bool((outs[0].latents == 0).all())
        if ab.mode == "noise":  # same norm as the latent the model produced at that step
            ref = naive_latent_decode(model, processor, reqs[0], latent_size=K, layout=layout, max_new_tokens=n,
                                      eos_ids=eos, logit_bias=bias, ablate=lambda j, h: h)
            torch.testing.assert_close(outs[0].latents[0].norm(), ref[2][0].norm(), rtol=1e-5, atol=1e-5)
        if ab.mode == "perturb":  # z + 0.5 * eps: the first latent moved by noise of the expected size
            ref = naive_latent_decode(model, processor, reqs[0], latent_size=K, layout=layout, max_new_tokens=n,
                                      eos_ids=eos, logit_bias=bias, ablate=lambda j, h: h)
            eps = torch.randn(D, generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(outs[0].latents[0], ref[2][0] + 0.5 * eps, rtol=1e-5, atol=1e-5)
        if ab.mode == "replace":
            torch.testing.assert_close(outs[0].latents[:K - 1], other)
            assert bool((outs[0].latents[K - 1] == 0).all())
    assert changed >= 1  # the tiny model's answers do depend on what it is fed
    same = monet.generate(model, processor, reqs, max_new_tokens=n, latent_size=K, layout=layout,
                          return_latents=True, logit_bias=bias, ablations=[None, None])
    assert [o.token_ids for o in same] == [o.token_ids for o in plain]
    with pytest.raises(ValueError, match="1 ablations given for 2 requests"):
        monet.generate(model, processor, reqs, latent_size=K, ablations=[None])


def test_span_structure_and_forced_tokens(tiny):
    """With sampling and a huge EOS bias, spans still have exactly K PADs then END; EOS only after END."""
    model, processor = tiny
    ids = model.monet_config.token_ids
    eos = eos_token_ids(model, processor.tokenizer)
    K = 4
    outs = monet.generate(model, processor, [monet.LatentRequest(prompt="hi", force_latent=True)] * 3,
                          max_new_tokens=30, latent_size=K, temperature=1.0, seed=0,
                          logit_bias={e: 50.0 for e in eos})
    for out in outs:  # force_latent: START is the first generated token
        assert out.token_ids[:K + 2] == [ids.start] + [ids.pad] * K + [ids.end]
        assert out.token_ids[K + 2] in eos and len(out.token_ids) == K + 3
        assert out.finish_reason == "stop"
        assert out.latent_positions == list(range(1, K + 1))
        assert out.rendered.startswith(SPAN_PLACEHOLDER)


@pytest.mark.parametrize("layout", ["standard", "monet-v1"])
def test_sampled_spans_have_fixed_length(tiny, layout):
    model, processor = tiny
    ids = model.monet_config.token_ids
    K = 3
    outs = monet.generate(model, processor, mixed_requests(), max_new_tokens=40, latent_size=K, layout=layout,
                          temperature=1.0, top_k=50, top_p=0.9, seed=1, logit_bias={ids.start: 3.0})
    n_spans = 0
    for out in outs:
        toks = out.token_ids
        for i, t in enumerate(toks):
            if t == ids.start and i + K + 1 < len(toks):
                n_pad = K if layout == "standard" else K - 1
                assert toks[i + 1:i + 1 + n_pad] == [ids.pad] * n_pad and toks[i + 1 + n_pad] == ids.end
                n_spans += 1
        n_latent_expected = sum(1 for t in toks if t == ids.pad) + (sum(1 for t in toks if t == ids.start) if layout == 'monet-v1' else 0)
        assert len(out.latent_positions) == n_latent_expected
    assert n_spans > 0


def test_seed_reproducible(tiny):
    model, processor = tiny
    kw = dict(max_new_tokens=12, latent_size=2, temperature=0.8, seed=7)
    a = monet.generate(model, processor, mixed_requests(), **kw)
    b = monet.generate(model, processor, mixed_requests(), **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_generate_bf16_runs(tiny_on, device):
    model, processor = tiny_on(device.type, "bfloat16")
    assert model.dtype == torch.bfloat16 and model.device.type == device.type
    outs = monet.generate(model, processor, mixed_requests()[:3], max_new_tokens=8, latent_size=2, return_latents=True)
    assert outs[1].latent_positions == [1, 2] and outs[1].latents.shape == (2, model.config.text_config.hidden_size)
    assert bool(outs[1].latents.isfinite().all())


def test_generate_errors(tiny, tmp_path):
    model, processor = tiny
    with pytest.raises(ValueError, match="latent_size must be >= 1"):
        monet.generate(model, processor, "hi", latent_size=0)
    with pytest.raises(ValueError, match="layout must be one of"):
        monet.generate(model, processor, "hi", layout="v2")
    with pytest.raises(FileNotFoundError, match="request 0 images\\[0\\].*missing.png"):
        monet.generate(model, processor, monet.LatentRequest(prompt="x", images=[tmp_path / "missing.png"]))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode image"):
        monet.generate(model, processor, monet.LatentRequest(prompt="x", images=[tmp_path / "bad.png"]))
    with pytest.raises(ValueError, match="1 image placeholders .* 0 images"):
        monet.generate(model, processor, monet.LatentRequest(prompt="<|vision_start|><|image_pad|><|vision_end|>x", raw_prompt=True))
    with pytest.raises(ValueError, match="exactly one of prompt or messages"):
        monet.generate(model, processor, {"images": []})
    with pytest.raises(ValueError, match="max_new_tokens"):
        monet.generate(model, processor, "hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="logit_bias token ids must lie in"):
        monet.generate(model, processor, "hi", latent_size=2, logit_bias={10 ** 6: 1.0})


def test_request_and_sampling_errors_name_request_and_field(tiny, tmp_path):
    import numpy as np

    model, processor = tiny
    bad = [
        (dict(prompt="x", images=[np.zeros((3, 32, 32), np.uint8)]), ValueError, r"request 1 images\[0\].*channel-first"),
        (dict(prompt="x", images=[np.zeros((32, 32, 5), np.uint8)]), ValueError, r"request 1 images\[0\].*C in \(1, 3, 4\)"),
        (dict(prompt="x", images=[np.zeros((0, 0), np.uint8)]), ValueError, r"request 1 images\[0\].*empty"),
        (dict(prompt="x", images=[np.zeros((8, 8), np.float32)]), TypeError, r"request 1 images\[0\].*uint8"),
        (dict(prompt="x", images="a.png"), TypeError, r"request 1: images must be a list.*wrap"),
        (dict(prompt="x", images=None), TypeError, r"request 1: images must be a list"),
        (dict(prompt="x", images=[tmp_path]), IsADirectoryError, r"request 1 images\[0\].*is a directory"),
        (dict(messages=[{"content": "hi"}]), ValueError, r"request 1: messages\[0\].role"),
        (dict(messages="hi"), TypeError, r"request 1: messages must be a non-empty list"),
        (dict(messages=[{"role": "user", "content": 5}]), TypeError, r"request 1: messages\[0\].content"),
        (dict(prompt=3), TypeError, r"request 1: prompt must be a str"),
    ]
    for fields, exc, pattern in bad:
        with pytest.raises(exc, match=pattern):
            monet.generate(model, processor, ["fine", fields], max_new_tokens=2, latent_size=2)
    for kw, pattern in [(dict(temperature=float("nan")), "temperature must be a finite"),
                        (dict(max_new_tokens=2.5), "max_new_tokens must be an int"),
                        (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(seed="1"), "seed"),
                        (dict(temprature=1.0), "unknown sampling arguments")]:
        with pytest.raises((TypeError, ValueError), match=pattern):
            monet.generate(model, processor, "hi", latent_size=2, **kw)


def test_context_limits(tiny, caplog):
    """max_new_tokens is clamped to the context (buffers grow with what is generated); a prompt
    that does not fit is refused naming the request, its length and the limit."""
    model, processor = tiny
    cfg = model.config.text_config
    old = cfg.max_position_embeddings
    try:
        n_prompt = monet.generate(model, processor, ["hi", "a much longer prompt " * 3], max_new_tokens=1,
                                  latent_size=2)
        lens = [o.num_prompt_tokens for o in n_prompt]
        cfg.max_position_embeddings = max(lens) + 5
        with caplog.at_level("WARNING", logger="monet"):
            outs = monet.generate(model, processor, ["hi", "a much longer prompt " * 3], max_new_tokens=10 ** 9,
                                  latent_size=2, logit_bias={e: -1e4 for e in eos_token_ids(model, processor.tokenizer)})
        assert "does not fit the model's context" in caplog.text
        for o, n in zip(outs, lens):
            assert len(o.token_ids) == cfg.max_position_embeddings - n and o.finish_reason == "length"
        cfg.max_position_embeddings = min(lens) + 1
        with pytest.raises(ValueError, match=rf"request 1: the prompt has {lens[1]} tokens but the model's context "
                                             rf"is {min(lens) + 1}"):
            monet.generate(model, processor, ["hi", "a much longer prompt " * 3], max_new_tokens=4, latent_size=2)
    finally:
        cfg.max_position_embeddings = old


def test_sampling_params_object_and_keywords_agree(tiny):
    model, processor = tiny
    sp = monet.SamplingParams(max_new_tokens=9, temperature=0.7, top_k=20, seed=3)
    a = monet.generate(model, processor, mixed_requests()[:3], sp, latent_size=2)
    b = monet.generate(model, processor, mixed_requests()[:3], max_new_tokens=9, temperature=0.7, top_k=20, seed=3,
                       latent_size=2)
    c = monet.generate(model, processor, mixed_requests()[:3], sp, seed=4, latent_size=2)  # keyword overrides
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_render_spans(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    ids = monet.LatentTokenIds.from_tokenizer(tok)
    hello = tok.encode("hello")
    seq = hello + [ids.start, ids.pad, ids.pad, ids.end] + hello + [ids.start, ids.pad]
    assert [k for k, _ in split_spans(seq, ids)] == ["text", "latent", "text", "latent"]
    assert render_latent_text(tok, seq, ids) == f"hello{SPAN_PLACEHOLDER}hello{SPAN_PLACEHOLDER}"
    # continuation of a span opened by the prompt
    assert split_spans([ids.pad, ids.end] + hello, ids) == [("latent", [ids.pad, ids.end]), ("text", hello)]


def test_load_model_adds_tokens_and_config_roundtrip(tmp_path):
    # 695 tokens padded to 704 rows: adding 5 tokens needs no resize
    path = build_tiny_checkpoint(tmp_path / "nomonet", add_monet_tokens=False)
    model, processor = monet.load_model(path, latent_size=5, layout="monet-v1")
    ids = model.monet_config.token_ids
    assert (ids.pad, ids.start, ids.end) == (695, 696, 697)
    assert model.get_input_embeddings().weight.shape[0] == 704
    out = tmp_path / "saved"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    saved = json.loads((out / "monet_config.json").read_text())
    # a plain Qwen2.5-VL checkpoint: vLLM refuses unknown architecture names
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert saved["latent_size"] == 5 and saved["layout"] == "monet-v1" and saved["token_ids"]["start"] == 696
    again, _ = monet.load_model(out)
    assert again.monet_config == model.monet_config
    for a, b in zip(again.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_load_model_grows_embeddings_with_mean_rows(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "tight", add_monet_tokens=False, pad_vocab_to_multiple_of=1)
    from transformers import Qwen2_5_VLForConditionalGeneration

    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    old = plain.get_input_embeddings().weight
    model, processor = monet.load_model(path)
    new = model.get_input_embeddings().weight
    assert new.shape[0] == len(processor.tokenizer) == old.shape[0] + 5
    torch.testing.assert_close(new[:old.shape[0]], old)
    torch.testing.assert_close(new[old.shape[0]:], old.mean(0, keepdim=True).expand(5, -1))


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        monet.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        monet.load_model(tmp_path / "empty")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type is 'llama'.*Qwen2.5-VL"):
        monet.load_model(tmp_path / "llama")
    with pytest.raises(ValueError, match="CUDA is not available"):
        if not torch.cuda.is_available():
            monet.load_model(tmp_path / "llama", device="cuda")
        else:
            raise ValueError("CUDA is not available")  # nothing to check on a CUDA machine


def test_load_model_refuses_incomplete_checkpoints(tmp_path):
    import shutil

    src = build_tiny_checkpoint(cache=True)
    only_cfg = tmp_path / "only_config"
    only_cfg.mkdir()
    shutil.copy(src / "config.json", only_cfg / "config.json")
    with pytest.raises(FileNotFoundError, match="no model weights"):
        monet.load_model(only_cfg)
    trunc = tmp_path / "truncated"
    shutil.copytree(src, trunc)
    w = trunc / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated: the header promises \d+ bytes but the file has"):
        monet.load_model(trunc)
    w.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="truncated or not a safetensors file"):
        monet.load_model(trunc)
    no_proc = tmp_path / "no_processor"
    no_proc.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, no_proc / f)
    with pytest.raises(ValueError, match="cannot load the processor/tokenizer files"):
        monet.load_model(no_proc)
