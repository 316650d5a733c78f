"""``monet`` command line: ``monet generate`` (HF or vLLM engine) and the training/data commands."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate with latent reasoning for one prompt (+ images)")
    p.add_argument("--model", required=True, help="checkpoint directory (Qwen2.5-VL / Monet)")
    p.add_argument("--image", action="append", default=[], help="image path (repeat for several)")
    p.add_argument("--prompt", required=True, help="user message")
    p.add_argument("--latent-size", type=int, default=None, help="latent steps per span (default: model's config)")
    p.add_argument("--layout", choices=["standard", "monet-v1"], default=None)
    p.add_argument("--force-latent", action="store_true", help="append START so decoding opens with a latent span")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    p.add_argument("--show-latents", action="store_true", help="print latent positions and vector norms")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from monet.model.requests import LatentRequest

    req = LatentRequest(prompt=args.prompt, images=list(args.image), force_latent=args.force_latent)
    kw = dict(max_new_tokens=args.max_new_tokens, latent_size=args.latent_size, layout=args.layout,
              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
              return_latents=args.show_latents)
    t0 = time.perf_counter()
    if args.engine == "vllm":
        from monet.vllm.cli import generate_with_vllm

        out = generate_with_vllm(args.model, [req], dtype=args.dtype, **kw)[0]
    else:
        import monet

        model, processor = monet.load_model(args.model, dtype=args.dtype, device=args.device)
        t0 = time.perf_counter()
        out = monet.generate(model, processor, [req], **kw)[0]
    dt = time.perf_counter() - t0
    print(out.rendered)
    if args.show_latents and out.latents is not None:
        norms = out.latents.norm(dim=-1).tolist()
        print(f"\nlatent positions: {out.latent_positions}")
        print("latent norms:     [" + ", ".join(f"{n:.3f}" for n in norms) + "]")
    n = len(out.token_ids)
    print(f"\n[{n} tokens, {len(out.latent_positions)} latent steps in {out.num_latent_spans} spans, "
          f"{n / dt:.1f} tokens/s, finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monet", description="Latent visual reasoning for Qwen2.5-VL")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"monet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
