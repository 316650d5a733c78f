"""The README's first Python example runs as written (keeps the README true)."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_hf_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    assert "monet.generate" in example
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "<abs_vis_token><latent></abs_vis_token>" in out  # the force_latent request opened a span
