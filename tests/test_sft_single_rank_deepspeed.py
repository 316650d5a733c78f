"""A one-process DeepSpeed SFT run works: plain ``python`` with ``deepspeed:`` set, and
``torchrun --nproc_per_node 1``. DeepSpeed's engine needs a process group even for one rank;
monet creates a one-rank group for it (monet.train.distributed.init_distributed). The runs end
at the weights of the plain (no DeepSpeed) one-process run, and a resumed one-rank ZeRO-2 run
reproduces the uninterrupted one exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from monet.data.synth import synthesize_dataset
from monet.testing import build_tiny_checkpoint
from monet.train.config import SFTConfig

REPO = Path(__file__).resolve().parents[1]
LR = 3e-3


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _launch(cfg_path: Path, *extra: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    cli = ["-m", "monet.cli", "sft", "--config", str(cfg_path), "--device", "cpu", *extra]
    # plain python, not torchrun: no RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29531"]
                             if torchrun else []), *cli]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_one_process_deepspeed_runs_match_the_plain_run(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by scripts/setup_env.sh (train extra)")
    data = synthesize_dataset(tmp_path / "data", n=4, n_eval=0, seed=0)
    ckpt = build_tiny_checkpoint(cache=True)
    zero3 = json.loads((REPO / "scripts" / "deepspeed" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    base = SFTConfig(stage=3, model=str(ckpt), data=[str(data.train_json)], image_root=str(data.root), latent_size=2,
                     lr=LR, warmup_steps=0, micro_batch_size=1, grad_accum=2, max_steps=2, dtype="float32",
                     gradient_checkpointing=False, log_every=100, teacher="none", latent_backward="joint",
                     cache_dir=str(tmp_path / "cache"), output_dir="")
    zero2 = str(REPO / "scripts" / "deepspeed" / "zero2.json")
    runs = {"plain": (replace(base, output_dir=str(tmp_path / "plain")), False),
            "zero2": (replace(base, output_dir=str(tmp_path / "zero2"), deepspeed=zero2), False),
            "zero3-torchrun": (replace(base, output_dir=str(tmp_path / "zero3-torchrun"),
                                       deepspeed=str(tmp_path / "zero3.json")), True),
            "resumed": (replace(base, output_dir=str(tmp_path / "resumed"), deepspeed=zero2, max_steps=1), False)}
    for name, (cfg, torchrun) in runs.items():
        (tmp_path / f"{name}.yaml").write_text(cfg.to_yaml())
        res = _launch(tmp_path / f"{name}.yaml", torchrun=torchrun)
        assert res.returncode == 0 and "Traceback" not in res.stderr, (name, res.stderr[-3000:])
    res = _launch(tmp_path / "resumed.yaml", "--resume", "--set", "max_steps=2")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert (tmp_path / "resumed" / "checkpoint-2" / "deepspeed").is_dir()  # a DeepSpeed run indeed

    start = _weights(Path(ckpt))
    finals = {name: _weights(tmp_path / name / "checkpoint-2") for name in runs}
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in runs}
    assert summaries["resumed"]["resumed_from"] is not None
    for name in ("zero2", "zero3-torchrun"):
        for key in ("first", "last"):  # Adam hides a mis-scaled gradient; its norm does not
            assert summaries[name]["metrics"]["grad_norm"][key] == pytest.approx(
                summaries["plain"]["metrics"]["grad_norm"][key], rel=1e-4), name
    changed = 0
    for k, plain in finals["plain"].items():
        for name in ("zero2", "zero3-torchrun"):
            # Adam's first steps move a weight by ~lr * g / (|g| + eps): an element whose gradient is near
            # eps can move by a visible fraction of lr under another summation order, hence atol lr / 100
            torch.testing.assert_close(finals[name][k], plain, rtol=1e-4, atol=LR / 100, msg=f"{name}: {k}")
        torch.testing.assert_close(finals["resumed"][k], finals["zero2"][k], rtol=0, atol=0, msg=k)
        changed += not torch.equal(plain, start[k])
    assert changed > 10
