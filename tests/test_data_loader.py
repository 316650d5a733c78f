"""monet.data.sft_loader: every kind of malformed sample is rejected with the right reason."""

from __future__ import annotations

import json

import pytest

from data_fixtures.samples import PH, good_sample, two_helper_sample, variant, write_images, write_json
from monet.data import DatasetFileError, ImageItem, load_sft_dataset, parse_sample
from monet.data.sft_loader import REASONS


def _assistant(s):
    return s["data"][2]["content"]


# (sample-id, mutation, expected reason)
BAD = [
    ("not-object", None, "bad_structure"),
    ("no-meta", lambda s: s.pop("metadata"), "bad_metadata"),
    ("empty-name", lambda s: s["metadata"].update(dataset_name=""), "bad_metadata"),
    ("no-data", lambda s: s.pop("data"), "bad_turns"),
    ("roles", lambda s: s["data"].reverse(), "bad_turns"),
    ("two-users", lambda s: s["data"].insert(1, dict(s["data"][1])), "bad_turns"),
    ("video", lambda s: _assistant(s).append({"type": "video", "video": "x.mp4"}), "bad_content"),
    ("text-not-str", lambda s: _assistant(s).append({"type": "text", "text": 3}), "bad_content"),
    ("no-placeholder", lambda s: _assistant(s)[0].update(text="Let me zoom in."), "placeholder_mismatch"),
    ("extra-placeholder", lambda s: _assistant(s)[2].update(text=_assistant(s)[2]["text"] + PH),
     "placeholder_mismatch"),
    ("placeholder-mid-text", lambda s: _assistant(s)[0].update(text=PH + " zoom in." + PH[:-1]),
     "placeholder_mismatch"),
    ("image-first", lambda s: _assistant(s).insert(0, {"type": "image", "image": "img/h1.png"}),
     "placeholder_mismatch"),
    ("stray-start", lambda s: _assistant(s)[2].update(text="<abs_vis_token> oops"), "stray_special_token"),
    ("pad-in-user", lambda s: s["data"][1]["content"][1].update(text="q <abs_vis_token_pad>"),
     "stray_special_token"),
    ("obs-in-user", lambda s: s["data"][1]["content"][1].update(text="<observation>x</observation>"),
     "stray_special_token"),
    ("vision-in-text", lambda s: _assistant(s)[2].update(text="<|image_pad|>"), "stray_special_token"),
    ("obs-unclosed", lambda s: _assistant(s)[2].update(text="<observation>red"), "observation_unbalanced"),
    ("obs-close-first", lambda s: _assistant(s)[2].update(text="red</observation>"), "observation_unbalanced"),
    ("obs-nested", lambda s: _assistant(s)[2].update(
        text="<observation>a<observation>b</observation></observation>"), "observation_unbalanced"),
    ("obs-spans-image", lambda s: (_assistant(s)[0].update(text="<observation>" + PH),
                                   _assistant(s)[2].update(text="</observation> red")), "image_in_observation"),
    ("missing-image", lambda s: _assistant(s)[1].update(image="img/nope.png"), "image_missing"),
    ("corrupt-image", lambda s: s["data"][1]["content"][0].update(image="img/bad.png"), "image_unreadable"),
]


@pytest.fixture()
def root(tmp_path):
    write_images(tmp_path)
    return tmp_path


def test_good_samples_load(root):
    path = write_json(root / "d.json", [good_sample("a"), two_helper_sample("b")])
    samples, report = load_sft_dataset(path)
    assert report.rejected == 0 and report.accepted == report.total == 2
    a, b = samples
    assert a.key == "Hand/a" and len(a.question_images) == 1 and len(a.helper_images) == 1
    assert [im.path for im in b.question_images] == ["img/q0.png", "img/q1.png"]
    assert len(b.helper_images) == 2
    assert b.question_images[1].size == (84, 56)  # filled in by the image check
    assert b.question_images[0].file == root / "img" / "q0.png"
    assert json.loads(json.dumps(a.to_json())) == good_sample("a")  # round trip


@pytest.mark.parametrize("sid,mutate,reason", BAD, ids=[b[0] for b in BAD])
def test_each_malformed_sample_is_rejected_with_its_reason(root, sid, mutate, reason):
    bad = "not a sample" if mutate is None else variant(mutate, sid)
    path = write_json(root / "d.json", [good_sample("ok1"), bad, good_sample("ok2")])
    samples, report = load_sft_dataset(path)
    assert [s.sample_id for s in samples] == ["ok1", "ok2"]
    assert report.total == 3 and report.accepted == 2 and report.rejected == 1
    (rej,) = report.rejections
    assert rej.reason == reason, rej
    assert rej.index == 1 and rej.source == str(path)
    if reason not in ("bad_structure", "bad_metadata"):
        assert rej.key == f"Hand/{sid}"
    assert report.counts == {reason: 1}


def test_all_reasons_covered_by_tests():
    assert {b[2] for b in BAD} | {"duplicate_id"} == set(REASONS)


def test_duplicates_counts_and_summary(root):
    data = [good_sample("x"), good_sample("x"), good_sample("x", dataset="Other"),
            variant(lambda s: _assistant(s)[0].update(text="no ph"), "y"),
            variant(lambda s: _assistant(s)[0].update(text="no ph"), "z"),
            variant(lambda s: _assistant(s)[1].update(image="img/gone.png"), "w")]
    path = write_json(root / "d.json", data)
    samples, report = load_sft_dataset(path, root)
    assert [s.key for s in samples] == ["Hand/x", "Other/x"]
    assert report.counts == {"placeholder_mismatch": 2, "duplicate_id": 1, "image_missing": 1}
    assert report.by_dataset() == {"Hand": {"placeholder_mismatch": 2, "duplicate_id": 1, "image_missing": 1}}
    text = report.summary()
    assert "2 of 6 samples accepted, 4 rejected" in text
    assert "placeholder_mismatch: 2" in text and "Hand/y" in text and "duplicate_id: 1" in text
    assert str(report) == text


def test_several_files_and_image_root(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("json")
    p1 = write_json(other / "a.json", [good_sample("1")])
    p2 = write_json(other / "b.json", [two_helper_sample("2")])
    samples, report = load_sft_dataset([p1, p2], image_root=root)
    assert [s.sample_id for s in samples] == ["1", "2"] and report.rejected == 0
    # Without image_root, paths are relative to each JSON file's folder (no images there).
    _, report = load_sft_dataset([p1, p2])
    assert report.counts == {"image_missing": 2}
    # check_images=False skips file access entirely.
    samples, report = load_sft_dataset([p1, p2], check_images=False)
    assert report.rejected == 0 and samples[0].question_images[0].size is None


def test_whitespace_after_placeholder_and_string_content(root):
    s = good_sample("ws")
    _assistant(s)[0]["text"] = "Zoom." + PH + " \n"
    s["data"][0]["content"] = "System as a plain string."
    samples, report = load_sft_dataset(write_json(root / "d.json", [s]))
    assert report.rejected == 0
    assert samples[0].turns[0].content[0].text == "System as a plain string."


def test_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(DatasetFileError, match="missing.json"):
        load_sft_dataset(missing)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(DatasetFileError, match=r"obj\.json.*list"):
        load_sft_dataset(obj)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DatasetFileError, match="broken.json"):
        load_sft_dataset(broken)
    with pytest.raises(DatasetFileError):
        load_sft_dataset([])


def test_parse_sample_keeps_extra_metadata(tmp_path):
    raw = good_sample(7)
    raw["metadata"]["source"] = "hand"
    s = parse_sample(raw, tmp_path)
    assert s.sample_id == 7 and s.key == "Hand/7" and s.extra_metadata == {"source": "hand"}
    assert s.to_json() == raw
    assert isinstance(s.helper_images[0], ImageItem)
