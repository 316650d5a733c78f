"""The ``monet`` command line."""

from __future__ import annotations

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
    assert "latent positions: [0, 1, 2]" in out
    assert "10 tokens, 3 latent steps in 1 spans" in err and "tokens/s" in err


def test_generate_reports_bad_input(tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert rc == 2
    assert "model path does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x"])  # --model is required
