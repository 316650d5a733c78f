"""Command-line pieces for the vLLM path, wired into ``monet.cli``:

* :func:`generate_with_vllm` — ``monet generate --engine vllm``;
* :func:`add_serve_parser` — registers ``monet serve MODEL [--latent-size K] [--layout L] [-- vllm serve options]``.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from monet.model.outputs import LatentGeneration
from monet.model.requests import LatentRequest, as_requests
from monet.model.sampling import SamplingParams, resolve_sampling


def default_engine_kwargs(requests: Sequence[LatentRequest], dtype: str = "auto") -> dict:
    """Engine settings that work for a one-off CLI run on this machine (CPU: a 1 GiB KV cache)."""
    from vllm.platforms import current_platform

    n_images = max([len(r.images) for r in requests] + [1])
    kw: dict[str, Any] = {"dtype": dtype, "limit_mm_per_prompt": {"image": n_images}}
    if current_platform.is_cpu():
        kw.update(kv_cache_memory_bytes=1 << 30, enforce_eager=True)
    return kw


def generate_with_vllm(
    model: str,
    requests: Sequence[LatentRequest | str | dict],
    sampling: SamplingParams | None = None,
    *,
    latent_size: int | None = None,
    layout: str | None = None,
    return_latents: bool = False,
    dtype: str = "auto",
    engine_kwargs: dict | None = None,
    **sampling_kw: Any,
) -> list[LatentGeneration]:
    """Start a latent vLLM engine on ``model``, generate for ``requests``, shut it down."""
    from monet.vllm.llm import LatentLLM

    reqs = as_requests(requests)
    params = resolve_sampling(sampling, **sampling_kw)
    kw = {**default_engine_kwargs(reqs, dtype), **(engine_kwargs or {})}
    if params.seed is not None:
        kw.setdefault("seed", params.seed)
    llm = LatentLLM(model, latent_size=latent_size, layout=layout, **kw)
    try:
        return llm.generate(reqs, params, return_latents=return_latents)
    finally:
        llm.shutdown()


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve``: vLLM's OpenAI-compatible server with latent decoding."""
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible server (vLLM) with latent decoding",
        description="Starts vLLM's OpenAI-compatible API server with the Monet latent worker. Options after "
                    "`--` go to `vllm serve` (e.g. -- --port 8000 --dtype bfloat16). Per request, "
                    "vllm_xargs={\"monet_latent_size\": K, \"monet_layout\": L} override the defaults; "
                    "non-streaming answers render latent spans as <abs_vis_token><latent></abs_vis_token>.")
    _serve_options(p)
    p.add_argument("model", help="checkpoint directory holding the Monet tokens")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="`vllm serve` options, after `--`")
    p.set_defaults(func=_cmd_serve)
    return p


def _serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latent-size", type=int, default=None, help="default latent steps per span (model config)")
    p.add_argument("--layout", choices=["standard", "monet-v1"], default=None)
    p.add_argument("--max-latents-per-request", type=int, default=None,
                   help="latent vectors kept per request on the device (re-fed after preemption)")


def split_serve_args(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """argparse hands everything after MODEL to ``vllm_args``: parse our options up to ``--``."""
    rest = list(args.vllm_args)
    cut = rest.index("--") if "--" in rest else len(rest)
    own, vllm = rest[:cut], rest[cut + 1:]
    mini = argparse.ArgumentParser(prog="monet serve MODEL")
    _serve_options(mini)
    parsed = mini.parse_args(own)
    for key, value in vars(parsed).items():
        if value is not None:
            setattr(args, key, value)
    return args, vllm


def _cmd_serve(args: argparse.Namespace) -> int:
    from monet.vllm.serve import run_serve

    args, vllm_args = split_serve_args(args)
    run_serve(args.model, latent_size=args.latent_size, layout=args.layout,
              max_latents_per_request=args.max_latents_per_request, vllm_args=vllm_args)
    return 0
