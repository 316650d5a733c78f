"""``LatentLLM``: latent generation on a vLLM engine, same requests and results as ``monet.generate``."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Sequence

from monet.layout import check_latent_size, check_layout, is_monet_v1
from monet.model.outputs import LatentGeneration
from monet.model.requests import LatentRequest, as_requests, render_prompt
from monet.render import render_latent_text, split_spans
from monet.tokens import LATENT_PAD, LATENT_START, LatentTokenIds
from monet.vllm.settings import (CONFIG_KEY, DEFAULT_MAX_LATENTS, V2_ERROR, EngineSettings, replay_latent_positions,
                                 request_extra_args)

WORKER_CLS = "monet.vllm.worker.LatentWorker"


def engine_kwargs(settings: EngineSettings, **kwargs: Any) -> dict:
    """vLLM engine arguments that select the latent worker and carry the latent settings.

    Refuses what latent decoding cannot support (speculative decoding, pipeline parallelism)."""
    kwargs = dict(kwargs)
    if kwargs.get("speculative_config"):
        raise ValueError("Monet latent decoding does not support speculative decoding (speculative_config)")
    if int(kwargs.get("pipeline_parallel_size", 1) or 1) > 1:
        raise ValueError("Monet latent decoding does not support pipeline parallelism (pipeline_parallel_size > 1)")
    worker = kwargs.get("worker_cls", "auto")
    if worker not in ("auto", WORKER_CLS):
        raise ValueError(f"worker_cls={worker!r} conflicts with the Monet latent worker ({WORKER_CLS})")
    kwargs["worker_cls"] = WORKER_CLS
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


def load_settings(model: str, processor: Any, latent_size: int | None, layout: str | None,
                  max_latents_per_request: int) -> EngineSettings:
    from monet.model.config import MonetConfig

    try:
        ids = LatentTokenIds.from_tokenizer(processor.tokenizer)
    except ValueError as e:
        raise ValueError(f"{model}: {e}. vLLM serves the checkpoint as saved: load it once with "
                         f"monet.load_model(...) and save_pretrained() it (model and processor)") from None
    cfg = MonetConfig.load(model) if Path(model).is_dir() else None
    if cfg is not None and cfg.token_ids is not None and cfg.token_ids != ids:
        raise ValueError(f"{model}: monet_config.json token ids {cfg.token_ids} differ from the tokenizer's {ids}")
    K = latent_size if latent_size is not None else (cfg.latent_size if cfg is not None else 8)
    layout = layout or (cfg.layout if cfg is not None else "standard")
    return EngineSettings(pad_id=ids.pad, start_id=ids.start, end_id=ids.end, latent_size=check_latent_size(K),
                          layout=check_layout(layout), max_latents_per_request=max_latents_per_request)


def cache_salt(prompt_text: str, latent_size: int, layout: str) -> str:
    """Prefix-cache salt keeping cached KV consistent with latent inputs.

    vLLM hashes blocks by token ids only, but whether a position took a latent input depends on the
    latent size and layout, and a PAD (or a non-final START) in a *prompt* is plain text while the same
    token generated is a latent. So requests share cached blocks only with requests of the same
    latent size and layout, and prompts holding latent tokens as text share with nobody.
    """
    body = prompt_text[:-len(LATENT_START)] if prompt_text.endswith(LATENT_START) else prompt_text
    if LATENT_PAD in prompt_text or LATENT_START in body:
        return f"monet-private-{uuid.uuid4().hex}"
    salt = f"monet-k{latent_size}-{layout}"
    if is_monet_v1(layout) and prompt_text.endswith(LATENT_START):
        salt += "-prompt-start"  # a generated START is a latent position in monet-v1, a prompt START is not
    return salt


class LatentLLM:
    """A vLLM engine that decodes with latent spans (SPEC sections 4 and 8).

    ``model`` is a checkpoint directory holding the Monet tokens (as saved by
    ``monet.load_model(...).save_pretrained``). ``latent_size``/``layout`` are the engine defaults
    (from ``monet_config.json`` when present); :meth:`generate` can override them per call. Other
    keyword arguments go to ``vllm.LLM`` (e.g. ``dtype``, ``max_model_len``, ``limit_mm_per_prompt``).
    """

    def __init__(self, model: str | Path, *, latent_size: int | None = None, layout: str | None = None,
                 max_latents_per_request: int = DEFAULT_MAX_LATENTS, processor: Any = None, **engine_kw: Any):
        from transformers import AutoProcessor
        from vllm import LLM

        check_runner_v1()
        self.model = str(model)
        self.processor = processor or AutoProcessor.from_pretrained(self.model)
        self.settings = load_settings(self.model, self.processor, latent_size, layout, max_latents_per_request)
        self.token_ids = LatentTokenIds.from_tokenizer(self.processor.tokenizer)
        self.llm = LLM(model=self.model, **engine_kwargs(self.settings, **engine_kw))

    @property
    def latent_size(self) -> int:
        return self.settings.latent_size

    @property
    def layout(self) -> str:
        return self.settings.layout

    def generate(
        self,
        requests: Sequence[LatentRequest | str | dict] | LatentRequest | str | dict,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        logit_bias: dict[int, float] | None = None,
        n: int = 1,
        return_latents: bool = False,
        latent_size: int | Sequence[int] | None = None,
        layout: str | Sequence[str] | None = None,
        use_tqdm: bool = False,
    ) -> list[LatentGeneration]:
        """Generate for a batch of requests; like :func:`monet.generate`.

        Returns one :class:`LatentGeneration` per request, in order; with ``n > 1`` the ``n`` samples
        of each request follow each other (``len(result) == n * len(requests)``). ``latent_size`` and
        ``layout`` default to the engine's; give a list to set them per request (one engine serves
        every combination, in the same batch).
        """
        from vllm import SamplingParams

        reqs = as_requests(requests)
        if not reqs:
            return []
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        Ks = _per_request(latent_size, len(reqs), "latent_size", self.settings.latent_size, check_latent_size)
        layouts = _per_request(layout, len(reqs), "layout", self.settings.layout, check_layout)
        prompts, params, tags = [], [], []
        for i, req in enumerate(reqs):
            K, layout = Ks[i], layouts[i]
            text, images = render_prompt(self.processor, req, i)
            prompt: dict[str, Any] = {"prompt": text, "cache_salt": cache_salt(text, K, layout)}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            tag = uuid.uuid4().hex if return_latents else None
            tags.append(tag)
            prompts.append(prompt)
            params.append(SamplingParams(
                n=n, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_new_tokens,
                logit_bias=dict(logit_bias) if logit_bias else None, skip_special_tokens=True,
                extra_args=request_extra_args(latent_size=K, layout=layout, return_latents=return_latents, tag=tag),
            ))
        outputs = self.llm.generate(prompts, params, use_tqdm=use_tqdm)
        latents = self._take_latents([t for t in tags if t is not None]) if return_latents else {}
        results = []
        for out, tag, K, layout in zip(outputs, tags, Ks, layouts):
            prompt_ids = list(out.prompt_token_ids or [])
            ends = bool(prompt_ids) and prompt_ids[-1] == self.token_ids.start
            comps = sorted(out.outputs, key=lambda c: c.index)
            recs = latents.get(tag, [])
            if return_latents and len(recs) != len(comps):
                raise RuntimeError(f"latents of {len(recs)} sequences came back for a request with {len(comps)}")
            for c in comps:
                results.append(self._result(c, prompt_ids, ends, K, layout, recs[c.index] if return_latents else None))
        return results

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

    def _result(self, comp, prompt_ids, ends, K, layout, rec) -> LatentGeneration:
        toks = list(comp.token_ids)
        ids = self.token_ids
        pos = replay_latent_positions(toks, prompt_ends_in_start=ends, latent_size=K, monet_v1=is_monet_v1(layout),
                                      start_id=ids.start)
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


def _per_request(value, n: int, name: str, default, check) -> list:
    if value is None:
        return [default] * n
    if isinstance(value, (int, str)):
        return [check(value)] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} requests")
    return [check(v) for v in values]


def _child_index(req_id: str) -> int:
    head = req_id.split("_", 1)[0]
    return int(head) if head.isdigit() else 0
