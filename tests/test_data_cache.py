"""monet.data.preprocess_cache: tokenise once, reuse, invalidate on change, resume, atomic files."""

from __future__ import annotations

import json
import os

import pytest
import torch

import monet.data.preprocess_cache as pc
from data_fixtures.samples import tiny_processor
from monet.data import StageCollator, build_stage_example, load_sft_dataset, preprocess_dataset, synthesize_dataset

K = 2


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture()
def samples(tmp_path):
    ds = synthesize_dataset(tmp_path / "synth", n=7, n_eval=0, seed=1)
    samples, report = load_sft_dataset(ds.train_json)
    assert report.rejected == 0
    return samples


@pytest.fixture()
def counting(monkeypatch):
    """Counts calls of the tokeniser the cache uses."""
    calls = []
    real = pc.build_stage_example

    def counted(*args, **kwargs):
        calls.append(args[0].key)
        return real(*args, **kwargs)

    monkeypatch.setattr(pc, "build_stage_example", counted)
    return calls


def _same(a, b):
    assert a.key == b.key and a.answer_start == b.answer_start and a.images == b.images
    for name in ("input_ids", "labels", "observation_mask", "latent_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    if b.pixel_values is not None:
        assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.image_grid_thw, b.image_grid_thw)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_second_call_reuses_the_cache(tmp_path, processor, samples, counting, stage):
    cache = tmp_path / "cache"
    first = preprocess_dataset(samples, processor, stage, K, cache, shard_size=3)
    assert len(counting) == 7 and first.built_shards == 3 and not first.cache_hit
    files = {p: p.stat().st_mtime_ns for p in first.path.iterdir()}
    second = preprocess_dataset(samples, processor, stage, K, cache, shard_size=3)
    assert len(counting) == 7, "second call tokenised again"
    assert second.cache_hit and second.path == first.path and second.reused_shards == 3
    assert {p: p.stat().st_mtime_ns for p in second.path.iterdir()} == files
    assert len(second) == 7 and second.keys == [s.key for s in samples]
    for i, s in enumerate(samples):
        _same(second[i], build_stage_example(s, processor, stage, K))
    assert second.lengths == [len(second[i]) for i in range(7)]
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["stage"] == stage and manifest["latent_size"] == K and manifest["num_samples"] == 7
    batch = StageCollator(processor)([second[0], second[1]])
    assert batch.input_ids.shape[0] == 2


def test_settings_and_inputs_change_the_key(tmp_path, processor, samples, counting):
    cache = tmp_path / "cache"
    base = preprocess_dataset(samples, processor, 2, K, cache)
    other_k = preprocess_dataset(samples, processor, 2, K + 1, cache)
    other_stage = preprocess_dataset(samples, processor, 3, K, cache)
    fewer = preprocess_dataset(samples[:5], processor, 2, K, cache)
    research = preprocess_dataset(samples, processor, 2, K, cache, labels="research")
    assert len({base.path, other_k.path, other_stage.path, fewer.path, research.path}) == 5
    assert len(counting) == 7 * 4 + 5
    # Each label rule reads back its own targets.
    for i, s in enumerate(samples):
        _same(research[i], build_stage_example(s, processor, 2, K, labels="research"))
        _same(base[i], build_stage_example(s, processor, 2, K))
    assert int(base[0].target_mask.sum()) > int(research[0].target_mask.sum())
    # Touching an image (new mtime) invalidates the entry.
    f = samples[0].question_images[0].file
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = preprocess_dataset(samples, processor, 2, K, cache)
    assert again.path != base.path and again.built_shards == 1


def test_interrupted_run_resumes_and_broken_shard_is_rebuilt(tmp_path, processor, samples, counting):
    cache = tmp_path / "cache"
    first = preprocess_dataset(samples, processor, 2, K, cache, shard_size=3)
    (first.path / "manifest.json").unlink()  # as if killed before the manifest was written
    (first.path / "shard-00001.safetensors").write_bytes(b"truncated")
    counting.clear()
    resumed = preprocess_dataset(samples, processor, 2, K, cache, shard_size=3)
    assert resumed.built_shards == 1 and resumed.reused_shards == 2
    assert counting == [s.key for s in samples[3:6]]
    for i, s in enumerate(samples):
        _same(resumed[i], build_stage_example(s, processor, 2, K))


def test_max_length_and_lazy_pixels(tmp_path, processor, samples):
    full = preprocess_dataset(samples, processor, 1, K, tmp_path / "c")
    limit = sorted(full.lengths)[3]
    short = preprocess_dataset(samples, processor, 1, K, tmp_path / "c", max_length=limit)
    assert short.cache_hit and 0 < len(short) < 7
    assert all(n <= limit for n in short.lengths)
    assert sorted(short.dropped) == sorted(k for k, n in zip(full.keys, full.lengths) if n > limit)
    ex = short.example(0, with_pixels=False)
    assert ex.pixel_values is None and ex.images
    assert short[0].pixel_values is not None
    with pytest.raises(IndexError):
        short[len(short)]
