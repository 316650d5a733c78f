"""``monet eval`` throughput: samples per second on the synthetic split, vLLM vs HF, and the cost of
collecting latents.

Small preset (hidden 512, 8 layers), fp32, the synthetic eval split (``monet data synth``), spans
forced at the start of every answer (``force_latent``), ``STEPS`` new tokens per answer with EOS
banned so every engine decodes the same number of steps:

* ``eval_throughput``: one pass of :func:`monet.eval.harness.run_samples` (prompting, generation
  with ``return_latents=True``, scoring, records and latents written) over ``N`` samples in batches
  of ``BATCH``; ``vllm`` (baseline) and ``hf``. Ratio ``hf/vllm`` = speed-up of the vLLM engine;
  ``samples_per_s_<impl>`` in the case params.
* ``eval_latent_overhead``: the same engine's ``generate`` on one batch with ``return_latents=True``
  (baseline ``latents``) and ``False`` (``no_latents``), alternated round by round (drift hits both).
  Goal: collecting latents costs <= 5%, i.e. ``no_latents/latents >= 1/1.05``.

The vLLM engine and the HF path get the same cores (the HF path runs with as many torch threads as
the process may use). Run: ``pytest benchmarks/bench_eval.py`` (JSON in benchmarks/results/);
``--bench-device cuda`` puts the HF model on the GPU.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from monet.data.synth import synthesize_dataset
from monet.eval.engine import HFEvalEngine, vllm_available
from monet.eval.harness import EvalSettings, load_samples, run_samples
from monet.eval.prompts import build_messages
from monet.layout import SpanLayout
from monet.model.decoding import eos_token_ids
from monet.scoring import Scorer
from monet.testing import build_tiny_checkpoint
from report import Goal, time_interleaved

N = 16
BATCH = 8
STEPS = 24
K = 4


@pytest.fixture(scope="module")
def path():
    return build_tiny_checkpoint(preset="small", cache=True)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = synthesize_dataset(tmp_path_factory.mktemp("synth"), 0, N, seed=0).root
    return load_samples("synth", root).samples


@pytest.fixture(scope="module")
def engines(path, bench_device):
    import monet

    model, processor = monet.load_model(path, dtype="float32", device=bench_device)
    out = {"hf": HFEvalEngine(str(path), model=model, processor=processor)}
    if vllm_available():
        from monet.eval.engine import VllmEvalEngine

        out["vllm"] = VllmEvalEngine(str(path), dtype="float32", max_new_tokens=STEPS, seed=0,
                                     engine_kwargs=dict(max_model_len=1024, max_num_seqs=BATCH,
                                                        kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False))
    yield out
    for e in out.values():
        e.close()


def _cores() -> int:
    return len(os.sched_getaffinity(0))


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _no_eos(engine) -> dict[int, float]:
    tok = engine.processor.tokenizer
    model = getattr(engine, "model", None)
    eos = eos_token_ids(model, tok) if model is not None else [tok.eos_token_id]
    return {int(e): -1e9 for e in eos}


def _settings(out: str) -> EvalSettings:
    return EvalSettings(model="", benchmarks=("synth",), data=("-",), out=out, latent_sizes=(K,), force_latent=True,
                        batch_size=BATCH, max_new_tokens=STEPS, progress=False)


@pytest.mark.parametrize("impl", ["vllm", "hf"])
def test_eval_throughput(benchmark, bench_report, engines, samples, impl):
    if impl not in engines:
        pytest.skip("vllm is not installed")
    engine = engines[impl]
    settings = _settings("")
    span = SpanLayout(K, "standard")
    bias = _no_eos(engines["hf"])
    gen = engine.generate

    def generate_no_eos(reqs, sampling, **kw):  # every answer decodes exactly STEPS tokens
        import dataclasses

        return gen(reqs, dataclasses.replace(sampling, logit_bias=bias), **kw)

    class Fixed:
        name, generate = engine.name, staticmethod(generate_no_eos)

    def once():
        d = tempfile.mkdtemp(prefix="bench_eval_")
        try:
            run_samples(Fixed, samples, Path(d), name=impl, span=span, settings=settings, scorer=Scorer(),
                        fingerprint={"bench": impl})
        finally:
            shutil.rmtree(d, ignore_errors=True)

    with torch_threads(_cores() if impl == "hf" else torch.get_num_threads()):
        benchmark.pedantic(once, rounds=2, warmup_rounds=1)
    med = benchmark.stats.stats.median
    bench_report("eval_throughput", baseline="vllm", others=("hf",),
                 note=f"run_samples over {N} synthetic samples, batch {BATCH}, K={K}, {STEPS} tokens per answer "
                      f"(EOS banned, span forced), small preset, fp32; times per pass").record(
        f"N={N}", impl, med, min_s=benchmark.stats.stats.min, op="run_samples",
        params={f"samples_per_s_{impl}": round(N / med, 2)})


@pytest.mark.parametrize("impl", ["vllm", "hf"])
def test_latent_collection_overhead(benchmark, bench_report, engines, samples, impl):
    if impl not in engines:
        pytest.skip("vllm is not installed")
    engine = engines[impl]
    settings = _settings("")
    sampling = settings.sampling()
    import dataclasses

    sampling = dataclasses.replace(sampling, logit_bias=_no_eos(engines["hf"]))
    span = SpanLayout(K, "standard")
    reqs = [{"messages": build_messages(s, settings.prompt_config()), "force_latent": True} for s in samples[:BATCH]]
    runs = {name: (lambda flag=flag: engine.generate(reqs, sampling, layout=span, return_latents=flag))
            for name, flag in (("latents", True), ("no_latents", False))}
    with torch_threads(_cores() if impl == "hf" else torch.get_num_threads()):
        t0 = time.perf_counter()
        times = time_interleaved(runs, rounds=5)
        benchmark.extra_info["wall_s"] = time.perf_counter() - t0
    benchmark.pedantic(runs["latents"], rounds=1, warmup_rounds=0)
    bench_report("eval_latent_overhead", baseline="latents", others=("no_latents",),
                 goals=(Goal("collecting latents costs <= 5% (return_latents True vs False)", "no_latents/latents",
                             1 / 1.05),),
                 note=f"engine.generate on {BATCH} synthetic samples, K={K}, {STEPS} tokens, alternated 5 rounds; "
                      "medians per call").record_times(impl, times, op="generate", params={"batch": BATCH})
