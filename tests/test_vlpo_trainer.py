"""VLPO trainer on the tiny model with HF rollouts (``monet.generate``): replay of rollouts,
training steps, checkpoints, exact resume, export."""

from __future__ import annotations

import json
import math

import pytest
import torch

import monet
from monet.model.sampling import SamplingParams
from monet.rl import action_masks, policy_logprobs
from monet.rl.batch import collate_rollouts
from monet.rl.checkpoint import export_policy, latest_checkpoint
from monet.rl.data import load_rl_parquet, synthesize_rl_split
from monet.rl.rollout import HFRolloutEngine, encode_prompt, generate_rollouts
from monet.rl.run_config import VLPORunConfig
from monet.rl.trainer import VLPOTrainer
from monet.testing import build_tiny_checkpoint
from run_kill import sigkill_at_checkpoint

START_BIAS = 4.5


@pytest.fixture(scope="module")
def ckpt():
    return build_tiny_checkpoint(cache=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthesize_rl_split(tmp_path_factory.mktemp("rl") / "rl.parquet", 6, seed=1)


def run_config(ckpt, data, out, **kw) -> VLPORunConfig:
    base = dict(model=str(ckpt), data=[str(data)], output_dir=str(out), engine="hf",
                vlpo=dict(n=3, temperature=1.0, latent_noise=1.0, groups_per_batch=2, buffer_groups=6, sigma=10.0,
                          length_penalty=dict(max_tokens=10, buffer=8)),
                steps=2, prompts_per_rollout=3, difficulty_filter=False, max_response_tokens=10, latent_size=2,
                force_latent=True, logit_bias={"<|im_end|>": 4.0}, micro_batch_size=4, lr=1e-3, dtype="float32",
                seed=5)
    base.update(kw)
    return VLPORunConfig(**base)


@pytest.mark.parametrize("noise", [0.0, 0.7])
def test_teacher_forced_pass_replays_rollouts(ckpt, data, noise):
    """The trainer's rebuilt prompt + response puts the latents exactly where the rollout fed them,
    and its mu there is the decoder's hidden state: z == mu without noise, z - mu ~ noise * N(0, I)."""
    model, processor = monet.load_model(ckpt, dtype="float32")
    ids = model.monet_config.token_ids
    examples, _ = load_rl_parquet(data)
    prompts = [e.prompt(force_latent=(i % 2 == 0)) for i, e in enumerate(examples[:3])]
    # image-pad / vision-start biased too: generated vision tokens are text to the decoder
    vision = {model.config.image_token_id: 3.0, model.config.vision_start_token_id: 2.0}
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3, logit_bias={ids.start: START_BIAS, **vision})
    encoded = {}
    rnd = generate_rollouts(HFRolloutEngine(model, processor), processor, prompts, n=2, sampling=sampling,
                            latent_noise=noise, run_seed=0, round_index=0, latent_size=3, layout="standard",
                            encoded=encoded)
    rollouts = [r for g in rnd.groups for r in g]
    assert sum(r.num_latents for r in rollouts) >= 2 * 3  # spans opened
    assert any(r.latent_positions and r.latent_positions[0] > 1 for r in rollouts)  # a span opened mid-answer
    assert [r.forced_first_start for r in rollouts] == [True, True, False, False, True, True]
    assert sum(t in vision for r in rollouts for t in r.response_ids) >= 2
    batch = collate_rollouts(rollouts, encoded, pad_id=processor.tokenizer.pad_token_id, hidden_size=128)
    layout = monet.SpanLayout(3, "standard")
    masks = action_masks(batch.input_ids, batch.attention_mask, batch.response_start, layout=layout, token_ids=ids,
                         forced_first_start=batch.forced_first_start)
    for b, r in enumerate(rollouts):
        got = (masks.latent[b].nonzero().flatten() - len(r.prompt_ids)).tolist()
        assert got == r.latent_positions, b
        assert r.prompt_ids == encode_prompt(processor, prompts[b // 2].request).input_ids
    with torch.no_grad():
        s = policy_logprobs(model, batch, layout=layout, token_ids=ids, temperature=1.0, sigma=10.0, masks=masks)
    diff = s.z - s.mu
    if noise == 0:
        torch.testing.assert_close(s.z, s.mu, rtol=1e-4, atol=1e-4)
    else:
        rms = float(diff.pow(2).mean().sqrt())
        assert abs(rms - noise) < 0.15 * noise, rms  # ~N(0, noise^2) per coordinate
        # each rollout has its own noise: no two rollouts' first latents share their perturbation
        firsts = [d for d in torch.split(diff, [r.num_latents for r in rollouts]) if len(d)]
        assert min(float((a[0] - b[0]).abs().max()) for i, a in enumerate(firsts) for b in firsts[i + 1:]) > 0.1


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("time/", "sync/")) and k != "rollout/tokens_per_s"}


def test_training_steps_ray_controller_resume_and_export(ckpt, data, tmp_path):
    """Two steps with the Ray controller (rollout and trainer actors) and the same two steps in one
    process, interrupted after step 1 and resumed: the same metrics and weights (HF rollouts are
    seeded per round; floats to 1e-4 relative); the steps train (weights move, latent term live), metrics are strict JSON,
    and the exported policy loads."""
    from monet.rl.controller import run_vlpo_ray

    w0 = {n: p.detach().clone() for n, p in monet.load_model(ckpt, dtype="float32")[0].named_parameters()}
    rows_a = run_vlpo_ray(run_config(ckpt, data, tmp_path / "a"), printer=None)
    assert [r["trained"] for r in rows_a] == [1, 1]
    for r in rows_a:
        assert r["batch/n_latent"] > 0 and r["rollout/latent_span_rate"] == 1.0
        assert r["latent/abs_term_mean"] > 0  # exploration noise: z != mu, the latent term is live
        assert r["reward/std"] > 0 and r["batch/adv_abs_mean"] > 0
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert r["sync/bytes"] > 0
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert "NaN" not in "".join(lines) and "Infinity" not in "".join(lines)  # strict JSON
    wa = dict(monet.load_model(latest_checkpoint(tmp_path / "a"), dtype="float32")[0].named_parameters())
    changed = [n for n in w0 if not torch.equal(w0[n], wa[n])]
    assert any("language_model" in n for n in changed)
    assert not any("visual" in n for n in changed)  # frozen vision tower

    # one process, interrupted after step 1, then resumed; one intra-op thread like the Ray actors
    # (fractional CPUs), so that float reductions run in (nearly) the same order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = VLPOTrainer(run_config(ckpt, data, tmp_path / "b"), printer=None)
        b.train(steps=1)
        b.save()
        assert len(b.waiting) == 1  # one kept group waits in the buffer across the checkpoint
        b.close()
        b2 = VLPOTrainer(run_config(ckpt, data, tmp_path / "b"), resume=True, printer=None)
        assert b2.step_count == 1
        b2.train()
        wb = {n: p.detach().clone() for n, p in b2.policy.named_parameters()}
        b2.close()
    finally:
        torch.set_num_threads(threads)
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2]
    # Ray actors and this process may still reduce in different orders (thread pools are set up by
    # different runtimes): metrics and weights agree to float tolerance, the rest exactly.
    for rb, ra in zip(rows_b, [json.loads(x) for x in lines]):
        rb, ra = _strip(rb), _strip(ra)
        assert rb.keys() == ra.keys()
        for k in ra:
            if isinstance(ra[k], float) and isinstance(rb[k], float):
                assert math.isclose(rb[k], ra[k], rel_tol=1e-4, abs_tol=1e-6), (k, rb[k], ra[k])
            else:
                assert rb[k] == ra[k], k
    # Adam normalises every element's update to about lr, so an element whose gradient is tiny turns
    # reduction-order noise into update noise (seen on zero-initialised k_proj biases): compare each
    # tensor's *update* from w0, to 1% of one step (lr) per element
    lr = run_config(ckpt, data, tmp_path / "a").lr
    for n in wa:
        torch.testing.assert_close(wb[n] - w0[n], wa[n].detach() - w0[n], rtol=1e-3, atol=1e-2 * lr, msg=n)

    # export: a plain model directory for monet.load_model
    last = latest_checkpoint(tmp_path / "b")
    assert last.name == "checkpoint-2"
    exported = export_policy(last, tmp_path / "policy")
    assert not (exported / "vlpo_state.json").exists()
    model, _ = monet.load_model(exported, dtype="float32")
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), wb[n]), n


def test_nonfinite_gradient_skips_the_update_and_run_lock(ckpt, data, tmp_path):
    from monet.rl.checkpoint import RunBusy

    cfg = run_config(ckpt, data, tmp_path / "c", prompts_per_rollout=2,
                     vlpo=dict(n=2, temperature=1.0, latent_noise=1.0, groups_per_batch=2, buffer_groups=2,
                               length_penalty=dict(max_tokens=10, buffer=8)))
    t = VLPOTrainer(cfg, printer=None)
    try:
        with pytest.raises(RunBusy, match="another VLPO run"):
            VLPOTrainer(cfg, printer=None)
        w0 = {n: p.detach().clone() for n, p in t.policy.named_parameters()}
        p = t.policy.get_input_embeddings().weight
        hook = p.register_hook(lambda g: g * float("nan"))  # poison one gradient
        row = t.step()
        hook.remove()
        assert row["trained"] == 1 and math.isnan(row["grad_norm"]) and row["count/skipped_nonfinite"] == 1
        for n, q in t.policy.named_parameters():
            assert torch.equal(q.detach(), w0[n]), n  # no parameter moved, none became NaN
        assert not t.optimizer.state  # AdamW never stepped
        assert all(q.grad is None for q in t.params)
    finally:
        t.close()


def test_cli_synth_rl_vlpo_and_export(ckpt, tmp_path, capsys):
    import subprocess
    import sys
    from pathlib import Path

    from monet.cli import main

    rl = tmp_path / "rl.parquet"
    assert main(["data", "synth", "--rl", str(rl), "--n", "3", "--seed", "4"]) == 0
    assert load_rl_parquet(rl)[1].loaded == 3
    cfg = tmp_path / "vlpo.yaml"
    cfg.write_text(f"model: {ckpt}\ndata: [rl.parquet]\noutput_dir: run\nengine: hf\ndtype: float32\n"
                   "vlpo: {n: 2, groups_per_batch: 1, buffer_groups: 2}\n")
    sets = ["--set", "steps=1", "--set", "prompts_per_rollout=1", "--set", "max_response_tokens=6",
            "--set", "difficulty_filter=false", "--set", "latent_size=2", "--set", "force_latent=true",
            "--set", "vlpo.temperature=1.0", "--set", "vlpo.length_penalty={max_tokens: 6, buffer: 5}",
            "--set", "logit_bias={'<|im_end|>': 4.0}"]
    assert main(["vlpo", "--config", str(cfg), *sets]) == 0
    run = tmp_path / "run"
    assert (run / "checkpoint-1" / "vlpo_state.json").is_file() and (run / "latest").read_text().strip() == "checkpoint-1"
    assert main(["vlpo", "--export", str(run / "checkpoint-1"), str(tmp_path / "policy")]) == 0
    assert (tmp_path / "policy" / "config.json").is_file()
    assert main(["vlpo", "--config", str(cfg), "--set", "vlpo.sigmaa=1"]) == 2
    assert "sigmaa" in capsys.readouterr().err
    # the launch script's dry run prints the paper command
    script = Path(__file__).resolve().parents[1] / "scripts" / "vlpo.sh"
    out = subprocess.run(["bash", str(script), "--dry-run", "--resume"], capture_output=True, text=True,
                         env={"RUNS": str(tmp_path / "runs"), "PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
                         check=True).stdout
    assert "monet.cli vlpo --config" in out and "configs/vlpo.yaml" in out and "--resume" in out
    assert f"model={tmp_path}/runs/stage3/checkpoint-LATEST" in out


def test_sigkill_mid_run_then_resume_repeats_the_uninterrupted_run(ckpt, data, tmp_path):
    """`monet vlpo` killed with SIGKILL (no cleanup, no atexit) after its second checkpoint, then
    rerun with --resume: metrics rows and final weights equal an uninterrupted run's exactly (HF
    rollouts are seeded per round; both runs single-threaded so reductions run in one order). The
    run lock dies with the process, so the resume is not refused."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "vlpo.yaml"
    cfg.write_text(run_config(ckpt, data, "run").to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def cmd(out, *extra):
        return [sys.executable, "-m", "monet.cli", "vlpo", "--config", str(cfg), "--set", f"output_dir={out}",
                "--set", "steps=4", "--set", "save_every=1", "--set", "keep_last=null", *extra]

    straight = subprocess.run(cmd(tmp_path / "straight"), env=env, capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sigkill_at_checkpoint(proc, killed, "checkpoint-2", 900)
    assert latest_checkpoint(killed).name in ("checkpoint-2", "checkpoint-3")  # never a partial one
    resumed = subprocess.run(cmd(killed, "--resume"), env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr

    rows = {name: [_strip(json.loads(x)) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "killed")}
    assert [r["step"] for r in rows["killed"]] == [1, 2, 3, 4]
    assert rows["killed"] == rows["straight"]
    a = monet.load_model(latest_checkpoint(tmp_path / "straight"), dtype="float32")[0].state_dict()
    b = monet.load_model(latest_checkpoint(killed), dtype="float32")[0].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
