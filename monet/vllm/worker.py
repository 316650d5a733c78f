"""``LatentWorker``: vLLM's own worker for the current platform, building the latent model runner.

Select it with ``worker_cls="monet.vllm.worker.LatentWorker"`` (``LatentLLM`` and ``monet serve`` do
this). Only the V1 model runner is supported (the CPU runner subclasses it); on GPU, vLLM 0.32
defaults to Model Runner V2, so set ``VLLM_USE_V2_MODEL_RUNNER=0`` (a clear error says so).
"""

from __future__ import annotations

import torch
from vllm.platforms import current_platform

from monet.vllm.runner import cpu_runner_cls, gpu_runner_cls
from monet.vllm.settings import V2_ERROR

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _PlatformWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _PlatformWorker



class LatentWorker(_PlatformWorker):
    """The platform's vLLM worker with the latent model runner and latent result RPCs."""

    if current_platform.is_cpu():

        def init_device(self):
            super().init_device()  # sets up threads/distributed and builds the stock CPU runner
            if self.use_v2_model_runner:
                raise RuntimeError(V2_ERROR)
            self.model_runner = cpu_runner_cls()(self.vllm_config, torch.device("cpu"))

    else:

        def _make_model_runner(self):
            if self.use_v2_model_runner:
                raise RuntimeError(V2_ERROR)
            return gpu_runner_cls()(self.vllm_config, self.device)

    # collective_rpc targets -----------------------------------------------------------------------
    def monet_take_latents(self, tags):
        """Latent vectors of the requests carrying ``tags`` (``{tag: [(req_id, [n, D] float32, overflow)]}``)."""
        return self.model_runner.monet_take_latents(tags)

    def monet_stats(self):
        return self.model_runner.monet_stats()

    def monet_load_weights(self, weights):
        """Load ``[(name, dtype, shape, raw bytes)]`` (Hugging Face checkpoint names; packed by
        ``monet.rl.weight_sync.pack_weights`` so any RPC transport carries them as plain bytes) into
        the served model in place, through vLLM's in-place reload (``reload_weights`` with
        checkpoint-format weights: the model's own ``load_weights`` maps names, fuses and shards, then
        the per-layer post-processing runs again). Used by VLPO to push trainer updates without a
        checkpoint on disk; the caller resets the prefix cache afterwards (cached KV was computed
        with the old weights). Returns how many tensors were given."""
        from monet.rl.weight_sync import unpack_weights

        named = unpack_weights(weights)
        self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
        return len(named)
