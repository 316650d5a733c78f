"""Benchmark loaders (VLMEvalKit TSVs, Monet-SFT JSON) and prompt building."""

import base64
import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from monet.eval.bench import (BENCHMARKS, BenchmarkFileError, find_benchmark_file, get_spec, load_benchmark,
                              load_vlmeval_tsv, parse_inline_options)
from monet.eval.prompts import (MCQ_INSTRUCTION, MME_RW_INSTRUCTION, VISUAL_PUZZLES_INSTRUCTION, PromptConfig,
                                build_messages, build_prompt_text)

FIX = Path(__file__).parent / "data_fixtures" / "bench"
_spec = importlib.util.spec_from_file_location("bench_fixtures", FIX / "make_fixtures.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)


def pixel(sample, i=0):
    return sample.load_images()[i].getpixel((3, 3))


def read_tsv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f, delimiter="\t"))


def write_tsv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t", lineterminator="\n").writerows(rows)


# ---------------------------------------------------------------- loaders on the published layouts

def test_vstar_fixture():
    ds = load_benchmark("vstar", FIX)
    assert ds.report.rows == 4 and ds.report.loaded == 4 and not ds.report.skipped
    s = {x.sample_id: x for x in ds}
    a = s["VStarBench/0"]
    assert a.options == {"A": "red", "B": "white", "C": "black", "D": "blue"} and a.answer == "B"
    assert a.category == "direct_attributes" and a.num_options == 4 and a.hint is None
    assert pixel(a) == fixtures.colour(0)
    rel = s["VStarBench/1"]
    assert rel.options == {"A": "left", "B": "right"} and rel.category == "relative_position"
    # quoted field with an embedded quote and newline survives
    assert s["VStarBench/2"].question == 'What is written on the "EXIT" sign?\n(look closely)'
    # index reference "0" resolves to row 0's image
    assert pixel(s["VStarBench/3"]) == fixtures.colour(0)


def test_hrbench_fixture_legacy_file_name():
    assert find_benchmark_file("HRBench4K", FIX).name == "hr_bench_4k.tsv"
    ds = load_benchmark("HRBench4K", FIX)
    assert [x.sample_id for x in ds] == ["HRBench4K/0", "HRBench4K/1", "HRBench4K/2"]
    assert [x.category for x in ds] == ["single", "cross", "single"]
    assert [x.extra["cycle_category"] for x in ds] == ["0", "0", "1"]
    assert [pixel(x) for x in ds] == [fixtures.colour(i) for i in (10, 11, 12)]
    with pytest.raises(BenchmarkFileError, match="HRBench8K"):
        load_benchmark("HRBench8K", FIX)


def test_mme_realworld_lite_fixture():
    ds = load_benchmark("MME-RealWorld-Lite", FIX)
    a = ds.samples[0]
    assert a.sample_id == "MME-RealWorld-Lite/100"
    assert a.options == {"A": "AB123", "B": "AB128", "C": "XB123", "D": "AB723",
                         "E": "The image does not feature the plate."}
    assert a.category == "Perception/Autonomous_Driving" and a.subcategory == "object_identification"
    assert ds.samples[2].options["A"] == "$3.99"  # the apostrophe in the question did not break parsing
    assert [pixel(x) for x in ds] == [fixtures.colour(i) for i in (20, 21, 22)]


def test_visual_puzzles_fixture():
    ds = load_benchmark("VisualPuzzles", FIX)
    a, b, c = ds.samples
    assert a.options == {"A": "circle", "B": "square", "C": "triangle", "D": "star"} and a.extra["difficulty"] == "easy"
    assert b.options == {"A": "", "B": "", "C": "", "D": ""} and b.extra["options_in_image"] is True
    assert len(c.images) == 2 and [pixel(c, 0), pixel(c, 1)] == [fixtures.colour(32), fixtures.colour(33)]


def test_limit_and_tsv_path(tmp_path):
    ds = load_benchmark("HRBench4K", FIX / "hr_bench_4k.tsv", limit=2)
    assert len(ds) == 2


def test_spec_lookup():
    assert get_spec("hrbench_8k").name == "HRBench8K" and get_spec("V*").name == "VStarBench"
    with pytest.raises(KeyError, match="known"):
        get_spec("MMBench")
    assert set(BENCHMARKS) == {"VStarBench", "HRBench4K", "HRBench8K", "MME-RealWorld-Lite", "VisualPuzzles"}


def test_image_path_column(tmp_path):
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "im.png")
    write_tsv(tmp_path / "VStarBench.tsv", [["index", "question", "answer", "A", "B", "image_path"],
                                             ["7", "q?", "A", "x", "y", "im.png"]])
    (s,) = load_benchmark("VStarBench", tmp_path).samples
    assert pixel(s) == (1, 2, 3) and s.category is None


# ---------------------------------------------------------------- malformed rows: skip, count, name

def _bad_vstar(tmp_path):
    rows = read_tsv(FIX / "VStarBench.tsv")
    h = rows[0]
    good = rows[1]
    col = h.index
    bad_b64 = list(good); bad_b64[col("index")] = "10"; bad_b64[col("image")] = "!!!not-base64!!!" * 5
    not_img = list(good); not_img[col("index")] = "11"
    not_img[col("image")] = base64.b64encode(b"just some bytes, not an image" * 4).decode()
    bad_ans = list(good); bad_ans[col("index")] = "12"; bad_ans[col("answer")] = "E"
    dup = list(good)  # index 0 again
    short = good[:3]
    no_q = list(good); no_q[col("index")] = "13"; no_q[col("question")] = " "
    dangling = list(good); dangling[col("index")] = "14"; dangling[col("image")] = "999"
    one_opt = list(good); one_opt[col("index")] = "15"
    for c in "BCD":
        one_opt[col(c)] = ""
    out = tmp_path / "VStarBench.tsv"
    write_tsv(out, [h, good, bad_b64, not_img, bad_ans, dup, short, no_q, dangling, one_opt, rows[2]])
    return out


def test_malformed_rows_are_skipped_and_counted(tmp_path, caplog):
    path = _bad_vstar(tmp_path)
    ds = load_vlmeval_tsv(path, get_spec("VStarBench"))
    assert [s.sample_id for s in ds] == ["VStarBench/0", "VStarBench/1"]
    rep = ds.report
    assert rep.rows == 10 and rep.loaded == 2 and len(rep.skipped) == 8
    assert rep.counts_by_reason() == {"bad_image": 3, "bad_answer": 1, "duplicate_index": 1,
                                      "bad_field_count": 1, "missing_question": 1, "bad_options": 1}
    by_index = {s.index: s for s in rep.skipped}
    assert by_index["12"].row == 4 and by_index["12"].line == 5
    msg = by_index["12"].describe(path)
    assert str(path) in msg and "row 4" in msg and "index 12" in msg and "'E'" in msg
    assert "refers to no row" in by_index["14"].detail
    assert "skipped 8" in rep.summary() and rep.to_dict()["skipped"] == 8
    assert any("index 12" in r.message for r in caplog.records)


def test_zero_valid_rows_is_an_error(tmp_path):
    rows = read_tsv(FIX / "hr_bench_4k.tsv")
    h = rows[0]
    for r in rows[1:]:
        r[h.index("answer")] = "Z"
    write_tsv(tmp_path / "HRBench4K.tsv", rows)
    with pytest.raises(BenchmarkFileError, match=r"no valid HRBench4K rows out of 3.*bad_answer=3.*row 1"):
        load_benchmark("HRBench4K", tmp_path)


def test_header_errors(tmp_path):
    write_tsv(tmp_path / "VStarBench.tsv", [["index", "question", "A", "B"], ["0", "q", "x", "y"]])
    with pytest.raises(BenchmarkFileError, match=r"missing column\(s\) answer, image"):
        load_benchmark("VStarBench", tmp_path)
    (tmp_path / "VisualPuzzles.tsv").write_text("")
    with pytest.raises(BenchmarkFileError, match="empty file"):
        load_benchmark("VisualPuzzles", tmp_path)
    with pytest.raises(BenchmarkFileError, match="not found"):
        load_vlmeval_tsv(tmp_path / "nope.tsv", get_spec("VStarBench"))


def test_options_literal_is_never_executed(tmp_path):
    rows = read_tsv(FIX / "VisualPuzzles.tsv")
    h = rows[0]
    marker = tmp_path / "pwned"
    rows[1][h.index("options")] = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    rows[2][h.index("options")] = "['a', 'b'"  # truncated literal
    write_tsv(tmp_path / "VisualPuzzles.tsv", rows)
    ds = load_benchmark("VisualPuzzles", tmp_path)
    assert not marker.exists()
    assert ds.report.counts_by_reason() == {"bad_options": 2} and len(ds) == 1


def test_mme_options_need_prefix(tmp_path):
    rows = read_tsv(FIX / "mme_realworld_lite.tsv")
    h = rows[0]
    rows[1][h.index("multi-choice options")] = str(["AB123", "AB128"])
    write_tsv(tmp_path / "mme_realworld_lite.tsv", rows)
    ds = load_benchmark("MME-RealWorld-Lite", tmp_path)
    (skip,) = ds.report.skipped
    assert skip.reason == "bad_options" and "prefix" in skip.detail and skip.index == "100"


# ---------------------------------------------------------------- Monet-SFT source

def _sft_file(tmp_path):
    Image.new("RGB", (6, 6), (9, 8, 7)).save(tmp_path / "q.png")
    def sample(sid, user_text, answer_text, image="q.png"):
        return {"metadata": {"dataset_name": "Zoom", "sample_id": sid},
                "data": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                         {"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": user_text}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer_text}]}]}
    raws = [sample(1, "Which colour?\nA. red\nB. blue\nC. green", "Looks blue. \\boxed{B}"),
            sample(2, "How many dots?", "There are \\boxed{12} dots."),
            sample(3, "No answer here", "I do not know"),
            sample(4, "Missing image", "\\boxed{1}", image="missing.png"),
            {"metadata": {}, "data": []},
            sample(1, "duplicate", "\\boxed{A}")]
    p = tmp_path / "eval.json"
    p.write_text(json.dumps(raws))
    return p


def test_sft_source(tmp_path):
    ds = load_benchmark("heldout", _sft_file(tmp_path))
    assert [s.sample_id for s in ds] == ["heldout/Zoom/1", "heldout/Zoom/2"]
    mc, open_ = ds.samples
    assert mc.options == {"A": "red", "B": "blue", "C": "green"} and mc.answer == "B"
    assert open_.options == {} and open_.answer == "12" and open_.category == "Zoom"
    assert pixel(mc) == (9, 8, 7)
    assert ds.report.counts_by_reason() == {"missing_answer": 1, "missing_image": 1, "bad_metadata": 1,
                                            "duplicate_index": 1}
    # verbatim prompt, sample's own system text
    msgs = build_messages(open_)
    assert msgs[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert msgs[1]["content"][-1] == {"type": "text", "text": "How many dots?"}


def test_parse_inline_options():
    assert parse_inline_options("Q\n(A) x\n(B) y z\nC. w") == {"A": "x", "B": "y z", "C": "w"}
    assert parse_inline_options("Q\nA. only one") == {}
    assert parse_inline_options("B. x\nC. y") == {}


# ---------------------------------------------------------------- prompts

def test_mcq_prompt_exact():
    s = load_benchmark("VStarBench", FIX).samples[1]
    assert build_prompt_text(s) == ("Question: Is the cup on the left or right side of the laptop?\n"
                                    "Options:\nA. left\nB. right\n" + MCQ_INSTRUCTION)
    assert MCQ_INSTRUCTION == "Please select the correct answer from the options above."
    hinted = type(s)(**{**s.__dict__, "hint": "Look at the table."})
    assert build_prompt_text(hinted).startswith("Hint: Look at the table.\nQuestion: ")
    boxed = PromptConfig(instruction="Put the option letter in \\boxed{}.")
    assert build_prompt_text(s, boxed).endswith("B. right\nPut the option letter in \\boxed{}.")


def test_mme_and_visual_puzzles_prompts_exact():
    m = load_benchmark("MME-RealWorld-Lite", FIX).samples[1]
    assert build_prompt_text(m) == (
        "How many people are waiting at the crosswalk? The choices are listed below:\n"
        "(A) 2\n(B) 3\n(C) 4\n(D) 5\n(E) The image does not feature the people.\n" + MME_RW_INSTRUCTION)
    assert MME_RW_INSTRUCTION.endswith("of the correct option. \nThe best answer is:")
    a, b, _ = load_benchmark("VisualPuzzles", FIX).samples
    assert build_prompt_text(a) == ("Which shape completes the pattern?\nOptions:\n(A) circle\n(B) square\n"
                                    "(C) triangle\n(D) star\n" + VISUAL_PUZZLES_INSTRUCTION)
    assert build_prompt_text(b) == ("Which piece fits the gap?\nOptions: Choose from (A) (B) (C) (D) in the image.\n"
                                    + VISUAL_PUZZLES_INSTRUCTION)


def test_messages_qwen_format():
    s = load_benchmark("VisualPuzzles", FIX).samples[2]
    msgs = build_messages(s, PromptConfig(system_prompt="You are Monet."))
    assert [m["role"] for m in msgs] == ["system", "user"]
    content = msgs[1]["content"]
    assert [c["type"] for c in content] == ["image", "image", "text"]
    assert isinstance(content[0]["image"], Image.Image) and content[0]["image"].mode == "RGB"
    assert content[1]["image"].getpixel((0, 0)) == fixtures.colour(33)
    assert content[2]["text"] == build_prompt_text(s)
    raw = build_messages(s, load_images=False)
    assert len(raw) == 1 and isinstance(raw[0]["content"][0]["image"], bytes)
    with pytest.raises(ValueError, match="style"):
        PromptConfig(style="fancy")


def test_corrupt_image_named_at_decode_time():
    from monet.eval.bench import EvalSample
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    s = EvalSample("X/1", "X", (png.getvalue()[:40],), "q", {"A": "a", "B": "b"}, "A")
    with pytest.raises(ValueError, match="sample X/1: image 0"):
        s.load_images()


def test_pixel_bomb_row_is_skipped_not_crashing(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)   # 8x8 fixture images exceed 2x this
    rows = read_tsv(FIX / "hr_bench_4k.tsv")
    write_tsv(tmp_path / "HRBench4K.tsv", rows)
    with pytest.raises(BenchmarkFileError, match="bad_image=3"):
        load_benchmark("HRBench4K", tmp_path)
