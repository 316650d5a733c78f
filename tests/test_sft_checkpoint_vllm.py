"""An SFT checkpoint folder is a model folder: a vLLM engine (``LatentLLM``, the engine of
``monet serve`` and of VLPO rollouts) starts on it as is and decodes with the trained weights; the
trainer state kept next to the weights is never taken for weights. Checkpoints of the earlier
layout (``trainer_state.safetensors``) still resume exactly, and an engine refuses them with an
error naming the file and the rename that fixes it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import monet
from monet.data.synth import synthesize_dataset
from monet.train.checkpoint import LEGACY_STATE_TENSORS, STATE_TENSORS, load_trainer_state
from monet.train.config import SFTConfig
from monet.train.pipeline import run_sft
from monet.testing import build_tiny_checkpoint

pytest.importorskip("vllm", reason="vllm is installed by scripts/setup_env.sh (MONET_WITH_VLLM=1, the default)")

from monet.vllm import LatentLLM  # noqa: E402

K = 2
ENGINE = dict(dtype="float32", max_model_len=256, enforce_eager=True, limit_mm_per_prompt={"image": 1},
              block_size=32, num_gpu_blocks_override=16, kv_cache_memory_bytes=64 << 20, max_num_seqs=4,
              max_num_batched_tokens=256, seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[SFTConfig, Path]:
    """A 4-step stage-1 run on the tiny model, checkpoints at steps 2 and 4 (lr high enough that the
    weights move). Returns its config and output folder."""
    root = tmp_path_factory.mktemp("sft_vllm")
    data = synthesize_dataset(root / "data", n=4, n_eval=1, seed=0)
    cfg = SFTConfig(stage=1, model=str(build_tiny_checkpoint(cache=True)), data=[str(data.train_json)],
                    image_root=str(data.root), output_dir=str(root / "run"), latent_size=K, lr=3e-2,
                    warmup_steps=0, micro_batch_size=2, grad_accum=1, dtype="float32",
                    gradient_checkpointing=False, log_every=100, teacher="none", cache_dir=str(root / "cache"),
                    max_steps=4, save_every=2, keep_last=None)
    run_sft(cfg, progress=False, printer=lambda _: None)
    return cfg, root / "run"


def test_no_trainer_file_looks_like_weights(run):
    """vLLM loads every ``*.safetensors`` of a model folder (there is no index for one shard): only
    the weights may carry that suffix; the state's tensors are still a safetensors file."""
    from safetensors.torch import load_file

    ckpt = run[1] / "checkpoint-2"
    names = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert names == ["model.safetensors"], names
    assert load_file(str(ckpt / STATE_TENSORS)), "the trainer state holds no tensors"


def test_vllm_engine_starts_on_an_sft_checkpoint(run):
    """LatentLLM opens the checkpoint folder and decodes greedily exactly like the HF model loaded
    from the same folder, whose weights differ from the base model's (so the engine holds the
    trained weights, not the initial ones)."""
    ckpt = run[1] / "checkpoint-2"
    model, processor = monet.load_model(ckpt, dtype="float32")
    base, _ = monet.load_model(build_tiny_checkpoint(cache=True), dtype="float32")
    trained, initial = model.state_dict(), base.state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial), "SFT did not change the weights"
    ids = model.monet_config.token_ids
    reqs = [monet.LatentRequest(prompt=f"question {i}: what is in the picture?", force_latent=i % 2 == 0)
            for i in range(4)]
    kw = dict(max_new_tokens=16, latent_size=K, layout="standard", return_latents=True,
              logit_bias={ids.start: 0.5})
    with LatentLLM(ckpt, latent_size=K, **ENGINE) as llm:
        ours = llm.generate(reqs, **kw)
    ref = monet.generate(model, processor, reqs, **kw)
    base_ref = monet.generate(base, processor, reqs, **kw)
    assert [o.token_ids for o in ref] != [o.token_ids for o in base_ref], "the probe cannot tell the weights apart"
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.token_ids == b.token_ids, f"request {i}"
        assert a.latent_positions == b.latent_positions, f"request {i}"
        if b.latents is not None:
            torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-4)
    assert any(o.latent_positions for o in ours)


def _legacy_copy(run_dir: Path, out: Path, step: int) -> Path:
    """``out`` holding ``checkpoint-STEP`` of ``run_dir`` in the earlier layout (the state's tensors
    as ``trainer_state.safetensors``) and a ``latest`` pointing at it."""
    out.mkdir()
    ckpt = shutil.copytree(run_dir / f"checkpoint-{step}", out / f"checkpoint-{step}")
    (ckpt / STATE_TENSORS).rename(ckpt / LEGACY_STATE_TENSORS)
    (out / "latest").write_text(f"checkpoint-{step}\n")
    return ckpt


def _same_state(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif hasattr(a, "shape"):  # numpy array
        assert a.dtype == b.dtype and (a == b).all(), where
    else:
        assert a == b, where


def test_a_checkpoint_of_the_earlier_layout_resumes_exactly(run, tmp_path):
    """The state read from ``trainer_state.safetensors`` is the one written; resuming a 2-step
    checkpoint of that layout to step 4 ends at the uninterrupted run's weights, bit for bit."""
    cfg, run_dir = run
    ckpt = _legacy_copy(run_dir, tmp_path / "legacy", 2)
    assert not (ckpt / STATE_TENSORS).exists()
    _same_state(load_trainer_state(ckpt), load_trainer_state(run_dir / "checkpoint-2"))
    summary = run_sft(replace(cfg, output_dir=str(tmp_path / "legacy")), resume=True, progress=False,
                      printer=lambda _: None)
    assert summary["steps"] == 4
    a = monet.load_model(run_dir / "checkpoint-4", dtype="float32")[0].state_dict()
    b = monet.load_model(tmp_path / "legacy" / "checkpoint-4", dtype="float32")[0].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "legacy" / "checkpoint-4" / STATE_TENSORS).is_file()  # new checkpoints: the new name
    assert not (tmp_path / "legacy" / "checkpoint-4" / LEGACY_STATE_TENSORS).exists()


def test_the_new_name_wins_over_a_stale_legacy_file(run, tmp_path):
    """Both files present (e.g. a legacy file copied in by hand): the state comes from
    ``trainer_state.tensors``; a corrupt legacy file is never read."""
    ckpt = shutil.copytree(run[1] / "checkpoint-2", tmp_path / "checkpoint-2")
    (ckpt / LEGACY_STATE_TENSORS).write_bytes(b"not a safetensors file")
    _same_state(load_trainer_state(ckpt), load_trainer_state(run[1] / "checkpoint-2"))


def test_engine_refuses_the_earlier_layout_naming_the_rename(run, tmp_path):
    """An engine on a legacy checkpoint fails before vLLM starts, naming the file and the fix; after
    the rename the folder is served (and still resumes: the test above)."""
    ckpt = _legacy_copy(run[1], tmp_path / "legacy", 2)
    with pytest.raises(ValueError) as err:
        LatentLLM(ckpt, latent_size=K, **ENGINE)
    msg = str(err.value)
    assert str(ckpt / LEGACY_STATE_TENSORS) in msg and f"mv {ckpt / LEGACY_STATE_TENSORS} {ckpt / STATE_TENSORS}" in msg
    # a sharded checkpoint's index limits vLLM to the shards it names: no refusal there
    index = {"metadata": {}, "weight_map": {"x": "model.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    from monet.vllm.llm import check_no_state_as_weights

    check_no_state_as_weights(ckpt)
    # the VLPO state's earlier name is refused the same way
    (ckpt / "model.safetensors.index.json").unlink()
    (ckpt / LEGACY_STATE_TENSORS).rename(ckpt / "vlpo_state.safetensors")
    with pytest.raises(ValueError, match="vlpo_state.safetensors.*Rename it to vlpo_state.tensors"):
        check_no_state_as_weights(ckpt)


def test_vlpo_with_vllm_rollouts_starts_from_an_sft_checkpoint(run, tmp_path):
    """``monet vlpo`` with ``engine: vllm`` on an SFT checkpoint (``scripts/vlpo.sh``'s setting):
    the rollout engine starts on the checkpoint folder, one step trains, and the VLPO checkpoint
    (started from the SFT weights) is a model folder again."""
    from monet.rl.checkpoint import latest_checkpoint
    from monet.rl.data import synthesize_rl_split
    from monet.rl.run_config import VLPORunConfig
    from monet.rl.trainer import VLPOTrainer

    data = synthesize_rl_split(tmp_path / "rl.parquet", 4, seed=1)
    cfg = VLPORunConfig(
        model=str(run[1] / "checkpoint-4"), data=[str(data)], output_dir=str(tmp_path / "vlpo"), engine="vllm",
        engine_kwargs=dict(enforce_eager=True, limit_mm_per_prompt={"image": 1}, block_size=32,
                           num_gpu_blocks_override=32, kv_cache_memory_bytes=64 << 20, max_num_seqs=8,
                           max_num_batched_tokens=256, max_model_len=256),
        vlpo=dict(n=2, temperature=1.0, groups_per_batch=1, buffer_groups=2), steps=1, prompts_per_rollout=2,
        difficulty_filter=False, max_response_tokens=8, latent_size=K, force_latent=True, micro_batch_size=2,
        lr=1e-3, dtype="float32", save_every=1, seed=0)
    t = VLPOTrainer(cfg, printer=None)
    try:
        t.train()
    finally:
        t.close()
    rows = [json.loads(x) for x in (tmp_path / "vlpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["trained"] == 1, rows
    out = latest_checkpoint(tmp_path / "vlpo")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]


def test_monet_serve_refuses_the_earlier_layout_by_name(run, tmp_path, capsys):
    """``monet serve`` checks the folder before vLLM's server starts: exit code 2 and the rename."""
    from monet.cli import main

    ckpt = _legacy_copy(run[1], tmp_path / "legacy", 2)
    assert main(["serve", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert str(ckpt / LEGACY_STATE_TENSORS) in err and f"Rename it to {STATE_TENSORS}" in err, err
