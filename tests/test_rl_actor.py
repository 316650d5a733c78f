"""The VLPO actor update (monet.rl.actor): one process, plain data parallel and DeepSpeed ZeRO-3
under torchrun (2 CPU processes) on one fixed batch of HF rollouts end at the same weights; the
batch file format and the sharing rules refuse bad input with clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import monet
from monet.layout import SpanLayout
from monet.model.sampling import SamplingParams
from monet.rl.actor import load_actor_batch, main, micro_batches, micro_batches_per_step, rank_share, \
    save_actor_batch
from monet.rl.advantages import grpo_advantages_by_group
from monet.rl.data import load_rl_parquet, synthesize_rl_split
from monet.rl.rollout import HFRolloutEngine, generate_rollouts
from monet.rl.run_config import VLPORunConfig
from monet.testing import build_tiny_checkpoint
from monet.train.distributed import DistInfo

LR = 1e-3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A fixed training batch: 2 prompts x 4 HF rollouts (each opening with a latent span, latents
    perturbed by exploration noise so z != mu), rewards 1/0 alternating (non-zero advantages), in
    micro-batches of 2, saved with save_actor_batch; and the run config of the updates."""
    root = tmp_path_factory.mktemp("actor")
    ckpt = build_tiny_checkpoint(cache=True)
    model, processor = monet.load_model(ckpt, dtype="float32")
    data = synthesize_rl_split(root / "rl.parquet", 4, seed=2)
    prompts = [e.prompt(force_latent=True) for e in load_rl_parquet(data)[0][:2]]
    c = model.config  # no generated vision tokens: ZeRO-3 needs every rank to make the same module calls
    no_vision = {t: -100.0 for t in (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id)}
    sampling = SamplingParams(max_new_tokens=10, temperature=1.0, seed=11,
                              logit_bias={**no_vision, processor.tokenizer.convert_tokens_to_ids("<|im_end|>"): 3.0})
    encoded: dict = {}
    rnd = generate_rollouts(HFRolloutEngine(model, processor), processor, prompts, n=4, sampling=sampling,
                            latent_noise=0.5, run_seed=0, round_index=0, latent_size=2, layout="standard",
                            encoded=encoded)
    rollouts = [r for g in rnd.groups for r in g]
    assert all(r.num_latents >= 2 for r in rollouts)
    adv = grpo_advantages_by_group(torch.tensor([1.0, 0.0, 1.0, 0.0] * 2, dtype=torch.float64),
                                   torch.tensor([0] * 4 + [1] * 4)).float()
    layout = SpanLayout(2, "standard")
    micros = micro_batches(rollouts, adv, encoded, micro_batch_size=2, pad_id=processor.tokenizer.pad_token_id or 0,
                           hidden_size=model.config.get_text_config().hidden_size, layout=layout,
                           token_ids=model.monet_config.token_ids, device="cpu", dtype=torch.float32)
    save_actor_batch(root / "batch", micros)
    cfg = VLPORunConfig(model=str(ckpt), data=[str(data)], output_dir=str(root / "unused"), engine="hf",
                        vlpo=dict(n=4, groups_per_batch=2, temperature=1.0, latent_noise=0.5, sigma=10.0, kl_coef=0.05),
                        micro_batch_size=2, mini_batches=1, ppo_epochs=2, lr=LR, dtype="float32", latent_size=2,
                        layout="standard", max_grad_norm=1.0)
    (root / "vlpo.yaml").write_text(cfg.to_yaml())
    return root, ckpt, micros


def _weights(path):
    return {n: p.detach().clone() for n, p in monet.load_model(path, dtype="float32")[0].named_parameters()}


def _torchrun(root, port, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "monet.rl.actor", "--config", str(root / "vlpo.yaml"), "--batch", str(root / "batch"),
           "--out", str(out), *extra]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]


def test_batch_file_roundtrip_and_errors(setup, tmp_path):
    root, _, micros = setup
    loaded = load_actor_batch(root / "batch")
    assert len(loaded) == len(micros) == 4
    for (b, adv), m in zip(loaded, micros):
        assert torch.equal(b.input_ids, m.batch.input_ids) and torch.equal(adv, m.advantages)
        assert torch.equal(b.pixel_values, m.batch.pixel_values)
        assert all(torch.equal(z, y) for z, y in zip(b.latents, m.batch.latents))
    with pytest.raises(FileNotFoundError, match="actor_batch.json not found"):
        load_actor_batch(tmp_path)
    from safetensors.torch import load_file, save_file

    (tmp_path / "actor_batch.json").write_text((root / "batch" / "actor_batch.json").read_text())
    t = load_file(str(root / "batch" / "actor_batch.safetensors"))
    del t["m2.advantages"]
    save_file(t, str(tmp_path / "actor_batch.safetensors"))
    with pytest.raises(ValueError, match=r"micro-batch 2 lacks \['advantages'\]"):
        load_actor_batch(tmp_path)


def test_rank_shares_and_deepspeed_accumulation_rules():
    # 5 micro-batches in 2 mini-batches (3 + 2): one process takes all of them in order
    assert rank_share(5, 2, DistInfo()) == [[0, 1, 2], [3, 4]]
    assert rank_share(8, 2, DistInfo(1, 2)) == [[1, 3], [5, 7]]
    with pytest.raises(ValueError, match="mini-batch 1 of the training batch has 3 micro-batches, which 2 ranks"):
        rank_share(5, 2, DistInfo(0, 2))
    cfg = VLPORunConfig(model="m", data=["d"], vlpo=dict(n=4, groups_per_batch=3), micro_batch_size=2, mini_batches=1)
    assert micro_batches_per_step(cfg, 2) == 3
    with pytest.raises(ValueError, match="6 micro-batches, not divisible by mini_batches"):
        micro_batches_per_step(cfg, 4)


def test_run_config_deepspeed_field(tmp_path):
    (tmp_path / "v.yaml").write_text("model: m\ndata: [d.parquet]\ndeepspeed: ds/zero3.json\n")
    cfg = VLPORunConfig.from_yaml(tmp_path / "v.yaml")
    assert cfg.deepspeed == str(tmp_path / "ds" / "zero3.json")  # relative to the YAML, like SFT's
    with pytest.raises(ValueError, match="deepspeed with dtype float16"):
        VLPORunConfig(model="m", data=["d"], deepspeed="z.json", dtype="float16")
    from monet.rl.trainer import VLPOTrainer

    with pytest.raises(ValueError, match="DeepSpeed runs the actor in a process group, which the single-process"):
        VLPOTrainer(VLPORunConfig(model="m", data=["d"], deepspeed="z.json", output_dir=str(tmp_path / "o")),
                    printer=None, lock=False)


def test_one_process_plain_data_parallel_and_zero3_agree(setup, tmp_path):
    """Two optimiser steps (ppo_epochs=2; each accumulates 4 micro-batches: 2 per rank) with the
    KL term and live latent terms: one process, torchrun x2 plain data parallel, torchrun x2
    DeepSpeed ZeRO-3 with every parameter partitioned and ZeRO-2 reach the same weights and metrics."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by scripts/setup_env.sh (train extra)")
    root, ckpt, _ = setup
    repo = Path(__file__).resolve().parents[1]
    zero3 = json.loads((repo / "scripts" / "deepspeed" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny tensors
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))

    assert main(["--config", str(root / "vlpo.yaml"), "--batch", str(root / "batch"), "--out",
                 str(tmp_path / "one")]) == 0
    assert main(["--config", str(root / "vlpo.yaml"), "--batch", str(root / "batch"), "--out",
                 str(tmp_path / "no_latent"), "--set", "vlpo.latent_weight=0"]) == 0
    _torchrun(root, 29531, tmp_path / "plain")
    _torchrun(root, 29533, tmp_path / "zero3", "--set", f"deepspeed={tmp_path / 'zero3.json'}")
    _torchrun(root, 29535, tmp_path / "zero2", "--set", f"deepspeed={repo / 'scripts' / 'deepspeed' / 'zero2.json'}")

    start = _weights(ckpt)
    runs = {name: _weights(tmp_path / name) for name in ("one", "plain", "zero3", "zero2", "no_latent")}
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in runs}
    assert [metrics[n]["world_size"] for n in ("one", "plain", "zero3", "zero2")] == [1, 2, 2, 2]
    changed = [n for n in start if not torch.equal(runs["one"][n], start[n])]
    assert any("language_model" in n for n in changed) and not any("visual" in n for n in changed)
    for name in ("plain", "zero3", "zero2"):
        for n in start:
            # summation order differs (over ranks; DeepSpeed reduce-scatters per micro-batch): ~1e-7
            # relative in a gradient; Adam moves an element whose gradient is near its eps by a
            # visible fraction of lr, so the tolerance is lr / 100 (a step moves weights by ~lr)
            torch.testing.assert_close(runs[name][n], runs["one"][n], rtol=1e-4, atol=LR / 100, msg=f"{name}: {n}")
        ours, ref = metrics[name]["updates"][0], metrics["one"]["updates"][0]
        for k in ("loss", "text/loss", "latent/loss", "latent/abs_term_mean", "text/kl", "latent/share"):
            assert ours[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-7), (name, k)
        # global counts: all-reduced over the ranks' shares
        assert ours["batch/n_latent"] == ref["batch/n_latent"] and ours["batch/n_text"] == ref["batch/n_text"]
        assert ours["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
    m = metrics["one"]["updates"][0]
    assert m["batch/n_latent"] >= 16 and m["latent/abs_term_mean"] > 0 and m["text/kl"] > 0
    # the latent term moves the weights: without it (latent_weight 0) they end elsewhere
    assert max(float((runs["no_latent"][n] - runs["one"][n]).abs().max()) for n in start) > LR / 10
