"""Bad data never crashes a run and never disappears silently.

* An image whose PNG chunks (and checksums) are valid but whose compressed pixel data is corrupt
  passes ``PIL.verify``; validation decodes it and rejects the sample (``image_unreadable``).
* Validation decodes each file once per process (cache keyed by path, size, mtime).
* On the training path, a sample whose image breaks after validation is skipped, counted and
  named (collator, trainer metrics and summary), never a raw ``OSError`` mid-run.
* Empty dataset files, deeply nested JSON, and ``--out`` onto an existing file are clear errors.
"""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch

import monet.data.sft_loader as sl
from data_fixtures.samples import good_sample, tiny_processor, write_images, write_json
from monet.cli import main
from monet.data import DatasetFileError, StageCollator, load_sft_dataset, preprocess_dataset, synthesize_dataset
from monet.data.stage_layout import SampleLoadError, build_stage_example

K = 2


def corrupt_png_data(path) -> None:
    """Flip bytes inside the IDAT (compressed pixel) data of a PNG and recompute the chunk CRC,
    so every chunk checksum stays valid and only decompression fails."""
    raw = bytearray(path.read_bytes())
    pos = 8  # after the signature
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos:pos + 4])
        kind = bytes(raw[pos + 4:pos + 8])
        if kind == b"IDAT":
            start = pos + 8
            for j in range(start + 2, start + length - 4):  # keep the 2-byte zlib header
                raw[j] ^= 0x5A
            crc = zlib.crc32(bytes(raw[pos + 4:start + length])) & 0xFFFFFFFF
            raw[start + length:start + length + 4] = struct.pack(">I", crc)
            path.write_bytes(bytes(raw))
            return
        pos += 12 + length
    raise AssertionError(f"{path} has no IDAT chunk")


@pytest.fixture()
def root(tmp_path):
    write_images(tmp_path)
    return tmp_path


def test_corrupt_png_passes_verify_but_not_decoding(root):
    from PIL import Image

    f = root / "img" / "q0.png"
    corrupt_png_data(f)
    with Image.open(f) as im:
        im.verify()  # the old check: passes
    with pytest.raises(Exception), Image.open(f) as im:
        im.load()


def test_validation_decodes_images_and_rejects_corrupt_data(root, capsys):
    corrupt_png_data(root / "img" / "h0.png")
    good = good_sample("ok")
    good["data"][2]["content"][1]["image"] = "img/h1.png"
    path = write_json(root / "d.json", [good_sample("bad"), good])
    samples, report = load_sft_dataset(path)
    assert [s.key for s in samples] == ["Hand/ok"]
    (rej,) = report.rejections
    assert rej.key == "Hand/bad" and rej.reason == "image_unreadable" and "h0.png" in rej.detail
    assert main(["data", "check", str(path)]) == 1
    assert "image_unreadable" in capsys.readouterr().out


def test_each_image_is_decoded_once_and_rechecked_when_changed(root, monkeypatch):
    calls = []
    real = sl._decode_image_file
    monkeypatch.setattr(sl, "_decode_image_file", lambda f: calls.append(f.name) or real(f))
    monkeypatch.setattr(sl, "_IMAGE_CHECKS", {})
    path = write_json(root / "d.json", [good_sample("a"), good_sample("b")])
    for _ in range(3):
        samples, report = load_sft_dataset(path)
        assert report.accepted == 2
    assert sorted(calls) == ["h0.png", "q0.png"]  # shared files, three loads: one decode each
    # A changed file (new size and mtime) is decoded again and now rejected.
    corrupt_png_data(root / "img" / "h0.png")
    with open(root / "img" / "h0.png", "ab") as f:
        f.write(b"\0")  # trailing garbage after IEND changes the size
    samples, report = load_sft_dataset(path)
    assert calls.count("h0.png") == 2 and report.accepted == 0
    assert {r.reason for r in report.rejections} == {"image_unreadable"}


def test_collator_skips_samples_that_fail_to_load(root):
    processor = tiny_processor()
    path = write_json(root / "d.json", [good_sample(f"s{i}") for i in range(2)])
    samples, _ = load_sft_dataset(path)
    # s1 gets its own helper image, which breaks after validation and preprocessing.
    write_images(root / "other")
    s1 = good_sample("s1")
    s1["data"][2]["content"][1]["image"] = "other/img/h0.png"
    path = write_json(root / "d.json", [good_sample("s0"), s1, good_sample("s2")])
    samples, report = load_sft_dataset(path)
    assert report.accepted == 3
    ds = preprocess_dataset(samples, processor, 1, K, root / "cache")
    corrupt_png_data(root / "other" / "img" / "h0.png")
    with pytest.raises(SampleLoadError, match="Hand/s1.*h0.png"):
        ds[1]
    collate = StageCollator(processor)
    batch = collate.load(ds, [0, 1, 2])
    assert batch.keys == ["Hand/s0", "Hand/s2"] and batch.skipped == ["Hand/s1"]
    ref = collate([ds[0], ds[2]])
    assert torch.equal(batch.input_ids, ref.input_ids) and torch.equal(batch.pixel_values, ref.pixel_values)
    assert collate.load(ds, [1]) is None
    assert [s.key for s in collate.skipped] == ["Hand/s1", "Hand/s1"]
    assert "h0.png" in collate.skipped[0].reason
    # build_stage_example names the sample too.
    with pytest.raises(SampleLoadError, match="Hand/s1"):
        build_stage_example(samples[1], processor, 1, K)


def test_trainer_skips_and_counts_a_broken_sample(tmp_path):
    from monet.testing import build_tiny_checkpoint
    from monet.train.config import SFTConfig
    from monet.train.pipeline import run_sft

    data = synthesize_dataset(tmp_path / "d", n=4, n_eval=0, seed=2)
    cfg = SFTConfig(stage=1, model=str(build_tiny_checkpoint(cache=True)), data=[str(data.train_json)],
                    output_dir=str(tmp_path / "out"), latent_size=K, max_steps=4, micro_batch_size=2, grad_accum=1,
                    dtype="float32", gradient_checkpointing=False, teacher="none", log_every=1,
                    cache_dir=str(tmp_path / "cache"), freeze_vision=False)
    load_sft_dataset(cfg.data)  # validated (and cached) while intact
    # Break train-000002's question image after validation: the cached check still says "fine"
    # only if size and mtime are unchanged, so corrupt in place and restore the stat.
    import os

    f = data.root / "images" / "train" / "000002.png"
    st = os.stat(f)
    corrupt_png_data(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    lines = []
    summary = run_sft(cfg, device="cpu", progress=False, printer=lines.append)
    assert summary["steps"] == 4
    keys = {s["key"] for s in summary["skipped_samples"]}
    assert keys == {"Synth_Zoom/train-000002"}
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_samples"] >= 1  # 4 steps x 2 = 2 epochs: seen once or twice
    assert any("skipped sample Synth_Zoom/train-000002" in x and "000002.png" in x for x in lines)


def test_empty_dataset_file_is_an_error(tmp_path, capsys):
    empty_list = write_json(tmp_path / "empty.json", [])
    zero_bytes = tmp_path / "zero.json"
    zero_bytes.write_bytes(b"")
    for f in (empty_list, zero_bytes):
        with pytest.raises(DatasetFileError, match=str(f.name)):
            load_sft_dataset(f)
        assert main(["data", "check", str(f)]) != 0
        assert str(f) in capsys.readouterr().err


def test_deeply_nested_json_is_a_clear_error(tmp_path, capsys):
    f = tmp_path / "deep.json"
    f.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DatasetFileError, match="nested too deeply"):
        load_sft_dataset(f)
    assert main(["data", "check", str(f)]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["data", "synth", "--n", "1", "--n-eval", "1"], ["quickstart", "--fast"]])
def test_out_onto_an_existing_file_says_so(tmp_path, capsys, command):
    f = tmp_path / "taken"
    f.write_text("keep me")
    assert main([*command, "--out", str(f)]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "not a directory" in err
    assert f.read_text() == "keep me"
    assert main([*command, "--out", str(f / "sub")]) == 2  # a file as a parent
    assert "not a directory" in capsys.readouterr().err
