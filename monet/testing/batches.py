"""Synthetic latent training batches (stage-2 / stage-3 shaped) for tests and benchmarks."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from monet.testing.tiny_model import synthetic_image

VISION = "<|vision_start|><|image_pad|><|vision_end|>"
_WORDS = ["look", "closer", "the", "shape", "is", "red", "circle", "zoom", "in", "on", "corner"]


def latent_training_batch(
    model: Any,
    processor: Any,
    latent_size: int,
    spans_per_sample: Sequence[int],
    attention: str = "stage2",
    helper_images: bool = True,
    seed: int = 0,
    image_size: tuple[int, int] = (56, 56),
):
    """A right-padded :class:`~monet.model.training.LatentBatch`.

    Sample ``i``: a question image, then an assistant turn with ``spans_per_sample[i]`` blocks of
    random words, a helper image (when ``helper_images``; stage-2 style) and
    ``START + K*PAD + END`` followed by an observation; ends with a boxed answer.
    """
    from monet.model.training import LatentBatch

    tok = processor.tokenizer
    g = torch.Generator().manual_seed(seed)
    texts, images = [], []
    for i, n_spans in enumerate(spans_per_sample):
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"question {i}?"}]}],
            add_generation_prompt=True)
        images.append(synthetic_image(10 * seed + i, size=image_size))
        answer = ""
        for s in range(n_spans):
            n = int(torch.randint(1, 6, (1,), generator=g))
            answer += " ".join(_WORDS[int(j)] for j in torch.randint(0, len(_WORDS), (n,), generator=g))
            if helper_images:
                answer += VISION
                images.append(synthetic_image(100 + 10 * i + s, size=(image_size[0], image_size[1] * 3 // 2)))
            answer += "<abs_vis_token>" + "<abs_vis_token_pad>" * latent_size + "</abs_vis_token>"
            answer += "<observation>it is red</observation>"
        answer += " so \\boxed{red}<|im_end|>"
        texts.append(prompt + answer)
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="right")
    ids, am = enc["input_ids"], enc["attention_mask"]
    assistant = tok.encode("<|im_start|>assistant\n")
    starts = []
    for row in ids.tolist():  # answer starts after the last "<|im_start|>assistant\n"
        for p in range(len(row) - len(assistant), -1, -1):
            if row[p:p + len(assistant)] == assistant:
                starts.append(p + len(assistant))
                break
    answer_start = torch.tensor(starts)
    pos = torch.arange(ids.shape[1])
    pad_id = tok.convert_tokens_to_ids("<abs_vis_token_pad>")
    latent_mask = (ids == pad_id) & (pos >= answer_start[:, None]) & am.bool()
    return LatentBatch(ids, am, latent_mask, enc["pixel_values"], enc["image_grid_thw"], attention, answer_start)


def split_batch(batch, index: int, vision_start_id: int):
    """Sample ``index`` of a batch, unpadded, with its own pixel rows and image grid."""
    from monet.model.training import LatentBatch

    n = int(batch.attention_mask[index].sum())
    grid = batch.image_grid_thw
    per_image = grid.prod(-1).tolist()
    counts = [int((row == vision_start_id).sum()) for row in batch.input_ids]
    first = sum(counts[:index])
    rows_before = sum(per_image[:first])
    rows = sum(per_image[first:first + counts[index]])
    return LatentBatch(batch.input_ids[index:index + 1, :n], batch.attention_mask[index:index + 1, :n],
                       batch.latent_mask[index:index + 1, :n], batch.pixel_values[rows_before:rows_before + rows],
                       grid[first:first + counts[index]], batch.attention,
                       None if batch.answer_start is None else batch.answer_start[index:index + 1])
