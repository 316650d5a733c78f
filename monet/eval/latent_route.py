"""Where a latent route breaks: teacher-forced probes of a model in an SFT stage layout.

Decoding accuracy says *whether* a model answers; these two measurements say *which link* of the
chain helper image -> latents -> text is missing. Both run reference SFT samples in a stage layout
(:func:`monet.data.stage_layout.build_stage_example`) through the training forward
(:func:`monet.model.training.latent_forward`: latents decoded from the model itself, stage-2
attention mask in stage 2), so they measure exactly what training optimises.

* :func:`teacher_forced_accuracy` — with the reference sequence forced, the share of samples whose
  final ``\\boxed{}`` answer tokens are all argmax-correct, and the share of argmax-correct target
  tokens inside observations. In the stage-2 layout the text after a latent span sees its helper
  image *only through the latents*, so stage 2's answer accuracy is the accuracy of the latent
  route itself; compare it with stage 1's (helper image in view) and with chance.
* :func:`helper_sensitivity` — replace one sample's last helper image by noise and measure how far
  the final hidden states move (L2 norm over the hidden dimension, averaged over positions) at the
  image's own tokens, at the latent positions that follow it and at the text after them. A latent
  route that reads the image moves the latent positions; a route that does not leaves them (and,
  in stage 2, the text after them) nearly unchanged.

``benchmarks/probe_latent_route.py`` runs both on a checkpoint; docs/demo.md reports them for the
quickstart's stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from monet.data.stage_layout import StageExample, build_stage_example


def answer_positions(example: StageExample, tokenizer: Any) -> list[int]:
    """Positions of the final ``\\boxed{...}`` answer's tokens in ``example`` (targets only).

    The answer starts after the last target token whose text contains ``boxed`` and ends before
    the first later token containing ``}``; that token is included when text precedes its ``}``
    (a tokenizer that merges ``orange}``). Raises ``ValueError`` naming the sample when the
    assistant turn has no ``\\boxed{}`` target."""
    ids = example.input_ids.tolist()
    targets = example.target_mask.nonzero().flatten().tolist()
    text = {p: tokenizer.decode([ids[p]]) for p in targets}
    starts = [i for i, p in enumerate(targets) if "boxed" in text[p]]
    if not starts:
        raise ValueError(f"sample {example.key!r}: no \\boxed{{}} answer among the training targets")
    out = []
    for p in targets[starts[-1] + 1:]:
        t = text[p]
        if "}" in t:
            if t.split("}", 1)[0].strip(" {"):
                out.append(p)
            break
        out.append(p)
    if not out:
        raise ValueError(f"sample {example.key!r}: the \\boxed{{}} answer is empty")
    return out


@dataclass
class TeacherForced:
    """Result of :func:`teacher_forced_accuracy` (shares in [0, 1])."""

    stage: int
    n: int
    answer_accuracy: float  # samples whose answer tokens are all argmax-correct
    observation_token_accuracy: float | None  # None when no sample has observation targets
    answer_correct: list[bool]  # per sample, in input order

    def as_dict(self) -> dict:
        return {"stage": self.stage, "n": self.n, "answer_accuracy": self.answer_accuracy,
                "observation_token_accuracy": self.observation_token_accuracy}


def _examples(samples: Sequence[Any], processor: Any, stage: int, latent_size: int) -> list[StageExample]:
    return [build_stage_example(s, processor, stage, latent_size) for s in samples]


def _hidden(model: Any, processor: Any, examples: list[StageExample], pixel_values: torch.Tensor | None = None):
    from monet.data.collate import StageCollator
    from monet.model.training import latent_forward

    batch = StageCollator(processor, ce_emphasize_factor=1.0)(examples).to_latent_batch()
    if pixel_values is not None:
        from dataclasses import replace

        batch = replace(batch, pixel_values=pixel_values)
    device = next(model.parameters()).device
    with torch.no_grad():
        return latent_forward(model, batch.to(device)).hidden.float().cpu(), batch


@torch.no_grad()
def teacher_forced_predictions(model: Any, processor: Any, examples: Sequence[StageExample],
                               *, batch_size: int = 16) -> list[torch.Tensor]:
    """Per example, ``pred`` [L] int64 with ``pred[p] = argmax(lm_head(h[p - 1]))`` (``pred[0] = -1``),
    ``h`` the final-norm hidden states of the training forward in the examples' stage layout."""
    head = model.get_output_embeddings()
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        hidden, _ = _hidden(model, processor, chunk)
        for r, ex in enumerate(chunk):
            h = hidden[r, : len(ex) - 1].to(device=head.weight.device, dtype=head.weight.dtype)
            out.append(torch.cat([torch.full((1,), -1), head(h).argmax(-1).cpu()]))
    return out


def score_predictions(examples: Sequence[StageExample], predictions: Sequence[torch.Tensor],
                      tokenizer: Any) -> TeacherForced:
    """Answer accuracy (every token of the final ``\\boxed{}`` answer right, :func:`answer_positions`)
    and observation-token accuracy (targets strictly inside observations) of ``predictions``
    (as from :func:`teacher_forced_predictions`) against the examples' reference tokens."""
    if not examples or len(examples) != len(predictions):
        raise ValueError(f"need one prediction per example and at least one; got {len(examples)} examples, "
                         f"{len(predictions)} predictions")
    correct: list[bool] = []
    obs_right = obs_total = 0
    for ex, pred in zip(examples, predictions):
        ids = ex.input_ids
        ans = torch.tensor(answer_positions(ex, tokenizer))
        correct.append(bool((pred[ans] == ids[ans]).all()))
        obs = (ex.observation_mask & ex.target_mask).nonzero().flatten()
        obs_right += int((pred[obs] == ids[obs]).sum())
        obs_total += int(obs.numel())
    return TeacherForced(examples[0].stage, len(correct), sum(correct) / len(correct),
                         obs_right / obs_total if obs_total else None, correct)


def teacher_forced_accuracy(model: Any, processor: Any, samples: Sequence[Any], stage: int, latent_size: int,
                            *, batch_size: int = 16) -> TeacherForced:
    """Teacher-forced accuracy of ``model`` on ``samples`` (:class:`monet.data.SFTSample`) laid out
    for ``stage`` (1, 2 or 3) with ``latent_size`` latents per span: :func:`teacher_forced_predictions`
    scored by :func:`score_predictions`."""
    if not samples:
        raise ValueError("teacher_forced_accuracy needs at least one sample")
    examples = _examples(samples, processor, stage, latent_size)
    preds = teacher_forced_predictions(model, processor, examples, batch_size=batch_size)
    return score_predictions(examples, preds, processor.tokenizer)


@dataclass
class HelperSensitivity:
    """Result of :func:`helper_sensitivity`: mean L2 change of final hidden states per position group."""

    stage: int
    n: int
    before: float  # positions before the poisoned image: 0 under a causal model (a check of the probe)
    image_tokens: float  # the poisoned helper image's own tokens
    latents: float  # latent positions after that image (nan if none)
    text_after: float  # every position after the last latent (or after the image, stage 1)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "n": self.n, "before": self.before, "image_tokens": self.image_tokens, "latents": self.latents,
                "text_after": self.text_after}


@torch.no_grad()
def helper_sensitivity(model: Any, processor: Any, samples: Sequence[Any], stage: int, latent_size: int,
                       *, noise_std: float = 3.0, seed: int = 0) -> HelperSensitivity:
    """Poison each sample's last helper image (its pixel patches replaced by ``N(0, noise_std^2)``
    noise; stage 1 or 2: stage 3 has no helper image) and return how far the final hidden states
    move, averaged over samples: at the image's own tokens, at the latent positions after it and
    at the text after the last of those (stage 1: after the image).

    ``before`` is the largest movement at any position before the image (0 in a causal model: a
    check of the probe). In the stage-2 layout the text after a span sees the image only through
    the latent positions, so any movement of ``text_after`` there is carried by them."""
    if stage not in (1, 2):
        raise ValueError(f"helper_sensitivity needs a layout with helper images (stage 1 or 2), got stage {stage}")
    if not samples:
        raise ValueError("helper_sensitivity needs at least one sample")
    image_id = model.config.image_token_id
    gen = torch.Generator().manual_seed(seed)
    sums = {"before": 0.0, "image_tokens": 0.0, "latents": 0.0, "text_after": 0.0}
    n_latents = 0
    for s in samples:
        (ex,) = _examples([s], processor, stage, latent_size)
        if len(ex.images) < 2:
            raise ValueError(f"sample {ex.key!r} has no helper image (only {len(ex.images)} image(s))")
        h0, batch = _hidden(model, processor, [ex])
        n_last = int(batch.image_grid_thw[-1].prod())
        pv = batch.pixel_values.clone()
        pv[-n_last:] = torch.randn(pv[-n_last:].shape, generator=gen, dtype=torch.float32).to(pv.dtype) * noise_std
        h1, _ = _hidden(model, processor, [ex], pixel_values=pv)
        d = (h1[0] - h0[0]).norm(dim=-1)[: len(ex)]  # [L]
        img = (ex.input_ids == image_id).nonzero().flatten()
        last_run = img[(img.diff(prepend=img[:1] - 1) != 1).nonzero().flatten()[-1]:]  # the last image's tokens
        lat = ex.latent_positions[ex.latent_positions > last_run[-1]]
        after = int(lat[-1]) + 1 if lat.numel() else int(last_run[-1]) + 1
        sums["before"] += float(d[: int(last_run[0])].max())
        sums["image_tokens"] += float(d[last_run].mean())
        if lat.numel():
            sums["latents"] += float(d[lat].mean())
            n_latents += 1
        sums["text_after"] += float(d[after:].mean()) if after < len(ex) else 0.0
    n = len(samples)
    return HelperSensitivity(stage, n, sums["before"] / n, sums["image_tokens"] / n,
                             sums["latents"] / n_latents if n_latents else float("nan"), sums["text_after"] / n)
