"""Per-sample JSONL records (resume after interruption), accuracy reports, and plots."""

import csv
import io
import json
import struct
import zlib

import pytest
import torch
from rich.console import Console

from monet.eval.diagnostics import pairwise_cosines, wilson_interval
from monet.eval.plots import plot_ablation_deltas, plot_accuracy_vs_k, plot_cosine_histogram
from monet.eval.report import (ALL, RecordWriter, SampleRecord, print_report, read_records, scrub_secrets,
                               summarize, write_report)


def rec(i, bench="VStarBench", cat="direct_attributes", verdict="correct", by="rule", k=4):
    return SampleRecord(sample_id=f"{bench}/{i}", benchmark=bench, category=cat, answer="B", prediction="B",
                        text=f"output {i} with unicode é \\boxed{{B}}", verdict=verdict, decided_by=by, num_options=k,
                        extra={"latent_spans": i % 3})


def test_records_roundtrip_and_resume_after_torn_write(tmp_path):
    path = tmp_path / "run" / "records.jsonl"
    with RecordWriter(path) as w:
        for i in range(3):
            w.write(rec(i))
    # simulate a kill in the middle of writing record 3
    with open(path, "ab") as f:
        f.write(rec(3).to_json().encode()[:25])
    records, torn = read_records(path)
    assert [r.sample_id for r in records] == ["VStarBench/0", "VStarBench/1", "VStarBench/2"] and torn == 1
    assert records[1] == rec(1)
    w = RecordWriter(path)
    assert w.torn_lines_dropped == 1 and w.done_ids() == {"VStarBench/0", "VStarBench/1", "VStarBench/2"}
    todo = [i for i in range(5) if f"VStarBench/{i}" not in w.done_ids()]
    assert todo == [3, 4]
    for i in todo:
        w.write(rec(i))
    with pytest.raises(ValueError, match="already written"):
        w.write(rec(0))
    w.close()
    records, torn = read_records(path)
    assert [r.sample_id for r in records] == [f"VStarBench/{i}" for i in range(5)] and torn == 0
    assert all(json.loads(line) for line in path.read_text().splitlines())   # every line valid JSON


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(rec(0).to_json() + "\n{broken\n" + rec(1).to_json() + "\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_records(path)
    path.write_text(json.dumps({"sample_id": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1: record lacks"):
        read_records(path)
    assert read_records(tmp_path / "missing.jsonl") == ([], 0)


def test_record_validation():
    with pytest.raises(ValueError, match="VStarBench/0.*verdict"):
        rec(0, verdict="maybe")
    with pytest.raises(ValueError, match="decided_by"):
        rec(0, by="oracle")


def test_summarize_against_hand_counts():
    records = ([rec(i, cat="direct_attributes", verdict="correct") for i in range(3)]
               + [rec(3, cat="direct_attributes", verdict="incorrect", by="judge")]
               + [rec(4, cat="relative_position", verdict="degenerate", k=2)]
               + [rec(5, cat="relative_position", verdict="incorrect", by="undecided", k=2)]
               + [rec(0, bench="HRBench4K", cat=None, verdict="correct")])
    rows = summarize(records)
    assert [(r.benchmark, r.category) for r in rows] == [("HRBench4K", ALL), ("VStarBench", ALL),
                                                         ("VStarBench", "direct_attributes"),
                                                         ("VStarBench", "relative_position")]
    v = rows[1]
    assert (v.n, v.correct, v.degenerate, v.by_rule, v.by_judge, v.undecided) == (6, 3, 1, 4, 1, 1)
    assert v.accuracy == pytest.approx(0.5) and (v.ci_low, v.ci_high) == pytest.approx(wilson_interval(3, 6))
    assert v.chance == pytest.approx((4 * 0.25 + 2 * 0.5) / 6)
    assert rows[3].accuracy == 0 and rows[3].chance == pytest.approx(0.5)
    open_ended = summarize([rec(0, k=0)])
    assert open_ended[0].chance is None


def test_write_and_print_report(tmp_path):
    rows = summarize([rec(0), rec(1, verdict="incorrect")])
    paths = write_report(rows, tmp_path / "out", settings={"model": "m", "latent_size": 8, "api_key": "xyz",
                                                            "judge": {"api_key_env": "K", "token": "t"}},
                         extra={"load_reports": [{"benchmark": "VStarBench", "skipped": 0}]})
    rep = json.loads(paths["json"].read_text())
    assert rep["settings"] == {"model": "m", "latent_size": 8, "judge": {"api_key_env": "K"}}
    assert rep["rows"][0]["accuracy"] == 0.5 and rep["load_reports"][0]["benchmark"] == "VStarBench"
    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and float(table[0]["accuracy"]) == 0.5 and table[1]["category"] == "direct_attributes"
    buf = io.StringIO()
    print_report(rows, Console(file=buf, width=140))
    out = buf.getvalue()
    assert "VStarBench" in out and "50.0" in out and "direct_attributes" in out


def test_scrub_secrets_nested():
    assert scrub_secrets({"a": [{"OPENAI_API_KEY": 1, "x": 2}], "password": 3, "api_key_env": "E"}) == \
        {"a": [{"x": 2}], "api_key_env": "E"}


# ---------------------------------------------------------------- plots

def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    w, h = struct.unpack(">II", data[16:24])
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0], "IHDR CRC mismatch"
    assert data.endswith(b"IEND\xaeB`\x82")
    return w, h, len(data)


def test_plots_write_valid_pngs(tmp_path):
    from PIL import Image

    p1 = plot_accuracy_vs_k({"VStarBench": [(4, .6, .5, .7), (8, .7, .6, .8), (16, .72, .62, .8)],
                             "HRBench4K": [(8, .5, .45, .55), (4, .4, .35, .46)]}, tmp_path / "plots" / "k.png")
    p2 = plot_ablation_deltas({"no latents": -.08, "random latents": -.05, "K=16": .01}, tmp_path / "abl.png",
                              errors={"no latents": .02})
    answers = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    p3 = plot_cosine_histogram({"within": pairwise_cosines(answers, "within").tolist(),
                                "across": pairwise_cosines(answers, "across").tolist()}, tmp_path / "cos.png")
    for p in (p1, p2, p3):
        w, h, size = png_size(p)
        assert w >= 300 and h >= 200 and size > 5000, (p, w, h, size)
        with Image.open(p) as im:
            im.load()
            colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 10, f"{p} looks blank"


def test_plot_input_errors(tmp_path):
    with pytest.raises(ValueError):
        plot_accuracy_vs_k({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="outside its interval"):
        plot_accuracy_vs_k({"b": [(4, .9, .5, .7)]}, tmp_path / "x.png")
    with pytest.raises(ValueError):
        plot_cosine_histogram({"a": []}, tmp_path / "x.png")
    with pytest.raises(ValueError):
        plot_ablation_deltas({}, tmp_path / "x.png")


def test_pipeline_without_a_model(tmp_path):
    """Loader -> prompt -> (scripted outputs) -> Scorer -> records -> report, as `monet eval` wires it."""
    from pathlib import Path

    from monet.eval.bench import load_benchmark
    from monet.eval.prompts import build_messages
    from monet.scoring import ScoreItem, Scorer

    fix = Path(__file__).parent / "data_fixtures" / "bench"
    scorer = Scorer()
    expected = {}
    for name in ("VStarBench", "HRBench4K", "MME-RealWorld-Lite", "VisualPuzzles"):
        ds = load_benchmark(name, fix)
        writer = RecordWriter(tmp_path / name / "records.jsonl")
        for i, s in enumerate(ds):
            assert build_messages(s)[-1]["content"][-1]["type"] == "text"
            wrong = next(k for k in s.options if k != s.answer)
            output = f"Let me look. The answer is {s.answer if i % 2 == 0 else wrong}."
            r = scorer.score(ScoreItem(output, s.answer, s.options, s.question))
            writer.write(SampleRecord(s.sample_id, s.benchmark, s.category, s.answer, r.extracted, output,
                                      r.verdict.value, r.decided_by, r.detail, s.num_options))
        writer.close()
        expected[name] = (len(ds), (len(ds) + 1) // 2)
    records = [r for name in expected for r in read_records(tmp_path / name / "records.jsonl")[0]]
    rows = {(r.benchmark, r.category): r for r in summarize(records)}
    for name, (n, correct) in expected.items():
        row = rows[(name, ALL)]
        assert (row.n, row.correct, row.by_rule) == (n, correct, n)
    assert rows[("MME-RealWorld-Lite", ALL)].chance == pytest.approx(0.2)
    assert rows[("VStarBench", ALL)].chance == pytest.approx((0.25 + 0.5 + 0.25 + 0.5) / 4)
