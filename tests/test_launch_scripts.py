"""Launch scripts (scripts/sft_stage*.sh, scripts/precompute_teacher_*.sh) in dry-run mode, and the
command line's imports: no command pulls in DeepSpeed (or the model stack) before it needs it, and
DeepSpeed's import-time chatter goes to stderr."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from monet.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"

#: script -> (monet command, stage of its config, stage whose checkpoint is the model, extra checks)
CASES = {
    "sft_stage1.sh": (["sft"], 1, None, {"output_dir": "stage1"}),
    "sft_stage2.sh": (["sft"], 2, "stage1", {"output_dir": "stage2", "teacher_store": "teacher_reps"}),
    "sft_stage3.sh": (["sft"], 3, "stage1", {"output_dir": "stage3", "teacher_store": "teacher_latents"}),
    "precompute_teacher_reps.sh": (["precompute", "teacher-reps"], 1, "stage1", {}),
    "precompute_teacher_latents.sh": (["precompute", "teacher-latents"], 2, "stage2", {}),
}


def fake_runs(root: Path) -> Path:
    """A RUNS folder where stages 1 and 2 finished (``latest`` names a checkpoint)."""
    for stage, step in (("stage1", 7), ("stage2", 3)):
        (root / stage / f"checkpoint-{step}").mkdir(parents=True)
        (root / stage / "latest").write_text(f"checkpoint-{step}\n")
    return root


def dry_run(script: str, runs: Path, *args: str, env_flag: bool = False, nproc: str | None = None):
    env = {**os.environ, "RUNS": str(runs), "PYTHON": sys.executable}
    env.pop("DRY_RUN", None)
    if env_flag:
        env["DRY_RUN"] = "1"
    else:
        args = ("--dry-run", *args)
    if nproc is not None:
        env["NPROC"] = nproc
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd="/")


def monet_args(cmd: list[str]) -> list[str]:
    """The ``monet`` arguments of a launch command (after ``-m monet.cli``)."""
    i = cmd.index("monet.cli")
    assert cmd[i - 1] == "-m"
    return cmd[i + 1:]


def set_values(args: list[str]) -> dict[str, str]:
    return dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")


@pytest.mark.parametrize("script", sorted(CASES))
def test_dry_run_prints_a_well_formed_command(script, tmp_path):
    command, stage, model_from, expect = CASES[script]
    runs = fake_runs(tmp_path / "runs")
    res = dry_run(script, runs, "--set", "max_steps=2")
    assert res.returncode == 0, res.stderr
    cmd = shlex.split(res.stdout.strip())
    assert len(res.stdout.strip().splitlines()) == 1
    args = monet_args(cmd)
    assert args[:len(command)] == command and "--dry-run" not in args
    if command[0] == "sft":  # torchrun over 8 processes by default
        assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
        assert cmd[cmd.index("--nproc_per_node") + 1] == "8"
    else:  # one process for the precompute
        assert cmd[:3] == [sys.executable, "-m", "monet.cli"]
    parsed = build_parser(args).parse_args(args)  # what `monet` would do with it
    config = Path(parsed.config)
    assert config.is_file() and config.parent == SCRIPTS / "configs"
    raw = yaml.safe_load(config.read_text())
    assert raw["stage"] == stage
    sets = set_values(args)
    assert sets["max_steps"] == "2"  # extra arguments reach monet
    if model_from is not None:
        latest = (runs / model_from / "latest").read_text().strip()
        assert sets["model"] == str(runs / model_from / latest)
    for key, sub in expect.items():
        assert sets[key] == str(runs / sub)
    if command[0] == "precompute":
        assert parsed.out == str(runs / ("teacher_reps" if "reps" in script else "teacher_latents"))
        assert parsed.dtype == "bfloat16"
    # the config + overrides form a valid SFTConfig of the right stage (typed --set values)
    from monet.train.config import SFTConfig, parse_overrides

    cfg = SFTConfig.from_yaml(config, parse_overrides(parsed.set))
    assert cfg.stage == stage and cfg.max_steps == 2 and isinstance(cfg.lr, float)
    if cfg.deepspeed:
        assert Path(cfg.deepspeed).is_file()


def test_dry_run_by_variable_and_process_count(tmp_path):
    runs = fake_runs(tmp_path / "runs")
    res = dry_run("sft_stage1.sh", runs, env_flag=True, nproc="2")
    assert res.returncode == 0, res.stderr
    cmd = shlex.split(res.stdout)
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2" and monet_args(cmd)[0] == "sft"
    res = dry_run("sft_stage1.sh", runs, env_flag=True, nproc="1")
    assert shlex.split(res.stdout)[:3] == [sys.executable, "-m", "monet.cli"]


def test_missing_previous_stage_is_an_error_unless_dry_run(tmp_path):
    empty = tmp_path / "runs"
    empty.mkdir()
    res = dry_run("sft_stage2.sh", empty)
    assert res.returncode == 0 and "no finished checkpoint yet" in res.stderr
    assert set_values(monet_args(shlex.split(res.stdout)))["model"] == str(empty / "stage1" / "checkpoint-LATEST")
    env = {**os.environ, "RUNS": str(empty), "PYTHON": "/bin/false"}
    env.pop("DRY_RUN", None)
    res = subprocess.run(["bash", str(SCRIPTS / "sft_stage2.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no finished checkpoint in" in res.stderr and "stage1" in res.stderr
    assert res.stdout == ""


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_building_the_cli_imports_no_heavy_library():
    res = _python("import sys, monet.cli\n"
                  "for argv in (['generate'], ['sft'], ['precompute'], ['data'], ['quickstart']):\n"
                  "    monet.cli.build_parser(argv)\n"
                  "print(sorted(m for m in ('deepspeed', 'transformers', 'vllm', 'accelerate') if m in sys.modules))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_generate_output_has_no_library_chatter(tmp_path):
    from monet.testing import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(cache=True)
    res = _python("import sys\nfrom monet.cli import main\n"
                  f"rc = main(['generate', '--model', {str(ckpt)!r}, '--prompt', 'hi', '--max-new-tokens', '3'])\n"
                  "print('DEEPSPEED' if 'deepspeed' in sys.modules else 'NO-DEEPSPEED', file=sys.stderr)\n"
                  "sys.exit(rc)")
    assert res.returncode == 0, res.stderr
    assert "NO-DEEPSPEED" in res.stderr
    assert "[INFO]" not in res.stdout and "[WARNING]" not in res.stdout and "accelerator" not in res.stdout


def test_deepspeed_chatter_goes_to_stderr():
    pytest.importorskip("deepspeed", reason="DeepSpeed is installed by scripts/setup_env.sh (train extra)")
    res = _python("from monet.train.deepspeed_engine import import_deepspeed\n"
                  "ds = import_deepspeed()\n"
                  "from deepspeed.utils import logger\n"
                  "logger.warning('probe-message')\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert "probe-message" in res.stderr
