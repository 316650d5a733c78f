"""A synthetic pointer-chasing task with content-addressed regions (``Synth_Keys``).

Why this task. On the other two synthetic tasks the tiny model never gets past chance without
the helper images: both name a region by its *position* ("the top-left corner", "two cells up"),
and a small Qwen2.5-VL does not learn a position-dependent lookup in the demo's budget, while it
does learn a lookup by *content* ("the square on the red tile": ``benchmarks/probe_colour_reading.py
--task key``; docs/demo.md). Here every region carries its own key and the question names keys, so
each single step is one the model can learn, and the answer needs two such steps in turn, the
second depending on the first (pointer chasing, the known setting where continuous thoughts help):

The scene (112x112) is four 56 px tiles (2x2), each filled with its own key colour (4 of the 6
synthetic colours), each holding a centred square dot whose colour is the key of another tile. The
dots form a derangement of the tiles (every tile is named by exactly one dot, none by its own), so
the bag of dot colours says nothing and only following the dots does::

    user:      [scene] "Each tile's dot has the colour of another tile. Start at the red tile and
               go to the tile its dot names. What colour is the dot on that tile? ..."
    assistant: "I will look at the red tile.<abs_vis_token></abs_vis_token>" [red tile]
               "<observation>This is the red tile.</observation> Its dot names the next tile; I will
               look at that tile.<abs_vis_token></abs_vis_token>" [named tile]
               "<observation>This is the tile it names.</observation> So the answer is \\boxed{green}."

Hop 1 is "the dot on the tile whose key is s" (= t), hop 2 "the dot on the tile whose key is t".
The helper images are the two tiles (56 px crops), so the answer is the dot of the second helper
image. The observations deliberately carry *no* content (no colour beyond what the question
states): the text-only control keeps them, so if they named the intermediate tile the text would be
an explicit chain of thought and the comparison would say nothing about what the latents carry.
Latent steps (stages 2-3) can carry each hop's result; text cannot. Variants, for the measurements
of docs/demo.md: ``observe="pointer"`` (the first observation names the start tile's dot: an
explicit first hop in text), ``observe="last"`` (the last observation names the last helper
image's dot, i.e. the answer said early: no help to text-only reasoning, but a CE and alignment
target that needs the second helper image in stage 2), ``visits=1`` (one helper image, the start
tile; the second hop is read off the question image).

Chance: given the start tile, the answer is the start colour itself (a 2-cycle) or one of the two
tiles that are neither the start nor the one its dot names, each with probability exactly 1/3 —
also for a model that has made the first hop and not the second. So :data:`CHANCE` is 1/3.

Determinism and splits as in :mod:`monet.data.synth`: each sample has its own RNG stream
(``monet-keys/{seed}/{split}/{i}[/{attempt}]``); ``val`` and ``eval`` never repeat a scene of an
earlier split, so tuning on ``val`` leaves ``eval`` untouched.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monet.data.sft_format import PLACEHOLDER
from monet.data.synth import (COLOURS, SYSTEM_PROMPT, SplitDataset, _atomic_write_bytes, _png_bytes,
                              caption_json, check_output_dir, three_splits, write_captions,
                              write_samples)

DATASET_NAME = "Synth_Keys"
TILES = 4
TILE = 56
SCENE_SIZE = 2 * TILE
HELPER_SIZE = TILE
#: probability of the right answer for any strategy that does not follow both dots (module docstring)
CHANCE = 1 / 3
#: what the observations state (module docstring): nothing beyond the question (default), the start
#: tile's dot (an explicit first hop in text), or the last helper image's dot (the answer, said early)
OBSERVE = ("none", "pointer", "last")
#: tile index -> (column, row) in the 2x2 grid
TILE_CELLS = ((0, 0), (1, 0), (0, 1), (1, 1))
#: every derangement of the four tiles (dot of tile i names tile pointer[i] != i)
DERANGEMENTS: tuple[tuple[int, ...], ...] = tuple(
    p for p in itertools.permutations(range(TILES)) if all(p[i] != i for i in range(TILES)))


#: what :func:`synthesize_keys` returns
KeysDataset = SplitDataset


@dataclass(frozen=True)
class Scene:
    """One sample: tile ``i`` has key colour ``keys[i]`` and a dot of colour ``keys[pointer[i]]``."""

    keys: tuple[str, ...]
    pointer: tuple[int, ...]
    dot_px: tuple[int, ...]  # dot side per tile
    start: int  # tile index the question names

    @property
    def hop(self) -> int:
        """The tile the start tile's dot names."""
        return self.pointer[self.start]

    @property
    def answer(self) -> str:
        """The dot colour of :attr:`hop`."""
        return self.keys[self.pointer[self.hop]]

    def dot_colour(self, tile: int) -> str:
        return self.keys[self.pointer[tile]]

    def signature(self) -> tuple:
        """What makes two scenes the same question (dot sizes left out: two scenes that differ only
        there must not fall into different splits)."""
        return (self.keys, self.pointer, self.start)


def random_scene(rng: random.Random) -> Scene:
    keys = tuple(rng.sample(sorted(COLOURS), TILES))
    pointer = rng.choice(DERANGEMENTS)
    return Scene(keys, pointer, tuple(rng.randint(18, 24) for _ in range(TILES)), rng.randrange(TILES))


def tile_box(tile: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` (exclusive end) of a tile in the scene."""
    c, r = TILE_CELLS[tile]
    return c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE


def draw_scene(scene: Scene):
    """The question image (RGB, SCENE_SIZE square): four key-coloured tiles, a centred dot on each."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE))
    draw = ImageDraw.Draw(img)
    for t in range(TILES):
        x0, y0, x1, y1 = tile_box(t)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=COLOURS[scene.keys[t]])
        d = scene.dot_px[t]
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - d // 2, cy - d // 2, cx - d // 2 + d - 1, cy - d // 2 + d - 1),
                       fill=COLOURS[scene.dot_colour(t)])
    return img


def tile_crop(img, tile: int):
    """The helper image of a tile: its TILE x TILE pixels."""
    return img.crop(tile_box(tile))


def question_text(scene: Scene) -> str:
    return (f"Each tile's dot has the colour of another tile. Start at the {scene.keys[scene.start]} tile and go "
            f"to the tile its dot names. What colour is the dot on that tile? Put the final answer in \\boxed{{}}.")


def sample_json(scene: Scene, sample_id: str, scene_path: str, helper_paths: tuple[str, ...],
                observe: str = "none") -> dict[str, Any]:
    """The SFT sample; ``helper_paths`` holds one (the start tile) or two (and the tile it names)
    helper images: with one, the second hop is read off the question image."""
    start = scene.keys[scene.start]
    first = f"I will look at the {start} tile.{PLACEHOLDER}"
    hop = scene.keys[scene.hop]
    seen = (f"<observation>The {start} tile's dot is {hop}.</observation>" if observe == "pointer"
            else f"<observation>This is the {start} tile.</observation>")
    answer = f"So the answer is \\boxed{{{scene.answer}}}."
    if len(helper_paths) == 1:
        texts = [first, f"{seen} The tile its dot names has the answer as its dot. {answer}"]
    elif observe == "last":
        texts = [first, f"{seen} Its dot names the next tile; I will look at that tile.{PLACEHOLDER}",
                 f"<observation>Its dot is {scene.answer}.</observation> {answer}"]
    elif observe == "pointer":
        texts = [first, f"{seen} I will look at the {hop} tile.{PLACEHOLDER}",
                 f"<observation>This is the {hop} tile.</observation> {answer}"]
    else:
        texts = [first, f"{seen} Its dot names the next tile; I will look at that tile.{PLACEHOLDER}",
                 f"<observation>This is the tile it names.</observation> {answer}"]
    content: list[dict[str, Any]] = []
    for text, helper in zip(texts, (*helper_paths, None)):
        content.append({"type": "text", "text": text})
        if helper is not None:
            content.append({"type": "image", "image": helper})
    return {
        "metadata": {"dataset_name": DATASET_NAME, "sample_id": sample_id},
        "data": [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "image", "image": scene_path},
                                         {"type": "text", "text": question_text(scene)}]},
            {"role": "assistant", "content": content},
        ],
    }


def scene_caption(scene: Scene) -> str:
    """Every tile's key and dot in reading order: ``"red tile with a blue dot. ..."``."""
    return " ".join(f"{scene.keys[t]} tile with a {scene.dot_colour(t)} dot." for t in range(TILES))


def _write_split(out: Path, split: str, scenes: list[Scene], observe: str, visits: int) -> Path:
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, scene in enumerate(scenes):
        rel = f"images/{split}/{i:06d}.png"
        helpers = (f"images/{split}/{i:06d}_hop1.png", f"images/{split}/{i:06d}_hop2.png")[:visits]
        img = draw_scene(scene)
        _atomic_write_bytes(out / rel, _png_bytes(img))
        for path, tile in zip(helpers, (scene.start, scene.hop)):
            _atomic_write_bytes(out / path, _png_bytes(tile_crop(img, tile)))
        samples.append(sample_json(scene, f"{split}-{i:06d}", rel, helpers, observe))
    return write_samples(out, split, samples)


def split_scenes(n: int, n_val: int, n_eval: int, seed: int) -> dict[str, list[Scene]]:
    """The scenes of the three splits (no scene of val/eval repeats one of an earlier split)."""
    return three_splits(random_scene, f"monet-keys/{seed}", n, n_val, n_eval)


def synthesize_keys(out_dir: str | os.PathLike, n: int, n_eval: int, seed: int = 0, n_val: int = 0,
                    captions: bool = False, observe: str = "none", visits: int = 2) -> KeysDataset:
    """Write ``train.json`` / ``val.json`` / ``eval.json`` and their PNGs into ``out_dir``
    (layout as :func:`monet.data.synth.synthesize_dataset`; ``captions``: also
    ``train_captions.json``, :func:`scene_caption` of every training scene). Same arguments ->
    identical bytes."""
    if observe not in OBSERVE:
        raise ValueError(f"observe must be one of {OBSERVE}, got {observe!r}")
    if visits not in (1, 2):
        raise ValueError(f"visits must be 1 (the start tile) or 2 (and the tile it names), got {visits!r}")
    if visits == 1 and observe == "last":
        raise ValueError('observe="last" names the second helper image\'s dot; it needs visits=2')
    out = Path(out_dir)
    check_output_dir(out)
    scenes = split_scenes(n, n_val, n_eval, seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {split: _write_split(out, split, s, observe, visits) for split, s in scenes.items()}
    caps = write_captions(out, [caption_json(f"train-{i:06d}", f"images/train/{i:06d}.png", scene_caption(sc))
                                for i, sc in enumerate(scenes["train"])]) if captions else None
    return KeysDataset(out, paths["train"], paths["val"], paths["eval"], n, n_val, n_eval, seed, caps)
