"""Latent decoding inside vLLM's V1 model runner (``GPUModelRunner`` and its CPU subclass).

Hooks (all overrides of the V1 runner's own methods, calling ``super()``):

* ``_update_states`` — after vLLM updated its persistent batch: free slots of finished requests,
  give new requests a slot (initial counter ``FORCE_START`` when the front end stripped a trailing
  START, see :mod:`monet.layout`), note requests resumed after preemption, and re-map batch rows to
  slots when the batch changed. Per-request settings were validated at admission
  (:mod:`monet.vllm.validation`), so parsing them here cannot fail.
* ``_preprocess`` — vLLM has written token/image embeddings into its persistent ``inputs_embeds``
  buffer; before the forward, ``monet.ops.latent_embed_`` overwrites the row of each request's
  newest token with the stored final-norm hidden state when its next input is a latent (and, for a
  request recomputed after preemption, stored latents are written at its older latent positions).
* ``sample_tokens`` / ``_sample`` — right after sampling and before vLLM copies the ids to the host
  (and records them as output tokens), ``monet.ops.latent_advance_`` forces PAD/END inside spans,
  opens spans on START and stores the final-norm hidden rows (``hidden_states[logits_indices]``,
  exactly what vLLM computed the logits from). EOS/stop never see anything but the forced tokens
  inside a span, so they cannot end one.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from monet.vllm.settings import EngineSettings, check_engine_features, parse_request_settings
from monet.vllm.state import LatentState

logger = logging.getLogger("monet.vllm")


def check_supported(vllm_config: Any) -> None:
    """Refuse engine features the latent feedback cannot honour, with a clear error."""
    pc = vllm_config.parallel_config
    mc = vllm_config.model_config
    check_engine_features(speculative=getattr(vllm_config, "speculative_config", None) is not None,
                          pipeline_parallel_size=getattr(pc, "pipeline_parallel_size", 1),
                          runner_type=getattr(mc, "runner_type", "generate"))
    from monet.vllm.validation import VALIDATOR, LatentSettingsValidator

    procs = getattr(mc, "logits_processors", None) or []
    if not any(p is LatentSettingsValidator or p == VALIDATOR for p in procs):
        raise ValueError("the Monet latent worker needs its request validator among the engine's logits "
                         f"processors (logits_processors=['{VALIDATOR}']); build the engine arguments with "
                         "monet.vllm.engine_kwargs() or use LatentLLM / `monet serve`")


class LatentRunnerMixin:
    """Mixed into vLLM's V1 ``GPUModelRunner`` (or ``CPUModelRunner``)."""

    monet_state: LatentState

    def _monet_setup(self) -> None:
        check_supported(self.vllm_config)
        settings = EngineSettings.from_vllm_config(self.vllm_config)
        self.monet_state = LatentState(
            settings,
            hidden_size=self.model_config.get_hidden_size(),
            dtype=self.dtype,
            device=self.device,
            max_num_reqs=self.max_num_reqs,
            max_num_tokens=self.max_num_tokens,
        )
        self._monet_hidden: torch.Tensor | None = None
        self._monet_refeed: set[str] = set()
        self._monet_counters = {"resumed_with_outputs": 0, "refed_latents": 0}

    # -- persistent batch bookkeeping (host, changed requests only) --------------------------------
    def _update_states(self, scheduler_output):
        st = self.monet_state
        for rid in scheduler_output.finished_req_ids:
            st.finish_request(rid)
            self._monet_refeed.discard(rid)
        result = super()._update_states(scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            if new.sampling_params is None:
                continue
            settings = parse_request_settings(new.sampling_params.extra_args, st.settings.layout)
            st.add_request(new.req_id, settings, new.prompt_token_ids)
        for rid in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            if rid in st.reqs and self.requests[rid].output_token_ids:
                self._monet_refeed.add(rid)
                self._monet_counters["resumed_with_outputs"] += 1
        st.sync_batch(self.input_batch.req_ids)
        return result

    # -- pre-forward: latent inputs ---------------------------------------------------------------
    def _preprocess(self, scheduler_output, num_input_tokens, intermediate_tensors=None):
        out = super()._preprocess(scheduler_output, num_input_tokens, intermediate_tensors)
        inputs_embeds = out[1]
        if inputs_embeds is None:
            raise RuntimeError("Monet latent decoding needs the runner to feed input embeddings "
                               "(a multimodal model such as Qwen2.5-VL)")
        st = self.monet_state
        num_reqs = self.input_batch.num_reqs
        num_tokens = scheduler_output.total_num_scheduled_tokens
        last_rows = self.query_start_loc.gpu[1:num_reqs + 1].to(torch.int64) - 1
        st.embed_(inputs_embeds, num_tokens, last_rows, st.batch_slots(num_reqs, self.discard_request_mask.gpu))
        if self._monet_refeed:
            self._monet_refeed_rows(scheduler_output, inputs_embeds)
        return out

    def _monet_refeed_rows(self, scheduler_output, inputs_embeds: torch.Tensor) -> None:
        st = self.monet_state
        rows: list[int] = []
        slots: list[int] = []
        ks: list[int] = []
        for rid in list(self._monet_refeed):
            i = self.input_batch.req_id_to_index.get(rid)
            n = scheduler_output.num_scheduled_tokens.get(rid, 0)
            if i is None or not n:
                continue
            r, s, k, more = st.refeed_plan(rid, self.requests[rid].output_token_ids,
                                           int(self.input_batch.num_computed_tokens_cpu[i]), n,
                                           int(self.query_start_loc.np[i]))
            rows += r
            slots += s
            ks += k
            if not more:
                self._monet_refeed.discard(rid)
        self._monet_counters["refed_latents"] += len(rows)
        st.refeed_(inputs_embeds, rows, slots, ks)

    # -- post-sample: forcing + state update ------------------------------------------------------
    def sample_tokens(self, grammar_output):
        state = self.execute_model_state
        self._monet_hidden = state.sample_hidden_states if state is not None else None
        try:
            return super().sample_tokens(grammar_output)
        finally:
            self._monet_hidden = None

    def _sample(self, logits, spec_decode_metadata):
        out = super()._sample(logits, spec_decode_metadata)
        hidden = self._monet_hidden
        if hidden is not None:
            num_reqs = self.input_batch.num_reqs
            st = self.monet_state
            if st.needs_start_embedding:  # public multimodal-model interface; TP ranks all run this step
                ids = torch.tensor([st.settings.start_id], dtype=torch.long, device=self.device)
                st.start_embedding = self.get_model().embed_input_ids(ids)[0].to(st.dtype)
            st.advance_(out.sampled_token_ids[:num_reqs, 0], hidden[:num_reqs],
                        st.batch_slots(num_reqs, self.discard_request_mask.gpu))
        return out

    # -- results ----------------------------------------------------------------------------------
    def monet_take_latents(self, tags: list[str]) -> dict[str, list[tuple[str, list[int], bytes, bool]]]:
        """Per tag: (req_id, shape, float32 bytes, overflow) — plain types so any RPC transport carries them."""
        got = self.monet_state.take_latents(list(tags))
        return {t: [(f.req_id, list(f.latents.shape), f.latents.numpy().tobytes(), f.overflow) for f in v]
                for t, v in got.items()}

    def monet_stats(self) -> dict:
        st = self.monet_state
        return {"live_requests": len(st.reqs), "num_slots": st.S, "stored_results": len(st._store.finished),
                "tags": len(st._store.by_tag), **self._monet_counters}


@functools.cache
def gpu_runner_cls():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    class LatentGPUModelRunner(LatentRunnerMixin, GPUModelRunner):
        def __init__(self, vllm_config, device):
            super().__init__(vllm_config, device)
            self._monet_setup()

    return LatentGPUModelRunner


@functools.cache
def cpu_runner_cls():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    class LatentCPUModelRunner(LatentRunnerMixin, CPUModelRunner):
        def __init__(self, vllm_config, device):
            super().__init__(vllm_config, device)
            self._monet_setup()

    return LatentCPUModelRunner
