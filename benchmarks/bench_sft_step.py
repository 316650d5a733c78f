"""Stage-2 SFT step: our trainer's loss computation vs the sequential research-style latent loop.

Same batch (synthetic zoom-in data, stage-2 layout, K=8), same losses (weighted CE + alignment to
fixed random teacher states routed through the latents), same gradients (checked first). Time of
forward+backward per micro-batch of 4 samples, activation memory (bytes autograd saves, parameters
excluded) and peak memory above weights + gradients (monet.testing.memory). Ours: three-pass latent
forward with activation checkpointing; reference: one forward call per latent step per sample, loss
pass checkpointed as in the research trainer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import monet
from monet.data.collate import StageCollator
from monet.data.preprocess_cache import preprocess_dataset
from monet.data.sft_loader import load_sft_dataset
from monet.data.synth import synthesize_dataset
from monet.model.training import attention_mask_4d
from monet.testing import build_tiny_checkpoint
from monet.testing.batches import split_batch
from monet.testing.memory import SavedActivationBytes, peak_live_bytes
from monet.train.config import SFTConfig
from monet.train.losses import alignment_loss, weighted_ce_sum
from monet.train.sft import aligned_counts, micro_batch_losses
from report import Goal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from latent_reference import sequential_latent_forward  # noqa: E402

K = 8


class FixedTeacher:
    """Teacher states drawn once per sample key (stands in for a teacher store)."""

    def __init__(self, layers: int, hidden: int):
        self.layers, self.hidden, self.cache = layers, hidden, {}

    def for_key(self, key: str, n: int) -> torch.Tensor:
        if key not in self.cache:
            g = torch.Generator().manual_seed(hash(key) % (2 ** 31))
            self.cache[key] = torch.randn(self.layers, n, self.hidden, generator=g)
        return self.cache[key]

    def states(self, batch):
        return torch.cat([self.for_key(k, n) for k, n in zip(batch.keys, aligned_counts(batch, "observation"))], 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_sft")
    data = synthesize_dataset(root / "data", n=4, n_eval=0, seed=0)
    model, processor = monet.load_model(build_tiny_checkpoint(preset="small", cache=True), dtype="float32", latent_size=K)
    model.model.visual.requires_grad_(False)
    model.train()
    samples, _ = load_sft_dataset([data.train_json], data.root)
    ds = preprocess_dataset(samples, processor, 2, K, root / "cache")
    batch = StageCollator(processor)([ds[i] for i in range(4)])
    cfg = SFTConfig(stage=2, model="-", data=["-"], latent_size=K, teacher="none", dtype="float32")
    teacher = FixedTeacher(model.config.text_config.num_hidden_layers + 1, model.config.text_config.hidden_size)
    return model, processor, batch, cfg, teacher


def _weight_total(batch):
    return torch.tensor(float(batch.weights[:, 1:][batch.labels[:, 1:] != -100].sum()))


def run_ours(model, batch, cfg, teacher):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        loss, _ = micro_batch_losses(model, batch, cfg, teacher, _weight_total(batch), 1)
        loss.backward()
    finally:
        model.gradient_checkpointing_disable()


def run_sequential(model, batch, cfg, teacher, vs_id):
    """Per sample: research-style latent loop + loss pass, then the same CE / routed alignment."""
    w = _weight_total(batch)
    lb = batch.to_latent_batch()
    for b in range(len(batch.keys)):
        s = split_batch(lb, b, vs_id)
        n = s.input_ids.shape[1]
        hidden_states = []

        def keep(module, args, kwargs):  # all-layer states at observation positions of the loss pass
            hidden_states.append(args[0] if args else kwargs["hidden_states"])

        mask4d = attention_mask_4d(model, s, torch.float32)
        handles = [layer.register_forward_pre_hook(keep, with_kwargs=True) for layer in model.model.language_model.layers]
        try:
            hidden, zt = sequential_latent_forward(model, s.input_ids, s.attention_mask, s.latent_mask, mask4d,
                                                   s.pixel_values, s.image_grid_thw, checkpoint_loss_pass=True)
        finally:
            for h in handles:
                h.remove()
        layers = len(model.model.language_model.layers)
        per_layer = hidden_states[-layers:] + [hidden]  # the loss pass's layer inputs + final norm
        obs = batch.observation_mask[b, :n].nonzero().flatten()
        student = torch.stack([h[0, obs] for h in per_layer])
        ce, _ = weighted_ce_sum(hidden, model.get_output_embeddings().weight, batch.labels[b:b + 1, :n],
                                batch.weights[b:b + 1, :n])
        align = alignment_loss(student, teacher.for_key(batch.keys[b], obs.numel()), cfg.alignment_axis)
        # the alignment gradient reaches the weights only through the latents z~
        (g,) = torch.autograd.grad(cfg.alignment_weight * align / len(batch.keys), zt, retain_graph=True)
        (ce / w + (zt * g * cfg.emphasize_latent_weight).sum()).backward()


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("impl", ["trainer", "sequential"])
def test_sft_step(benchmark, bench_report, setup, impl):
    model, processor, batch, cfg, teacher = setup
    vs_id = processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    fn = (lambda: run_ours(model, batch, cfg, teacher)) if impl == "trainer" else \
        (lambda: run_sequential(model, batch, cfg, teacher, vs_id))
    model.zero_grad(set_to_none=True)
    run_ours(model, batch, cfg, teacher)
    a = _grads(model)
    model.zero_grad(set_to_none=True)
    run_sequential(model, batch, cfg, teacher, vs_id)
    b = _grads(model)
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        assert (x - y).norm() <= 1e-4 * y.norm() + 1e-10, "trainer and sequential gradients differ"
    model.zero_grad(set_to_none=True)
    with SavedActivationBytes(model.parameters()) as saved:
        fn()
    model.zero_grad(set_to_none=False)  # gradients stay allocated: they are not the step's cost
    peak = peak_live_bytes(fn)
    benchmark.pedantic(fn, setup=lambda: model.zero_grad(set_to_none=True), rounds=3, warmup_rounds=1)
    params = {"tokens": int(batch.attention_mask.sum()), "latents": int(batch.latent_mask.sum())}
    bench_report("sft_step", baseline="trainer", others=("sequential",),
                 goals=(Goal("stage-2 step faster than the sequential loop", "sequential/trainer", 1.0),),
                 note=f"small preset, fp32, 4 synthetic samples, K={K}; fwd+bwd of CE + routed alignment").record(
        "stage2", impl, benchmark.stats.stats.median, min_s=benchmark.stats.stats.min, op="step", params=params)
    bench_report("sft_step_memory", baseline="trainer", others=("sequential",),
                 goals=(Goal("lower activation memory", "sequential/trainer", 1.0),),
                 note="bytes autograd saves for backward (parameters excluded), shown in the 'us' columns as MB",
                 ).record("stage2", impl, saved.total / 1e12, op="saved_activation_MB", params={"bytes": saved.total})
    bench_report("sft_step_peak_memory", baseline="trainer", others=("sequential",),
                 goals=(Goal("lower peak memory", "sequential/trainer", 1.0),),
                 note="peak tensor memory of a step above weights + gradients (CPU: replayed from profiler "
                      "memory events), shown in the 'us' columns as MB",
                 ).record("stage2", impl, peak / 1e12, op="peak_MB", params={"bytes": peak})
