"""A synthetic two-hop visual lookup task in the Monet-SFT-125K format (``Synth_MultiHop``).

Why: in the zoom-in task (:mod:`monet.data.synth`) the answer is one small shape in a named
corner, so a model can read it in one pass and a direct answer is as good as any reasoning. Here
the answer needs two lookups in turn, each on a small detail, and the second depends on the first:

1. *find* the only arrow in the scene (a ~10 px black arrow in one of 16 cells, position not named
   in the question) and read its direction (one of 8);
2. *follow* it two cells and read the small shape in that cell (its colour or its kind).

The scene (112x112) is a 4x4 grid of 28 px cells (no lines drawn); about half of the other cells
hold a small distractor shape, so the answer cell cannot be found without the arrow. The assistant
turn visits both regions in order, each with a helper image (the 28 px cell zoomed 2x to 56 px):

    user:      [scene] "A small arrow points at a cell two cells away. What colour is the small
               shape in that cell? ..."
    assistant: "... I will find the arrow and zoom in on it.<abs_vis_token></abs_vis_token>" [arrow cell]
               "<observation>The arrow points up and to the left.</observation> The shape it points
               at is two cells further that way; I will zoom in on that cell.<abs_vis_token></abs_vis_token>"
               [target cell] "<observation>The cell shows a red circle.</observation> ... \\boxed{red}."

The helper images carry exactly what each hop needs: the first shows the arrow alone (its cell
holds nothing else), the second the answer shape alone (every shape lies inside its cell with a
margin), so the answer is derivable from the last helper image. The question image holds the same
information but at 1/4 the scale and mixed with distractors. The observation of the first hop
names the direction but never the arrow's position, so the text-only control must still locate
the arrow and the target cell from the scene; latent steps that see the helper images' features
(stages 2/3) can carry the located cell.

Determinism and splits as in :mod:`monet.data.synth`: each sample has its own RNG stream
(``monet-multihop/{seed}/{split}/{i}[/{attempt}]``); ``val`` and ``eval`` never repeat a scene of an
earlier split (train, then val, then eval), so tuning on ``val`` leaves ``eval`` untouched.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monet.data.sft_format import PLACEHOLDER
from monet.data.synth import (COLOURS, SHAPES, SYSTEM_PROMPT, SplitDataset, _article, _atomic_write_bytes,
                              _png_bytes, caption_json, check_output_dir, three_splits, write_captions,
                              write_samples)

DATASET_NAME = "Synth_MultiHop"
GRID = 4
CELL = 28
SCENE_SIZE = GRID * CELL
HELPER_SIZE = 2 * CELL
HOPS = 2  # cells between the arrow and the answer
#: direction name -> (dx, dy) in cells (y grows downwards)
DIRECTIONS: dict[str, tuple[int, int]] = {
    "right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1),
    "up and to the right": (1, -1), "up and to the left": (-1, -1),
    "down and to the right": (1, 1), "down and to the left": (-1, 1),
}
_BACKGROUNDS = ((255, 255, 255), (240, 240, 240), (245, 240, 225))
_ARROW = (20, 20, 20)


#: what :func:`synthesize_multihop` returns
MultiHopDataset = SplitDataset


@dataclass(frozen=True)
class _Shape:
    kind: str
    colour: str
    cell: tuple[int, int]  # (column, row)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive, inside the cell with a margin


@dataclass(frozen=True)
class Scene:
    """One sample: the arrow's cell and direction, the asked attribute, the shapes (target first)."""

    background: tuple[int, int, int]
    arrow_cell: tuple[int, int]
    direction: str
    ask: str  # "colour" or "shape"
    shapes: tuple[_Shape, ...]

    @property
    def target_cell(self) -> tuple[int, int]:
        dx, dy = DIRECTIONS[self.direction]
        return self.arrow_cell[0] + HOPS * dx, self.arrow_cell[1] + HOPS * dy

    @property
    def target(self) -> _Shape:
        return self.shapes[0]

    @property
    def answer(self) -> str:
        return self.target.colour if self.ask == "colour" else self.target.kind

    def signature(self) -> tuple:
        return (self.background, self.arrow_cell, self.direction, self.ask, self.shapes)


def _shape_in(rng: random.Random, cell: tuple[int, int]) -> _Shape:
    size = rng.randint(8, 12)
    margin = 3
    x0 = cell[0] * CELL + rng.randint(margin, CELL - margin - size)
    y0 = cell[1] * CELL + rng.randint(margin, CELL - margin - size)
    return _Shape(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), cell, (x0, y0, x0 + size - 1, y0 + size - 1))


def random_scene(rng: random.Random) -> Scene:
    """A scene whose arrow points at a cell inside the grid that holds the target shape."""
    while True:
        arrow = (rng.randrange(GRID), rng.randrange(GRID))
        options = [d for d, (dx, dy) in DIRECTIONS.items()
                   if 0 <= arrow[0] + HOPS * dx < GRID and 0 <= arrow[1] + HOPS * dy < GRID]
        if options:
            break
    direction = rng.choice(sorted(options))
    dx, dy = DIRECTIONS[direction]
    target_cell = (arrow[0] + HOPS * dx, arrow[1] + HOPS * dy)
    shapes = [_shape_in(rng, target_cell)]
    for row in range(GRID):
        for col in range(GRID):
            if (col, row) not in (arrow, target_cell) and rng.random() < 0.5:
                shapes.append(_shape_in(rng, (col, row)))
    return Scene(rng.choice(_BACKGROUNDS), arrow, direction, rng.choice(("colour", "shape")), tuple(shapes))


def draw_scene(scene: Scene):
    """The question image (RGB, SCENE_SIZE square)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        x0, y0, x1, y1 = s.box
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(s.box, fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    # the arrow: a 2 px shaft through the cell centre and a filled head, 10 px long
    cx, cy = scene.arrow_cell[0] * CELL + CELL // 2, scene.arrow_cell[1] * CELL + CELL // 2
    dx, dy = DIRECTIONS[scene.direction]
    norm = (dx * dx + dy * dy) ** 0.5
    ux, uy = dx / norm, dy / norm
    tail, tip = (cx - 5 * ux, cy - 5 * uy), (cx + 5 * ux, cy + 5 * uy)
    draw.line([tail, tip], fill=_ARROW, width=2)
    px, py = -uy, ux  # perpendicular
    draw.polygon([(tip[0] + 2 * ux, tip[1] + 2 * uy), (tip[0] - 2 * ux + 3 * px, tip[1] - 2 * uy + 3 * py),
                  (tip[0] - 2 * ux - 3 * px, tip[1] - 2 * uy - 3 * py)], fill=_ARROW)
    return img


def cell_zoom(img, cell: tuple[int, int]):
    """The helper image of a cell: its CELL x CELL pixels zoomed 2x (nearest)."""
    from PIL import Image

    x, y = cell[0] * CELL, cell[1] * CELL
    return img.crop((x, y, x + CELL, y + CELL)).resize((HELPER_SIZE, HELPER_SIZE), Image.Resampling.NEAREST)


def sample_json(scene: Scene, sample_id: str, scene_path: str, helper_paths: tuple[str, str]) -> dict[str, Any]:
    t = scene.target
    if scene.ask == "colour":
        question = "A small arrow points at a cell two cells away. What colour is the small shape in that cell?"
    else:
        question = "A small arrow points at a cell two cells away. What kind of shape is the small object in that cell?"
    question += " Put the final answer in \\boxed{}."
    thing = f"{_article(t.colour)} {t.colour} {t.kind}"
    first = (f"The question is about the cell the small arrow points at. I will find the arrow and zoom in "
             f"on it.{PLACEHOLDER}")
    second = (f"<observation>The arrow points {scene.direction}.</observation> The shape it points at is two "
              f"cells further that way; I will zoom in on that cell.{PLACEHOLDER}")
    last = (f"<observation>The cell shows {thing}.</observation> The arrow points at {thing}, so the answer "
            f"is \\boxed{{{scene.answer}}}.")
    return {
        "metadata": {"dataset_name": DATASET_NAME, "sample_id": sample_id},
        "data": [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "image", "image": scene_path},
                                         {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": first},
                                              {"type": "image", "image": helper_paths[0]},
                                              {"type": "text", "text": second},
                                              {"type": "image", "image": helper_paths[1]},
                                              {"type": "text", "text": last}]},
        ],
    }


def scene_caption(scene: Scene) -> str:
    """Every cell's content, row by row: ``"row 1: empty, red circle, arrow up, empty. row 2: ..."``
    (the arrow's direction named as in the reasoning text)."""
    by_cell = {sh.cell: f"{sh.colour} {sh.kind}" for sh in scene.shapes}
    by_cell[scene.arrow_cell] = f"arrow {scene.direction}"
    return " ".join(f"row {r + 1}: " + ", ".join(by_cell.get((c, r), "empty") for c in range(GRID)) + "."
                    for r in range(GRID))


def _write_split(out: Path, split: str, scenes: list[Scene]) -> Path:
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, scene in enumerate(scenes):
        rel = f"images/{split}/{i:06d}.png"
        helpers = (f"images/{split}/{i:06d}_hop1.png", f"images/{split}/{i:06d}_hop2.png")
        img = draw_scene(scene)
        _atomic_write_bytes(out / rel, _png_bytes(img))
        _atomic_write_bytes(out / helpers[0], _png_bytes(cell_zoom(img, scene.arrow_cell)))
        _atomic_write_bytes(out / helpers[1], _png_bytes(cell_zoom(img, scene.target_cell)))
        samples.append(sample_json(scene, f"{split}-{i:06d}", rel, helpers))
    return write_samples(out, split, samples)


def split_scenes(n: int, n_val: int, n_eval: int, seed: int) -> dict[str, list[Scene]]:
    """The scenes of the three splits (no scene of val/eval repeats one of an earlier split)."""
    return three_splits(random_scene, f"monet-multihop/{seed}", n, n_val, n_eval)


def synthesize_multihop(out_dir: str | os.PathLike, n: int, n_eval: int, seed: int = 0,
                        n_val: int = 0, captions: bool = False) -> MultiHopDataset:
    """Write ``train.json`` / ``val.json`` / ``eval.json`` and their PNGs into ``out_dir``
    (layout as :func:`monet.data.synth.synthesize_dataset`; ``captions``: also
    ``train_captions.json``, :func:`scene_caption` of every training scene). Same arguments ->
    identical bytes."""
    out = Path(out_dir)
    check_output_dir(out)
    scenes = split_scenes(n, n_val, n_eval, seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {split: _write_split(out, split, s) for split, s in scenes.items()}
    caps = write_captions(out, [caption_json(f"train-{i:06d}", f"images/train/{i:06d}.png", scene_caption(sc))
                                for i, sc in enumerate(scenes["train"])]) if captions else None
    return MultiHopDataset(out, paths["train"], paths["val"], paths["eval"], n, n_val, n_eval, seed, caps)
