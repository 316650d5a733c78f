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


def _strict(line: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_nonfinite_values_are_written_as_null(tmp_path):
    log = MetricsLogger(tmp_path, printer=lambda _: None)
    log.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1, "skipped": True})
    log.log(2, {"loss": 2.0, "grad_norm": -float("inf"), "lr": 0.1})
    rows = [_strict(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] is None and rows[0]["grad_norm"] is None and rows[0]["skipped"] is True
    assert rows[1]["loss"] == 2.0 and rows[1]["grad_norm"] is None
    s = log.summary()
    assert s["loss"] == {"first": 2.0, "last": 2.0, "mean": 2.0} and "grad_norm" not in s and "skipped" not in s


def test_resume_drops_rows_past_the_checkpoint_and_keeps_the_history(tmp_path):
    first = MetricsLogger(tmp_path, printer=lambda _: None)
    for step in range(1, 6):
        first.log(step, {"loss": float(10 - step)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "loss": 3.')  # torn by a crash mid-write
    again = MetricsLogger(tmp_path, printer=lambda _: None)
    assert again.resume_at(3) == 3  # steps 4, 5 and the torn line
    for step in (4, 5):
        again.log(step, {"loss": float(20 - step)})
    rows = [_strict(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == [9.0, 8.0, 7.0, 16.0, 15.0]
    assert again.summary()["loss"] == {"first": 9.0, "last": 15.0, "mean": (9 + 8 + 7 + 16 + 15) / 5}
    assert rows[3]["time_s"] >= rows[2]["time_s"]  # the clock continues from the kept rows
    assert MetricsLogger(tmp_path / "fresh", printer=lambda _: None).resume_at(0) == 0
