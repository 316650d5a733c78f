"""A deterministic synthetic visual-reasoning dataset in the Monet-SFT-125K format.

Each scene is a small image (112x112) of coloured shapes, one per corner region at most. The
question asks about the *small* shape in one corner (its colour or its kind); the assistant zooms
in (helper image = 2x zoom of a 28x28 crop around that shape, 56x56 pixels), states what it sees
in an ``<observation>`` and answers in ``\\boxed{}``::

    user:      [scene] "What colour is the small shape in the top-left corner? ..."
    assistant: "... so I will zoom in on that region.<abs_vis_token></abs_vis_token>" [crop]
               "<observation>The crop shows a red circle.</observation> ... \\boxed{red}."

Everything is a function of ``seed`` (each sample has its own RNG stream, so the first ``n``
samples do not depend on the total). The eval split uses separate streams and never repeats a
training scene. The command line ``monet data synth`` is expected to call
:func:`synthesize_dataset`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monet.atomic import atomic_write_bytes
from monet.data.sft_format import PLACEHOLDER

DATASET_NAME = "Synth_Zoom"
SCENE_SIZE = 112
CROP_SIZE = 28  # region around the target, zoomed 2x into the helper image
HELPER_SIZE = 56
SYSTEM_PROMPT = "You are a helpful assistant."

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
_BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (245, 240, 225))


@dataclass(frozen=True)
class SynthDataset:
    """Paths written by :func:`synthesize_dataset`. ``root`` is the image root of both files."""

    root: Path
    train_json: Path
    eval_json: Path
    n: int
    n_eval: int
    seed: int
    val_json: Path | None = None  # written when n_val > 0: the split to tune on
    n_val: int = 0
    captions_json: Path | None = None  # written with captions=True: captions of the training scenes


@dataclass(frozen=True)
class SplitDataset:
    """Paths written by the three-split tasks (:func:`monet.data.synth_multihop.synthesize_multihop`,
    :func:`monet.data.synth_keys.synthesize_keys`); ``root`` is the image root of all files."""

    root: Path
    train_json: Path
    val_json: Path
    eval_json: Path
    n: int
    n_val: int
    n_eval: int
    seed: int
    captions_json: Path | None = None  # written with captions=True: captions of the training scenes


@dataclass(frozen=True)
class _Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive


@dataclass(frozen=True)
class _Scene:
    background: tuple[int, int, int]
    corner: int
    ask: str  # "colour" or "shape"
    target: _Shape
    others: tuple[_Shape, ...]

    def signature(self) -> tuple:
        return (self.background, self.corner, self.ask, self.target, self.others)


def _shape_in(rng: random.Random, corner: int, size: int, colour: str | None = None) -> _Shape:
    half = SCENE_SIZE // 2
    ox, oy = (corner % 2) * half, (corner // 2) * half
    margin = 4
    x0 = ox + rng.randint(margin, half - margin - size)
    y0 = oy + rng.randint(margin, half - margin - size)
    return _Shape(rng.choice(SHAPES), colour or rng.choice(sorted(COLOURS)), (x0, y0, x0 + size - 1, y0 + size - 1))


def _random_scene(rng: random.Random) -> _Scene:
    corner = rng.randrange(4)
    target = _shape_in(rng, corner, rng.randint(9, 13))
    others = tuple(_shape_in(rng, c, rng.randint(9, 26)) for c in range(4) if c != corner and rng.random() < 0.75)
    return _Scene(rng.choice(_BACKGROUNDS), corner, rng.choice(("colour", "shape")), target, others)


def _draw(scene: _Scene):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for s in (scene.target, *scene.others):
        fill = COLOURS[s.colour]
        x0, y0, x1, y1 = s.box
        if s.kind == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(s.box, fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


def _helper(scene: _Scene, img):
    from PIL import Image

    x0, y0, x1, y1 = scene.target.box
    cx, cy = (x0 + x1 + 1) // 2, (y0 + y1 + 1) // 2
    left = min(max(0, cx - CROP_SIZE // 2), SCENE_SIZE - CROP_SIZE)
    top = min(max(0, cy - CROP_SIZE // 2), SCENE_SIZE - CROP_SIZE)
    crop = img.crop((left, top, left + CROP_SIZE, top + CROP_SIZE))
    return crop.resize((HELPER_SIZE, HELPER_SIZE), Image.Resampling.NEAREST)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sample_json(scene: _Scene, sample_id: str, scene_path: str, helper_path: str) -> dict[str, Any]:
    corner = CORNERS[scene.corner]
    t = scene.target
    if scene.ask == "colour":
        question = f"What colour is the small shape in the {corner} corner?"
        answer = t.colour
    else:
        question = f"What kind of shape is the small object in the {corner} corner?"
        answer = t.kind
    question += " Put the final answer in \\boxed{}."
    reasoning = (f"The question is about the small shape in the {corner} corner. It is too small to see "
                 f"clearly, so I will zoom in on that region.{PLACEHOLDER}")
    thing = f"{_article(t.colour)} {t.colour} {t.kind}"
    conclusion = (f"<observation>The crop shows {thing}.</observation> The small shape in the "
                  f"{corner} corner is {thing}, so the answer is \\boxed{{{answer}}}.")
    return {
        "metadata": {"dataset_name": DATASET_NAME, "sample_id": sample_id},
        "data": [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "image", "image": scene_path},
                                         {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": reasoning},
                                              {"type": "image", "image": helper_path},
                                              {"type": "text", "text": conclusion}]},
        ],
    }


CAPTION_QUESTION = "Describe the image region by region."
CAPTION_DATASET = "Synth_Captions"


def caption_json(sample_id: str, scene_path: str, caption: str) -> dict[str, Any]:
    """A caption sample (Monet-SFT format, no helper image): the scene, :data:`CAPTION_QUESTION`,
    the caption as the whole assistant turn. Used by the quickstart's vision warm-up (stage 0)."""
    return {
        "metadata": {"dataset_name": CAPTION_DATASET, "sample_id": sample_id},
        "data": [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "image", "image": scene_path},
                                         {"type": "text", "text": CAPTION_QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]},
        ],
    }


def write_captions(out: Path, samples: list[dict[str, Any]]) -> Path:
    """Write the caption samples of the training split to ``out/train_captions.json``."""
    path = out / "train_captions.json"
    _atomic_write_bytes(path, (json.dumps(samples, indent=1) + "\n").encode("utf-8"))
    return path


def scene_caption(scene: _Scene) -> str:
    """Every corner's content in a fixed order: ``"top-left: a red circle. top-right: empty. ..."``."""
    by_corner = {scene.corner: scene.target}
    for sh in scene.others:
        half = SCENE_SIZE // 2
        by_corner[(sh.box[1] >= half) * 2 + (sh.box[0] >= half)] = sh
    parts = []
    for c, name in enumerate(CORNERS):
        sh = by_corner.get(c)
        parts.append(f"{name}: {_article(sh.colour)} {sh.colour} {sh.kind}." if sh else f"{name}: empty.")
    return " ".join(parts)


_atomic_write_bytes = atomic_write_bytes


def disjoint_splits(make_scene, prefix: str, counts: dict[str, int]) -> dict[str, list]:
    """Scenes per split, in ``counts`` order, each drawn from its own RNG stream
    (``{prefix}/{split}/{i}``); scenes of later splits are redrawn (``/{attempt}``) until their
    ``signature()`` repeats no earlier scene (the first split may repeat itself). Deterministic."""
    out: dict[str, list] = {}
    seen: set = set()
    for k, (split, count) in enumerate(counts.items()):
        scenes = []
        for i in range(count):
            if k == 0:
                scene = make_scene(random.Random(f"{prefix}/{split}/{i}"))
            else:
                attempt = 0
                while True:
                    scene = make_scene(random.Random(f"{prefix}/{split}/{i}/{attempt}"))
                    if scene.signature() not in seen:
                        break
                    attempt += 1
                seen.add(scene.signature())  # unique within this split too
            scenes.append(scene)
        seen.update(s.signature() for s in scenes)
        out[split] = scenes
    return out


def three_splits(make_scene, prefix: str, n: int, n_val: int, n_eval: int) -> dict[str, list]:
    """:func:`disjoint_splits` over ``train`` / ``val`` / ``eval`` (in that order), sizes checked."""
    if min(n, n_val, n_eval) < 0:
        raise ValueError(f"n, n_val and n_eval must be >= 0, got {n}, {n_val}, {n_eval}")
    return disjoint_splits(make_scene, prefix, {"train": n, "val": n_val, "eval": n_eval})


def write_samples(out: Path, split: str, samples: list[dict[str, Any]]) -> Path:
    """``out/{split}.json`` (atomically), the Monet-SFT samples of one split."""
    path = out / f"{split}.json"
    _atomic_write_bytes(path, (json.dumps(samples, indent=1) + "\n").encode("utf-8"))
    return path


def check_output_dir(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` when it (or a parent) exists but is not a directory."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "the output directory" if p == path else f"a parent of the output directory {path}"
                raise ValueError(f"{p} exists and is not a directory (it was given as {what}); "
                                 "choose another --out")
            return


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_split(out: Path, split: str, scenes: list[_Scene]) -> Path:
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, scene in enumerate(scenes):
        scene_rel = f"images/{split}/{i:06d}.png"
        helper_rel = f"images/{split}/{i:06d}_zoom.png"
        img = _draw(scene)
        _atomic_write_bytes(out / scene_rel, _png_bytes(img))
        _atomic_write_bytes(out / helper_rel, _png_bytes(_helper(scene, img)))
        samples.append(_sample_json(scene, f"{split}-{i:06d}", scene_rel, helper_rel))
    return write_samples(out, split, samples)


def synthesize_dataset(out_dir: str | os.PathLike, n: int, n_eval: int, seed: int = 0,
                       n_val: int = 0, captions: bool = False) -> SynthDataset:
    """Write ``n`` training, ``n_val`` validation and ``n_eval`` held-out samples into ``out_dir``.

    Layout: ``out_dir/train.json`` and ``out_dir/eval.json`` (JSON lists in the Monet-SFT-125K
    format, dataset name ``Synth_Zoom``, sample ids ``train-000000``/``eval-000000``...) and the
    PNG images under ``out_dir/images/{train,eval}/`` referenced by paths relative to ``out_dir``.
    Eval samples carry the full reference assistant turn; the answer is its ``\\boxed{}``.
    With ``n_val > 0`` also ``out_dir/val.json`` (ids ``val-000000``...): the split to tune on.
    No scene of val or eval repeats a scene of an earlier split (train, val, eval), so tuning on val
    leaves eval untouched. With ``captions`` also ``out_dir/train_captions.json``: one caption
    sample per *training* scene (:func:`scene_caption`, same image files). Same arguments ->
    byte-identical files. Returns a :class:`SynthDataset`.
    """
    if min(n, n_eval, n_val) < 0:
        raise ValueError(f"n, n_val and n_eval must be >= 0, got {n}, {n_val}, {n_eval}")
    out = Path(out_dir)
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": n, "val": n_val, "eval": n_eval} if n_val else {"train": n, "eval": n_eval}
    scenes = disjoint_splits(_random_scene, f"monet-synth/{seed}", counts)
    train_json = _write_split(out, "train", scenes["train"])
    val_json = _write_split(out, "val", scenes["val"]) if n_val else None
    eval_json = _write_split(out, "eval", scenes["eval"])
    caps = write_captions(out, [caption_json(f"train-{i:06d}", f"images/train/{i:06d}.png", scene_caption(sc))
                                for i, sc in enumerate(scenes["train"])]) if captions else None
    return SynthDataset(out, train_json, eval_json, n, n_eval, seed, val_json, n_val, caps)
