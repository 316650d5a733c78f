"""SFT trainer: loss decreases per stage, accumulation normalisation, resume, online teacher, torchrun;
typed --set values, skipped non-finite steps, resume with changed settings, the stage table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import monet
from monet.data.collate import StageCollator
from monet.data.synth import synthesize_dataset
from monet.train.config import SFTConfig
from monet.train.pipeline import load_stage_dataset, run_precompute, run_sft
from monet.train.sft import SFTTrainer, micro_batch_losses
from monet.testing import build_tiny_checkpoint

K = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    data = synthesize_dataset(root / "data", n=8, n_eval=2, seed=0)
    ckpt = build_tiny_checkpoint(cache=True)
    return root, data, ckpt


def config(root, data, ckpt, stage, name, **kw):
    base = dict(stage=stage, model=str(ckpt), data=[str(data.train_json)], image_root=str(data.root),
                output_dir=str(root / name), latent_size=K, lr=3e-3, warmup_steps=0, micro_batch_size=2,
                grad_accum=1, dtype="float32", gradient_checkpointing=False, log_every=100, teacher="none",
                cache_dir=str(root / "cache"), keep_last=3)
    base.update(kw)
    return SFTConfig(**base)


def trainer_for(cfg, examples=None, **kw):
    model, processor = monet.load_model(cfg.model, latent_size=cfg.latent_size)
    if examples is None:
        examples = load_stage_dataset(cfg, processor, cfg.stage, printer=lambda _: None)
    return SFTTrainer(cfg, model, processor, examples, progress=False, printer=lambda _: None, **kw)


def fixed_subset(examples, n):
    """The first n examples as a list (a fixed batch to overfit)."""
    return [examples[i] for i in range(n)]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_loss_decreases_on_a_fixed_batch(setup, stage):
    root, data, ckpt = setup
    cfg = config(root, data, ckpt, stage, f"fixed{stage}", max_steps=8)
    tr = trainer_for(cfg)
    tr.examples = fixed_subset(tr.examples, 2)
    tr.micro_per_epoch = 1
    summary = tr.train()
    loss = summary["metrics"]["loss"]
    assert loss["last"] < 0.8 * loss["first"], loss


def test_grad_accumulation_is_normalised_over_the_step(setup):
    """One micro-batch of 2 == two micro-batches of 1 (CE normalised by the step's weight sum)."""
    root, data, ckpt = setup
    cfg = config(root, data, ckpt, 2, "accum")
    model, processor = monet.load_model(cfg.model, latent_size=K)
    ex = load_stage_dataset(cfg, processor, 2, printer=lambda _: None)
    collate = StageCollator(processor, ce_emphasize_factor=cfg.ce_factor)
    items = [ex[0], ex[1]]

    def grads(micro):
        model.zero_grad(set_to_none=True)
        w = sum(float(b.weights[:, 1:][b.labels[:, 1:] != -100].sum()) for b in micro)
        for b in micro:
            loss, _ = micro_batch_losses(model, b, cfg, None, torch.tensor(w), len(micro))
            loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    one = grads([collate(items)])
    two = grads([collate(items[:1]), collate(items[1:])])
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-7)


def _weights(path):
    model, _ = monet.load_model(path)
    return model.state_dict()


def test_resume_reproduces_uninterrupted_run(setup):
    root, data, ckpt = setup
    straight = config(root, data, ckpt, 1, "straight", max_steps=4, save_every=2)
    run_sft(straight, progress=False, printer=lambda _: None)
    part = replace(straight, output_dir=str(root / "resumed"), max_steps=2)
    run_sft(part, progress=False, printer=lambda _: None)
    rest = replace(part, max_steps=4)
    summary = run_sft(rest, resume=True, progress=False, printer=lambda _: None)
    assert summary["steps"] == 4
    a, b = _weights(root / "straight" / "checkpoint-4"), _weights(root / "resumed" / "checkpoint-4")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def test_stage2_with_teacher_store_and_online_teacher_agree(setup):
    """Store mode (precomputed stage-1 reps) and online mode give the same first-step losses."""
    root, data, ckpt = setup
    c1 = config(root, data, ckpt, 1, "teacher1")
    store = root / "reps"
    run_precompute(c1, "teacher-reps", store, dtype="float32", progress=False, printer=lambda _: None)
    c_store = config(root, data, ckpt, 2, "s2store", teacher="store", teacher_store=str(store), max_steps=1)
    c_online = config(root, data, ckpt, 2, "s2online", teacher="online", teacher_model=str(ckpt), max_steps=1)
    s_store = run_sft(c_store, progress=False, printer=lambda _: None)
    s_online = run_sft(c_online, progress=False, printer=lambda _: None)
    a, b = s_store["metrics"]["alignment"]["first"], s_online["metrics"]["alignment"]["first"]
    assert a == pytest.approx(b, rel=1e-5) and a > 0


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
        SFTConfig(stage=4, model="m", data=["d"])
    with pytest.raises(ValueError, match="teacher_store"):
        SFTConfig(stage=2, model="m", data=["d"])
    with pytest.raises(ValueError, match="latent_backward must be"):
        SFTConfig(stage=1, model="m", data=["d"], latent_backward="separate")
    with pytest.raises(ValueError, match="cannot be used with DeepSpeed"):
        SFTConfig(stage=1, model="m", data=["d"], latent_backward="nested", deepspeed="z.json")
    assert SFTConfig(stage=1, model="m", data=["d"]).latent_backward_mode == "nested"
    assert SFTConfig(stage=1, model="m", data=["d"], deepspeed="z.json").latent_backward_mode == "joint"
    (tmp_path / "c.yaml").write_text("stage: 1\nmodel: m\ndata: [d.json]\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown settings \\['learning_rate'\\]"):
        SFTConfig.from_yaml(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("stage: 1\nmodel: m\ndata: [d.json]\n")
    cfg = SFTConfig.from_yaml(tmp_path / "c.yaml", {"lr": 2e-5})
    assert cfg.lr == 2e-5 and cfg.data == [str(tmp_path / "d.json")]


def test_torchrun_two_ranks_end_with_identical_weights(setup, tmp_path):
    root, data, ckpt = setup
    cfg = config(root, data, ckpt, 1, "ddp", max_steps=2, micro_batch_size=1, grad_accum=2)
    out = tmp_path / "ddp"
    cfg = replace(cfg, output_dir=str(out))
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "monet.cli", "sft", "--config", str(tmp_path / "c.yaml"), "--device", "cpu"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    sums = summary["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    start = _weights(ckpt)
    end = _weights(out / "checkpoint-2")
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_deepspeed_zero2_matches_plain_data_parallel(setup, tmp_path):
    """torchrun x2: the DeepSpeed ZeRO-2 path and our own data-parallel path end at the same weights."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by scripts/setup_env.sh (train extra)")
    root, data, ckpt = setup
    repo = Path(__file__).resolve().parents[1]
    finals = {}
    for name, ds in (("plain", None), ("zero2", str(repo / "scripts" / "deepspeed" / "zero2.json"))):
        cfg = config(root, data, ckpt, 2, name, max_steps=2, micro_batch_size=1, grad_accum=2, deepspeed=ds)
        # both with the joint latent backward (DeepSpeed's default), so gradients are summed in one order
        cfg = replace(cfg, output_dir=str(tmp_path / name), latent_backward="joint")
        (tmp_path / f"{name}.yaml").write_text(cfg.to_yaml())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
               "-m", "monet.cli", "sft", "--config", str(tmp_path / f"{name}.yaml"), "--device", "cpu"]
        res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        finals[name] = _weights(tmp_path / name / "checkpoint-2")
    start = _weights(ckpt)
    changed = 0
    for k in finals["plain"]:
        # Adam divides by sqrt(v): for near-zero gradients a reduction-order difference of ~1e-9 in the
        # gradient can move an update by ~1e-6, so the absolute tolerance sits well below lr, not at 1e-6
        torch.testing.assert_close(finals["zero2"][k], finals["plain"][k], rtol=1e-4, atol=1e-5)
        changed += not torch.equal(finals["plain"][k], start[k])
    assert changed > 10


def _mixed_latent_data(root):
    """Zoom samples (one latent span) and two-hop samples (two spans) in one training file, so
    data-parallel ranks' micro-batches have different numbers of latents."""
    from monet.data.synth_multihop import synthesize_multihop

    zoom = synthesize_dataset(root / "zoom", n=4, n_eval=0, seed=1)
    hop = synthesize_multihop(root / "hop", n=4, n_eval=0, seed=1)
    rows = []
    for sub, ds in (("zoom", zoom), ("hop", hop)):
        for sample in json.loads(Path(ds.train_json).read_text()):
            for turn in sample["data"]:
                for part in turn["content"]:
                    if part.get("type") == "image":
                        part["image"] = f"{sub}/{part['image']}"
            rows.append(sample)
    (root / "mixed.json").write_text(json.dumps(rows))
    return root / "mixed.json"


def _torchrun(cfg_path, port, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "monet.cli", "sft", "--config", str(cfg_path), "--device", "cpu", *extra]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]


def test_deepspeed_zero3_matches_plain_data_parallel(setup, tmp_path):
    """torchrun x2, stage 2 with the online teacher's alignment routed through the latents: the
    DeepSpeed ZeRO-3 path, with *every* parameter partitioned, ends at the weights of our own
    data-parallel path; its checkpoint holds the full weights; resuming it after step 1 reproduces
    the uninterrupted run. The ranks' micro-batches differ in their numbers of latents and of CE
    chunks (ZeRO-3's collective parameter gathering needs the ranks in lockstep)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by scripts/setup_env.sh (train extra)")
    from safetensors import safe_open

    from monet.train.distributed import DistInfo
    from monet.train.sft import epoch_order

    root, _, ckpt = setup
    train_json = _mixed_latent_data(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    zero3 = json.loads((repo / "scripts" / "deepspeed" / "zero3.json").read_text())
    # the shipped threshold keeps every tensor of the tiny model whole after its first use (ZeRO-3's
    # "persistent" small parameters); 0 partitions all of them, so every module's gathering is tested
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    base = SFTConfig(stage=2, model=str(ckpt), data=[str(train_json)], image_root=str(tmp_path), latent_size=K,
                     lr=3e-3, warmup_steps=0, micro_batch_size=1, grad_accum=2, max_steps=2, dtype="float32",
                     gradient_checkpointing=False, log_every=100, teacher="online", teacher_model=str(ckpt),
                     cache_dir=str(root / "cache"), keep_last=3, latent_backward="joint", ce_chunk_size=16)
    # the lockstep is exercised: in some micro-batch the two ranks hold different numbers of latents
    order = [epoch_order(8, 0, base.seed, DistInfo(r, 2), 1) for r in range(2)]
    names = [json.loads(train_json.read_text())[i]["metadata"]["dataset_name"] for i in range(8)]
    assert any(names[a[0]] != names[b[0]] for a, b in zip(*order))
    runs = {"plain": replace(base, output_dir=str(tmp_path / "plain")),
            "zero3": replace(base, output_dir=str(tmp_path / "zero3"), deepspeed=str(tmp_path / "zero3.json")),
            "resumed": replace(base, output_dir=str(tmp_path / "resumed"), deepspeed=str(tmp_path / "zero3.json"),
                               max_steps=1)}
    for port, (name, cfg) in zip((29521, 29523, 29525), runs.items()):
        (tmp_path / f"{name}.yaml").write_text(cfg.to_yaml())
        _torchrun(tmp_path / f"{name}.yaml", port)
    _torchrun(tmp_path / "resumed.yaml", 29527, "--resume", "--set", "max_steps=2")

    def shapes(folder):
        with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    # full tensors, not this rank's (or empty) partitions
    assert shapes(tmp_path / "zero3" / "checkpoint-2") == shapes(ckpt)
    start = _weights(ckpt)
    finals = {name: _weights(tmp_path / name / "checkpoint-2") for name in runs}
    summaries = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in runs}
    for name, summary in summaries.items():
        sums = summary["replica_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1], name
    assert summaries["zero3"]["metrics"]["alignment"]["last"] > 0
    # Adam hides a uniformly mis-scaled gradient; the gradient norms do not
    for key in ("first", "last"):
        assert summaries["zero3"]["metrics"]["grad_norm"][key] == pytest.approx(
            summaries["plain"]["metrics"]["grad_norm"][key], rel=1e-4)
    changed = 0
    for k in finals["plain"]:
        # reduction order differs (DeepSpeed reduce-scatters each micro-batch, we all-reduce the sum):
        # ~1e-7 relative in a gradient; Adam's first steps move a weight by ~lr * g / (|g| + eps), so an
        # element whose gradient is near eps can move by a visible fraction of lr: tolerance lr / 100
        torch.testing.assert_close(finals["zero3"][k], finals["plain"][k], rtol=1e-4, atol=base.lr / 100, msg=k)
        # DeepSpeed restores its fp32 partitions, optimizer moments and our RNG / data position exactly
        torch.testing.assert_close(finals["resumed"][k], finals["zero3"][k], rtol=0, atol=0, msg=k)
        changed += not torch.equal(finals["plain"][k], start[k])
    assert changed > 10


def test_stage2_refuses_an_incomplete_teacher_store(setup, tmp_path):
    """Pre-flight: every training sample must have teacher states before step 1."""
    from monet.train.teacher_store import TeacherStoreWriter

    root, data, ckpt = setup
    model, _ = monet.load_model(ckpt)
    store = tmp_path / "partial"
    n_layers = model.config.text_config.num_hidden_layers + 1
    with TeacherStoreWriter(store, num_layers_total=n_layers, dtype=torch.float32,
                            hidden_size=model.config.text_config.hidden_size, kind="observation_reps") as w:
        w.add("Synth_Zoom/train-000000", torch.zeros(n_layers, 3, model.config.text_config.hidden_size))
    cfg = config(root, data, ckpt, 2, "partial", teacher="store", teacher_store=str(store), max_steps=1)
    with pytest.raises(ValueError, match="lacks 7 of 8 training samples"):
        run_sft(cfg, progress=False, printer=lambda _: None)


def test_collated_stage2_metadata_gives_the_same_mask_as_recomputing(setup):
    from monet.model.training import attention_mask_4d

    root, data, ckpt = setup
    cfg = config(root, data, ckpt, 2, "meta")
    model, processor = monet.load_model(cfg.model, latent_size=K)
    ex = load_stage_dataset(cfg, processor, 2, printer=lambda _: None)
    lb = StageCollator(processor)([ex[i] for i in range(3)]).to_latent_batch()
    assert lb.kind is not None and lb.step is not None
    fresh = replace(lb, kind=None, step=None)
    assert torch.equal(attention_mask_4d(model, lb, torch.float32), attention_mask_4d(model, fresh, torch.float32))


def test_set_values_are_typed_by_the_config_field(tmp_path):
    from monet.train.config import parse_overrides

    got = parse_overrides(["lr=2e-5", "max_steps=10", "save_every=none", "data=a.json,b.json",
                           "alignment_layers=[0, 3]", "freeze_vision=false", "max_grad_norm=1"])
    assert got == {"lr": 2e-5, "max_steps": 10, "save_every": None, "data": ["a.json", "b.json"],
                   "alignment_layers": [0, 3], "freeze_vision": False, "max_grad_norm": 1.0}
    assert type(got["lr"]) is float and type(got["max_grad_norm"]) is float
    for bad, message in (("lr=fast", "lr='fast' is not a number"), ("max_steps=2.5", "is not an integer"),
                         ("freeze_vision=maybe", "is not a boolean"), ("learning_rate=1", "unknown setting"),
                         ("lr", "must look like key=value")):
        with pytest.raises(ValueError, match=message):
            parse_overrides([bad])
    (tmp_path / "c.yaml").write_text("stage: 1\nmodel: m\ndata: d.json\nlr: 1e-5\n")  # YAML reads 1e-5 as a string
    assert SFTConfig.from_yaml(tmp_path / "c.yaml").lr == 1e-5
    (tmp_path / "c.yaml").write_text("stage: 1\nmodel: m\ndata: d.json\nmax_steps: lots\n")
    with pytest.raises(ValueError, match="max_steps='lots' is not an integer"):
        SFTConfig.from_yaml(tmp_path / "c.yaml")
    for field, value in (("max_steps", 0), ("max_steps", -3), ("save_every", 0), ("max_nonfinite_steps", 0),
                         ("keep_last", 0), ("epochs", 0.0)):
        with pytest.raises(ValueError, match=field):
            SFTConfig(stage=1, model="m", data=["d"], **{field: value})


def test_a_nonfinite_step_is_skipped_and_training_continues(setup, monkeypatch):
    """Step 2's loss is NaN: its update is skipped (weights and optimizer state unchanged), the
    run continues, the metrics row is strict JSON with null, and the summary counts the skip."""
    import monet.train.sft as sft

    root, data, ckpt = setup
    cfg = config(root, data, ckpt, 1, "nanstep", max_steps=3)
    tr = trainer_for(cfg)
    real, calls = sft.micro_batch_losses, []

    def poisoned(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            loss, parts = loss * float("nan"), {**parts, "ce_sum": float("nan")}
        return loss, parts

    monkeypatch.setattr(sft, "micro_batch_losses", poisoned)
    snapshots = []
    real_step = tr.train_step

    def recording_step(micro):
        out = real_step(micro)
        snapshots.append({n: p.detach().clone() for n, p in tr.model.named_parameters()})
        return out

    tr.train_step = recording_step
    summary = tr.train()
    tr.close()
    assert summary["steps"] == 3 and summary["skipped_steps"] == 1
    for n in snapshots[0]:
        assert torch.equal(snapshots[1][n], snapshots[0][n]), n  # step 2 changed nothing
    assert any(not torch.equal(snapshots[2][n], snapshots[1][n]) for n in snapshots[0])  # step 3 trained
    rows = [json.loads(x) for x in (root / "nanstep" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] is None and rows[1]["skipped"] is True and "skipped" not in rows[2]
    assert tr.nonfinite_streak == 0 and tr.nonfinite_total == 1


def test_resume_with_changed_settings_warns_and_applies_them(setup):
    root, data, ckpt = setup
    first = config(root, data, ckpt, 1, "changed", max_steps=2, save_every=1)
    run_sft(first, progress=False, printer=lambda _: None)
    lines = []
    second = replace(first, max_steps=3, lr=1e-3, log_every=1)
    summary = run_sft(second, resume=True, progress=False, printer=lines.append)
    text = "\n".join(lines)
    assert "resuming" in text and "3 changed setting(s)" in text
    assert "lr: 0.003 -> 0.001: takes effect" in text and "max_steps: 2 -> 3: takes effect" in text
    rows = [json.loads(x) for x in (root / "changed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # no duplicate steps after the resume
    assert rows[2]["lr"] == pytest.approx(1e-3, rel=0, abs=0) and rows[0]["lr"] == 3e-3
    assert summary["steps"] == 3 and summary["metrics"]["lr"]["first"] == 3e-3  # covers the whole run
    with pytest.raises(ValueError, match=r"cannot resume .*checkpoint-3 with changed latent_size \(2 -> 3"):
        run_sft(replace(second, latent_size=3, max_steps=4), resume=True, progress=False, printer=lambda _: None)


def test_stage_table_is_the_single_source(setup):
    """The trainer, the precompute and the store read one table: stage 2 <- stage-1 layout,
    observation reps; stage 3 <- stage-2 layout, latents."""
    from monet.train import teacher_store
    from monet.train.teacher_targets import TARGETS, for_precompute, for_stage

    assert [(t.student_stage, t.teacher_stage, t.positions, t.store_kind, t.precompute) for t in TARGETS] == [
        (2, 1, "observation", "observation_reps", "teacher-reps"), (3, 2, "latent", "latents", "teacher-latents")]
    assert teacher_store.KINDS == ("observation_reps", "latents") and for_stage(1) is None
    assert for_precompute("teacher-latents") is for_stage(3)
    with pytest.raises(ValueError, match="unknown precompute target 'teacher-x'"):
        for_precompute("teacher-x")
    root, data, ckpt = setup
    store = root / "table_reps"
    c1 = config(root, data, ckpt, 1, "table1")
    run_precompute(c1, "teacher-reps", store, dtype="float32", progress=False, printer=lambda _: None)
    assert teacher_store.TeacherStore(store).kind == for_stage(2).store_kind
    with pytest.raises(teacher_store.TeacherStoreError, match="holds 'observation_reps' states, this run needs 'latents'"):
        trainer_for(config(root, data, ckpt, 3, "table3", teacher="store", teacher_store=str(store)))
