"""The ``monet`` command line."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from monet.cli import main
from monet.testing import build_tiny_checkpoint, synthetic_image
from monet.render import SPAN_PLACEHOLDER


def test_generate_prints_rendered_answer_and_summary(tmp_path, capsys):
    ckpt = build_tiny_checkpoint(cache=True)
    img = tmp_path / "img.png"
    synthetic_image(0).save(img)
    rc = main(["generate", "--model", str(ckpt), "--image", str(img), "--prompt", "What is here?",
               "--latent-size", "3", "--force-latent", "--max-new-tokens", "10", "--show-latents"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.startswith(SPAN_PLACEHOLDER)
    assert "latent positions: [1, 2, 3]" in out  # START forced as token 0, then K = 3 latents
    assert "10 tokens, 3 latent steps in 1 spans" in err and "tokens/s" in err


def test_generate_reports_bad_input(tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert rc == 2
    assert "model path does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x"])  # --model is required


def test_data_synth_and_check(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--n", "3", "--n-eval", "2", "--seed", "1"]) == 0
    assert "wrote 3 training samples" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "d" / "train.json")]) == 0
    assert "3" in capsys.readouterr().out


# `monet quickstart --fast` end to end: tests/test_quickstart.py::test_quickstart_fast_end_to_end


def test_precompute_with_verify(tmp_path, capsys):
    import yaml

    from monet.data.synth import synthesize_dataset

    data = synthesize_dataset(tmp_path / "d", n=3, n_eval=0, seed=2)
    cfg = {"stage": 1, "model": str(build_tiny_checkpoint(cache=True)), "data": [str(data.train_json)],
           "image_root": str(data.root), "latent_size": 2, "output_dir": str(tmp_path / "o"), "teacher": "none"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc = main(["precompute", "teacher-reps", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "store"),
               "--dtype", "float32", "--verify", "--device", "cpu"])
    assert rc == 0
    assert "verify: 3/3 entries readable" in capsys.readouterr().out


def _run_cli(*args: str):
    return subprocess.run([sys.executable, "-m", "monet.cli", *args], capture_output=True, text=True, timeout=600)


def test_generate_stdout_carries_only_the_answer(tmp_path):
    """A fresh interpreter (real import order): library chatter (DeepSpeed's accelerator banner,
    progress bars, warnings) must not reach stdout."""
    ckpt = build_tiny_checkpoint(cache=True)
    r = _run_cli("generate", "--model", str(ckpt), "--prompt", "hi", "--latent-size", "2", "--force-latent",
                 "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(SPAN_PLACEHOLDER), r.stdout
    # bad input through the CLI: a clear message, exit code 2, no traceback
    for extra, pattern in [(["--image", str(tmp_path)], "is a directory, not an image file"),
                           (["--device", "cuda:7"], "CUDA is not available|only")]:
        r = _run_cli("generate", "--model", str(ckpt), "--prompt", "x", *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert re.search(pattern, r.stderr), r.stderr
