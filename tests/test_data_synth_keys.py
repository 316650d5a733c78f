"""monet.data.synth_keys: determinism, disjoint splits, answers derivable by chasing the dots in the
pixels, helper images, chance level, content-free observations, stage layouts, captions."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from fractions import Fraction
from itertools import permutations

import pytest
from PIL import Image

from monet.data import load_sft_dataset
from monet.data.synth import COLOURS
from monet.data.synth_keys import (CHANCE, DERANGEMENTS, TILE, TILES, random_scene, split_scenes,
                                   synthesize_keys)

NAME_OF = {rgb: name for name, rgb in COLOURS.items()}


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read_tile(img, x0, y0):
    """(key, dot) of the TILE-square at (x0, y0): the key is the corner pixel's colour, the dot the
    centre pixel's; both must be palette colours and differ."""
    key = NAME_OF[img.getpixel((x0 + 1, y0 + 1))]
    dot = NAME_OF[img.getpixel((x0 + TILE // 2, y0 + TILE // 2))]
    assert key != dot
    return key, dot


def _read_scene(path):
    img = Image.open(path).convert("RGB")
    assert img.size == (2 * TILE, 2 * TILE)
    return dict(_read_tile(img, x, y) for y in (0, TILE) for x in (0, TILE))


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = synthesize_keys(tmp_path / "a", n=6, n_eval=3, seed=7, n_val=2)
    b = synthesize_keys(tmp_path / "b", n=6, n_eval=3, seed=7, n_val=2)
    c = synthesize_keys(tmp_path / "c", n=6, n_eval=3, seed=8, n_val=2)
    assert _digest(a.root) == _digest(b.root)
    assert _digest(a.root)["train.json"] != _digest(c.root)["train.json"]
    assert split_scenes(3, 0, 0, 7)["train"] == split_scenes(6, 0, 0, 7)["train"][:3]


def test_splits_are_disjoint_by_question_content():
    """No val/eval scene repeats a training scene's keys, dots and start, even with other dot sizes."""
    scenes = split_scenes(2000, 500, 500, 0)
    content = {k: {(s.keys, s.pointer, s.start) for s in v} for k, v in scenes.items()}
    assert not content["train"] & content["val"] and not content["train"] & content["eval"]
    assert not content["val"] & content["eval"]
    assert len(content["val"]) == 500 and len(content["eval"]) == 500


def test_dots_are_a_derangement_and_the_answer_follows_two_dots():
    assert len(DERANGEMENTS) == 9  # derangements of 4 elements
    for i in range(500):
        s = random_scene(random.Random(f"k/{i}"))
        assert len(set(s.keys)) == TILES and sorted(s.pointer) == list(range(TILES))
        assert all(s.pointer[t] != t for t in range(TILES))
        # naive chase by colour names only
        dots = {s.keys[t]: s.keys[s.pointer[t]] for t in range(TILES)}
        assert s.answer == dots[dots[s.keys[s.start]]]


def test_chance_is_one_third_even_after_the_first_hop():
    """Exact, by enumeration: over the derangements, given the start and the tile its dot names, the
    answer is the start or one of the two remaining tiles, each with probability 1/3 (so neither
    answering the start colour nor making only the first hop beats CHANCE)."""
    for start in range(TILES):
        for hop in range(TILES):
            if hop == start:
                continue
            ends = Counter(p[p[start]] for p in DERANGEMENTS if p[start] == hop)
            total = sum(ends.values())
            assert hop not in ends
            assert {e: Fraction(c, total) for e, c in ends.items()} == {
                e: Fraction(1, 3) for e in range(TILES) if e != hop}
    assert CHANCE == pytest.approx(1 / 3)
    # and the bag of dot colours is uninformative: every key appears as exactly one dot
    assert all(sorted(p) == list(range(TILES)) for p in permutations(range(TILES)) if p in DERANGEMENTS)


def test_answer_and_helper_images_are_read_from_the_pixels(tmp_path):
    ds = synthesize_keys(tmp_path / "d", n=60, n_eval=0, seed=3)
    for s in json.loads(ds.train_json.read_text()):
        user, assistant = s["data"][1]["content"], s["data"][2]["content"]
        question = user[1]["text"]
        start = re.search(r"Start at the (\w+) tile", question).group(1)
        dots = _read_scene(ds.root / user[0]["image"])
        answer = re.findall(r"\\boxed\{([^{}]*)\}", assistant[-1]["text"])[-1]
        assert answer == dots[dots[start]], s["metadata"]["sample_id"]
        helpers = [c["image"] for c in assistant if c["type"] == "image"]
        assert len(helpers) == 2
        hop1 = Image.open(ds.root / helpers[0]).convert("RGB")
        hop2 = Image.open(ds.root / helpers[1]).convert("RGB")
        assert hop1.size == hop2.size == (TILE, TILE)
        assert _read_tile(hop1, 0, 0) == (start, dots[start])  # the start tile and its dot
        assert _read_tile(hop2, 0, 0) == (dots[start], answer)  # the named tile; its dot is the answer
        # the observations name no colour the question does not (else text would carry the hops)
        said = " ".join(c["text"] for c in assistant if c["type"] == "text")
        observed = " ".join(re.findall(r"<observation>(.*?)</observation>", said))
        assert {w for w in re.findall(r"[a-z]+", observed) if w in COLOURS} <= {start}


def test_keys_samples_load_and_build_every_stage(tmp_path):
    from data_fixtures.samples import tiny_processor
    from monet.data import build_stage_example

    ds = synthesize_keys(tmp_path / "d", n=3, n_eval=2, seed=1, n_val=2)
    processor = tiny_processor()
    for path, count in ((ds.train_json, 3), (ds.val_json, 2), (ds.eval_json, 2)):
        samples, report = load_sft_dataset(path, ds.root)
        assert report.rejected == 0 and len(samples) == count, report.summary()
        assert all(s.dataset_name == "Synth_Keys" and len(s.helper_images) == 2 for s in samples)
    for stage, images in ((1, 3), (2, 3), (3, 1)):
        ex = build_stage_example(samples[0], processor, stage, 4)
        assert int(ex.image_grid_thw.shape[0]) == images


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="n, n_val and n_eval must be >= 0"):
        synthesize_keys(tmp_path / "d", n=0, n_eval=-2)


def test_captions_name_every_tile_from_the_pixels(tmp_path):
    ds = synthesize_keys(tmp_path / "d", 8, 2, seed=5, captions=True)
    caps, report = load_sft_dataset(ds.captions_json, ds.root)
    assert len(caps) == 8 and report.rejected == 0
    for cap in caps:
        said = re.findall(r"(\w+) tile with a (\w+) dot\.", cap.assistant.content[0].text)
        assert len(said) == TILES
        assert dict(said) == _read_scene(cap.question_images[0].file), cap.key


@pytest.mark.parametrize("visits,observe,last", [(1, False, False), (2, True, False), (1, True, False),
                                                 (2, False, True)])
def test_variants_visit_and_observe_what_they_say(tmp_path, visits, observe, last):
    """visits=1: one helper image (the start tile); the answer is the dot of the tile its dot names,
    read off the question image. observe="pointer": the first observation names the start tile's dot
    as read from helper image 1, and nothing else. observe="last": the last observation names the
    last helper image's dot (the answer) and no intermediate colour."""
    mode = "pointer" if observe else "last" if last else "none"
    ds = synthesize_keys(tmp_path / "d", n=30, n_eval=0, seed=4, visits=visits, observe=mode)
    for s in json.loads(ds.train_json.read_text()):
        user, assistant = s["data"][1]["content"], s["data"][2]["content"]
        start = re.search(r"Start at the (\w+) tile", user[1]["text"]).group(1)
        dots = _read_scene(ds.root / user[0]["image"])
        helpers = [c["image"] for c in assistant if c["type"] == "image"]
        assert len(helpers) == visits
        key, dot = _read_tile(Image.open(ds.root / helpers[0]).convert("RGB"), 0, 0)
        assert key == start
        answer = re.findall(r"\\boxed\{([^{}]*)\}", assistant[-1]["text"])[-1]
        assert answer == dots[dot]  # helper 1's dot names the tile whose dot is the answer
        said = " ".join(c["text"] for c in assistant if c["type"] == "text")
        assert said.count("<abs_vis_token></abs_vis_token>") == visits
        observed = re.findall(r"<observation>(.*?)</observation>", said)
        named = {w for w in re.findall(r"[a-z]+", " ".join(observed)) if w in COLOURS}
        assert named == ({start, dot} if observe else {start, answer} if last else {start})


def test_bad_visits_are_refused(tmp_path):
    with pytest.raises(ValueError, match="visits must be 1"):
        synthesize_keys(tmp_path / "d", n=1, n_eval=0, visits=3)
    with pytest.raises(ValueError, match="it needs visits=2"):
        synthesize_keys(tmp_path / "d", n=1, n_eval=0, visits=1, observe="last")
    with pytest.raises(ValueError, match="observe must be one of"):
        synthesize_keys(tmp_path / "d", n=1, n_eval=0, observe="hop")
