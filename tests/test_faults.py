"""Fault injection on the tiny model: a SIGKILL during a checkpoint write, a rerun into a used
directory, concurrent runs, corrupted teacher-store bytes, NaN losses, a malicious pickle and a
full disk. Each test is named for the fault class it covers."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from monet.cli import main
from monet.data.synth import synthesize_dataset
from monet.testing import build_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
K = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = synthesize_dataset(root / "data", n=4, n_eval=0, seed=3)
    return root, data, build_tiny_checkpoint(cache=True)


def write_config(world, name: str, **kw) -> Path:
    root, data, ckpt = world
    cfg = dict(stage=1, model=str(ckpt), data=[str(data.train_json)], image_root=str(data.root),
               output_dir=str(root / name), latent_size=K, lr=3e-3, warmup_steps=0, micro_batch_size=2,
               grad_accum=1, dtype="float32", gradient_checkpointing=False, log_every=100, teacher="none",
               cache_dir=str(root / "cache"), keep_last=2, max_steps=3, save_every=1)
    cfg.update(kw)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str) -> tuple[int, str]:
    """``monet ARGS`` in this process; returns (exit code, stderr+stdout text)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, err.getvalue() + out.getvalue()


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def strict_rows(path: Path) -> list[dict]:
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(world):
    """An uninterrupted 3-step run (the reference the fault scenarios are compared with)."""
    cfg = write_config(world, "straight")
    rc, text = run_cli("sft", "--config", str(cfg), "--device", "cpu")
    assert rc == 0, text
    return world[0] / "straight"


def test_sigkill_during_checkpoint_write_then_resume(world, straight_run):
    """SIGKILL while checkpoint-2 is half written: resume removes the debris, continues from
    checkpoint-1, ends at the uninterrupted run's weights, with each metrics step once."""
    cfg = write_config(world, "killed")
    out = world[0] / "killed"
    driver = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        import monet.train.checkpoint as ck
        real = ck.write_trainer_state
        def dying(folder, state):
            if state["step"] == 2:  # the model files of checkpoint-2 are already in the temporary folder
                (Path(folder) / "trainer_state.tensors").write_bytes(b"half")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(folder, state)
        ck.write_trainer_state = dying
        from monet.cli import main
        sys.exit(main(["sft", "--config", {str(cfg)!r}, "--device", "cpu"]))
    """)
    res = subprocess.run([sys.executable, "-c", driver], env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert [p.name for p in out.glob(".checkpoint-2.tmp-*")], "the kill left no half-written folder"
    assert (out / "latest").read_text().strip() == "checkpoint-1"
    assert [r["step"] for r in strict_rows(out / "metrics.jsonl")] == [1, 2]  # step 2 logged before the kill
    assert (out / ".run.lock").exists()  # left by the dead process; must not block the resume

    rc, text = run_cli("sft", "--config", str(cfg), "--device", "cpu", "--resume")
    assert rc == 0, text
    assert "removed unfinished checkpoint folders" in text and "resumed from" in text
    assert not list(out.glob(".checkpoint-*"))
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    assert [r["step"] for r in strict_rows(out / "metrics.jsonl")] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("checkpoint-1")
    ref = json.loads((straight_run / "summary.json").read_text())
    assert summary["metrics"]["loss"]["first"] == ref["metrics"]["loss"]["first"]  # covers the whole run
    a, b = weights(straight_run / "checkpoint-3"), weights(out / "checkpoint-3")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def test_rerun_into_used_directory_is_refused_or_overwritten(world, tmp_path):
    cfg = write_config(world, "used")
    out = world[0] / "used"
    assert run_cli("sft", "--config", str(cfg), "--device", "cpu")[0] == 0
    before = sorted(p.name for p in out.iterdir())
    assert "checkpoint-3" in before and "checkpoint-2" in before
    rc, text = run_cli("sft", "--config", str(cfg), "--device", "cpu", "--set", "max_steps=1")
    assert rc == 2 and "already holds an earlier run" in text and "--resume" in text and "--overwrite" in text
    assert sorted(p.name for p in out.iterdir()) == before
    # --overwrite: the old run's checkpoints go first, so retention can never delete the new one
    rc, text = run_cli("sft", "--config", str(cfg), "--device", "cpu", "--set", "max_steps=1", "--overwrite")
    assert rc == 0, text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / "latest").read_text().strip() == "checkpoint-1"
    assert [r["step"] for r in strict_rows(out / "metrics.jsonl")] == [1]
    # --overwrite never deletes what a run did not write
    (out / "notes.txt").write_text("mine")
    rc, text = run_cli("sft", "--config", str(cfg), "--device", "cpu", "--overwrite")
    assert rc == 2 and "not from an SFT run (notes.txt)" in text and (out / "latest").exists()


def test_retention_never_deletes_the_newest_checkpoint_of_the_run(tmp_path):
    """Checkpoints with higher steps from an abandoned continuation do not push the new one out."""
    from monet.train.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def save_pretrained(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"x")

    m = Model()
    for step in (5, 6):
        save_checkpoint(tmp_path, step, model=m, processor=None, trainer_state={"step": step}, keep_last=1)
    path = save_checkpoint(tmp_path, 2, model=m, processor=None, trainer_state={"step": 2}, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert latest_checkpoint(tmp_path) == path and load_trainer_state(path)["step"] == 2
    save_checkpoint(tmp_path, 3, model=m, processor=None, trainer_state={"step": 3}, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_concurrent_run_on_one_directory_is_refused(world):
    from monet.train.run_dir import RunDirectory

    cfg = write_config(world, "busy")
    holder = RunDirectory(world[0] / "busy")  # "the first run", alive
    try:
        res = subprocess.run([sys.executable, "-m", "monet.cli", "sft", "--config", str(cfg), "--device", "cpu"],
                             env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "in use by another run" in res.stderr and f"pid {os.getpid()}" in res.stderr
        assert not list((world[0] / "busy").glob("checkpoint-*"))
    finally:
        holder.release()
    RunDirectory(world[0] / "busy").release()  # free again once its holder is gone


def test_corrupt_teacher_store_bytes_fail_by_name_and_precompute_repairs(world):
    from monet.train.teacher_store import TeacherStore, verify

    root, data, ckpt = world
    store = root / "reps"
    cfg1 = write_config(world, "teacher1")
    assert run_cli("precompute", "teacher-reps", "--config", str(cfg1), "--out", str(store), "--dtype", "float32",
                   "--batch-size", "2", "--device", "cpu")[0] == 0
    good = TeacherStore(store)
    original = {k: good.get(k).clone() for k in good.keys()}  # a copy: get() may map the file
    good.close()
    index = json.loads((store / "index.json").read_text())
    shard = index["shards"][0]
    victim_keys = sorted(k for k, e in index["entries"].items() if e["shard"] == shard)
    raw = bytearray((store / shard).read_bytes())
    raw[-3] ^= 0x40  # same size, still parses: only the checksum can tell
    (store / shard).write_bytes(bytes(raw))

    cfg2 = write_config(world, "student2", stage=2, teacher="store", teacher_store=str(store), max_steps=1,
                        micro_batch_size=4)
    rc, text = run_cli("sft", "--config", str(cfg2), "--device", "cpu")
    assert rc == 2, text
    assert shard in text and "CRC32" in text and any(repr(k) in text for k in victim_keys), text
    assert not list((root / "student2").glob("checkpoint-*"))

    rc, text = run_cli("precompute", "teacher-reps", "--config", str(cfg1), "--out", str(store), "--dtype", "float32",
                       "--batch-size", "2", "--device", "cpu")
    assert rc == 0, text
    assert f"repairing {store}" in text and f"wrote {len(victim_keys)} samples" in text
    assert verify(store, checksums=True)["errors"] == []
    fixed = TeacherStore(store)
    assert sorted(fixed.keys()) == sorted(original)
    for k, v in original.items():
        assert torch.equal(fixed.get(k), v), k


def test_precompute_argument_errors_are_clear(world, capsys):
    cfg1 = write_config(world, "teacher_args")
    out = str(world[0] / "never")
    assert main(["precompute", "teacher-reps", "--config", str(cfg1), "--out", out, "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    assert main(["precompute", "teacher-reps", "--config", str(cfg1), "--out", out, "--layers", "a,b"]) == 2
    assert "--layers must be comma-separated hidden-state indices" in capsys.readouterr().err
    assert not Path(out).exists()


def _poisoned_checkpoint(world) -> Path:
    """The tiny checkpoint with a NaN in the final norm: every loss is NaN."""
    from safetensors.torch import load_file, save_file

    root, _, ckpt = world
    dst = root / "poisoned"
    if not dst.exists():
        shutil.copytree(ckpt, dst)
        w = load_file(str(dst / "model.safetensors"))
        name = next(k for k in w if k.endswith("language_model.norm.weight") or k.endswith("model.norm.weight"))
        w[name][0] = float("nan")
        save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_nan_loss_skips_steps_then_stops_without_a_checkpoint(world):
    cfg = write_config(world, "nan", model=str(_poisoned_checkpoint(world)), max_steps=6, max_nonfinite_steps=2,
                       save_every=None)
    out = world[0] / "nan"
    rc, text = run_cli("sft", "--config", str(cfg), "--device", "cpu")
    assert rc == 1, text
    assert "2 consecutive steps (up to step 2) had a non-finite loss" in text
    assert text.count("step skipped, weights unchanged") == 2
    assert not list(out.glob("checkpoint-*")) and not (out / "latest").exists()
    rows = strict_rows(out / "metrics.jsonl")  # strict JSON: NaN written as null
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] is None and r["ce"] is None and r["skipped"] is True for r in rows)


def test_nan_weights_are_never_checkpointed(world):
    """More allowed skips than steps: the run reaches its final save, which refuses NaN weights."""
    cfg = write_config(world, "nan_save", model=str(_poisoned_checkpoint(world)), max_steps=2,
                       max_nonfinite_steps=10, save_every=None)
    rc, text = run_cli("sft", "--config", str(cfg), "--device", "cpu")
    assert rc == 1 and "refusing to write a checkpoint with non-finite weights" in text, text
    assert not list((world[0] / "nan_save").glob("*checkpoint-*"))


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_in_a_checkpoint_is_refused(world, straight_run, tmp_path):
    root = world[0]
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"step": 1, "optimizer": _Payload(marker)})
    cases = {
        "pt": ("trainer_state.pt", "a pickle"),          # the old format, or a planted file
        "json": ("trainer_state.json", "not valid JSON"),
        "safetensors": ("trainer_state.tensors", "unreadable"),
        "legacy": ("trainer_state.safetensors", "unreadable"),  # the tensor file's name before; still read
        "weights": ("pytorch_model.bin", "no safetensors weights"),
    }
    for case, (planted, message) in cases.items():
        name = f"evil_{case}"
        out = root / name
        shutil.copytree(straight_run, out, ignore=shutil.ignore_patterns("cache", ".run.lock"))
        ckpt = out / "checkpoint-3"
        if case == "weights":
            (ckpt / "model.safetensors").unlink()
        else:
            for f in ("trainer_state.json", "trainer_state.tensors"):
                (ckpt / f).unlink()
            if case in ("safetensors", "legacy"):  # a valid JSON naming tensors, but the tensor file is a pickle
                shutil.copy(straight_run / "checkpoint-3" / "trainer_state.json", ckpt / "trainer_state.json")
        (ckpt / planted).write_bytes(payload)
        cfg = write_config(world, name)
        rc, text = run_cli("sft", "--config", str(cfg), "--device", "cpu", "--resume")
        assert rc == 2, (case, text)
        assert message in text and str(ckpt) in text, (case, text)
        assert not marker.exists(), f"{case}: the pickle was executed"
        assert (out / "latest").read_text().strip() == "checkpoint-3"


def test_disk_full_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from monet.atomic import DiskFullError
    from monet.train.checkpoint import latest_checkpoint, save_checkpoint
    from monet.train.metrics import MetricsLogger

    class Model(torch.nn.Module):
        def __init__(self, error=None):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
            self.error = error

        def save_pretrained(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"partial")
            if self.error is not None:
                raise self.error

    first = save_checkpoint(tmp_path, 1, model=Model(), processor=None, trainer_state={"step": 1})
    errors = [OSError(errno.ENOSPC, "No space left on device"),
              RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" })")]  # how safetensors reports it
    for err in errors:
        with pytest.raises(DiskFullError, match="no space left on device while writing checkpoint step 2: "
                                                + re.escape(str(tmp_path / "checkpoint-2"))):
            save_checkpoint(tmp_path, 2, model=Model(err), processor=None, trainer_state={"step": 2})
        assert latest_checkpoint(tmp_path) == first and not list(tmp_path.glob(".checkpoint-*"))
    log = MetricsLogger(tmp_path, printer=lambda _: None)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(log.path), "open", full)
    with pytest.raises(DiskFullError, match="no space left on device while writing training metrics: "
                                            + re.escape(str(tmp_path / "metrics.jsonl"))):
        log.log(1, {"loss": 1.0})


def test_malicious_pickle_in_deepspeed_shards_is_refused(tmp_path):
    """DeepSpeed unpickles its shards in full; they are parsed with the weights-only unpickler first."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by scripts/setup_env.sh (train extra)")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from monet.train.checkpoint import CheckpointError
    from monet.train.deepspeed_engine import check_deepspeed_checkpoint

    good = tmp_path / "good"
    good.mkdir()
    torch.save({"module": {"w": torch.ones(3)}, "zero_stage": ZeroStageEnum.gradients,
                "frags": [fragment_address(numel=3, start=0)], "loss_scaler": LossScaler(1.0)},
               good / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert check_deepspeed_checkpoint(good) == 1
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    torch.save({"module": {"w": torch.ones(3)}, "x": _Payload(marker)}, bad / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: refusing to let DeepSpeed unpickle it"):
        check_deepspeed_checkpoint(bad)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="holds no DeepSpeed checkpoint files"):
        check_deepspeed_checkpoint(tmp_path / "missing")
