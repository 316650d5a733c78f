"""Held-out evaluation of a checkpoint on a Monet-SFT-format file with :func:`monet.generate`.

The prompt is the sample's system + user turns; the reference answer is the ``\\boxed{}`` of its
assistant turn. Latent diagnostics: the share of answers that used at least one latent span and
the mean pairwise cosine similarity of the latent vectors across answers (near 1 means the
latents carry no sample-specific information).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from monet.eval.answers import extract_boxed, normalize_answer


@dataclass
class EvalReport:
    n: int
    accuracy: float
    latent_usage: float  # share of answers with >= 1 latent span
    mean_latent_spans: float
    mean_pairwise_latent_cosine: float | None
    answered: float  # share of answers with a \boxed{}
    samples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _prompt_messages(raw: dict, image_root: Path) -> tuple[list[dict], str | None]:
    turns = raw["data"]
    messages = []
    for turn in turns[:-1]:
        content = []
        for item in turn["content"]:
            if item.get("type") == "image":
                content.append({"type": "image", "image": str(image_root / item["image"])})
            else:
                content.append({"type": "text", "text": item.get("text", "")})
        messages.append({"role": turn["role"], "content": content})
    answer_text = "".join(i.get("text", "") for i in turns[-1]["content"] if i.get("type") == "text")
    return messages, extract_boxed(answer_text)


def mean_pairwise_cosine(vectors: list[torch.Tensor]) -> float | None:
    """Mean cosine over all pairs of distinct vectors ([D] each); None with fewer than two."""
    if len(vectors) < 2:
        return None
    x = torch.nn.functional.normalize(torch.stack([v.float() for v in vectors]), dim=-1)
    sim = x @ x.t()
    n = x.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


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
) -> EvalReport:
    """Greedy-decode every sample's prompt and score its ``\\boxed{}`` answer."""
    from monet.model.decoding import generate

    path = Path(eval_json)
    if not path.is_file():
        raise FileNotFoundError(f"eval file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    raws = json.loads(path.read_text())
    if limit is not None:
        raws = raws[:limit]
    prompts = [_prompt_messages(r, root) for r in raws]
    rows, latent_means = [], []
    for s in tqdm(range(0, len(prompts), batch_size), desc="eval", disable=not progress):
        chunk = prompts[s:s + batch_size]
        outs = generate(model, processor, [{"messages": m} for m, _ in chunk], max_new_tokens=max_new_tokens,
                        latent_size=latent_size, layout=layout, return_latents=True)
        for (_, ref), raw, out in zip(chunk, raws[s:s + batch_size], outs):
            pred = extract_boxed(out.text)
            ok = pred is not None and normalize_answer(pred) == normalize_answer(ref)
            if out.latents is not None and out.latents.shape[0]:
                latent_means.append(out.latents.mean(0))
            meta = raw.get("metadata", {})
            rows.append({"key": f"{meta.get('dataset_name')}/{meta.get('sample_id')}", "reference": ref,
                         "prediction": pred, "correct": ok, "latent_spans": out.num_latent_spans,
                         "output": out.rendered})
    n = len(rows)
    return EvalReport(
        n=n,
        accuracy=sum(r["correct"] for r in rows) / max(n, 1),
        latent_usage=sum(r["latent_spans"] > 0 for r in rows) / max(n, 1),
        mean_latent_spans=sum(r["latent_spans"] for r in rows) / max(n, 1),
        mean_pairwise_latent_cosine=mean_pairwise_cosine(latent_means),
        answered=sum(r["prediction"] is not None for r in rows) / max(n, 1),
        samples=rows,
    )
