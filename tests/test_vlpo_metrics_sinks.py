"""VLPO metrics sinks: TensorBoard / W&B through the SFT trainer's shared ScalarSinks, the typed
run-config settings, resume without duplicated steps, clear errors for missing packages."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types

import pytest

from monet.rl.metrics_log import MetricsLog
from monet.rl.run_config import VLPORunConfig
from monet.train.metrics import MetricsLogger

HAS_TB = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None


class RecordingWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (same constructor / add_scalar / close)."""

    made: list["RecordingWriter"] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        RecordingWriter.made.append(self)

    def add_scalar(self, tag, value, global_step):
        assert not self.closed
        self.scalars.append((tag, value, global_step))

    def close(self):
        self.closed = True


@pytest.fixture(autouse=True)
def _fresh_writers():
    RecordingWriter.made = []


def _rows(seed_rows: int):
    import random

    rng = random.Random(seed_rows)
    out = []
    for step in range(1, seed_rows + 1):
        out.append({"step": step, "reward/mean": rng.uniform(-1, 1), "grad_norm": rng.choice([rng.random(), math.nan]),
                    "count/skipped_nonfinite": rng.randrange(3), "trained": rng.randrange(2), "flag": True,
                    "time/step": math.inf if step == 2 else rng.random(), "note": "text"})
    return out


def _finite_scalars(row):
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and v is not None and math.isfinite(v)}


def test_tensorboard_gets_every_finite_number_of_each_row(tmp_path):
    log = MetricsLog(tmp_path, printer=None, tensorboard=True, summary_writer=RecordingWriter)
    rows = _rows(4)
    for r in rows:
        log.log(r)
    log.close()
    (w,) = RecordingWriter.made
    assert w.log_dir == str(tmp_path / "tensorboard") and w.purge_step is None and w.closed
    # rebuild the per-step scalars from the event calls and compare with the JSONL file
    got: dict[int, dict[str, float]] = {}
    for tag, value, step in w.scalars:
        assert tag not in got.setdefault(step, {}), (tag, step)  # once per step
        got[step][tag] = value
    jsonl = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl] == [1, 2, 3, 4]
    assert got == {r["step"]: {k: v for k, v in _finite_scalars(r).items()} for r in jsonl}
    assert "time/step" not in got[2] and "flag" not in got[1] and "note" not in got[1]


def test_resume_drops_later_rows_and_purges_them_in_tensorboard(tmp_path):
    log = MetricsLog(tmp_path, printer=None, tensorboard=True, summary_writer=RecordingWriter)
    rows = _rows(5)
    for r in rows:
        log.log(r)
    log.close()
    log = MetricsLog(tmp_path, printer=None, tensorboard=True, summary_writer=RecordingWriter)
    log.resume_at(2)
    redo = {**rows[2], "reward/mean": 0.125}
    log.log(redo)
    log.close()
    first, second = RecordingWriter.made
    assert second.purge_step == 3  # TensorBoard hides the first run's events of steps >= 3
    assert {s for _, _, s in second.scalars} == {3}
    assert ("reward/mean", 0.125, 3) in second.scalars
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_no_sink_by_default(tmp_path):
    log = MetricsLog(tmp_path, printer=None, summary_writer=RecordingWriter)
    log.log(_rows(1)[0])
    log.close()
    assert RecordingWriter.made == [] and not (tmp_path / "tensorboard").exists()


def test_wandb_gets_each_row_at_its_step(tmp_path, monkeypatch):
    """A stand-in `wandb` module (as in tests/test_metrics.py) records init/log/finish."""
    calls = []
    run = types.SimpleNamespace(log=lambda m, step: calls.append(("log", step, m)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw["project"], kw["config"])) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLog(tmp_path, printer=None, wandb_project="monet-vlpo", run_config={"lr": 1e-6})
    log.log({"step": 7, "reward/mean": 0.5})
    log.close()
    assert calls == [("init", "monet-vlpo", {"lr": 1e-6}), ("log", 7, {"reward/mean": 0.5}), ("finish",)]


@pytest.mark.skipif(HAS_TB, reason="tensorboard is installed here: the missing-package error cannot occur")
def test_tensorboard_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match=r"tensorboard: true needs the tensorboard package \(pip install"):
        MetricsLog(tmp_path, tensorboard=True)
    with pytest.raises(ImportError, match="tensorboard: true needs the tensorboard package"):
        MetricsLogger(tmp_path, tensorboard=True)  # the same message: one implementation


@pytest.mark.skipif(HAS_WANDB, reason="wandb is installed here: the missing-package error cannot occur")
def test_wandb_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match=r"wandb_project is set but wandb is not installed \(pip install wandb\)"):
        MetricsLog(tmp_path, wandb_project="p")


@pytest.mark.skipif(not HAS_TB, reason="tensorboard is not installed (the recording writer tests cover the calls)")
def test_tensorboard_event_file_matches_the_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, printer=None, tensorboard=True)
    for r in _rows(3):
        log.log(r)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    jsonl = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expect = {}
    for r in jsonl:
        for k, v in _finite_scalars(r).items():
            expect.setdefault(k, []).append((r["step"], v))
    assert sorted(acc.Tags()["scalars"]) == sorted(expect)
    for k, pts in expect.items():
        got = [(e.step, e.value) for e in acc.Scalars(k)]
        assert [s for s, _ in got] == [s for s, _ in pts]
        assert all(math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(got, pts))  # stored as float32


def test_run_config_settings(tmp_path):
    base = dict(model="m", data=["d.parquet"])
    cfg = VLPORunConfig.from_dict(base, {"tensorboard": True, "wandb_project": "proj", "offload_reference": True})
    assert (cfg.tensorboard, cfg.wandb_project, cfg.offload_reference) == (True, "proj", True)
    d = VLPORunConfig(**base)
    assert (d.tensorboard, d.wandb_project, d.offload_reference) == (False, None, False)
    assert VLPORunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="tensorboard must be true or false, got 'yes'"):
        VLPORunConfig(**base, tensorboard="yes")
    with pytest.raises(ValueError, match="offload_reference must be true or false, got 1"):
        VLPORunConfig(**base, offload_reference=1)
    with pytest.raises(ValueError, match="wandb_project must be a W&B project name or null, got ''"):
        VLPORunConfig(**base, wandb_project="")


@pytest.mark.skipif(HAS_TB, reason="tensorboard is installed here: the missing-package error cannot occur")
def test_trainer_fails_before_loading_the_model(tmp_path):
    from monet.rl.trainer import VLPOTrainer

    cfg = VLPORunConfig(model=str(tmp_path / "no-model-here"), data=[str(tmp_path / "no.parquet")],
                        output_dir=str(tmp_path / "run"), engine="hf", tensorboard=True)
    with pytest.raises(ImportError, match="tensorboard: true needs the tensorboard package"):
        VLPOTrainer(cfg, printer=None)  # not a model-loading error: the sinks are checked first
