"""Hand-written Monet-SFT samples (JSON dicts) and their images, written into a test folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from monet.testing import synthetic_image

PH = "<abs_vis_token></abs_vis_token>"
SYSTEM = "You are a helpful assistant."
QUESTION = "What colour is the box?"
REASON = "Let me zoom in."
OBSERVATION = "The box is red."
FINAL = " So the answer is \\boxed{red}."


def write_images(root: Path) -> None:
    """q0.png (112x112), q1.png (84x56), h0.png / h1.png (56x56), bad.png (not an image)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    synthetic_image(1, (112, 112)).save(root / "img" / "q0.png")
    synthetic_image(2, (84, 56)).save(root / "img" / "q1.png")
    synthetic_image(3, (56, 56)).save(root / "img" / "h0.png")
    synthetic_image(4, (56, 56)).save(root / "img" / "h1.png")
    (root / "img" / "bad.png").write_bytes(b"this is not a png")


def good_sample(sample_id="s0", dataset="Hand") -> dict:
    """One question image, one helper image, one observation."""
    return {
        "metadata": {"dataset_name": dataset, "sample_id": sample_id},
        "data": [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
            {"role": "user", "content": [{"type": "image", "image": "img/q0.png"},
                                         {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": REASON + PH},
                {"type": "image", "image": "img/h0.png"},
                {"type": "text", "text": f"<observation>{OBSERVATION}</observation>{FINAL}"},
            ]},
        ],
    }


def two_helper_sample(sample_id="s2") -> dict:
    """Two question images and two helper images (each preceded by a placeholder)."""
    s = good_sample(sample_id)
    s["data"][1]["content"].insert(1, {"type": "image", "image": "img/q1.png"})
    s["data"][2]["content"] = [
        {"type": "text", "text": "First look." + PH},
        {"type": "image", "image": "img/h0.png"},
        {"type": "text", "text": "<observation>A box.</observation> Then look again." + PH},
        {"type": "image", "image": "img/h1.png"},
        {"type": "text", "text": "<observation>It is red.</observation> \\boxed{red}"},
    ]
    return s


def variant(fn, sample_id) -> dict:
    s = copy.deepcopy(good_sample(sample_id))
    fn(s)
    return s


def write_json(path: Path, samples) -> Path:
    path.write_text(json.dumps(samples))
    return path


_PROCESSOR = None


def tiny_processor():
    """The tiny checkpoint's Qwen2_5_VLProcessor (built once per session, cached on disk)."""
    global _PROCESSOR
    if _PROCESSOR is None:
        from transformers import AutoProcessor

        from monet.testing import build_tiny_checkpoint

        _PROCESSOR = AutoProcessor.from_pretrained(build_tiny_checkpoint(cache=True))
    return _PROCESSOR


def load_hand_samples(root: Path, *samples: dict):
    """Write images and ``samples`` under ``root`` and load them (asserting none is rejected)."""
    from monet.data import load_sft_dataset

    write_images(root)
    loaded, report = load_sft_dataset(write_json(root / "hand.json", list(samples)))
    assert report.rejected == 0, report.summary()
    return loaded
