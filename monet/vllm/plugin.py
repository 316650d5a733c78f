"""vLLM general plugin (entry point ``vllm.general_plugins: monet_latent``).

vLLM calls :func:`register` in every process it starts (front end, engine core, each worker) before
models are built. It registers the Monet native ops (``torch.ops.monet.*``) in that process so the
latent runner's first step does not pay the import, and does nothing else: engines that do not select
``monet.vllm.worker.LatentWorker`` are unaffected.
"""

from __future__ import annotations


def register() -> None:
    from monet.ops import native

    native.available()  # imports monet._C once (registers the ops); the fallback warns on first use
