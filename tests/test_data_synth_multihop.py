"""monet.data.synth_multihop: determinism, disjoint splits, answers derivable from the helper images."""

from __future__ import annotations

import hashlib
import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from monet.data import load_sft_dataset
from monet.data.synth import COLOURS, SHAPES
from monet.data.synth_multihop import CELL, DIRECTIONS, GRID, HOPS, random_scene, split_scenes, synthesize_multihop


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = synthesize_multihop(tmp_path / "a", n=6, n_eval=3, seed=7, n_val=2)
    b = synthesize_multihop(tmp_path / "b", n=6, n_eval=3, seed=7, n_val=2)
    c = synthesize_multihop(tmp_path / "c", n=6, n_eval=3, seed=8, n_val=2)
    assert _digest(a.root) == _digest(b.root)
    assert _digest(a.root)["train.json"] != _digest(c.root)["train.json"]
    # the first n samples do not depend on the total
    small = split_scenes(3, 0, 0, 7)["train"]
    assert small == split_scenes(6, 0, 0, 7)["train"][:3]


def test_splits_are_disjoint():
    scenes = split_scenes(300, 100, 100, 0)
    sigs = {k: {s.signature() for s in v} for k, v in scenes.items()}
    assert len(sigs["train"] & sigs["val"]) == 0 and len(sigs["train"] & sigs["eval"]) == 0
    assert len(sigs["val"] & sigs["eval"]) == 0
    assert len(sigs["val"]) == 100 and len(sigs["eval"]) == 100


def test_scene_geometry_is_valid():
    for i in range(300):
        s = random_scene(random.Random(f"t/{i}"))
        dx, dy = DIRECTIONS[s.direction]
        assert s.target_cell == (s.arrow_cell[0] + HOPS * dx, s.arrow_cell[1] + HOPS * dy)
        assert all(0 <= v < GRID for v in s.target_cell)
        cells = [sh.cell for sh in s.shapes]
        assert cells[0] == s.target_cell and len(set(cells)) == len(cells) and s.arrow_cell not in cells
        for sh in s.shapes:  # every shape strictly inside its cell
            x0, y0, x1, y1 = sh.box
            cx, cy = sh.cell
            assert cx * CELL < x0 <= x1 < (cx + 1) * CELL - 1 and cy * CELL < y0 <= y1 < (cy + 1) * CELL - 1


def _read_from_helper(path):
    """(colour, kind) of the only non-background object of a hop-2 helper image, by pixel counts:
    the colour is the palette entry of the most frequent non-background pixel, the kind follows
    from the fill ratio of the object's bounding box (square 1, circle ~0.79, triangle ~0.5)."""
    im = Image.open(path).convert("RGB")
    bg = im.getpixel((0, 0))
    px = [(x, y, im.getpixel((x, y))) for y in range(im.height) for x in range(im.width)
          if im.getpixel((x, y)) != bg]
    counts = {}
    for _, _, p in px:
        counts[p] = counts.get(p, 0) + 1
    rgb = max(counts, key=counts.get)
    colour = [name for name, c in COLOURS.items() if c == rgb]
    xs = [x for x, _, p in px if p == rgb]
    ys = [y for _, y, p in px if p == rgb]
    fill = counts[rgb] / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
    kind = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
    return colour[0] if colour else None, kind


def test_answer_is_derivable_from_the_last_helper_image(tmp_path):
    ds = synthesize_multihop(tmp_path / "d", n=40, n_eval=0, seed=3)
    raw = json.loads(ds.train_json.read_text())
    for s in raw:
        content = s["data"][-1]["content"]
        helpers = [c["image"] for c in content if c["type"] == "image"]
        assert len(helpers) == 2
        answer = re.findall(r"\\boxed\{([^{}]*)\}", content[-1]["text"])[-1]
        colour, kind = _read_from_helper(ds.root / helpers[1])
        assert answer in (colour, kind), (s["metadata"]["sample_id"], answer, colour, kind)
        # the first hop shows the arrow alone: only background and the arrow's dark pixels
        hop1 = np.asarray(Image.open(ds.root / helpers[0]).convert("RGB")).reshape(-1, 3)
        bg = hop1[0]
        assert bool(((hop1 == bg).all(1) | (hop1.max(1) < 128)).all())
        assert int((hop1.max(1) < 128).sum()) >= 20  # and the arrow is there
        assert answer in COLOURS or answer in SHAPES


def test_multihop_samples_load_and_build_every_stage(tmp_path):
    from data_fixtures.samples import tiny_processor
    from monet.data import build_stage_example

    ds = synthesize_multihop(tmp_path / "d", n=3, n_eval=2, seed=1, n_val=2)
    processor = tiny_processor()
    for path, count in ((ds.train_json, 3), (ds.val_json, 2), (ds.eval_json, 2)):
        samples, report = load_sft_dataset(path, ds.root)
        assert report.rejected == 0 and len(samples) == count, report.summary()
        for s in samples:
            assert s.dataset_name == "Synth_MultiHop" and len(s.helper_images) == 2
    for stage, images in ((1, 3), (2, 3), (3, 1)):
        ex = build_stage_example(samples[0], processor, stage, 4)
        assert int(ex.image_grid_thw.shape[0]) == images


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n, n_val and n_eval must be >= 0"):
        synthesize_multihop(tmp_path / "d", n=-1, n_eval=0)


def test_captions_describe_every_cell_from_the_pixels(tmp_path):
    """captions=True: per training scene, every cell row by row: the colour named is the colour whose
    pixels lie in that cell, "arrow D" marks the cell with arrow pixels (D = the direction the
    reference reasoning observes), "empty" a background-only cell."""
    from monet.data.synth_multihop import _ARROW

    ds = synthesize_multihop(tmp_path / "d", 8, 2, seed=5, captions=True)
    caps, report = load_sft_dataset(ds.captions_json, ds.root)
    assert len(caps) == 8 and report.rejected == 0
    for cap, sample in zip(caps, json.loads(ds.train_json.read_text())):
        assert cap.question_images[0].path == sample["data"][1]["content"][0]["image"] and not cap.helper_images
        rows = re.findall(r"row (\d): ([^.]*)\.", cap.assistant.content[0].text)
        assert [int(r) for r, _ in rows] == list(range(1, GRID + 1))
        img = Image.open(cap.question_images[0].file).convert("RGB")
        direction = re.search(r"The arrow points ([a-z ]+)\.", sample["data"][-1]["content"][2]["text"]).group(1)
        arrows = 0
        for r, (_, cells) in enumerate(rows):
            items = cells.split(", ")
            assert len(items) == GRID
            for c, item in enumerate(items):
                px = {p for _, p in img.crop((c * CELL, r * CELL, (c + 1) * CELL, (r + 1) * CELL)).getcolors(4096)}
                colours = px & set(COLOURS.values())
                if item == "empty":
                    assert not colours and _ARROW not in px, (cap.key, r, c)
                elif item.startswith("arrow "):
                    arrows += 1
                    assert item == f"arrow {direction}" and _ARROW in px and not colours
                else:
                    colour, kind = item.split(" ")
                    assert colours == {COLOURS[colour]} and kind in SHAPES, (cap.key, r, c)
        assert arrows == 1
