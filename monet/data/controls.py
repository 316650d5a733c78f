"""Control data layouts for the quickstart comparison (same samples, other assistant turns).

A control answers the question that a Monet sample asks, but without latent reasoning:

* ``direct`` — the assistant turn is only ``\\boxed{answer}`` (the answer of the reference turn).
  Measures what the model learns from question -> answer alone.
* ``text`` — text-only reasoning: the reference assistant turn with every helper image and every
  latent placeholder (``<abs_vis_token></abs_vis_token>``) removed; the text, including the
  ``<observation>`` sentences, is kept. Measures what verbal reasoning without a visual step gets.

Both are plain Monet-SFT samples with no helper image, so they are trained with the stage-1 layout
(the only layout that has no helper image requirement) and decoded without images or latents.
The transform works on the raw JSON (``{"metadata", "data"}`` per sample, the Monet-SFT-125K
format); image paths stay as written, so the control file shares the source's image root.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

from monet.atomic import atomic_write_bytes
from monet.data.sft_format import PLACEHOLDER

CONTROLS = ("direct", "text")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _assistant(sample: dict, where: str) -> dict:
    turns = sample.get("data")
    if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict) \
            or turns[-1].get("role") != "assistant":
        raise ValueError(f"{where}: the last turn is not an assistant turn")
    return turns[-1]


def _answer_text(turn: dict) -> str:
    return "".join(c.get("text", "") for c in turn.get("content", []) if c.get("type") == "text")


def control_sample(sample: dict[str, Any], kind: str, *, where: str = "sample") -> dict[str, Any]:
    """The ``kind`` control (``direct`` or ``text``) of one raw sample; the input is not modified.

    Raises ``ValueError`` naming ``where`` when the sample has no assistant turn or (``direct``)
    no ``\\boxed{}`` answer."""
    if kind not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {kind!r}")
    out = copy.deepcopy(sample)
    turn = _assistant(out, where)
    text = _answer_text(turn)
    if kind == "direct":
        boxes = _BOXED.findall(text)
        if not boxes:
            raise ValueError(f"{where}: the assistant turn has no \\boxed{{}} answer")
        turn["content"] = [{"type": "text", "text": f"\\boxed{{{boxes[-1]}}}"}]
    else:
        # Text items joined in order; the helper images between them disappear with the
        # placeholder that announced them (the sentence before it still ends the same way).
        turn["content"] = [{"type": "text", "text": text.replace(PLACEHOLDER, "")}]
    meta = out.setdefault("metadata", {})
    if isinstance(meta, dict):
        meta["control"] = kind
    return out


def write_control(src_json: str | os.PathLike, dst_json: str | os.PathLike, kind: str) -> Path:
    """Write the ``kind`` control of every sample of ``src_json`` (a JSON list) to ``dst_json``.
    Sample ``i`` of the output is the control of sample ``i`` of the input (same metadata ids)."""
    src = Path(src_json)
    try:
        samples = json.loads(src.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{src}: not valid JSON ({e})") from None
    if not isinstance(samples, list):
        raise ValueError(f"{src}: expected a JSON list of samples")
    out = [control_sample(s, kind, where=f"{src} sample {i}") for i, s in enumerate(samples)]
    dst = Path(dst_json)
    atomic_write_bytes(dst, (json.dumps(out, indent=1) + "\n").encode("utf-8"))
    return dst
