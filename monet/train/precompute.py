"""``monet precompute teacher-reps`` / ``teacher-latents``: frozen-teacher hidden states to a store.

* teacher reps: the stage-1 model on the stage-1 layout, all-layer states at observation positions;
* teacher latents: the stage-2 model on the stage-2 layout, all-layer states at latent positions.

Resumable: keys already in the store are skipped. Layer ``0`` is the embedding output, the last
one the final norm (transformers' ``output_hidden_states`` convention).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from monet.data.collate import StageCollator
from monet.model.training import latent_forward
from monet.train.sft import aligned_counts, aligned_positions, example_key

KINDS = {"teacher-reps": ("observation_reps", "observation", 1),
         "teacher-latents": ("latents", "latent", 2)}


@torch.no_grad()
def precompute_teacher_states(
    model: Any,
    processor: Any,
    examples: Sequence[Any],
    store_dir: str | os.PathLike,
    *,
    what: str,
    layers: Sequence[int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    batch_size: int = 4,
    progress: bool = True,
    printer=print,
) -> dict:
    """Run the frozen teacher over ``examples`` (StageExamples of the teacher's layout) and write
    ``[layers, N, D]`` per sample into ``store_dir``. Returns a summary dict."""
    from monet.train.teacher_store import TeacherStoreWriter

    if what not in KINDS:
        raise ValueError(f"what must be one of {sorted(KINDS)}, got {what!r}")
    kind, which, stage = KINDS[what]
    if getattr(examples, "stage", stage) != stage:
        raise ValueError(f"{what} needs stage-{stage} layouts, got stage {examples.stage}")
    n_total = model.config.text_config.num_hidden_layers + 1
    device = next(model.parameters()).device
    model.eval()
    t0 = time.perf_counter()
    written = skipped = 0
    collate = StageCollator(processor)
    with TeacherStoreWriter(store_dir, num_layers_total=n_total, layers=list(layers) if layers is not None else None,
                            dtype=dtype, hidden_size=model.config.text_config.hidden_size, kind=kind,
                            meta={"what": what, "stage": stage}) as writer:
        todo = [i for i in range(len(examples)) if example_key(examples, i) not in writer]
        skipped = len(examples) - len(todo)
        for s in tqdm(range(0, len(todo), batch_size), desc=what, disable=not progress):
            chunk = [examples[i] for i in todo[s:s + batch_size]]
            batch = collate(chunk).to(device)
            b, p = aligned_positions(batch, which)
            out = latent_forward(model, batch.to_latent_batch(), capture=(b, p),
                                 capture_layers=list(layers) if layers else None)
            states = out.captured.float().cpu()  # [layers, P, D], row-major over (b, p)
            offset = 0
            for row, n in enumerate(aligned_counts(batch, which)):
                writer.add(chunk[row].key, states[:, offset:offset + n], positions=p[offset:offset + n].cpu())
                offset += n
                written += 1
    summary = {"what": what, "written": written, "skipped_existing": skipped, "store": str(store_dir),
               "seconds": round(time.perf_counter() - t0, 2)}
    printer(f"{what}: wrote {written} samples ({skipped} already present) to {store_dir} in {summary['seconds']} s")
    return summary
