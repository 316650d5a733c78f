"""Train/inference consistency of the stage-3 targets: what SFT teaches is what decoding produces.

The tiny model is overfitted on one stage-3 example. Under teacher forcing we find the target
positions whose argmax prediction is the training token (with a margin, so float differences
between the training forward and the KV-cached decoder cannot flip them). Greedy decoding with
:func:`monet.generate` from the example's question turn must then reproduce the training sequence
up to the first target position that is not argmax-correct, and that prefix must reach past the
first latent span's END, so the token after END (``<observation>``) and the text after it are
exercised. With the research code's labels ``<observation>`` is never a target, so the model
cannot produce it after END and the check fails: the second test shows that.
"""

from __future__ import annotations

import pytest
import torch

import monet
from monet.data import StageCollator, build_stage_example, load_sft_dataset, synthesize_dataset
from monet.data.stage_layout import LayoutTokens
from monet.model.training import latent_forward
from monet.testing import build_tiny_checkpoint
from monet.train.losses import weighted_ce_sum

K = 3
STEPS = 60
MARGIN = 0.05  # logits; decode vs. training forward differ by ~1e-5 in float32


def _messages(sample) -> list[dict]:
    """The question turns of ``sample`` as chat messages (independent of monet.eval)."""
    out = []
    for turn in sample.turns[:-1]:
        content = [{"type": "image", "image": str(c.file)} if hasattr(c, "file") else {"type": "text", "text": c.text}
                   for c in turn.content]
        out.append({"role": turn.role, "content": content})
    return out


def _overfit_and_decode(tmp_path, labels: str):
    torch.manual_seed(0)
    ds = synthesize_dataset(tmp_path / "synth", n=1, n_eval=0, seed=3)
    (sample,), report = load_sft_dataset(ds.train_json)
    assert report.rejected == 0
    model, processor = monet.load_model(build_tiny_checkpoint(cache=True), dtype="float32", latent_size=K)
    ex = build_stage_example(sample, processor, 3, K, labels=labels)
    batch = StageCollator(processor, ce_emphasize_factor=1.0)([ex])
    lb = batch.to_latent_batch()
    head = model.get_output_embeddings().weight
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        out = latent_forward(model, lb)
        ce, w = weighted_ce_sum(out.hidden, head, batch.labels, batch.weights)
        (ce / w).backward()
        opt.step()
    model.eval()

    with torch.no_grad():
        logits = (latent_forward(model, lb).hidden[0] @ head.t()).float()  # [L, V]
    top2 = logits.topk(2, dim=-1)
    ids = ex.input_ids
    L = len(ex)
    # correct[p]: the logits at p - 1 predict ids[p] by at least MARGIN
    correct = torch.zeros(L, dtype=torch.bool)
    correct[1:] = (top2.indices[:-1, 0] == ids[1:]) & (top2.values[:-1, 0] - top2.values[:-1, 1] >= MARGIN)
    targets = ex.target_mask.nonzero().flatten().tolist()
    bad = [p for p in targets if not bool(correct[p])]
    last_target = targets[-1]  # <|im_end|>: decoding stops right after it
    limit = bad[0] if bad else last_target + 1  # decoded must equal ids[answer_start:limit]

    gen = monet.generate(model, processor, [{"messages": _messages(sample)}],
                         max_new_tokens=L - ex.answer_start + 4, latent_size=K, layout="standard")[0]
    lt = LayoutTokens.from_processor(processor).latent
    first_end = int(((ids == lt.end) & (torch.arange(L) >= ex.answer_start)).nonzero()[0])
    return ex, gen, limit, first_end, correct, lt


def test_greedy_decoding_reproduces_the_decodable_training_sequence(tmp_path):
    ex, gen, limit, first_end, correct, lt = _overfit_and_decode(tmp_path, "decodable")
    ids = ex.input_ids
    assert ids[first_end + 1] == lt.observation_start
    # The overfitted prefix covers the span and what follows it (<observation> and beyond).
    assert limit > first_end + 2, (f"only {limit - ex.answer_start} answer tokens are argmax-correct; "
                                   f"the first span's END is answer token {first_end - ex.answer_start}")
    want = ids[ex.answer_start:limit].tolist()
    assert gen.token_ids[:len(want)] == want
    assert gen.num_latent_spans >= 1


def test_research_labels_cannot_decode_past_the_span(tmp_path):
    """The same check fails with the research code's labels: <observation> after END is never a
    target, so it is not argmax-correct there and greedy decoding leaves the training sequence."""
    ex, gen, limit, first_end, correct, lt = _overfit_and_decode(tmp_path, "research")
    ids = ex.input_ids
    assert ids[first_end + 1] == lt.observation_start
    assert not bool(correct[first_end + 1])
    n = first_end + 2 - ex.answer_start  # answer tokens up to and including <observation>
    assert gen.token_ids[:n] != ids[ex.answer_start:ex.answer_start + n].tolist()


def test_config_label_rule_reaches_the_training_data(tmp_path):
    from data_fixtures.samples import tiny_processor
    from monet.train.config import SFTConfig
    from monet.train.pipeline import load_stage_dataset

    processor = tiny_processor()
    ds = synthesize_dataset(tmp_path / "synth", n=2, n_eval=0, seed=1)
    common = dict(stage=3, model="unused", data=[str(ds.train_json)], latent_size=K, teacher="none",
                  cache_dir=str(tmp_path / "cache"))
    assert SFTConfig(**common).labels == "decodable"
    with pytest.raises(ValueError, match="labels must be"):
        SFTConfig(**common, labels="all")
    lt = LayoutTokens.from_processor(processor).latent
    for rule in ("decodable", "research"):
        ex = load_stage_dataset(SFTConfig(**common, labels=rule), processor, 3, printer=lambda _: None)[0]
        obs = ex.input_ids == lt.observation_start
        assert obs.any() and bool(ex.target_mask[obs].all()) == (rule == "decodable")
