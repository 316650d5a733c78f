"""monet.data.synth: valid Monet-SFT output, deterministic by seed, held-out eval split."""

from __future__ import annotations

import hashlib
import json
import re

from PIL import Image

from monet.data import PLACEHOLDER, load_sft_dataset, synthesize_dataset
from monet.data.synth import COLOURS, CORNERS, SHAPES


def _digest(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_synth_loads_cleanly_and_matches_format(tmp_path):
    ds = synthesize_dataset(tmp_path / "d", n=12, n_eval=4, seed=3)
    assert ds.train_json == tmp_path / "d" / "train.json" and ds.eval_json.exists()
    train, report = load_sft_dataset(ds.train_json, ds.root)
    assert report.total == 12 and report.rejected == 0, report.summary()
    evals, report = load_sft_dataset(ds.eval_json, ds.root)
    assert len(evals) == 4 and report.rejected == 0
    raw = json.loads(ds.train_json.read_text())
    assert isinstance(raw, list) and set(raw[0]) == {"metadata", "data"}
    for s in train:
        assert s.dataset_name == "Synth_Zoom"
        assert [t.role for t in s.turns] == ["system", "user", "assistant"]
        assert not s.question_images[0].path.startswith("/")  # relative paths
        assert s.question_images[0].size == (112, 112) and s.helper_images[0].size == (56, 56)
        items = s.assistant.content
        assert items[0].text.endswith(PLACEHOLDER) and items[1] is s.helper_images[0]
        m = re.fullmatch(r"<observation>The crop shows an? (\w+) (\w+)\.</observation>.*\\boxed\{(\w+)\}\.",
                         items[2].text)
        assert m and m.group(1) in COLOURS and m.group(2) in SHAPES and m.group(3) in (m.group(1), m.group(2))
        question = s.user.content[1].text
        assert any(c in question for c in CORNERS) and "\\boxed{}" in question


def test_helper_image_is_a_zoom_of_the_target(tmp_path):
    ds = synthesize_dataset(tmp_path, n=6, n_eval=0, seed=0)
    samples, _ = load_sft_dataset(ds.train_json)
    for s in samples:
        colour = re.search(r"The crop shows an? (\w+)", s.assistant.content[2].text).group(1)
        zoom = Image.open(s.helper_images[0].file).convert("RGB")
        assert COLOURS[colour] in {c for _, c in zoom.getcolors(4096)}


def test_deterministic_by_seed_and_eval_held_out(tmp_path):
    a = synthesize_dataset(tmp_path / "a", n=10, n_eval=5, seed=7)
    b = synthesize_dataset(tmp_path / "b", n=10, n_eval=5, seed=7)
    c = synthesize_dataset(tmp_path / "c", n=10, n_eval=5, seed=8)
    assert _digest(a.root) == _digest(b.root)
    assert a.train_json.read_bytes() != c.train_json.read_bytes()
    # The first samples do not depend on n.
    small = synthesize_dataset(tmp_path / "s", n=4, n_eval=0, seed=7)
    assert json.loads(small.train_json.read_text()) == json.loads(a.train_json.read_text())[:4]
    # Eval scenes are not training scenes.
    train_imgs = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (a.root / "images" / "train").glob("0?????.png")}
    eval_imgs = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (a.root / "images" / "eval").glob("0?????.png")}
    assert len(eval_imgs) == 5 and not train_imgs & eval_imgs
    ids = [s["metadata"]["sample_id"] for s in json.loads(a.eval_json.read_text())]
    assert ids == [f"eval-{i:06d}" for i in range(5)]


def test_validation_split_is_disjoint_and_leaves_train_unchanged(tmp_path):
    """n_val > 0 adds val.json whose scenes repeat no training scene and which no eval scene repeats;
    the training split is the same bytes as without it; n_val = 0 writes no val.json."""
    plain = synthesize_dataset(tmp_path / "p", n=40, n_eval=30, seed=2)
    ds = synthesize_dataset(tmp_path / "v", n=40, n_eval=30, seed=2, n_val=30)
    assert plain.val_json is None and not (plain.root / "val.json").exists()
    assert ds.val_json == ds.root / "val.json" and ds.n_val == 30
    assert ds.train_json.read_bytes() == plain.train_json.read_bytes()
    vals, report = load_sft_dataset(ds.val_json, ds.root)
    assert len(vals) == 30 and report.rejected == 0
    assert [s.sample_id for s in vals] == [f"val-{i:06d}" for i in range(30)]

    def scenes(split):
        return {hashlib.sha256(p.read_bytes()).hexdigest() for p in (ds.root / "images" / split).glob("0?????.png")}

    train, val, ev = scenes("train"), scenes("val"), scenes("eval")
    assert len(val) == 30 and len(ev) == 30
    assert not train & val and not train & ev and not val & ev
    again = synthesize_dataset(tmp_path / "v2", n=40, n_eval=30, seed=2, n_val=30)
    assert _digest(again.root) == _digest(ds.root)


def test_captions_describe_every_corner_from_the_pixels(tmp_path):
    """captions=True: one caption per training scene (same image file), naming per corner the colour
    whose pixels lie in that quadrant, or "empty" when the quadrant is background only."""
    ds = synthesize_dataset(tmp_path / "d", n=12, n_eval=2, seed=4, captions=True)
    caps, report = load_sft_dataset(ds.captions_json, ds.root)
    assert len(caps) == 12 and report.rejected == 0
    train = json.loads(ds.train_json.read_text())
    for cap, sample in zip(caps, train):
        assert cap.question_images[0].path == sample["data"][1]["content"][0]["image"] and not cap.helper_images
        text = cap.assistant.content[0].text
        parts = re.findall(r"([a-z-]+): (?:an? (\w+) (\w+)|empty)\.", text)
        assert [p[0] for p in parts] == list(CORNERS)
        img = Image.open(cap.question_images[0].file).convert("RGB")
        for k, (corner, colour, kind) in enumerate(parts):
            x, y = (k % 2) * 56, (k // 2) * 56
            present = {c for _, c in img.crop((x, y, x + 56, y + 56)).getcolors(4096)} & set(COLOURS.values())
            assert present == ({COLOURS[colour]} if colour else set()), (cap.key, corner)
            assert not colour or kind in SHAPES
    assert synthesize_dataset(tmp_path / "n", n=3, n_eval=0, seed=4).captions_json is None
