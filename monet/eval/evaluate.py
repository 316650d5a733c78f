"""Held-out evaluation of a checkpoint on a Monet-SFT-format file with :func:`monet.generate`.

The file is read and validated with :func:`monet.data.sft_loader.load_sft_dataset` (rejected
samples are counted in the report, not scored). The prompt of a sample is its system + user turns,
rendered exactly as in training (same chat template, same image token counts): images are sized
with the same token budget as training (:mod:`monet.data.image_budget`; default: the stage-3
budget, the layout whose prompts have only the question images), not with the processor's own
default maximum. The reference answer is the ``\\boxed{}`` of the assistant turn.

``helper_images=True`` evaluates a model trained with helper images in its answer (stage 1):
whenever the model emits ``<|vision_start|>`` in its answer, the sample's next reference helper
image is inserted (``<|vision_start|>`` image ``<|vision_end|>``) and decoding continues, like the
image-inserting decoder stage 1 is trained for (see :mod:`monet.data.stage_layout`). Without it, a
stage-1 model never sees the image it asks for and its answer after that point is meaningless.
The generated text of each round is passed on as prompt text (re-tokenised), and
``max_new_tokens`` bounds the answer over all rounds.

Scoring: :class:`monet.scoring.Scorer` (rules only: degenerate output is never correct, then the
final answer against the reference). Latent diagnostics: the share of answers that used at least
one latent span and the mean pairwise cosine similarity of the latent vectors across answers (near
1 means the latents carry no sample-specific information); the per-answer latent vectors are kept
in :attr:`EvalReport.latents` (not serialised) for further diagnostics.

``ablation`` (a name of :data:`monet.eval.ablations.ABLATIONS`, e.g. ``zeros`` or ``other``)
replaces every latent the model produces by the ablated vector at the moment it becomes the next
input (:class:`monet.LatentAblation` via ``generate(ablations=...)``); ``other`` needs
``partner_latents`` (sample key -> the [n, D] latents to feed, e.g. another sample's baseline
latents from :func:`monet.eval.ablations.partner_latents`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from monet.data.image_budget import ImageBudget, ProcessorGeometry, stage_budget
from monet.eval.answers import extract_boxed
from monet.render import render_latent_text
from monet.tokens import LatentTokenIds

VISION_START = "<|vision_start|>"
HELPER_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class EvalReport:
    n: int
    accuracy: float
    latent_usage: float  # share of answers with >= 1 latent span
    mean_latent_spans: float
    mean_pairwise_latent_cosine: float | None
    answered: float  # share of answers with a \boxed{}
    rejected: int = 0  # samples of the file that failed validation (not scored)
    helper_images: bool = False
    mean_helper_images: float = 0.0  # helper images inserted per answer (helper_images=True)
    ablation: str | None = None
    samples: list[dict] = field(default_factory=list)
    # sample key -> [n, D] latents the answer produced (all spans); absent when none. Not serialised.
    latents: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "latents"}


def mean_pairwise_cosine(vectors: list[torch.Tensor]) -> float | None:
    """Mean cosine over all pairs of distinct vectors ([D] each); None with fewer than two."""
    if len(vectors) < 2:
        return None
    x = torch.nn.functional.normalize(torch.stack([v.float() for v in vectors]), dim=-1)
    sim = x @ x.t()
    n = x.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def eval_processor(processor: Any, budget: ImageBudget) -> Any:
    """A shallow copy of ``processor`` whose image processor caps each image at
    ``budget.per_image`` tokens (training's per-image cap) instead of its own default maximum."""
    ip = processor.image_processor
    geo = ProcessorGeometry.from_image_processor(ip)
    ip2 = copy.deepcopy(ip)
    ip2.size = {"shortest_edge": geo.min_pixels, "longest_edge": budget.per_image * geo.pixels_per_token}
    out = copy.copy(processor)
    out.image_processor = ip2
    return out


def prompt_images(sample: Any, processor: Any, budget: ImageBudget) -> list:
    """The question images of ``sample`` as model inputs sized like training: a path when the
    budget-capped processor (:func:`eval_processor`) already gives the planned grid, else the
    image resized (bicubic) to the planned size (only when the total budget scales images down)."""
    from PIL import Image

    from monet.data.stage_layout import plan_images

    geo = ProcessorGeometry.from_image_processor(processor.image_processor)
    plans = plan_images([(im, "question") for im in sample.question_images], processor, budget)
    out = []
    for im, plan in zip(sample.question_images, plans):
        if im.size is not None:
            w, h = im.size
        else:
            with Image.open(im.file) as pil:
                w, h = pil.size
        if geo.grid(w, h, budget.per_image) == tuple(plan.grid_thw):
            out.append(str(im.file))
        else:
            _, gh, gw = plan.grid_thw
            with Image.open(im.file) as pil:
                out.append(pil.convert("RGB").resize((gw * geo.patch_size, gh * geo.patch_size),
                                                     Image.Resampling.BICUBIC))
    return out


def prompt_messages(sample: Any, images: list) -> list[dict]:
    """Chat messages of the sample's turns before the assistant turn (``images`` in order)."""
    from monet.data.sft_format import ImageItem

    it = iter(images)
    return [{"role": t.role,
             "content": [{"type": "image", "image": next(it)} if isinstance(c, ImageItem)
                         else {"type": "text", "text": c.text} for c in t.content]}
            for t in sample.turns[:-1]]


def _reference(sample: Any) -> str | None:
    from monet.data.sft_format import TextItem

    return extract_boxed("".join(c.text for c in sample.assistant.content if isinstance(c, TextItem)))


@dataclass
class _Answer:
    text: str = ""
    rendered: str = ""
    latents: list = field(default_factory=list)
    latent_spans: int = 0
    tokens: int = 0
    helpers: int = 0


def _generate(model, processor, samples, images, *, helper_images, max_new_tokens, gen_kw,
              ablations=None) -> list[_Answer]:
    """Answers for a chunk of samples, inserting reference helper images when asked for."""
    from monet.model.decoding import generate
    from monet.model.requests import LatentRequest

    answers = [_Answer() for _ in samples]
    if not helper_images:
        extra = {} if ablations is None else {"ablations": ablations}
        outs = generate(model, processor, [{"messages": prompt_messages(s, im)} for s, im in zip(samples, images)],
                        max_new_tokens=max_new_tokens, return_latents=True, **gen_kw, **extra)
        for a, o in zip(answers, outs):
            a.text, a.rendered, a.latent_spans, a.tokens = o.text, o.rendered, o.num_latent_spans, len(o.token_ids)
            if o.latents is not None and o.latents.shape[0]:
                a.latents.append(o.latents)
        return answers

    tok = processor.tokenizer
    lt = getattr(getattr(model, "monet_config", None), "token_ids", None) or LatentTokenIds.from_tokenizer(tok)
    vs_id = tok.convert_tokens_to_ids(VISION_START)
    prompts = [processor.apply_chat_template(prompt_messages(s, im), add_generation_prompt=True, tokenize=False)
               for s, im in zip(samples, images)]
    prompts = [p[0] if isinstance(p, list) else p for p in prompts]
    imgs = [list(im) for im in images]
    active = list(range(len(samples)))
    while active:
        left = {i: max_new_tokens - answers[i].tokens for i in active}
        outs = generate(model, processor, [LatentRequest(prompt=prompts[i], images=list(imgs[i]), raw_prompt=True)
                                           for i in active], max_new_tokens=max(left.values()),
                        return_latents=True, **gen_kw)
        still = []
        for i, o in zip(active, outs):
            a, ids = answers[i], o.token_ids[:left[i]]
            helpers = samples[i].helper_images
            if vs_id in ids and a.helpers < len(helpers):
                # The model asks for an image: keep its answer up to there, insert the next reference
                # helper image, continue from <|vision_end|>. (Spans before the cut are re-tokenised
                # as text, so helper mode is for models that answer without latents: stage 1.)
                ids = ids[:ids.index(vs_id)]
                piece = tok.decode(ids, skip_special_tokens=False)
                prompts[i] += piece + HELPER_SLOT
                imgs[i].append(str(helpers[a.helpers].file))
                a.text += tok.decode(ids, skip_special_tokens=True)
                a.rendered += piece + "[helper image]"
                a.tokens += len(ids) + 1  # + the emitted <|vision_start|>
                a.helpers += 1
                still.append(i)
                continue
            whole = len(ids) == len(o.token_ids)
            a.text += o.text if whole else tok.decode(ids, skip_special_tokens=True)
            a.rendered += o.rendered if whole else render_latent_text(tok, ids, lt)
            a.latent_spans += o.num_latent_spans
            a.tokens += len(ids)
            if o.latents is not None and o.latents.shape[0]:
                a.latents.append(o.latents)
        active = still
    return answers


def evaluate_sft_file(
    model: Any,
    processor: Any,
    eval_json: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    latent_size: int | None = None,
    layout: str | None = None,
    max_new_tokens: int = 96,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    image_budget: ImageBudget | None = None,
    helper_images: bool = False,
    ablation: str | None = None,
    partner_latents: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> EvalReport:
    """Greedy-decode every valid sample's prompt and score its ``\\boxed{}`` answer.

    ``image_budget`` (default: the stage-3 training budget) sizes the question images as training
    does; ``helper_images`` inserts the reference helper images when the model asks for them
    (module docstring); ``ablation`` / ``partner_latents`` replace the latents (module docstring)."""
    from monet.data.sft_loader import load_sft_dataset
    from monet.eval.ablations import build_ablation, parse_ablations
    from monet.scoring import ScoreItem, Scorer, ScorerConfig

    if ablation is not None:
        parse_ablations([ablation])
        if helper_images:
            raise ValueError("ablation: helper_images=True evaluates stage-1 models, which have no latents to ablate")
        if ablation == "other" and partner_latents is None:
            raise ValueError("ablation 'other' needs partner_latents (sample key -> latents)")

    path = Path(eval_json)
    if not path.is_file():
        raise FileNotFoundError(f"eval file not found: {path}")
    samples, report = load_sft_dataset(path, image_root)
    if limit is not None:
        samples = samples[:limit]
    budget = image_budget or stage_budget(3)
    proc = eval_processor(processor, budget)
    gen_kw = dict(latent_size=latent_size, layout=layout)
    emb = model.get_input_embeddings() if model is not None and hasattr(model, "get_input_embeddings") else None
    hidden = getattr(emb, "embedding_dim", None)  # ablation "other": a partner without latents -> [0, D]
    scorer = Scorer(ScorerConfig(use_math_verify=False))
    rows, latent_means, latents = [], [], {}
    for s in tqdm(range(0, len(samples), batch_size), desc="eval", disable=not progress):
        chunk = samples[s:s + batch_size]
        images = [prompt_images(x, processor, budget) for x in chunk]
        abl = None
        if ablation is not None:
            abl = [build_ablation(ablation, x.key, seed, (partner_latents or {}).get(x.key, torch.zeros(0)),
                                  hidden) for x in chunk]
        answers = _generate(model, proc, chunk, images, helper_images=helper_images,
                            max_new_tokens=max_new_tokens, gen_kw=gen_kw, ablations=abl)
        refs = [_reference(x) for x in chunk]
        scores = scorer.score_many([ScoreItem(a.text, ref or "") for a, ref in zip(answers, refs)])
        for sample, a, ref, sc in zip(chunk, answers, refs, scores):
            pred = extract_boxed(a.text)
            ok = ref is not None and sc.correct
            if a.latents:
                cat = torch.cat(a.latents).float()
                latents[sample.key] = cat
                latent_means.append(cat.mean(0))
            rows.append({"key": sample.key, "reference": ref, "prediction": pred, "correct": ok,
                         "verdict": sc.verdict.value, "decided_by": sc.decided_by,
                         "latent_spans": a.latent_spans, "helper_images": a.helpers, "output": a.rendered})
    scorer.close()
    n = len(rows)
    return EvalReport(
        n=n,
        accuracy=sum(r["correct"] for r in rows) / max(n, 1),
        latent_usage=sum(r["latent_spans"] > 0 for r in rows) / max(n, 1),
        mean_latent_spans=sum(r["latent_spans"] for r in rows) / max(n, 1),
        mean_pairwise_latent_cosine=mean_pairwise_cosine(latent_means),
        answered=sum(r["prediction"] is not None for r in rows) / max(n, 1),
        rejected=report.rejected,
        helper_images=helper_images,
        mean_helper_images=sum(r["helper_images"] for r in rows) / max(n, 1),
        ablation=ablation,
        samples=rows,
        latents=latents,
    )
