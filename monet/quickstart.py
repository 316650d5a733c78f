"""``monet quickstart`` (``make demo``): the whole pipeline on CPU in minutes.

synthetic zoom-in data -> tiny random Qwen2.5-VL -> stage 1 -> teacher reps -> stage 2 -> teacher
latents -> stage 3 (from the stage-1 weights) -> held-out evaluation with :func:`monet.generate` of
the stage-1 model (with the reference helper image inserted when it asks for one, and without) and
of the stage-3 model. Writes everything under the output directory and a
``report.json``; prints a summary table. The numbers are whatever this tiny model reaches.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from monet.train.config import SFTConfig


@dataclass
class QuickstartSettings:
    preset: str = "tiny"
    seed: int = 0
    n_train: int = 2000
    n_eval: int = 100
    latent_size: int = 4
    micro_batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    epochs: tuple[float, float, float] = (5.0, 3.0, 3.0)
    max_steps: int | None = None
    max_new_tokens: int = 128
    eval_batch_size: int = 16
    # The paper freezes a *pretrained* vision tower; the tiny model's tower is random, so by
    # default the quickstart trains it too (set True to follow the paper exactly).
    freeze_vision: bool = False
    # CE targets (monet.data.stage_layout label rules); "research" reproduces the original code
    labels: str = "decodable"

    @classmethod
    def default(cls, *, fast: bool = False, preset: str = "tiny", seed: int = 0) -> "QuickstartSettings":
        if fast:
            return cls(preset=preset, seed=seed, n_train=24, n_eval=8, max_steps=3, max_new_tokens=24)
        return cls(preset=preset, seed=seed)


def _stage_config(s: QuickstartSettings, out: Path, stage: int, model: Path, data, **kw) -> SFTConfig:
    return SFTConfig(stage=stage, model=str(model), data=[str(data.train_json)], image_root=str(data.root),
                     output_dir=str(out / f"stage{stage}"), latent_size=s.latent_size, lr=s.lr, warmup_steps=10,
                     epochs=s.epochs[stage - 1], max_steps=s.max_steps, micro_batch_size=s.micro_batch_size,
                     grad_accum=s.grad_accum, dtype="float32", gradient_checkpointing=False, seed=s.seed,
                     log_every=20, keep_last=1, cache_dir=str(out / "cache"), freeze_vision=s.freeze_vision,
                     labels=s.labels, **kw)


def run_quickstart(out_dir: str | Path, settings: QuickstartSettings | None = None, *, progress: bool = True,
                   printer=print) -> dict:
    import torch

    from monet.data.synth import check_output_dir, synthesize_dataset
    from monet.eval.evaluate import evaluate_sft_file
    from monet.model.loading import load_model
    from monet.testing import build_tiny_checkpoint
    from monet.train.pipeline import run_precompute, run_sft

    s = settings or QuickstartSettings.default()
    out = Path(out_dir)
    check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name, fn):
        printer(f"\n== {name} ==")
        t = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - t, 1)
        return result

    data = timed("synthetic data", lambda: synthesize_dataset(out / "data", s.n_train, s.n_eval, s.seed))
    base = timed("base model", lambda: build_tiny_checkpoint(out / "base", preset=s.preset, seed=s.seed, cache=True))

    c1 = _stage_config(s, out, 1, base, data, teacher="none")
    ck1 = Path(timed("stage 1 (warm-up, helper images as images)",
                     lambda: run_sft(c1, overwrite=True, progress=progress))["checkpoint"])
    reps = out / "teacher_reps"
    timed("teacher reps (stage-1 model, observation positions)",
          lambda: run_precompute(replace(c1, model=str(ck1)), "teacher-reps", reps, dtype="float32", progress=progress))
    c2 = _stage_config(s, out, 2, ck1, data, teacher="store", teacher_store=str(reps))
    ck2 = Path(timed("stage 2 (latents see the helper image; alignment via latents)",
                     lambda: run_sft(c2, overwrite=True, progress=progress))["checkpoint"])
    lats = out / "teacher_latents"
    timed("teacher latents (stage-2 model, latent positions)",
          lambda: run_precompute(replace(c2, model=str(ck2)), "teacher-latents", lats, dtype="float32",
                                 progress=progress))
    c3 = _stage_config(s, out, 3, ck1, data, teacher="store", teacher_store=str(lats))
    ck3 = Path(timed("stage 3 (no helper images; latent distillation)",
                     lambda: run_sft(c3, overwrite=True, progress=progress))["checkpoint"])

    reports = {}
    # The stage-1 model is trained to see the helper image it asks for: it is scored with the
    # reference helper image inserted when it emits <|vision_start|> ("stage1+zoom"), and without.
    for name, ck, helpers in (("stage1+zoom", ck1, True), ("stage1", ck1, False), ("stage3", ck3, False)):
        def ev(ck=ck, helpers=helpers):
            model, processor = load_model(ck, latent_size=s.latent_size)
            return evaluate_sft_file(model, processor, data.eval_json, max_new_tokens=s.max_new_tokens,
                                     batch_size=s.eval_batch_size, progress=progress, helper_images=helpers)
        reports[name] = timed(f"evaluate {name} model", ev)

    report = {
        "settings": asdict(s),
        "checkpoints": {"stage1": str(ck1), "stage2": str(ck2), "stage3": str(ck3)},
        "eval": {k: {kk: vv for kk, vv in v.to_dict().items() if kk != "samples"} for k, v in reports.items()},
        "examples": {k: v.samples[:3] for k, v in reports.items()},
        "timings_s": timings,
        "total_s": round(time.perf_counter() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    printer("\n" + format_report(report))
    printer(f"\nreport: {out / 'report.json'}")
    return report


#: Column titles of the summary table.
EVAL_TITLES = {"stage1+zoom": "stage-1 + zoom", "stage1": "stage-1 model", "stage3": "stage-3 model"}


def format_report(report: dict) -> str:
    ev = report["eval"]
    models = list(ev)
    rows = [("accuracy", "accuracy", "{:.1%}"), ("answers with a \\boxed{}", "answered", "{:.1%}"),
            ("answers using a latent span", "latent_usage", "{:.1%}"),
            ("latent spans per answer", "mean_latent_spans", "{:.2f}"),
            ("helper images per answer", "mean_helper_images", "{:.2f}"),
            ("mean pairwise latent cosine", "mean_pairwise_latent_cosine", "{:.3f}")]
    n = ev[models[-1]]["n"]
    lines = [f"{'held-out (' + str(n) + ' samples)':<32}" + "".join(f"{EVAL_TITLES.get(m, m):>16}" for m in models)]
    for label, key, fmt in rows:
        cells = [("-" if ev[m].get(key) is None else fmt.format(ev[m][key])) for m in models]
        lines.append(f"{label:<32}" + "".join(f"{c:>16}" for c in cells))
    lines.append("(stage-1 + zoom: the reference helper image is inserted when the stage-1 model asks for it)")
    lines.append(f"{'total time':<32}{report['total_s']:>15.0f}s")
    return "\n".join(lines)
