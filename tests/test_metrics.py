"""Training metrics logger and checkpoint pointer handling."""

from __future__ import annotations

import json

import pytest

from monet.train.checkpoint import latest_checkpoint
from monet.train.metrics import MetricsLogger


def test_metrics_jsonl_table_and_summary(tmp_path):
    lines = []
    log = MetricsLogger(tmp_path, every=2, printer=lines.append)
    for step, loss in enumerate([3.0, 2.0, 1.0], start=1):
        log.log(step, {"loss": loss, "lr": 0.1})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["loss"] for r in rows] == [3.0, 2.0, 1.0]
    assert len(lines) == 3  # header + steps 1 and 2 (every=2 prints step 1 and multiples of 2)
    assert log.summary()["loss"] == {"first": 3.0, "last": 1.0, "mean": 2.0}


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "x", enabled=False)
    log.log(1, {"loss": 1.0})
    assert not (tmp_path / "x").exists() and log.summary()["loss"]["last"] == 1.0


def test_dangling_latest_pointer_is_an_error(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "latest").write_text("checkpoint-7\n")
    with pytest.raises(FileNotFoundError, match="checkpoint-7.*not a complete checkpoint"):
        latest_checkpoint(tmp_path)


def test_wandb_logging_goes_through_the_public_api(tmp_path, monkeypatch):
    """A stand-in `wandb` module records init/log/finish calls."""
    import sys
    import types

    calls = []
    run = types.SimpleNamespace(log=lambda m, step: calls.append(("log", step, m)),
                                finish=lambda: calls.append(("finish",)))
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw["project"])) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLogger(tmp_path, wandb_project="monet-test", run_config={"stage": 2}, printer=lambda _: None)
    log.log(1, {"loss": 2.5})
    log.close()
    assert calls == [("init", "monet-test"), ("log", 1, {"loss": 2.5}), ("finish",)]


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="wandb is not installed"):
        MetricsLogger(tmp_path, wandb_project="p")
