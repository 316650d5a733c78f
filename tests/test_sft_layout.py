"""SFT checkpoints state the span layout the run trained in.

SFT data is built in the standard layout only (:func:`monet.data.stage_layout.sft_span_layout`).
A run started from a model whose ``monet_config.json`` names ``monet-v1`` (as the released
Monet-7B's does) and another K trains the standard layout with the run's K, says so in a WARNING
line of the run log, and every checkpoint's ``monet_config.json`` records that layout: loading the
checkpoint folder decodes exactly as the same weights with the explicit training layout, and not
as with the starting model's kind.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

import monet
from monet.data.synth import synthesize_dataset
from monet.layout import SpanLayout
from monet.model.config import MonetConfig
from monet.model.requests import LatentRequest
from monet.testing import build_tiny_checkpoint

K = 2
START_LAYOUT = SpanLayout(4, "monet-v1")  # the starting model's own defaults: other K, other kind


@pytest.fixture(scope="module")
def v1_run(tmp_path_factory):
    """Two stage-3 steps (CE only, K=2) from a tiny model whose monet_config says monet-v1, K=4."""
    from monet.train.config import SFTConfig
    from monet.train.pipeline import run_sft

    root = tmp_path_factory.mktemp("sft_layout")
    start = root / "start"
    shutil.copytree(build_tiny_checkpoint(cache=True), start)
    saved = MonetConfig.load(start)
    MonetConfig(span_layout=START_LAYOUT, token_ids=saved.token_ids if saved else None).save(start)
    assert MonetConfig.load(start).span_layout == START_LAYOUT
    data = synthesize_dataset(root / "data", n=4, n_eval=1, seed=0)
    cfg = SFTConfig(stage=3, model=str(start), data=[str(data.train_json)], image_root=str(data.root),
                    output_dir=str(root / "run"), latent_size=K, lr=3e-2, warmup_steps=0, micro_batch_size=2,
                    grad_accum=1, dtype="float32", gradient_checkpointing=False, log_every=100, teacher="none",
                    cache_dir=str(root / "cache"), max_steps=2, save_every=1, keep_last=None)
    log: list[str] = []
    run_sft(cfg, progress=False, printer=log.append)
    return start, root / "run", data, log


def _generate(model, processor, image):
    reqs = [LatentRequest(prompt="What is in the top-left corner?", images=[image], force_latent=True),
            LatentRequest(prompt="Describe the image.", images=[image])]
    return monet.generate(model, processor, reqs, max_new_tokens=12, temperature=0.0, return_latents=True)


def _same(a, b) -> bool:
    for x, y in zip(a, b, strict=True):
        if x.token_ids != y.token_ids or x.latent_positions != y.latent_positions:
            return False
        if (x.latents is None) != (y.latents is None):
            return False
        if x.latents is not None and not torch.equal(x.latents, y.latents):
            return False
    return True


def test_the_switch_to_the_standard_layout_is_logged(v1_run):
    start, _, _, log = v1_run
    warnings = [line for line in log if line.startswith("WARNING")]
    assert len(warnings) == 1, log
    assert str(start) in warnings[0] and "'monet-v1'" in warnings[0] and "'standard'" in warnings[0]
    assert f"latent_size {K}" in warnings[0]


def test_checkpoints_record_and_decode_in_the_trained_layout(v1_run):
    start, run, data, _ = v1_run
    image = data.root / "images" / "eval" / "000000.png"
    start_ids = monet.load_model(start, dtype="float32")[0].monet_config.token_ids.to_dict()
    for step in (1, 2):
        ckpt = run / f"checkpoint-{step}"
        cfg = json.loads((ckpt / "monet_config.json").read_text())
        assert (cfg["latent_size"], cfg["layout"]) == (K, "standard"), step
        assert cfg["token_ids"] == start_ids
    ckpt = run / "checkpoint-2"
    model, processor = monet.load_model(ckpt, dtype="float32")
    assert model.monet_config.span_layout == SpanLayout(K, "standard")
    own = _generate(model, processor, image)  # the checkpoint's own defaults
    assert own[0].num_latent_spans >= 1 and len(own[0].latent_positions) == K * own[0].num_latent_spans

    explicit, processor2 = monet.load_model(ckpt, dtype="float32", latent_size=K, layout="standard")
    assert _same(own, _generate(explicit, processor2, image))
    # the starting model's kind decodes these weights differently (a monet-v1 span is one token
    # shorter), so the comparison above can tell the layouts apart
    v1, processor3 = monet.load_model(ckpt, dtype="float32", latent_size=K, layout="monet-v1")
    assert not _same(own, _generate(v1, processor3, image))


def test_a_standard_starting_model_is_not_warned_about():
    from monet.train.pipeline import adopt_sft_layout

    for start, warned in ((SpanLayout(8, "standard"), False), (SpanLayout(K, "monet-v1"), True)):
        model = SimpleNamespace(monet_config=MonetConfig(span_layout=start))
        log: list[str] = []
        adopt_sft_layout(model, SimpleNamespace(model="m", latent_size=K), log.append)
        assert model.monet_config.span_layout == SpanLayout(K, "standard")
        assert bool(log) == warned and all(line.startswith("WARNING") for line in log)
