"""``monet`` command line: ``monet generate`` (HF or vLLM engine) and the training/data commands.

Building the parser imports nothing heavy: each command imports what it needs when it runs (the
``serve`` parser, which needs vLLM, is built only for ``monet serve``), so no command pays for, or
prints the import-time chatter of, libraries it does not use.
"""

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
    p.add_argument("--force-latent", action="store_true",
                   help="open the answer with a latent span (START forced as the first generated token)")
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
    rate = f"{n / dt:.1f} tokens/s" + (" incl. engine start-up" if args.engine == "vllm" else "")
    print(f"\n[{n} tokens, {len(out.latent_positions)} latent steps in {out.num_latent_spans} spans, "
          f"{rate}, finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def _add_sft(sub) -> None:
    p = sub.add_parser("sft", help="train one SFT stage (1, 2 or 3) from a YAML config")
    p.add_argument("--config", required=True, help="YAML file with SFTConfig fields")
    p.add_argument("--stage", type=int, choices=[1, 2, 3], default=None, help="overrides the config's stage")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run's checkpoints and metrics in output_dir and start over")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_sft)


def _load_config(args: argparse.Namespace):
    from monet.train.config import SFTConfig, parse_overrides

    overrides = parse_overrides(args.set)
    if getattr(args, "stage", None) is not None:
        overrides["stage"] = args.stage
    return SFTConfig.from_yaml(args.config, overrides)


def _cmd_sft(args: argparse.Namespace) -> int:
    from monet.train.pipeline import run_sft

    run_sft(_load_config(args), resume=args.resume, overwrite=args.overwrite, device=args.device)
    return 0


def _add_precompute(sub) -> None:
    p = sub.add_parser("precompute", help="write teacher states for stage 2 (teacher-reps) or 3 (teacher-latents)")
    p.add_argument("what", choices=["teacher-reps", "teacher-latents"])
    p.add_argument("--config", required=True, help="YAML with model (the teacher), data, image_root, latent_size")
    p.add_argument("--out", required=True, help="teacher store directory (resumable)")
    p.add_argument("--layers", default=None, help="comma-separated hidden-state layers to keep (default: all)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default=None)
    p.add_argument("--verify", action="store_true", help="afterwards read every entry back (with shard checksums)")
    p.set_defaults(func=_cmd_precompute)


def _cmd_precompute(args: argparse.Namespace) -> int:
    from monet.train.precompute import parse_layers

    layers = parse_layers(args.layers)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    from monet.train.pipeline import run_precompute

    run_precompute(_load_config(args), args.what, args.out, layers=layers, dtype=args.dtype,
                   batch_size=args.batch_size, device=args.device)
    if args.verify:
        from monet.train.teacher_store import verify

        report = verify(args.out, checksums=True)
        print(f"verify: {report['ok']}/{report['entries']} entries readable")
        for err in report["errors"][:20]:
            print(f"  {err}")
        return 1 if report["errors"] else 0
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="write the synthetic zoom-in dataset (Monet-SFT format + eval split)")
    synth.add_argument("--out", default=None, help="SFT dataset directory")
    synth.add_argument("--rl", default=None, metavar="OUT.parquet",
                       help="write the synthetic RL split (--n prompts, Thyme-RL parquet schema) instead")
    synth.add_argument("--n", type=int, required=True, help="training samples")
    synth.add_argument("--n-eval", type=int, default=100, help="held-out samples")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_cmd_data_synth)
    check = dsub.add_parser("check", help="validate Monet-SFT JSON files and report rejected samples")
    check.add_argument("files", nargs="+")
    check.add_argument("--image-root", default=None)
    check.set_defaults(func=_cmd_data_check)


def _cmd_data_synth(args: argparse.Namespace) -> int:
    if args.rl:
        from monet.rl.data import synthesize_rl_split

        path = synthesize_rl_split(args.rl, args.n, args.seed)
        print(f"wrote {args.n} RL prompts to {path}")
        return 0
    if not args.out:
        raise ValueError("give --out DIR (SFT dataset) or --rl OUT.parquet (RL split)")
    from monet.data.synth import synthesize_dataset

    d = synthesize_dataset(args.out, args.n, args.n_eval, args.seed)
    print(f"wrote {d.n} training samples to {d.train_json} and {d.n_eval} held-out samples to {d.eval_json}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from monet.data.sft_loader import load_sft_dataset

    samples, report = load_sft_dataset(args.files, args.image_root)
    print(report.summary())
    return 0 if not report.rejections else 1


def _add_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="the embedded default: synthetic data -> 3 SFT stages -> evaluation (CPU)")
    p.add_argument("--out", default="runs/quickstart", help="output directory (data, checkpoints, report)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-eval", type=int, default=None)
    p.add_argument("--n-val", type=int, default=None, help="validation samples (default 500)")
    p.add_argument("--split", choices=["eval", "val"], default="eval",
                   help="split the rows are evaluated on: the held-out split (default) or the validation split "
                        "(use val for tuning settings, so the held-out split stays untouched)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of every stage and control")
    p.add_argument("--caption-epochs", type=float, default=None,
                   help="epochs of stage 0, the vision warm-up on captions of the training scenes (default 0: "
                        "skipped)")
    p.add_argument("--vlpo-steps", type=int, default=None,
                   help="steps of the VLPO phase after stage 3 (0 skips it; default 8, --fast 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a few steps per stage and 8 held-out samples (CI smoke run)")
    p.add_argument("--epochs", default=None,
                   help="S1,S2,S3 epochs of the stages (the controls train with S3); default 5,3,3")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer length bound of the evaluation and the VLPO rollouts (default: 128 zoom, 192 multihop, 112 keys)")
    p.add_argument("--task", choices=["keys", "zoom", "multihop"], default="keys",
                   help="synthetic task: pointer chasing between colour-keyed tiles (default), one zoom-in, or the "
                        "two-hop arrow lookup (docs/demo.md)")
    p.add_argument("--keys-observe", choices=["none", "pointer", "last"], default=None,
                   help="keys task: what the observations state (none: nothing beyond the question; pointer: the "
                        "first hop; last: the last helper image's dot) — docs/demo.md")
    p.add_argument("--labels", choices=["decodable", "research"], default="decodable",
                   help="CE targets: every token the decoder must emit (default) or the research code's")
    p.set_defaults(func=_cmd_quickstart)


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from monet.quickstart import QuickstartSettings, run_quickstart

    settings = QuickstartSettings.default(fast=args.fast, preset=args.preset, seed=args.seed)
    for name in ("n_train", "n_eval", "n_val", "lr", "vlpo_steps", "caption_epochs", "keys_observe"):  # given -> overrides
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.eval_split = args.split
    if args.epochs is not None:
        try:
            epochs = tuple(float(x) for x in args.epochs.split(","))
        except ValueError:
            epochs = ()
        if len(epochs) != 3 or any(not e > 0 for e in epochs):
            raise ValueError(f"--epochs: expected three positive numbers S1,S2,S3, got {args.epochs!r}")
        settings.epochs = epochs
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        settings.max_new_tokens = args.max_new_tokens
    settings.labels = args.labels
    if args.task != settings.task and args.max_new_tokens is None and not args.fast:
        settings.max_new_tokens = None  # the task's own answer budget
    settings.task = args.task
    settings.__post_init__()  # validate the combination
    run_quickstart(args.out, settings)
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on benchmarks (accuracy, latent diagnostics, ablations)",
                       description="Results stream to per-sample JSONL under --out; rerunning the same command "
                                   "resumes where it stopped. See docs/eval.md.")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--bench", required=True,
                   help="comma-separated benchmarks: VStarBench, HRBench4K, HRBench8K, MME-RealWorld-Lite, "
                        "VisualPuzzles, synth (the `monet data synth` eval split), or any name for a Monet-SFT .json")
    p.add_argument("--data", required=True, action="append",
                   help="data folder / .tsv / .json for all benchmarks, or NAME=PATH per benchmark (repeat)")
    p.add_argument("--out", required=True, help="output folder (records, reports, plots; resumable)")
    p.add_argument("--engine", choices=["vllm", "hf", "auto"], default="auto", help="default: vllm if installed")
    p.add_argument("--latent-size", default=None, help="K, or a comma-separated sweep (1,4,8,16); default: model's")
    p.add_argument("--layout", choices=["standard", "monet-v1"], default=None)
    p.add_argument("--force-latent", action="store_true", help="open every answer with a latent span")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--instruction", default=None, help="replaces the benchmark prompt's trailing instruction")
    p.add_argument("--limit", type=int, default=None, help="first N samples per benchmark")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--ablations", default=None, help="comma-separated: zeros,start,other,noise")
    p.add_argument("--judge-config", default=None, help="YAML with LLM-judge settings (JudgeConfig fields)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="HF engine / heatmaps: auto, cpu, cuda")
    p.add_argument("--image-root", default=None, help="image root of a Monet-SFT .json (default: its folder)")
    p.add_argument("--heatmaps", type=int, default=3, help="samples drawn as latent heatmaps (0: none)")
    p.add_argument("--html-samples", type=int, default=20, help="samples per benchmark listed in report.html")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _add_vlpo(sub) -> None:
    p = sub.add_parser("vlpo", help="VLPO reinforcement learning (latent-aware GRPO) from a YAML config")
    p.add_argument("--config", default=None, help="YAML file with VLPORunConfig fields (section vlpo: VLPOConfig)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting (vlpo.KEY for the algorithm's settings)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--controller", choices=["local", "ray"], default="local",
                   help="local: one process (rollout engine + trainer); ray: rollout_engines rollout actors and a "
                        "training group of train_workers Ray actors (one device each; rank 0 is the trainer)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (implies --controller ray); "
                   "default: ray.init() starts a local one")
    p.add_argument("--export", nargs=2, metavar=("CHECKPOINT", "OUT"), default=None,
                   help="copy a VLPO checkpoint's policy to OUT as a plain model directory and exit")
    p.set_defaults(func=_cmd_vlpo)


def _cmd_vlpo(args: argparse.Namespace) -> int:
    if args.export:  # the VLPO-only spelling of `monet export`
        from monet.rl.checkpoint import export_policy

        print(f"exported the policy to {export_policy(*args.export)}")
        return 0
    if not args.config:
        raise ValueError("--config is required (or --export CHECKPOINT OUT)")
    from monet.rl.checkpoint import RunBusy
    from monet.rl.run_config import VLPORunConfig
    from monet.train.config import parse_overrides

    from monet.rl.config import VLPOConfig

    cfg = VLPORunConfig.from_yaml(args.config, parse_overrides(args.set, VLPORunConfig, sections={"vlpo": VLPOConfig}))
    try:
        if args.controller == "ray" or args.ray_address:
            from monet.rl.controller import run_vlpo_ray

            run_vlpo_ray(cfg, resume=args.resume, address=args.ray_address)
        else:
            from monet.rl.trainer import run_vlpo

            run_vlpo(cfg, resume=args.resume)
    except RunBusy as e:
        print(f"monet vlpo: error: {e}", file=sys.stderr)
        return 2
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a training checkpoint's model (SFT or VLPO) as a plain model directory",
                       description="Copy the model of an SFT or VLPO checkpoint (weights, config, generation config, "
                                   "processor/tokenizer files) to OUT with a monet_config.json holding the span "
                                   "layout it was trained in; no trainer state. OUT is written atomically and must "
                                   "not exist or be empty; non-finite weights are refused.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint-STEP folder of `monet sft` / `monet vlpo`, or a run folder (its latest checkpoint)")
    p.add_argument("out", metavar="OUT", help="new model directory for monet.load_model, LatentLLM and monet serve")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from monet.export import export_checkpoint

    r = export_checkpoint(args.checkpoint, args.out)
    span = r.monet_config.span_layout
    print(f"exported the {r.source.kind.upper()} checkpoint {r.source.folder} to {r.out} "
          f"(latent_size {span.latent_size}, layout {span.kind})")
    before = r.checkpoint_monet_config.span_layout if r.checkpoint_monet_config is not None else None
    if before is not None and before != span:
        print(f"note: the checkpoint's monet_config.json said latent_size {before.latent_size}, layout "
              f"{before.kind}; the export holds the layout the run trained with")
    if r.left_out:
        print(f"left out: {', '.join(r.left_out)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from monet.eval.harness import EvalSettings, run_eval

    try:
        ks = tuple(int(k) for k in args.latent_size.split(",") if k.strip()) if args.latent_size else ()
    except ValueError:
        raise ValueError(f"--latent-size: expected integers like 4 or 1,4,8,16, got {args.latent_size!r}") from None
    settings = EvalSettings(
        model=args.model, benchmarks=tuple(b.strip() for b in args.bench.split(",") if b.strip()),
        data=tuple(args.data), out=args.out, engine=args.engine, latent_sizes=ks, layout=args.layout,
        force_latent=args.force_latent, system_prompt=args.system_prompt, instruction=args.instruction,
        limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        ablations=tuple(a.strip() for a in (args.ablations or "").split(",") if a.strip()),
        judge_config=args.judge_config, dtype=args.dtype, device=args.device, image_root=args.image_root,
        heatmap_samples=args.heatmaps, html_samples=args.html_samples, progress=not args.no_progress)
    run_eval(settings)
    return 0


_SERVE_HELP = "OpenAI-compatible server (vLLM) with latent decoding (see `monet serve --help`)"


def _add_serve(sub, full: bool) -> None:
    """``monet serve MODEL ... -- <vllm serve options>``. Its parser comes from ``monet.vllm.cli``,
    which imports the model stack; it is built only when the command is ``serve`` (``full``), and
    listed by name otherwise."""
    if full:
        from monet.vllm.cli import add_serve_parser

        add_serve_parser(sub)
    else:
        sub.add_parser("serve", help=_SERVE_HELP, add_help=False)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``monet`` parser; the ``serve`` parser is built in full only when ``argv`` runs it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="monet", description="Latent visual reasoning for Qwen2.5-VL")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_sft(sub)
    _add_precompute(sub)
    _add_data(sub)
    _add_quickstart(sub)
    _add_eval(sub)
    _add_vlpo(sub)
    _add_export(sub)
    _add_serve(sub, full=bool(argv) and argv[0] == "serve")
    return parser


def _exit_code(e: BaseException) -> int | None:
    """2 for bad input or settings, 1 for a run stopped by a detected fault (full disk, non-finite
    loss or weights), None for anything else (a bug: let the traceback through)."""
    if isinstance(e, (FileNotFoundError, IsADirectoryError, ValueError)):
        return 2
    from monet.atomic import DiskFullError, is_disk_full

    if is_disk_full(e):  # also an ENOSPC raised by a writer that does not wrap it
        return 1
    faults: tuple[type, ...] = (DiskFullError,)
    for module, name in (("monet.train.sft", "NonFiniteLossError"),
                         ("monet.train.checkpoint", "NonFiniteWeightsError")):
        if module in sys.modules:  # the class can only have been raised if its module is loaded
            faults += (getattr(sys.modules[module], name),)
    return 1 if isinstance(e, faults) else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        code = _exit_code(e)
        if code is None:
            raise
        print(f"monet {args.command}: error: {e}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
