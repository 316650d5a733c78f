"""The Ray controller's training actor group (monet.rl.group) on the tiny model with HF rollouts and
real Ray (a local instance, 2 CPUs): 2 training workers, plain data parallel and DeepSpeed ZeRO-3,
against the single-process trainer; the rollout engine's weights against the gathered trainer
weights after every sync; exact resume from a checkpoint written by the group; clear refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import monet
from monet.rl import checkpoint as ckpt_io
from monet.rl.checkpoint import latest_checkpoint
from monet.rl.run_config import VLPORunConfig
from monet.rl.trainer import VLPOTrainer
from test_vlpo_trainer import _strip, ckpt, data, run_config  # noqa: F401  (module fixtures reused)

ray = pytest.importorskip("ray", reason="the Ray controller needs ray (the rl extra)")

LR = 1e-3
# no policy-generated vision tokens: under ZeRO-3 every rank must make the same module calls
# (monet.rl.actor); the same bias in every run here, so one single-process run is the reference
BIAS = {"<|im_end|>": 4.0, "<|image_pad|>": -100.0, "<|video_pad|>": -100.0, "<|vision_start|>": -100.0,
        "<|vision_end|>": -100.0}


def group_config(ckpt, data, out, **kw) -> VLPORunConfig:
    """2 steps, 2 kept groups x 3 rollouts per batch in micro-batches of 4 (two micro-batches: one
    of 4 rollouts on rank 0, one of 2 on rank 1), KL to the reference on, exploration noise on
    (the latent term is live), a checkpoint after every step, the probe after every sync."""
    base = dict(logit_bias=BIAS, save_every=1, keep_last=None, probe_every=1, lr=LR)
    base.update(kw)
    return run_config(ckpt, data, out, **base)


def _weights(path) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in monet.load_model(path, dtype="float32")[0].named_parameters()}


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _assert_rows_close(ours: list[dict], ref: list[dict], rel: float) -> None:
    assert [r["step"] for r in ours] == [r["step"] for r in ref]
    for a, b in zip(ours, ref):
        a, b = _strip(a), _strip(b)
        assert a.keys() == b.keys()
        for k in b:
            if isinstance(b[k], float) and isinstance(a[k], float):
                assert math.isclose(a[k], b[k], rel_tol=rel, abs_tol=1e-6), (a["step"], k, a[k], b[k])
            else:
                assert a[k] == b[k], (a["step"], k)


def _assert_same_run(ours_dir, ref_dir) -> None:
    """Bit for bit: every metrics row (but times) and the final weights."""
    assert [_strip(r) for r in _rows(ours_dir)] == [_strip(r) for r in _rows(ref_dir)]
    a, b = _weights(latest_checkpoint(ours_dir)), _weights(latest_checkpoint(ref_dir))
    for n in b:
        assert torch.equal(a[n], b[n]), n


def _resume_from_step_1(done, out, cfg) -> list[dict]:
    """A run interrupted after its step-1 checkpoint: ``out`` holds exactly what ``done`` held then
    (checkpoint-1, ``latest`` naming it, the metrics rows); resume it to the end with ``cfg``."""
    from monet.rl.controller import run_vlpo_ray

    out.mkdir()
    shutil.copytree(done / "checkpoint-1", out / "checkpoint-1")
    (out / "latest").write_text("checkpoint-1\n")
    (out / "metrics.jsonl").write_text((done / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    return run_vlpo_ray(cfg, resume=True, printer=None)


@pytest.fixture(scope="module")
def reference(ckpt, data, tmp_path_factory):  # noqa: F811
    """The single-process trainer's 2 steps (one intra-op thread, like the fractional-CPU Ray actors)."""
    out = tmp_path_factory.mktemp("group") / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = VLPOTrainer(group_config(ckpt, data, out, probe_every=0), printer=None)
        try:
            t.train()
        finally:
            t.close()
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def plain_run(local_ray, ckpt, data, reference):  # noqa: F811
    from monet.rl.controller import run_vlpo_ray

    out = reference.parent / "plain2"
    rows = run_vlpo_ray(group_config(ckpt, data, out, train_workers=2), printer=None)
    return out, rows


def _check_against_reference(out, rows, reference, ckpt) -> None:  # noqa: F811
    """Metrics rows and final weights of a 2-worker run vs the single-process run.

    Tolerance: the ranks' gradients are summed in another order (rank 0's micro-batch + rank 1's,
    vs one accumulation), ~1e-7 relative in a gradient; AdamW's first steps move a weight by
    ~lr * g / (|g| + eps), so an element whose gradient is near eps moves by a visible fraction of
    lr: weights to lr / 100 absolute, metrics (averages of many terms) to 1e-4 relative. Step 2's
    rollouts come from the updated weights, so a larger difference would also change its samples."""
    assert [r["trained"] for r in rows] == [1, 1]
    _assert_rows_close(_rows(out), _rows(reference), rel=1e-4)
    start, ours, ref = _weights(ckpt), _weights(latest_checkpoint(out)), _weights(latest_checkpoint(reference))
    moved = 0
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-4, atol=LR / 100, msg=n)
        moved += not torch.equal(ref[n], start[n])
    assert moved > 10  # the steps trained (a group that never updated would fail above, not pass here)
    for r in rows:
        assert r["latent/abs_term_mean"] > 0 and r["text/kl"] >= 0 and r["batch/n_latent"] > 0


def test_two_workers_plain_data_parallel_match_one_process(plain_run, reference, ckpt):  # noqa: F811
    out, rows = plain_run
    _check_against_reference(out, rows, reference, ckpt)
    # Not bit for bit in general: Ray starts its workers with one intra-op thread while the reference
    # process may use several, and a matmul's reduction order depends on the thread count (with
    # OMP_NUM_THREADS=1 everywhere the weights were measured bit-identical).
    saved = json.loads((latest_checkpoint(out) / "vlpo_state.json").read_text())["state"]
    assert saved["train_workers"] == 2 and saved["deepspeed"] is None and saved["optimizer"]["state"]


def test_rollout_engine_holds_the_gathered_weights_after_each_sync(plain_run, ckpt, data):  # noqa: F811
    """After every sync both sides decode the probe (a prompt opening with a latent span) greedily:
    the rollout actor's own model copy with the weights it was sent, and rank 0's replica. Same
    tokens and the same latents (fp32 on both sides, the same code: exact). A stale engine (no
    sync) would fail: one step moves the probe's latents by far more than the tolerance (below)."""
    from monet.rl.weight_sync import hf_generate, probe_generations

    out, rows = plain_run
    for r in rows:
        assert r["sync/probe_tokens_match"] == 1.0
        assert r["sync/probe_latent_diff"] <= 1e-6
        assert r["sync/bytes"] > 0
    # the probe's sensitivity: the starting weights vs the weights after step 1
    t = VLPOTrainer(group_config(ckpt, data, out.parent / "probe"), printer=None, lock=False)
    reqs, kw = t.probe_requests(), t.probe_kwargs()
    before = probe_generations(hf_generate(t.policy, t.processor), reqs, **kw)
    after_model = monet.load_model(out / "checkpoint-1", dtype="float32")[0]
    after = probe_generations(hf_generate(after_model, t.processor), reqs, **kw)
    n = min(len(before[0].latents), len(after[0].latents))
    assert n > 0
    assert float((before[0].latents[:n] - after[0].latents[:n]).abs().max()) > 1e-4


def test_resume_with_two_workers_repeats_the_uninterrupted_run(plain_run, ckpt, data, tmp_path):  # noqa: F811
    done, _ = plain_run
    resumed = tmp_path / "resumed"
    rows = _resume_from_step_1(done, resumed, group_config(ckpt, data, resumed, train_workers=2))
    assert [r["step"] for r in rows] == [2]
    _assert_same_run(resumed, done)


@pytest.fixture(scope="module")
def zero3_run(local_ray, ckpt, data, reference):  # noqa: F811
    """2 workers under DeepSpeed ZeRO-3 with every parameter partitioned (persistence threshold 0)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by scripts/setup_env.sh (train extra)")
    from monet.rl.controller import run_vlpo_ray

    root = reference.parent
    repo = Path(__file__).resolve().parents[1]
    zero3 = json.loads((repo / "scripts" / "deepspeed" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "zero3.json").write_text(json.dumps(zero3))
    cfg = dict(train_workers=2, deepspeed=str(root / "zero3.json"))
    out = root / "zero3"
    rows = run_vlpo_ray(group_config(ckpt, data, out, **cfg), printer=None)
    return out, rows, cfg


def test_two_workers_deepspeed_zero3_match_one_process(zero3_run, reference, ckpt):  # noqa: F811
    """The weights sent to the rollout actor after each step and written to the checkpoints are
    gathered from the partitions (the probe agrees with them); the optimiser shards sit inside the
    atomic checkpoint, one per rank."""
    out, rows, _ = zero3_run
    _check_against_reference(out, rows, reference, ckpt)
    for r in rows:
        assert r["sync/probe_tokens_match"] == 1.0 and r["sync/probe_latent_diff"] <= 1e-6
    c1 = out / "checkpoint-1"
    saved = json.loads((c1 / "vlpo_state.json").read_text())["state"]
    assert saved["optimizer"] is None and saved["deepspeed"] == {"world_size": 2, "zero_stage": 3}
    shards = sorted(p.name for p in (c1 / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2, shards
    assert not list(out.glob(".checkpoint-*"))  # no staging folder left behind


def test_deepspeed_zero3_resume_repeats_the_uninterrupted_run(zero3_run, ckpt, data, tmp_path):  # noqa: F811
    """Bit for bit: DeepSpeed restores each rank's fp32 partition and AdamW moments, rank 0 the rest."""
    out, _, cfg = zero3_run
    resumed = tmp_path / "resumed"
    rows = _resume_from_step_1(out, resumed, group_config(ckpt, data, resumed, **cfg))
    assert [r["step"] for r in rows] == [2]
    _assert_same_run(resumed, out)


def test_group_settings_and_checkpoint_kinds_are_checked(ckpt, data, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="train_workers must be an int >= 1"):
        VLPORunConfig(model="m", data=["d"], train_workers=0)
    # 2 x 3 rollouts in micro-batches of 2: 3 micro-batches, which 2 workers cannot share
    with pytest.raises(ValueError, match=r"train_workers=2: .* 3 micro-batches, split into mini-batches of \[3\]"):
        VLPORunConfig(model="m", data=["d"], vlpo=dict(n=3, groups_per_batch=2), micro_batch_size=2,
                      train_workers=2)
    cfg = VLPORunConfig(model="m", data=["d"], vlpo=dict(n=3, groups_per_batch=2), micro_batch_size=3,
                        train_workers=2)
    assert VLPORunConfig.from_dict(cfg.to_dict()).train_workers == 2
    with pytest.raises(ValueError, match="train_workers=2: an actor group .* --controller ray"):
        VLPOTrainer(group_config(ckpt, data, tmp_path / "x", train_workers=2), printer=None, lock=False)

    plain, ds = SimpleNamespace(engine=None), SimpleNamespace(engine=object())
    with pytest.raises(ckpt_io.CheckpointError, match="holds a plain AdamW state, which a DeepSpeed engine"):
        ckpt_io.restore_actor_optimizer(ds, tmp_path / "c", {"optimizer": {"state": {}}, "deepspeed": None}, {}, 2)
    with pytest.raises(ckpt_io.CheckpointError, match="written by a DeepSpeed actor group"):
        ckpt_io.restore_actor_optimizer(plain, tmp_path / "c", {"optimizer": None, "deepspeed": {"world_size": 2}},
                                        {}, 2)
    with pytest.raises(ckpt_io.CheckpointError, match="shards of 2 ranks, but this group has 3"):
        ckpt_io.restore_actor_optimizer(ds, tmp_path / "c", {"optimizer": None, "deepspeed": {"world_size": 2}}, {}, 3)


def test_replica_check_names_the_first_diverged_tensor(monkeypatch):
    """Plain data parallel saves rank 0's replica only, so every save first compares the ranks'
    weights and AdamW state: a single moment element off by 1e-7 on rank 1 is named. (The
    collective is replaced by the two replicas' checksums, computed by the same method.)"""
    from torch import nn

    import monet.rl.actor as actor_mod
    from monet.rl.actor import Actor
    from monet.train.distributed import DistInfo

    def replica(poison: bool):
        torch.manual_seed(0)
        m = nn.Linear(3, 2)
        opt = torch.optim.AdamW(m.parameters(), lr=LR)
        m(torch.ones(1, 3)).sum().backward()
        opt.step()
        if poison:
            opt.state[m.weight]["exp_avg"][0, 0] += 1e-7
        return SimpleNamespace(engine=None, dist=DistInfo(0, 2), policy=m, params=list(m.parameters()), optimizer=opt)

    def checksums(a):
        seen = {}
        monkeypatch.setattr(actor_mod, "gather_from_ranks",
                            lambda local, w: seen.setdefault("v", local).repeat(2, 1, 1))
        Actor.check_replicas(a)  # equal to itself
        return seen["v"]

    good, bad = checksums(replica(False)), checksums(replica(True))
    assert good.shape == (2 * 4, 2)  # weight and bias, each with exp_avg, exp_avg_sq and step
    monkeypatch.setattr(actor_mod, "gather_from_ranks", lambda local, w: torch.stack([local, good]))
    Actor.check_replicas(replica(False))
    monkeypatch.setattr(actor_mod, "gather_from_ranks", lambda local, w: torch.stack([local, bad]))
    with pytest.raises(RuntimeError, match=r"rank 1's weight \(AdamW exp_avg\) differs from rank 0's \(1 tensors"):
        Actor.check_replicas(replica(False))
