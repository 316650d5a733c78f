"""``monet precompute teacher-reps`` / ``teacher-latents``: frozen-teacher hidden states to a store.

Which teacher, layout and positions each target uses comes from
:mod:`monet.train.teacher_targets`:

* teacher reps: the stage-1 model on the stage-1 layout, all-layer states at observation positions;
* teacher latents: the stage-2 model on the stage-2 layout, all-layer states at latent positions.

Resumable and self-repairing: keys already in the store are skipped, and entries of a shard that
fails its size/CRC32 check are dropped and recomputed (see :mod:`monet.train.teacher_store`). Layer
``0`` is the embedding output, the last one the final norm (transformers' ``output_hidden_states``
convention).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from monet.data.alignment import aligned_counts, aligned_positions, example_key
from monet.data.collate import StageCollator
from monet.model.training import latent_forward
from monet.train.teacher_targets import for_precompute


def parse_layers(text: str | None) -> list[int] | None:
    """``"0,4,28"`` -> ``[0, 4, 28]`` (None/empty -> None = all layers); a clear error otherwise."""
    if text is None or not text.strip():
        return None
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated hidden-state indices (integers, 0 = embeddings), "
                         f"got {text!r}") from None
    if any(x < 0 for x in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"--layers must be distinct non-negative indices, got {text!r}")
    return layers


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
    ``[layers, N, D]`` per sample into ``store_dir``. Returns a summary dict (``repaired``: the
    shards that failed verification and whose samples were recomputed)."""
    from monet.train.teacher_store import TeacherStoreWriter

    target = for_precompute(what)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    stage, which = target.teacher_stage, target.positions
    if getattr(examples, "stage", stage) != stage:
        raise ValueError(f"{what} needs stage-{stage} layouts, got stage {examples.stage}")
    n_total = model.config.text_config.num_hidden_layers + 1
    device = next(model.parameters()).device
    model.eval()
    t0 = time.perf_counter()
    written = skipped = 0
    collate = StageCollator(processor)
    with TeacherStoreWriter(store_dir, num_layers_total=n_total, layers=list(layers) if layers is not None else None,
                            dtype=dtype, hidden_size=model.config.text_config.hidden_size, kind=target.store_kind,
                            meta={"what": what, "stage": stage}) as writer:
        for shard, problem in writer.repaired.items():
            printer(f"repairing {store_dir}: {problem}; its samples are recomputed")
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
        repaired = sorted(writer.repaired)
    summary = {"what": what, "written": written, "skipped_existing": skipped, "repaired_shards": repaired,
               "store": str(store_dir), "seconds": round(time.perf_counter() - t0, 2)}
    printer(f"{what}: wrote {written} samples ({skipped} already present) to {store_dir} in {summary['seconds']} s")
    return summary
