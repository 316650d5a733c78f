"""Token sequences, targets and image plans of one SFT sample for stage 1, 2 or 3.

Layout of the assistant turn per helper image (text before it ends in the placeholder
``<abs_vis_token></abs_vis_token>``; ``V`` = ``<|vision_start|> <|image_pad|>*n <|vision_end|>``):

* stage 1: ``text V``                      (helper image as a real image)
* stage 2: ``text V START PAD*K END``      (latents right after the helper image)
* stage 3: ``text START PAD*K END``        (helper image removed)

The placeholder text itself never becomes tokens: in stage 1 it is simply removed (the helper
image follows the reasoning text directly, so stage 1 does not teach the model to emit an empty
START/END pair); in stages 2-3 its place is taken by the ``START + K*PAD + END`` block (after the
image in stage 2). Text is rendered with the processor's chat template, so the prompt is exactly
what inference sees.

Targets (``labels``, aligned with ``input_ids`` like Hugging Face labels: the loss at position
``p`` uses the logits of ``p - 1``; ``-100`` = not a target). Only assistant-turn tokens from
``answer_start`` up to and including the turn's final ``<|im_end|>`` can be targets (the ``\n``
after it is never generated: decoding stops at ``<|im_end|>``). Which of them, is the label rule:

* ``"decodable"`` (default). A token is a target iff the model itself must emit it when the
  sequence is decoded; tokens that something else puts there are not. Per stage:

  - stage 1 (the assistant turn holds real helper images; an image-inserting decoder puts the
    image in when the model asks for it): the ``<|vision_start|>`` that opens a helper image is a
    target (the model must produce it right after the reasoning text); the image pads and
    ``<|vision_end|>`` are inserted with the image, so they are not.
  - stage 2 (``text V START PAD*K END``): as stage 1 for ``V``; START is a target (the model opens
    the span after the image); the K PADs and END are forced by the latent decoder
    (:meth:`monet.layout.SpanLayout.advance`), so they are not.
  - stage 3 (``text START PAD*K END``): START is a target, PAD and END are not (forced), exactly
    what :func:`monet.generate` does.
  - every stage: ``<observation>`` and ``</observation>`` are ordinary emitted tokens, so they are
    targets. In particular the token right after a span's END (or after a helper image's
    ``<|vision_end|>``) is a target: the logits at END are trained, and every later token is
    conditioned on a token the model can actually produce.

* ``"research"``: the targets of the original research code, kept for fidelity: as above, but
  ``<observation>``, ``</observation>`` and ``<|vision_start|>`` are never targets. The logits at
  a span's END position (and, in stages 1-2, after the reasoning text) are then never trained,
  so a model trained this way cannot decode its own training sequences.

START is a target under both rules. ``observation_mask`` marks the tokens strictly between
``<observation>`` and ``</observation>`` (the alignment positions of stage 2 and the teacher;
the tags themselves are not inside); their targets get weight ``ce_emphasize_factor``, other
targets 1, non-targets 0 (:meth:`StageExample.weights`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from monet.data.image_budget import ImageBudget, ProcessorGeometry, plan_image_tokens, stage_budget
from monet.data.sft_format import PLACEHOLDER, ImageItem, SFTSample, TextItem, Turn
from monet.layout import SpanLayout
from monet.tokens import LATENT_END, LATENT_PAD, LATENT_START, LatentTokenIds

IGNORE_INDEX = -100
STAGES = (1, 2, 3)
#: Label rules (module docstring); the first is the default.
LABEL_RULES: tuple[str, ...] = ("decodable", "research")
DEFAULT_LABEL_RULE = "decodable"

#: ``ce_emphasize_factor`` defaults: the paper uses 2 (stage 1) and 4 (stage 2); stage 3 is not
#: specified there and follows stage 2.
DEFAULT_CE_EMPHASIZE: dict[int, float] = {1: 2.0, 2: 4.0, 3: 4.0}

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_END = "<|im_end|>"


class SampleLoadError(ValueError):
    """One sample cannot be turned into model inputs (e.g. an image that no longer decodes).

    Raised per sample on the training data path so callers can skip exactly that sample and
    report it: ``key`` is the sample's ``dataset_name/sample_id``, ``reason`` what went wrong."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def check_stage(stage: int) -> int:
    if stage not in STAGES:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    return int(stage)


def sft_span_layout(latent_size: int) -> SpanLayout:
    """The span layout SFT data is built in, whatever the starting model decodes in: the standard
    layout (``START`` embedded, then K latents, then ``END``) with ``latent_size`` K. Checkpoints of
    an SFT run record it in their ``monet_config.json``."""
    return SpanLayout(latent_size, "standard")


def check_label_rule(labels: str) -> str:
    if labels not in LABEL_RULES:
        raise ValueError(f"labels must be one of {LABEL_RULES} (see monet.data.stage_layout), got {labels!r}")
    return labels


@dataclass(frozen=True)
class LayoutTokens:
    """Token ids (and the image token string) of a processor, read from its tokenizer."""

    image_token: str
    image_pad: int
    vision_start: int
    vision_end: int
    im_end: int | None
    pad: int
    latent: LatentTokenIds

    @classmethod
    def from_processor(cls, processor: Any) -> "LayoutTokens":
        tok = processor.tokenizer
        image_token = getattr(processor, "image_token", None) or "<|image_pad|>"

        def tid(s: str, required: bool = True) -> int | None:
            i = tok.convert_tokens_to_ids(s)
            if i is None or (tok.unk_token_id is not None and i == tok.unk_token_id):
                if required:
                    raise ValueError(f"tokenizer has no token {s!r}")
                return None
            return int(i)

        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return cls(image_token, tid(image_token), tid(VISION_START), tid(VISION_END), tid(IM_END, False),
                   int(pad), LatentTokenIds.from_tokenizer(tok))

    def non_targets(self, labels: str) -> list[int]:
        """Token ids never made targets under label rule ``labels`` (module docstring)."""
        forced = [self.image_pad, self.vision_end, self.latent.pad, self.latent.end]
        if check_label_rule(labels) == "research":
            forced += [self.vision_start, self.latent.observation_start, self.latent.observation_end]
        return forced

    def segment_ids(self) -> dict[str, int]:
        """Keyword arguments for :func:`monet.ops.latent_segments`."""
        return dict(vision_start_id=self.vision_start, vision_end_id=self.vision_end, latent_start_id=self.latent.start,
                    latent_pad_id=self.latent.pad)


@dataclass(frozen=True)
class ImagePlan:
    """One image of the sequence: file, role, token cap and the resulting patch grid."""

    file: str
    role: Literal["question", "helper"]
    max_tokens: int
    grid_thw: tuple[int, int, int]


@dataclass
class StageExample:
    """One tokenised sample of a stage (unpadded). ``pixel_values``/``image_grid_thw`` are
    filled by :func:`load_pixels` (images in sequence order: question images, then helper
    images)."""

    key: str
    stage: int
    latent_size: int
    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, IGNORE_INDEX where not a target
    observation_mask: torch.Tensor  # [L] bool, tokens strictly inside observation spans
    latent_mask: torch.Tensor  # [L] bool, latent PAD positions
    answer_start: int  # first position of the assistant turn content
    images: tuple[ImagePlan, ...] = ()
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3] int64

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def target_mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX

    @property
    def latent_positions(self) -> torch.Tensor:
        return self.latent_mask.nonzero().flatten()

    @property
    def observation_positions(self) -> torch.Tensor:
        return self.observation_mask.nonzero().flatten()

    def weights(self, ce_emphasize_factor: float) -> torch.Tensor:
        """[L] float32: ``factor`` on targets inside observations, 1 on other targets, 0 elsewhere."""
        w = self.target_mask.float()
        return torch.where(self.observation_mask, w * float(ce_emphasize_factor), w)


def _image_size(item: ImageItem) -> tuple[int, int]:
    if item.size is not None:
        return item.size
    from PIL import Image

    with Image.open(item.file) as im:
        return im.size


def _strip_placeholder(text: str) -> str:
    """Text of the item before a helper image without its trailing placeholder."""
    body = text.rstrip()  # whitespace after the placeholder is dropped with it
    if not body.endswith(PLACEHOLDER):
        raise ValueError(f"helper image not preceded by a text ending in {PLACEHOLDER}; "
                         "validate samples with monet.data.load_sft_dataset first")
    return body[: -len(PLACEHOLDER)]


def _assistant_items(turn: Turn, stage: int, span: SpanLayout) -> list[TextItem | ImageItem]:
    block = LATENT_START + LATENT_PAD * span.num_pads + LATENT_END
    items: list[TextItem | ImageItem] = []
    content = turn.content
    for i, c in enumerate(content):
        nxt = content[i + 1] if i + 1 < len(content) else None
        if isinstance(c, TextItem):
            if isinstance(nxt, ImageItem):
                text = _strip_placeholder(c.text)
                if stage == 3:
                    text += block
                items.append(TextItem(text))
            else:
                items.append(c)
        else:
            if stage in (1, 2):
                items.append(c)
            if stage == 2:
                items.append(TextItem(block))
    return items


def _chat(turns: list[tuple[str, list]]) -> list[dict]:
    out = []
    for role, items in turns:
        content = [{"type": "image"} if isinstance(c, ImageItem) else {"type": "text", "text": c.text}
                   for c in items]
        out.append({"role": role, "content": content})
    return out


def _render(processor: Any, conversation: list[dict], generation_prompt: bool) -> str:
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
    if isinstance(text, list):
        text = text[0]
    return text


def _expand(text: str, image_token: str, counts: list[int]) -> str:
    parts = text.split(image_token)
    if len(parts) != len(counts) + 1:
        raise ValueError(f"chat template produced {len(parts) - 1} image tokens for {len(counts)} images")
    out = [parts[0]]
    for n, part in zip(counts, parts[1:]):
        out.append(image_token * n)
        out.append(part)
    return "".join(out)


def plan_images(
    images: list[tuple[ImageItem, str]], processor: Any, budget: ImageBudget
) -> tuple[ImagePlan, ...]:
    geo = ProcessorGeometry.from_image_processor(processor.image_processor)
    sizes = [_image_size(im) for im, _ in images]
    caps = plan_image_tokens(sizes, budget, geo)
    return tuple(ImagePlan(str(im.file), role, cap, geo.grid(w, h, cap))
                 for (im, role), (w, h), cap in zip(images, sizes, caps))


def build_stage_example(
    sample: SFTSample,
    processor: Any,
    stage: int,
    latent_size: int,
    *,
    budget: ImageBudget | None = None,
    with_pixels: bool = True,
    tokens: LayoutTokens | None = None,
    labels: str = DEFAULT_LABEL_RULE,
) -> StageExample:
    """Tokenise a validated sample for ``stage`` (see the module docstring for the layout and
    for the label rules ``labels``: ``"decodable"`` or ``"research"``).

    ``budget`` defaults to :data:`monet.data.image_budget.STAGE_BUDGETS` of the stage. With
    ``with_pixels=False`` only image headers are read (grids are computed exactly as the image
    processor will); call :func:`load_pixels` later.
    """
    check_stage(stage)
    span = sft_span_layout(latent_size)
    check_label_rule(labels)
    budget = budget or stage_budget(stage)
    tokens = tokens or LayoutTokens.from_processor(processor)
    prompt_turns = [(t.role, list(t.content)) for t in sample.turns[:-1]]
    answer_items = _assistant_items(sample.assistant, stage, span)

    images = [(c, "question") for _, items in prompt_turns for c in items if isinstance(c, ImageItem)]
    images += [(c, "helper") for c in answer_items if isinstance(c, ImageItem)]
    plans = plan_images(images, processor, budget)
    geo = ProcessorGeometry.from_image_processor(processor.image_processor)
    counts = [geo.tokens(p.grid_thw) for p in plans]
    n_question = sum(1 for _, role in images if role == "question")

    full = _render(processor, _chat(prompt_turns + [("assistant", answer_items)]), False)
    prefix = _render(processor, _chat(prompt_turns), True)
    tok = processor.tokenizer
    ids = tok(_expand(full, tokens.image_token, counts), add_special_tokens=False)["input_ids"]
    prefix_ids = tok(_expand(prefix, tokens.image_token, counts[:n_question]), add_special_tokens=False)["input_ids"]
    if ids[: len(prefix_ids)] != prefix_ids:
        raise ValueError(f"{sample.key}: the chat template's generation prompt is not a prefix of the "
                         "rendered conversation; cannot locate the assistant turn")
    answer_start = len(prefix_ids)

    input_ids = torch.tensor(ids, dtype=torch.long)
    L = input_ids.shape[0]
    pos = torch.arange(L)
    lt = tokens.latent
    end = L
    if tokens.im_end is not None:
        ends = ((input_ids == tokens.im_end) & (pos >= answer_start)).nonzero().flatten()
        if ends.numel():
            end = int(ends[-1]) + 1
    in_answer = (pos >= answer_start) & (pos < end)
    # Only assistant-turn tokens can be targets, so the question images' <|vision_start|> never is.
    target = in_answer & ~torch.isin(input_ids, torch.tensor(tokens.non_targets(labels)))
    label_ids = torch.where(target, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    obs_open = (input_ids == lt.observation_start).long().cumsum(0)
    obs_close = (input_ids == lt.observation_end).long().cumsum(0)
    observation_mask = ((obs_open - obs_close) > 0) & (input_ids != lt.observation_start) & in_answer
    latent_mask = span.latent_input_mask(input_ids, start_id=lt.start) & (pos >= answer_start)

    n_pads = int((input_ids == tokens.image_pad).sum())
    if n_pads != sum(counts):
        raise ValueError(f"{sample.key}: {n_pads} image pad tokens but the images need {sum(counts)}")
    example = StageExample(sample.key, stage, latent_size, input_ids, label_ids, observation_mask,
                           latent_mask, answer_start, plans)
    return load_pixels(example, processor) if with_pixels else example


def load_pixels(example: StageExample, processor: Any) -> StageExample:
    """Return ``example`` with ``pixel_values``/``image_grid_thw`` computed by the processor's
    image processor (one call per image, each with its own token cap).

    Raises :class:`SampleLoadError` (naming the sample and the file) when an image cannot be
    opened or decoded, or no longer gives the planned grid."""
    if not example.images:
        return replace(example, pixel_values=None, image_grid_thw=None)
    from PIL import Image

    ip = processor.image_processor
    geo = ProcessorGeometry.from_image_processor(ip)
    pixels, grids = [], []
    for plan in example.images:
        try:
            with Image.open(plan.file) as im:
                rgb = im.convert("RGB")
        except Exception as e:  # OSError, SyntaxError, zlib/decompression errors, ... from PIL
            raise SampleLoadError(example.key, f"cannot decode image {plan.file}: {type(e).__name__}: {e}") from e
        out = ip(images=[rgb], return_tensors="pt",
                 size={"shortest_edge": geo.min_pixels, "longest_edge": plan.max_tokens * geo.pixels_per_token})
        grid = tuple(int(x) for x in out["image_grid_thw"][0])
        if grid != tuple(plan.grid_thw):
            raise SampleLoadError(example.key, f"image {plan.file} now gives grid {grid}, planned "
                                  f"{tuple(plan.grid_thw)} (file changed since preprocessing?)")
        pixels.append(out["pixel_values"])
        grids.append(out["image_grid_thw"])
    return replace(example, pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids).long())
