"""``monet quickstart`` (``make demo``): the whole pipeline and its controls on CPU in minutes.

synthetic data (the keys task by default: follow two dots between colour-keyed tiles) -> tiny random Qwen2.5-VL -> [stage 0: vision warm-up on captions, off by
default] -> stage 1 -> teacher reps -> stage 2 -> teacher latents -> stage 3 (from the stage-1
weights) -> a short VLPO phase (:mod:`monet.rl`, HF rollouts) on the training split's questions, and
in the same run two controls trained on the same samples with the same step budget as stage 3,
from the same stage-1 weights (so the only difference to stage 3 is the assistant turn they learn,
:mod:`monet.data.controls`):

==============  ===================================================================================
row             what is evaluated on the held-out split (greedy, prompts sized like training)
==============  ===================================================================================
``direct``      (a) control: question -> ``\\boxed{}`` only
``text``        (b) control: text-only reasoning (helper images and latent spans removed)
``stage3``      (c) Monet stage 3 (latent reasoning, no helper image)
``oracle``      (d) upper bound: the stage-1 model, the true helper image inserted when it asks for one
``stage3-zeros``  (e) stage 3 with every latent replaced by zeros
``stage3-other``  (e) stage 3 with every latent replaced by another sample's stage-3 latents
``vlpo``        (f) stage 3 after the VLPO phase (before/after in ``report["vlpo"]``)
==============  ===================================================================================

Settings are tuned on the validation split (``eval_split="val"``, ``monet quickstart --split val``);
a default run evaluates the held-out split once.

Every row is scored with :class:`monet.scoring.Scorer` (through
:func:`monet.eval.evaluate.evaluate_sft_file`) and summarised with :mod:`monet.eval.diagnostics`:
accuracy with its 95% Wilson interval, the chance level (keys: 1/3, see
:data:`monet.data.synth_keys.CHANCE`; zoom / multihop: guessing within the asked attribute, 1/6 for
colour questions, 1/3 for shape questions; averaged over the split), the latent-span
rate, latent collapse (mean pairwise cosine across answers, effective rank) and, for the ablation
rows, the share of final answers the ablation changed. Each row records the sha256 of the weights
it was computed from. The goals of the demo (stage 3 >= 10 points over the better control with
disjoint intervals; zeroing the latents costs >= 10 points; mean pairwise cosine < 0.5) are
measured and reported, never assumed.

Writes ``report.json``, ``report.png`` (training curves of every stage + a bar chart of the
rows with their intervals and chance) and every checkpoint under the output directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from monet.train.config import SFTConfig

#: Evaluated rows in report order: name -> (title, what it is).
ROWS: dict[str, tuple[str, str]] = {
    "direct": ("(a) direct answer", "control trained on question -> \\boxed{} only"),
    "text": ("(b) text-only reasoning", "control trained on the reasoning text without helper images/latents"),
    "stage3": ("(c) Monet stage 3", "latent reasoning, no helper image"),
    "oracle": ("(d) oracle: stage 1 + true helpers", "stage-1 model, reference helper image inserted when it asks for one"),
    "stage3-zeros": ("(e) stage 3, latents zeroed", "stage-3 model, every latent replaced by zeros"),
    "stage3-other": ("(e) stage 3, other's latents", "stage-3 model, latents of another held-out sample"),
    "vlpo": ("(f) stage 3 + VLPO", "stage-3 model after the short VLPO phase on the training questions"),
}
#: Thresholds of the demo's goals (measured, reported; nothing depends on them).
GOAL_MARGIN = 0.10
GOAL_MAX_COSINE = 0.5
TASKS = ("zoom", "multihop", "keys")
#: Default answer budget per task: the reference stage-3 answers take ~90 (zoom), ~130 (multihop,
#: two spans) and ~75 (keys, two spans) tokens with K = 4; a budget below that truncates every
#: answer before its \boxed{}.
ANSWER_TOKENS = {"zoom": 128, "multihop": 192, "keys": 112}


@dataclass
class QuickstartSettings:
    preset: str = "tiny"
    seed: int = 0
    # The defaults were measured end to end (docs/demo.md): 412 s for the quickstart on 2 cores.
    n_train: int = 2000
    n_eval: int = 500
    # validation split (disjoint scenes): settings are tuned on it with eval_split="val", so the
    # held-out split is touched once per run
    n_val: int = 500
    eval_split: str = "eval"
    latent_size: int = 4
    micro_batch_size: int = 16
    grad_accum: int = 1
    # 5e-4: at 2e-3 the tiny model does not learn to read even one large coloured square (docs/demo.md)
    lr: float = 5e-4
    # stage 1, stage 2, stage 3; the controls train with the stage-3 budget
    epochs: tuple[float, float, float] = (5.0, 3.0, 3.0)
    # Stage 0, a vision warm-up shared by every row: CE on region-by-region captions of the
    # training scenes (what a pretrained VLM brings; the tiny model's vision tower is random).
    # 0 (default) skips it and stage 1 starts from the random model: at the demo's budget the
    # captioner learns no region's content (docs/demo.md), so it only costs time.
    caption_epochs: float = 0.0
    max_steps: int | None = None
    # answer budget of the evaluation and the VLPO rollouts; None: the task's (ANSWER_TOKENS)
    max_new_tokens: int | None = None
    eval_batch_size: int = 64
    # The paper freezes a *pretrained* vision tower; the tiny model's tower is random, so by
    # default the quickstart trains it too (set True to follow the paper exactly).
    freeze_vision: bool = False
    # CE targets (monet.data.stage_layout label rules); "research" reproduces the original code
    labels: str = "decodable"
    # "keys" (monet.data.synth_keys: follow two dots between colour-keyed tiles; every lookup is by
    # content, which the tiny model learns), "zoom" (monet.data.synth: one small shape in a named
    # corner) or "multihop" (monet.data.synth_multihop: find a small arrow, follow it two cells)
    task: str = "keys"
    # keys task only: what the observations state (monet.data.synth_keys.OBSERVE)
    keys_observe: str = "none"
    # A short VLPO phase after stage 3 (monet.rl, HF rollouts on CPU) on the training split's
    # questions; 0 skips it. Its row (f) is evaluated like the others.
    vlpo_steps: int = 8
    vlpo_lr: float = 1e-5
    vlpo_n: int = 4  # rollouts per prompt (GRPO group size)
    vlpo_prompts: int = 8  # prompts per rollout round
    vlpo_latent_noise: float = 0.5  # exploration noise of the latents (VLPOConfig.latent_noise)
    # validation samples of the latent-route probes (report["latent_route"]; 0 skips them)
    route_samples: int = 128

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"quickstart task must be one of {TASKS}, got {self.task!r}")
        if self.eval_split not in ("eval", "val"):
            raise ValueError(f"eval_split must be 'eval' (held-out) or 'val' (tuning), got {self.eval_split!r}")
        if self.eval_split == "val" and self.n_val < 1:
            raise ValueError("eval_split='val' needs n_val >= 1")
        if not (self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.max_new_tokens is None:
            self.max_new_tokens = ANSWER_TOKENS[self.task]
        from monet.data.synth_keys import OBSERVE

        if self.keys_observe not in OBSERVE:
            raise ValueError(f"keys_observe must be one of {OBSERVE}, got {self.keys_observe!r}")
        if self.route_samples < 0:
            raise ValueError(f"route_samples must be >= 0, got {self.route_samples!r}")
        if self.caption_epochs < 0:
            raise ValueError(f"caption_epochs must be >= 0, got {self.caption_epochs!r}")
        if self.vlpo_steps < 0 or self.vlpo_n < 2 or self.vlpo_prompts < 1 or not self.vlpo_lr > 0:
            raise ValueError("vlpo_steps must be >= 0, vlpo_n >= 2 (a GRPO group needs two rollouts), vlpo_prompts >= 1 "
                             f"and vlpo_lr > 0; got {self.vlpo_steps}, {self.vlpo_n}, {self.vlpo_prompts}, {self.vlpo_lr}")

    @classmethod
    def default(cls, *, fast: bool = False, preset: str = "tiny", seed: int = 0) -> "QuickstartSettings":
        """The ``make demo`` settings, or with ``fast`` the CI smoke run (a few steps of every phase,
        stage 0 and VLPO included, 8 held-out samples)."""
        if fast:
            return cls(preset=preset, seed=seed, n_train=24, n_eval=8, n_val=4, max_steps=3, max_new_tokens=24,
                       eval_batch_size=8, vlpo_steps=2, vlpo_n=2, vlpo_prompts=2, caption_epochs=1.0,
                       route_samples=4)
        return cls(preset=preset, seed=seed)


def _stage_config(s: QuickstartSettings, out: Path, stage: int, model: Path, train_json: Path, root: Path,
                  name: str, epochs: float, **kw) -> SFTConfig:
    return SFTConfig(stage=stage, model=str(model), data=[str(train_json)], image_root=str(root),
                     output_dir=str(out / name), latent_size=s.latent_size, lr=s.lr, warmup_steps=10,
                     epochs=epochs, max_steps=s.max_steps, micro_batch_size=s.micro_batch_size,
                     grad_accum=s.grad_accum, dtype="float32", gradient_checkpointing=False, seed=s.seed,
                     log_every=20, keep_last=1, cache_dir=str(out / "cache" / name), freeze_vision=s.freeze_vision,
                     labels=s.labels, **kw)


def run_quickstart(out_dir: str | Path, settings: QuickstartSettings | None = None, *, progress: bool = True,
                   printer=print) -> dict:
    import torch

    from monet.data.controls import write_control
    from monet.data.synth import check_output_dir, synthesize_dataset
    from monet.train.pipeline import run_precompute, run_sft
    from monet.testing import build_tiny_checkpoint

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

    if s.task == "multihop":
        from monet.data.synth_multihop import synthesize_multihop as synthesize
    elif s.task == "keys":
        from functools import partial

        from monet.data.synth_keys import synthesize_keys

        synthesize = partial(synthesize_keys, observe=s.keys_observe)
    else:
        synthesize = synthesize_dataset
    data = timed(f"synthetic data ({s.task})",
                 lambda: synthesize(out / "data", s.n_train, s.n_eval, s.seed, n_val=s.n_val,
                                    captions=s.caption_epochs > 0))
    eval_json = data.val_json if s.eval_split == "val" else data.eval_json
    base = timed("base model", lambda: build_tiny_checkpoint(out / "base", preset=s.preset, seed=s.seed, cache=True))

    def sft(name, title, cfg):
        return Path(timed(title, lambda: run_sft(cfg, overwrite=True, progress=progress))["checkpoint"])

    checkpoints = {}
    if s.caption_epochs > 0:
        c0 = _stage_config(s, out, 1, base, data.captions_json, data.root, "stage0", s.caption_epochs,
                           teacher="none")
        base = checkpoints["stage0"] = sft("stage0", "stage 0 (vision warm-up: captions of the training scenes)", c0)
    c1 = _stage_config(s, out, 1, base, data.train_json, data.root, "stage1", s.epochs[0], teacher="none")
    ck1 = sft("stage1", "stage 1 (warm-up, helper images as images)", c1)
    reps = out / "teacher_reps"
    timed("teacher reps (stage-1 model, observation positions)",
          lambda: run_precompute(replace(c1, model=str(ck1)), "teacher-reps", reps, dtype="float32", progress=progress))
    c2 = _stage_config(s, out, 2, ck1, data.train_json, data.root, "stage2", s.epochs[1], teacher="store",
                       teacher_store=str(reps))
    ck2 = sft("stage2", "stage 2 (latents see the helper image; alignment via latents)", c2)
    lats = out / "teacher_latents"
    timed("teacher latents (stage-2 model, latent positions)",
          lambda: run_precompute(replace(c2, model=str(ck2)), "teacher-latents", lats, dtype="float32",
                                 progress=progress))
    c3 = _stage_config(s, out, 3, ck1, data.train_json, data.root, "stage3", s.epochs[2], teacher="store",
                       teacher_store=str(lats))
    ck3 = sft("stage3", "stage 3 (no helper images; latent distillation)", c3)
    checkpoints.update({"stage1": ck1, "stage2": ck2, "stage3": ck3})
    # Controls: same samples, same init (stage-1 weights), same epochs and CE weighting as stage 3
    # (observation tokens weighted like stage 3's, not stage 1's), CE only.
    for kind, title in (("direct", "control (a): direct answer"), ("text", "control (b): text-only reasoning")):
        train = write_control(data.train_json, data.root / f"train_{kind}.json", kind)
        cfg = _stage_config(s, out, 1, ck1, train, data.root, f"control_{kind}", s.epochs[2], teacher="none",
                            ce_emphasize_factor=c3.ce_factor)
        checkpoints[kind] = sft(f"control_{kind}", title, cfg)
    vlpo_rows = None
    if s.vlpo_steps:
        checkpoints["vlpo"], vlpo_rows = timed("VLPO (stage 3 -> RL on the training questions)",
                                               lambda: run_vlpo_phase(out, s, data, ck3, progress))

    rows = evaluate_rows(out, s, eval_json, checkpoints, timed, progress)
    route = (timed("latent route probes (validation split, teacher-forced)",
                   lambda: latent_route(s, data.val_json, data.root, checkpoints))
             if s.n_val and s.route_samples else None)
    report = {
        "settings": asdict(s),
        "data": {"task": s.task, "train": str(data.train_json), "eval": str(data.eval_json), "n_train": s.n_train,
                 "n_eval": s.n_eval, "n_val": s.n_val, "evaluated_split": s.eval_split,
                 "evaluated": str(eval_json)},
        "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "rows": rows,
        "goals": goals(rows),
        "latent_route": route,
        "curves": training_curves(out, [k for k in checkpoints if k != "vlpo"]),
        "vlpo": vlpo_summary(rows, vlpo_rows),
        "timings_s": timings,
    }
    from monet.quickstart_figure import write_figure

    report["figure"] = str(write_figure(report, out / "report.png"))
    report["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    printer("\n" + format_report(report))
    printer(f"\nreport: {out / 'report.json'}  figure: {out / 'report.png'}")
    return report


def vlpo_config(out: Path, s: QuickstartSettings, rl_data: Path, model: Path):
    """The quickstart's VLPO run: HF rollouts on CPU, the stage-3 model's K, greedy-length answers,
    every group kept (a tiny model's groups are often all-wrong or all-right, which the difficulty
    filter would drop and stall the phase), exploration noise on the latents."""
    from monet.rl.config import VLPOConfig
    from monet.rl.run_config import VLPORunConfig

    return VLPORunConfig(
        model=str(model), data=[str(rl_data)], output_dir=str(out / "vlpo"), engine="hf", steps=s.vlpo_steps,
        prompts_per_rollout=s.vlpo_prompts, max_rounds_per_step=1, difficulty_filter=False, top_p=1.0,
        max_response_tokens=s.max_new_tokens, latent_size=s.latent_size, micro_batch_size=8, lr=s.vlpo_lr,
        dtype="float32", device="cpu", freeze_vision=True, seed=s.seed, keep_last=1,
        vlpo=VLPOConfig(n=s.vlpo_n, temperature=1.0, latent_noise=s.vlpo_latent_noise, sigma=1.0,
                        groups_per_batch=s.vlpo_prompts, buffer_groups=2 * s.vlpo_prompts))


def run_vlpo_phase(out: Path, s: QuickstartSettings, data, ck3: Path, progress: bool) -> tuple[Path, list[dict]]:
    """RL prompts from the training split (never a val/eval scene), ``vlpo_steps`` VLPO steps from
    the stage-3 model, the policy exported as a plain checkpoint. Returns ``(policy dir, metrics rows)``."""
    import shutil

    from monet.rl.checkpoint import export_policy, latest_checkpoint
    from monet.rl.data import rl_split_from_sft
    from monet.rl.trainer import run_vlpo

    rl = rl_split_from_sft(data.train_json, out / "data" / "rl.parquet", image_root=data.root)
    cfg = vlpo_config(out, s, rl, ck3)
    if Path(cfg.output_dir).exists():  # the quickstart owns its output folder (check_output_dir ran)
        shutil.rmtree(cfg.output_dir)
    rows = run_vlpo(cfg, printer=print if progress else (lambda *_: None))
    policy = out / "vlpo_policy"
    if policy.exists():
        shutil.rmtree(policy)
    return export_policy(latest_checkpoint(cfg.output_dir), policy), rows


def vlpo_summary(rows: list[dict], vlpo_rows: list[dict] | None) -> dict | None:
    """Before/after of the VLPO phase: held-out accuracy and latent-span rate of stage 3 and of the
    VLPO policy (rows ``stage3`` / ``vlpo``) and the per-step rollout metrics."""
    if vlpo_rows is None:
        return None
    by = {r["name"]: r for r in rows}
    keep = ("reward/mean", "rollout/accuracy", "rollout/latent_span_rate", "text/kl", "latent/kl", "latent/share")
    return {
        "steps": len(vlpo_rows),
        "before": {k: by["stage3"][k] for k in ("accuracy", "ci95", "latent_span_rate")},
        "after": {k: by["vlpo"][k] for k in ("accuracy", "ci95", "latent_span_rate")},
        "per_step": [{k: r.get(k) for k in ("step", *keep) if k in r} for r in vlpo_rows],
    }


def chance_of(reference: str | None, task: str = "zoom") -> int:
    """Number of equally likely options of a synthetic answer: for ``zoom``/``multihop`` the asked
    attribute's values (6 colours or 3 shapes); for ``keys`` 3 (see :data:`monet.data.synth_keys.CHANCE`:
    without following both dots, the answer is one of three tiles' colours, each with probability 1/3)."""
    from monet.data.synth import COLOURS, SHAPES

    if task == "keys":
        from monet.data.synth_keys import CHANCE

        if reference not in COLOURS:
            raise ValueError(f"reference answer {reference!r} is not a colour of the keys task")
        return round(1 / CHANCE)
    if reference in COLOURS:
        return len(COLOURS)
    if reference in SHAPES:
        return len(SHAPES)
    raise ValueError(f"reference answer {reference!r} is neither a colour nor a shape of the synthetic task")


def evaluate_rows(out: Path, s: QuickstartSettings, eval_json: Path, checkpoints: dict[str, Path], timed,
                  progress: bool) -> list[dict]:
    """Evaluate every row of :data:`ROWS` on ``eval_json`` with its own checkpoint (one model in
    memory at a time); returns the report rows."""
    from monet.eval import diagnostics as diag
    from monet.eval.ablations import partner_latents
    from monet.eval.checkpoint_hash import checkpoint_hash
    from monet.eval.evaluate import evaluate_sft_file
    from monet.model.loading import load_model

    plan = {"direct": ("direct", False, None), "text": ("text", False, None), "stage3": ("stage3", False, None),
            "oracle": ("stage1", True, None), "stage3-zeros": ("stage3", False, "zeros"),
            "stage3-other": ("stage3", False, "other"), "vlpo": ("vlpo", False, None)}
    plan = {k: v for k, v in plan.items() if v[0] in checkpoints}
    reports, rows, loaded = {}, [], {}
    for name, (ck_name, helpers, ablation) in plan.items():
        ck = checkpoints[ck_name]
        if ck_name not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[ck_name] = load_model(ck, latent_size=s.latent_size)
        model, processor = loaded[ck_name]
        partners = None
        if ablation == "other":
            base = reports["stage3"]
            keys = [r["key"] for r in base.samples]
            partners = {k: v for k, (_, v) in partner_latents(keys, base.latents, s.seed).items()}

        def ev(model=model, processor=processor, helpers=helpers, ablation=ablation, partners=partners):
            return evaluate_sft_file(model, processor, eval_json, max_new_tokens=s.max_new_tokens,
                                     batch_size=s.eval_batch_size, progress=progress, helper_images=helpers,
                                     ablation=ablation, partner_latents=partners, seed=s.seed)

        rep = timed(f"evaluate {name} ({ck_name} model)", ev)
        reports[name] = rep
        samples = rep.samples
        n = len(samples)
        correct = sum(r["correct"] for r in samples)
        lo, hi = diag.wilson_interval(correct, n) if n else (0.0, 0.0)
        lat = [rep.latents[r["key"]] for r in samples if r["key"] in rep.latents]
        nonzero = [x for x in lat if bool((x.norm(dim=1) > 0).all())]
        rate = diag.latent_span_rate([r["latent_spans"] for r in samples]) if n else None
        row = {
            "name": name, "title": ROWS[name][0], "what": ROWS[name][1],
            "checkpoint": str(ck), "checkpoint_sha256": checkpoint_hash(ck)["sha256"],
            "helper_images": helpers, "ablation": ablation,
            "n": n, "correct": correct, "accuracy": correct / n if n else None, "ci95": [lo, hi],
            "chance": diag.chance_level([chance_of(r["reference"], s.task) for r in samples]) if n else None,
            "answered": rep.answered, "degenerate": sum(r["verdict"] == "degenerate" for r in samples) / max(n, 1),
            "latent_span_rate": rate.share_with_span if rate else None,
            "latent_spans_per_answer": rate.spans_per_answer if rate else None,
            "mean_helper_images": rep.mean_helper_images,
            "latent_cosine_across": diag.cosine_across_answers(nonzero) if len(nonzero) >= 2 else None,
            "latent_effective_rank": diag.effective_rank(lat) if lat else None,
            "answers_changed_vs_stage3": None,
            "examples": [{k: r[k] for k in ("key", "reference", "prediction", "correct", "output")}
                         for r in samples[:3]],
        }
        if ablation is not None:
            base = {r["key"]: r["prediction"] for r in reports["stage3"].samples}
            row["answers_changed_vs_stage3"] = diag.answer_changed_share(
                base, {r["key"]: r["prediction"] for r in samples})[0]
        rows.append(row)
    return rows


def latent_route(s: QuickstartSettings, val_json: Path, root: Path, checkpoints: dict[str, Path]) -> dict:
    """Where the latent route breaks (:mod:`monet.eval.latent_route`), on the first
    ``route_samples`` *validation* samples: teacher-forced answer accuracy of stage 1 in its layout
    (helper images in view) and of stage 2 and 3 in theirs (stage 2: the text after a span sees
    the helper image only through the latents; stage 3: no helper image), and how far the stage-2
    latent positions move when the last helper image is replaced by noise."""
    from monet.data import load_sft_dataset
    from monet.eval.latent_route import helper_sensitivity, teacher_forced_accuracy
    from monet.model.loading import load_model

    samples, _ = load_sft_dataset(val_json, root)
    samples = samples[: s.route_samples]
    out: dict = {"split": "val", "n": len(samples)}
    for stage in (1, 2, 3):
        model, proc = load_model(checkpoints[f"stage{stage}"], dtype="float32", latent_size=s.latent_size)
        model.eval()
        out[f"stage{stage}"] = teacher_forced_accuracy(model, proc, samples, stage, s.latent_size).as_dict()
        if stage in (1, 2):
            out[f"stage{stage}"]["sensitivity"] = helper_sensitivity(
                model, proc, samples[: min(16, len(samples))], stage, s.latent_size, seed=s.seed).as_dict()
    return out


def goals(rows: list[dict]) -> dict:
    """The demo's three goals, measured on ``rows`` (None when a needed row has no samples)."""
    by = {r["name"]: r for r in rows}
    st3 = by["stage3"]
    better = max((by["direct"], by["text"]), key=lambda r: r["accuracy"] or 0.0)
    out: dict = {}
    if st3["accuracy"] is None:
        return {"note": "no held-out samples"}
    margin = st3["accuracy"] - better["accuracy"]
    out["stage3_vs_best_control"] = {
        "best_control": better["name"], "margin": margin,
        "intervals_disjoint": st3["ci95"][0] > better["ci95"][1],
        "met": margin >= GOAL_MARGIN and st3["ci95"][0] > better["ci95"][1]}
    cost = st3["accuracy"] - by["stage3-zeros"]["accuracy"]
    out["zeroing_cost"] = {"cost": cost, "met": cost >= GOAL_MARGIN}
    cos = st3["latent_cosine_across"]
    out["latent_cosine"] = {"value": cos, "met": cos is not None and cos < GOAL_MAX_COSINE}
    return out


def training_curves(out: Path, names: list[str]) -> dict[str, list[list[float]]]:
    """Run name -> [[step, loss], ...] read from each run's ``metrics.jsonl`` (rows without a
    finite ``loss`` skipped)."""
    curves = {}
    for name in names:
        path = out / ("control_" + name if name in ("direct", "text") else name) / "metrics.jsonl"
        pts = []
        if path.is_file():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if isinstance(row.get("loss"), (int, float)) and isinstance(row.get("step"), int):
                    pts.append([row["step"], float(row["loss"])])
        curves[name] = pts
    return curves


def format_report(report: dict) -> str:
    """The console table: one line per row, then the goals."""
    def pct(x):
        return "-" if x is None else f"{100 * x:5.1f}%"

    def num(x, f="{:.3f}"):
        return "-" if x is None else f.format(x)

    rows = report["rows"]
    n = rows[0]["n"] if rows else 0
    split = "validation" if report.get("data", {}).get("evaluated_split") == "val" else "held-out"
    head = (f"{split + ' (' + str(n) + ' samples)':<34}{'acc':>7}{'95% Wilson':>16}{'chance':>8}"
            f"{'boxed':>8}{'span':>8}{'cos':>7}{'eff.rk':>8}{'changed':>9}")
    lines = [head]
    for r in rows:
        ci = f"[{100 * r['ci95'][0]:4.1f},{100 * r['ci95'][1]:5.1f}]"
        lines.append(f"{r['title']:<34}{pct(r['accuracy']):>7}{ci:>16}{pct(r['chance']):>8}{pct(r['answered']):>8}"
                     f"{pct(r['latent_span_rate']):>8}{num(r['latent_cosine_across']):>7}"
                     f"{num(r['latent_effective_rank'], '{:.2f}'):>8}{pct(r['answers_changed_vs_stage3']):>9}")
    g = report.get("goals", {})
    if "stage3_vs_best_control" in g:
        a, z, c = g["stage3_vs_best_control"], g["zeroing_cost"], g["latent_cosine"]
        lines.append(f"goal: stage 3 - best control ({a['best_control']}) = {100 * a['margin']:+.1f} points "
                     f"(>= +10, disjoint intervals): {'met' if a['met'] else 'NOT met'}")
        lines.append(f"goal: zeroing the latents costs {100 * z['cost']:+.1f} points (>= 10): "
                     f"{'met' if z['met'] else 'NOT met'}")
        lines.append(f"goal: mean pairwise latent cosine {num(c['value'])} (< 0.5): {'met' if c['met'] else 'NOT met'}")
    lr = report.get("latent_route")
    if lr:
        acc = "  ".join(f"stage {k}: {pct(lr[f'stage{k}']['answer_accuracy'])}" for k in (1, 2, 3))
        s1, s2 = lr["stage1"]["sensitivity"], lr["stage2"]["sensitivity"]
        lines.append(f"latent route ({lr['n']} validation samples, teacher-forced answer in each stage's layout): {acc}")
        lines.append(f"  helper image -> noise moves: its tokens {s2['image_tokens']:.2f}, stage-2 latent positions "
                     f"{s2['latents']:.3f}, stage-2 text after them {s2['text_after']:.4f} (stage 1: "
                     f"{s1['text_after']:.4f})")
    v = report.get("vlpo")
    if v:
        b, a = v["before"], v["after"]
        lines.append(f"VLPO ({v['steps']} steps): accuracy {pct(b['accuracy'])} -> {pct(a['accuracy'])}, latent-span "
                     f"rate {pct(b['latent_span_rate'])} -> {pct(a['latent_span_rate'])}")
    lines.append("(span: answers with a latent span; cos / eff.rk: latent collapse across answers; changed: share "
                 "of final answers an ablation changed vs stage 3)")
    if "total_s" in report:
        lines.append(f"{'total time':<34}{report['total_s']:>7.0f}s")
    return "\n".join(lines)
