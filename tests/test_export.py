"""`monet export`: an SFT or VLPO checkpoint (or run folder) becomes a plain model directory with
exactly the model files and a monet_config.json holding the trained span layout; the exported
model has the checkpoint's weights bit for bit and decodes (latent spans included) exactly like
it. Refusals: a non-empty OUT, a non-finite or empty (ZeRO-3 placeholder) weight, a folder that is
no checkpoint. Also: ``python -m monet.rl.actor`` refuses ``--out`` == ``--batch``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import monet
from monet.cli import main
from monet.data.synth import synthesize_dataset
from monet.export import ExportError, export_checkpoint
from monet.layout import SpanLayout
from monet.model.requests import LatentRequest
from monet.testing import build_tiny_checkpoint

K = 2
# what save_pretrained writes for the tiny model + processor, and monet_config.json: nothing else
MODEL_FILE_SET = {"chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                  "monet_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_checkpoint(cache=True)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny):
    """Two stage-3 steps (CE only) on the tiny model with K=2; checkpoints at steps 1 and 2."""
    from monet.train.config import SFTConfig
    from monet.train.pipeline import run_sft

    root = tmp_path_factory.mktemp("export_sft")
    data = synthesize_dataset(root / "data", n=4, n_eval=1, seed=0)
    cfg = SFTConfig(stage=3, model=str(tiny), data=[str(data.train_json)], image_root=str(data.root),
                    output_dir=str(root / "run"), latent_size=K, lr=3e-2, warmup_steps=0, micro_batch_size=2,
                    grad_accum=1, dtype="float32", gradient_checkpointing=False, log_every=100, teacher="none",
                    cache_dir=str(root / "cache"), max_steps=2, save_every=1, keep_last=None)
    run_sft(cfg, progress=False, printer=lambda _: None)
    return root / "run", data


@pytest.fixture(scope="module")
def vlpo_run(tmp_path_factory, tiny):
    """One VLPO step (HF rollouts) from the tiny model, whose own default K is not the run's K."""
    from monet.rl.data import synthesize_rl_split
    from monet.rl.run_config import VLPORunConfig
    from monet.rl.trainer import run_vlpo

    root = tmp_path_factory.mktemp("export_vlpo")
    rl = synthesize_rl_split(root / "rl.parquet", 6, seed=1)
    # tests/test_vlpo_trainer.py's settings (rewards differ within a group, so the step trains), one step
    cfg = VLPORunConfig(model=str(tiny), data=[str(rl)], output_dir=str(root / "run"), engine="hf",
                        vlpo=dict(n=3, temperature=1.0, latent_noise=1.0, groups_per_batch=2, buffer_groups=6,
                                  sigma=10.0, length_penalty=dict(max_tokens=10, buffer=8)),
                        steps=1, prompts_per_rollout=3, difficulty_filter=False, max_response_tokens=10,
                        latent_size=K, force_latent=True, logit_bias={"<|im_end|>": 4.0}, micro_batch_size=4,
                        lr=1e-3, dtype="float32", seed=5)
    run_vlpo(cfg, printer=None)
    return root / "run"


def _state(path, **kw):
    return {k: v.clone() for k, v in monet.load_model(path, dtype="float32", **kw)[0].state_dict().items()}


def _decode(path, image, **kw):
    model, processor = monet.load_model(path, dtype="float32", **kw)
    reqs = [LatentRequest(prompt="What is in the top-left corner?", images=[image], force_latent=True),
            LatentRequest(prompt="Describe the image.", images=[image])]
    return model.monet_config.span_layout, monet.generate(model, processor, reqs, max_new_tokens=12,
                                                          temperature=0.0, return_latents=True)


def _assert_same_generations(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids and x.latent_positions == y.latent_positions
        if x.latents is None:
            assert y.latents is None
        else:
            assert torch.equal(x.latents, y.latents)


def test_sft_run_folder_exports_its_latest_checkpoint(sft_run, tmp_path, capsys):
    run, data = sft_run
    assert (run / "latest").read_text().strip() == "checkpoint-2"
    out = tmp_path / "model"
    assert main(["export", str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint-2" in printed and "trainer_state.json" in printed  # named source, trainer files left out
    assert {p.name for p in out.iterdir()} == MODEL_FILE_SET
    assert not list(tmp_path.glob(".model.tmp-*"))  # the staging folder was renamed, none left behind
    assert json.loads((out / "monet_config.json").read_text())["latent_size"] == K
    assert json.loads((out / "monet_config.json").read_text())["layout"] == "standard"

    ckpt = run / "checkpoint-2"
    a, b = _state(ckpt), _state(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the run trained: the export is the latest checkpoint, not the first or the starting model
    first = _state(run / "checkpoint-1")
    assert any(not torch.equal(first[k], b[k]) for k in b)

    image = data.root / "images" / "eval" / "000000.png"
    span_a, gen_a = _decode(ckpt, image)
    span_b, gen_b = _decode(out, image)
    assert span_a == span_b == SpanLayout(K, "standard")
    assert gen_a[0].num_latent_spans >= 1 and len(gen_a[0].latent_positions) == K * gen_a[0].num_latent_spans
    _assert_same_generations(gen_a, gen_b)


def test_vlpo_checkpoint_exports_with_the_runs_layout(vlpo_run, tiny, sft_run, tmp_path):
    ckpt = vlpo_run / "checkpoint-1"
    # the starting model's default K is not the K the run rolled out with; the checkpoint records the run's
    assert monet.load_model(tiny, dtype="float32")[0].monet_config.span_layout.latent_size != K
    saved = json.loads((ckpt / "monet_config.json").read_text())
    assert (saved["latent_size"], saved["layout"]) == (K, "standard")
    out = export_checkpoint(ckpt, tmp_path / "policy").out
    assert {p.name for p in out.iterdir()} == MODEL_FILE_SET
    cfg = json.loads((out / "monet_config.json").read_text())
    assert (cfg["latent_size"], cfg["layout"]) == (K, "standard")
    assert cfg["token_ids"] == saved["token_ids"]

    a, b = _state(ckpt), _state(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], v) for k, v in _state(tiny).items())  # the policy moved
    image = sft_run[1].root / "images" / "eval" / "000000.png"
    _, gen_a = _decode(ckpt, image, latent_size=K, layout="standard")
    span_b, gen_b = _decode(out, image)  # the export's own defaults
    assert span_b == SpanLayout(K, "standard")
    assert len(gen_b[0].latent_positions) == K * gen_b[0].num_latent_spans > 0
    _assert_same_generations(gen_a, gen_b)

    # `monet vlpo --export` is the same export (VLPO checkpoints only)
    assert main(["vlpo", "--export", str(ckpt), str(tmp_path / "again")]) == 0
    for name in MODEL_FILE_SET:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    assert main(["vlpo", "--export", str(sft_run[0] / "checkpoint-1"), str(tmp_path / "sft")]) == 2
    assert not (tmp_path / "sft").exists()


def test_checkpoints_of_earlier_versions_are_exported_with_the_runs_layout(vlpo_run, sft_run, tmp_path, capsys):
    """Earlier trainers kept the starting model's layout in the checkpoint's monet_config.json; the
    export still writes the one the run trained with (from the run's YAML) and says so. Here the
    starting model said K=5, monet-v1: the VLPO run set only latent_size=K, so it rolled out K in
    monet-v1 (the starting model's kind); SFT always trains the standard layout."""
    stale = SpanLayout(5, "monet-v1")
    for src, name, kind in ((vlpo_run / "checkpoint-1", "vlpo", "monet-v1"),
                            (sft_run[0] / "checkpoint-2", "sft", "standard")):
        old = tmp_path / name / src.name
        shutil.copytree(src, old)
        cfg = json.loads((old / "monet_config.json").read_text())
        cfg.update(stale.to_dict())
        (old / "monet_config.json").write_text(json.dumps(cfg))
        assert monet.load_model(old, dtype="float32")[0].monet_config.span_layout == stale
        assert main(["export", str(old), str(tmp_path / f"{name}-out")]) == 0
        assert "said latent_size 5, layout monet-v1" in capsys.readouterr().out
        out = json.loads((tmp_path / f"{name}-out" / "monet_config.json").read_text())
        assert (out["latent_size"], out["layout"]) == (K, kind)
        assert out["token_ids"] == cfg["token_ids"]


def test_non_empty_out_is_refused_and_left_alone(sft_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(sft_run[0] / "checkpoint-1"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "monet export: error:" in err and "not empty" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # an empty existing folder is fine
    (tmp_path / "empty").mkdir()
    assert export_checkpoint(sft_run[0] / "checkpoint-1", tmp_path / "empty").out == tmp_path / "empty"
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def _copy_with_tensor(src: Path, dst: Path, name: str, fn) -> None:
    """A copy of checkpoint ``src`` whose weight ``name`` is replaced by ``fn(tensor)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    assert name in w
    w[name] = fn(w[name])
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_nan_weight_is_refused_naming_the_tensor(sft_run, tmp_path, capsys):
    from safetensors import safe_open

    src = sft_run[0] / "checkpoint-2"
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        name = sorted(k for k in f.keys() if "layers.1." in k and k.endswith("weight"))[0]

    def poison(t):
        t = t.clone()
        t.view(-1)[t.numel() // 2] = float("nan")
        return t

    bad = tmp_path / "checkpoint-7"
    _copy_with_tensor(src, bad, name, poison)
    with pytest.raises(ExportError, match=f"weight {name} in model.safetensors holds 1 NaN/inf"):
        export_checkpoint(bad, tmp_path / "out")
    assert main(["export", str(bad), str(tmp_path / "out")]) == 2
    assert name in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_deepspeed_shards_left_out_and_zero3_placeholders_refused(sft_run, tmp_path):
    src = sft_run[0] / "checkpoint-2"
    # a DeepSpeed checkpoint: full weights next to the engine's shards, which are trainer state
    ds = tmp_path / "ds" / "checkpoint-2"
    shutil.copytree(src, ds)
    (ds / "deepspeed" / "state").mkdir(parents=True)
    (ds / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"not a model file")
    r = export_checkpoint(ds, tmp_path / "ds_out")
    assert {p.name for p in r.out.iterdir()} == MODEL_FILE_SET and "deepspeed" in r.left_out
    # weights saved without gathering ZeRO-3 partitions: empty tensors
    part = tmp_path / "part" / "checkpoint-2"
    _copy_with_tensor(src, part, "lm_head.weight", lambda t: torch.empty(0, dtype=t.dtype))
    with pytest.raises(ExportError, match=r"weight lm_head\.weight in model\.safetensors is empty .*zero_to_fp32"):
        export_checkpoint(part, tmp_path / "part_out")
    # no weights at all, only shards
    only = tmp_path / "only" / "checkpoint-2"
    shutil.copytree(ds, only)
    (only / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="ZeRO partitions. Consolidate"):
        export_checkpoint(only, tmp_path / "only_out")


def test_a_real_deepspeed_zero3_checkpoint_exports_full_weights(sft_run, tiny, tmp_path):
    """One ZeRO-3 step on two ranks (every tensor partitioned): the checkpoint's weights are whole
    (saved gathered), so the export holds full-shape weights equal to the checkpoint's, and none of
    the engine's shards."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by scripts/setup_env.sh (train extra)")
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    from monet.train.config import SFTConfig

    data = sft_run[1]
    repo = Path(__file__).resolve().parents[1]
    zero3 = json.loads((repo / "scripts" / "deepspeed" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny tensors
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    cfg = SFTConfig(stage=3, model=str(tiny), data=[str(data.train_json)], image_root=str(data.root),
                    output_dir=str(tmp_path / "run"), latent_size=K, lr=3e-2, warmup_steps=0, micro_batch_size=1,
                    grad_accum=1, dtype="float32", gradient_checkpointing=False, log_every=100, teacher="none",
                    cache_dir=str(tmp_path / "cache"), max_steps=1, deepspeed=str(tmp_path / "zero3.json"),
                    latent_backward="joint")
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29641",
           "-m", "monet.cli", "sft", "--config", str(tmp_path / "c.yaml"), "--device", "cpu"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoint-1"
    assert (ckpt / "deepspeed" / "state").is_dir()
    r = export_checkpoint(tmp_path / "run", tmp_path / "out")
    assert r.source.folder == ckpt and {p.name for p in r.out.iterdir()} == MODEL_FILE_SET

    def shapes(folder):
        with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert shapes(r.out) == shapes(tiny)
    a, b, start = _state(ckpt), _state(r.out), _state(tiny)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(start[k], b[k]) for k in b)  # the step trained


def test_sharded_weights_are_exported_with_their_index(sft_run, tmp_path):
    src = sft_run[0] / "checkpoint-2"
    sharded = tmp_path / "checkpoint-2"
    shutil.copytree(src, sharded)
    (sharded / "model.safetensors").unlink()
    model, _ = monet.load_model(src, dtype="float32")
    model.save_pretrained(sharded, max_shard_size="200KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    (sharded / "stray.safetensors").write_bytes((sharded / shards[0]).read_bytes())  # not listed: not a weight
    r = export_checkpoint(sharded, tmp_path / "out")
    names = {p.name for p in r.out.iterdir()}
    assert names == (MODEL_FILE_SET - {"model.safetensors"}) | {"model.safetensors.index.json", *shards}
    assert "stray.safetensors" in r.left_out
    a, b = _state(src), _state(r.out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    (sharded / shards[-1]).unlink()
    with pytest.raises(ExportError, match=f"lists the shard {shards[-1]}, which is missing"):
        export_checkpoint(sharded, tmp_path / "out2")


def test_a_folder_that_is_no_checkpoint_is_refused(tiny, sft_run, tmp_path, capsys):
    cases = {
        "plain model directory": (Path(tiny), "plain model directory"),
        "missing": (tmp_path / "nope", "does not exist"),
    }
    empty_run = tmp_path / "run"
    shutil.copytree(sft_run[0] / "checkpoint-1", empty_run / "checkpoint-1")  # no `latest` pointer
    cases["run without latest"] = (empty_run, "checkpoint-1 but no 'latest' pointer")
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / "latest").write_text("checkpoint-9\n")
    cases["dangling latest"] = (dangling, "names .*checkpoint-9, which is not a complete")
    for what, (path, message) in cases.items():
        assert main(["export", str(path), str(tmp_path / "out")]) == 2, what
        err = capsys.readouterr().err
        assert err.startswith("monet export: error:") and "Traceback" not in err, what
        with pytest.raises(ExportError, match=message):
            export_checkpoint(path, tmp_path / "out")
        assert not (tmp_path / "out").exists(), what
    # OUT inside the checkpoint is refused too (it would become part of the checkpoint)
    with pytest.raises(ExportError, match="inside the checkpoint"):
        export_checkpoint(sft_run[0] / "checkpoint-1", sft_run[0] / "checkpoint-1" / "export")


def test_actor_refuses_out_equal_to_batch(tmp_path, capsys):
    from monet.rl.actor import main as actor_main

    batch = tmp_path / "batch"
    batch.mkdir()
    for out in (batch, tmp_path / "x" / ".." / "batch"):  # the same folder, however spelled
        with pytest.raises(SystemExit) as e:
            actor_main(["--config", str(tmp_path / "none.yaml"), "--batch", str(batch), "--out", str(out)])
        assert e.value.code == 2
        assert "is the --batch folder" in capsys.readouterr().err
    # another --out passes this check (and stops later, at the missing config)
    with pytest.raises(Exception) as e:
        actor_main(["--config", str(tmp_path / "none.yaml"), "--batch", str(batch), "--out", str(tmp_path / "p")])
    assert "--batch folder" not in str(e.value)


def test_vllm_engine_opens_the_export_with_its_layout(vlpo_run, tmp_path):
    """LatentLLM starts on an exported VLPO policy and, with no latent settings given, decodes with
    the export's monet_config.json (the run's K, not the starting model's) exactly like the HF model
    loaded from the same folder (greedy; latents to float tolerance)."""
    pytest.importorskip("vllm", reason="vllm is installed by scripts/setup_env.sh (MONET_WITH_VLLM=1, the default)")
    from monet.vllm import LatentLLM

    out = export_checkpoint(vlpo_run / "checkpoint-1", tmp_path / "policy").out
    model, processor = monet.load_model(out, dtype="float32")
    reqs = [LatentRequest(prompt=f"question {i}: what is in the picture?", force_latent=i % 2 == 0) for i in range(3)]
    kw = dict(max_new_tokens=12, temperature=0.0, return_latents=True)
    ref = monet.generate(model, processor, reqs, **kw)
    engine = dict(dtype="float32", max_model_len=256, enforce_eager=True, limit_mm_per_prompt={"image": 1},
                  block_size=32, num_gpu_blocks_override=16, kv_cache_memory_bytes=64 << 20, max_num_seqs=4,
                  max_num_batched_tokens=256, seed=0)
    with LatentLLM(out, **engine) as llm:
        ours = llm.generate(reqs, **kw)
    assert ref[0].num_latent_spans >= 1 and len(ref[0].latent_positions) == K * ref[0].num_latent_spans
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert a.token_ids == b.token_ids, f"request {i}"
        assert a.latent_positions == b.latent_positions, f"request {i}"
        if b.latents is not None:
            torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-4)
