"""vLLM latent decoding throughput: latent-heavy batches vs plain decoding in the same engine, and vs
the HF path (monet.generate).

Small preset (hidden 512, 8 layers), fp32, one vLLM engine (V1 CPU runner with the Monet latent
worker), batch 1 / 16 / 64. Every request decodes exactly ``STEPS`` tokens (EOS banned by logit bias)
so runs compare step for step:

* ``latent``: spans back to back (prompt ends with START, START forced whenever text is sampled):
  START, 8 PADs, END, START, ... — 80% of the steps take a latent input;
* ``plain``: the same requests with START banned (the prompt does not end with START): ordinary
  decoding in the same engine (the latent hooks still run; no request is in a span);
* ``hf``: monet.generate with the ``latent`` settings on the same checkpoint.

Both paths get the same cores: the vLLM engine uses every core it may run on (engine-core and
front-end processes), so the HF path runs with as many torch threads as there are such cores (not
the benchmarks' default of 1); ``cpu_per_wall_<impl>`` in the JSON records the CPU seconds per
second each one used. Times are per generate call (prefill included, same for every implementation). Ratios:
``plain/latent`` (>= ~0.95 means a latent step costs about a plain step) and ``hf/latent`` (speed-up
of the vLLM path). Run: ``pytest benchmarks/bench_vllm_decode.py`` (JSON in benchmarks/results/).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import pytest
import torch

import monet
from monet.model.decoding import eos_token_ids
from monet.testing import build_tiny_checkpoint, synthetic_image
from report import Goal, time_interleaved

pytest.importorskip("vllm")

STEPS = 32
K = 8
BATCHES = (1, 16, 64)


@pytest.fixture(scope="module")
def path():
    return build_tiny_checkpoint(preset="small", cache=True)


@pytest.fixture(scope="module")
def engine(path):
    from monet.vllm import LatentLLM

    llm = LatentLLM(path, latent_size=K, dtype="float32", max_model_len=512, enforce_eager=True,
                    limit_mm_per_prompt={"image": 1}, kv_cache_memory_bytes=2 << 30, max_num_seqs=max(BATCHES),
                    max_num_batched_tokens=8192, enable_prefix_caching=False)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def hf(path):
    return monet.load_model(path, dtype="float32")


def requests(batch: int, latent: bool):
    return [monet.LatentRequest(prompt=f"Describe picture {i} briefly.", images=[synthetic_image(i)],
                                force_latent=latent) for i in range(batch)]


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


def cpu_per_wall(fn) -> float:
    """CPU seconds per wall second that this process and its children (the engine) spend in ``fn()``."""
    import psutil  # a vLLM dependency

    tree = [psutil.Process()] + psutil.Process().children(recursive=True)

    def cpu() -> float:
        return sum(t.user + t.system for t in (p.cpu_times() for p in tree))

    c0, t0 = cpu(), time.perf_counter()
    fn()
    return (cpu() - c0) / (time.perf_counter() - t0)


def _report(bench_report):
    return bench_report(
        "vllm_decode", baseline="latent", others=("plain", "hf"),
        goals=(Goal("a latent step costs <= 1.05x a plain step in the same engine", "plain/latent", 1 / 1.05),
               Goal("vLLM path >= 3x monet.generate at batch 16 (issue goal)", "hf/latent", 3.0,
                    lambda c: c.params.get("batch") == 16)),
        note=f"{STEPS} decode steps per request, K={K}, small preset, fp32, CPU (vLLM CPU V1 runner); "
             f"times are per generate call, prefill included; HF path with {_cores()} torch threads "
             f"(the cores the engine uses)")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", ["latent", "plain", "hf"])
def test_vllm_decode(benchmark, bench_report, engine, hf, impl, batch):
    model, processor = hf
    ids = model.monet_config.token_ids
    no_eos = {e: -1e9 for e in eos_token_ids(model, processor.tokenizer)}
    latent = impl != "plain"
    reqs = requests(batch, latent)
    bias = {**no_eos, ids.start: 1e9 if latent else -1e9}
    kw = dict(max_new_tokens=STEPS, latent_size=K, logit_bias=bias)

    if impl == "hf":
        def fn():
            outs = monet.generate(model, processor, reqs, **kw)
            assert all(len(o.token_ids) == STEPS for o in outs)
    else:
        def fn():
            outs = engine.generate(reqs, **kw)
            assert all(len(o.token_ids) == STEPS for o in outs)
            assert all((len(o.latent_positions) >= K * (STEPS // (K + 2))) == latent for o in outs)

    rounds = 1 if impl == "hf" and batch == max(BATCHES) else 3
    with torch_threads(_cores() if impl == "hf" else torch.get_num_threads()):
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
        usage = cpu_per_wall(fn)
    _report(bench_report).record(f"batch={batch}", impl, benchmark.stats.stats.median,
                                 min_s=benchmark.stats.stats.min, op="generate",
                                 params={"batch": batch, f"cpu_per_wall_{impl}": round(usage, 2)})


@pytest.mark.parametrize("batch", [1, 16])
def test_vllm_latent_vs_plain_interleaved(benchmark, bench_report, engine, hf, batch):
    """Latent and plain decoding in the same engine alternated round by round (drift hits both)."""
    model, processor = hf
    ids = model.monet_config.token_ids
    no_eos = {e: -1e9 for e in eos_token_ids(model, processor.tokenizer)}
    runs = {}
    for impl, sign in (("latent", 1e9), ("plain", -1e9)):
        reqs = requests(batch, impl == "latent")
        kw = dict(max_new_tokens=STEPS, latent_size=K, logit_bias={**no_eos, ids.start: sign})
        runs[impl] = lambda reqs=reqs, kw=kw: engine.generate(reqs, **kw)
    times = time_interleaved(runs)
    benchmark.pedantic(runs["latent"], rounds=1, warmup_rounds=0)
    bench_report("vllm_decode_interleaved", baseline="latent", others=("plain",),
                 goals=(Goal("latent decoding within 3% of plain decoding", "plain/latent", 0.97),),
                 note=f"{STEPS} steps, same engine, latent and plain alternated 5 rounds; medians per call",
                 ).record_times(f"batch={batch}", times, op="generate", params={"batch": batch})
