"""HF-path latent decoding throughput: monet.generate vs plain decoding vs the naive reference.

Small preset (hidden 512, 8 layers), fp32, CPU (``--bench-device cuda``: GPU). Every request
decodes exactly ``STEPS`` tokens (EOS disabled by logit bias) so runs are comparable step for step:

* ``latent``: spans back to back (prompt ends with START, START forced by a huge logit bias
  whenever text is sampled): START, 8 PADs, END, START, ... — 80% of the steps feed a hidden state back.
* ``plain``:  the same requests and step count with START banned: ordinary decoding.
* ``naive``:  tests/latent_reference.py (full recompute per step, one request at a time).

Goals (issue 3): naive/latent >= 20 at batch 8; a latent step <= 1.05x a plain step, i.e.
plain/latent >= 0.952.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import monet
from monet.model.decoding import eos_token_ids
from monet.testing import build_tiny_checkpoint, synthetic_image
from report import Goal, time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from latent_reference import naive_latent_decode  # noqa: E402

STEPS = 40
K = 8


@pytest.fixture(scope="module")
def small(bench_device):
    return monet.load_model(build_tiny_checkpoint(preset="small", cache=True), dtype="float32", device=bench_device)


def requests(batch: int, latent: bool):
    return [monet.LatentRequest(prompt=f"Describe picture {i} briefly.", images=[synthetic_image(i)], force_latent=latent)
            for i in range(batch)]


def _report(bench_report, device):
    return bench_report(
        "hf_decode", baseline="latent", others=("plain", "naive"),
        goals=(Goal("monet.generate >= 20x the naive reference at batch 8", "naive/latent", 20.0,
                    lambda c: c.params.get("batch") == 8),
               Goal("a latent step costs <= 1.05x a plain step", "plain/latent", 1 / 1.05)),
        note=f"{STEPS} decode steps per request, small preset, fp32, {device.type}; times are per generate call")


@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("impl", ["latent", "plain", "naive"])
def test_hf_decode(benchmark, bench_report, bench_device, small, impl, batch):
    model, processor = small
    if impl == "naive" and batch > 8:
        pytest.skip("naive reference only at batch <= 8 (it recomputes the whole sequence per step)")
    ids = model.monet_config.token_ids
    no_eos = {e: -1e9 for e in eos_token_ids(model, processor.tokenizer)}
    reqs = requests(batch, latent=impl != "plain")
    if impl == "naive":
        def fn():
            for r in reqs:
                naive_latent_decode(model, processor, r, latent_size=K, layout="standard", max_new_tokens=STEPS,
                                    eos_ids=[], logit_bias={**no_eos, ids.start: 1e9})
    else:
        bias = {**no_eos, ids.start: 1e9 if impl == "latent" else -1e9}

        def fn():
            outs = monet.generate(model, processor, reqs, max_new_tokens=STEPS, latent_size=K, logit_bias=bias)
            assert all(len(o.token_ids) == STEPS for o in outs)
            assert all((len(o.latent_positions) >= K * (STEPS // (K + 2))) == (impl == "latent") for o in outs)
    benchmark.pedantic(fn, rounds=1 if impl == "naive" else 3, warmup_rounds=0 if impl == "naive" else 1)
    _report(bench_report, bench_device).record(f"batch={batch}", impl, benchmark.stats.stats.median,
                                 min_s=benchmark.stats.stats.min, op="generate", params={"batch": batch})


@pytest.mark.parametrize("batch", [1, 8])
def test_latent_vs_plain_interleaved(benchmark, bench_report, small, batch):
    """Latent and plain decoding alternated round by round, so machine drift hits both equally."""
    model, processor = small
    ids = model.monet_config.token_ids
    no_eos = {e: -1e9 for e in eos_token_ids(model, processor.tokenizer)}
    runs = {}
    for impl, sign in (("latent", 1e9), ("plain", -1e9)):
        reqs = requests(batch, latent=impl == "latent")
        bias = {**no_eos, ids.start: sign}
        runs[impl] = (lambda reqs=reqs, bias=bias: monet.generate(model, processor, reqs, max_new_tokens=STEPS,
                                                                  latent_size=K, logit_bias=bias))
    times = time_interleaved(runs)
    benchmark.pedantic(runs["latent"], rounds=1, warmup_rounds=0)
    bench_report("hf_decode_interleaved", baseline="latent", others=("plain",),
                 goals=(Goal("a latent step costs <= 1.05x a plain step", "plain/latent", 1 / 1.05),),
                 note=f"{STEPS} steps, latent and plain alternated 5 rounds; medians per generate call",
                 ).record_times(f"batch={batch}", times, op="generate", params={"batch": batch})
