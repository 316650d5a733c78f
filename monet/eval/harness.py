"""``monet eval``: evaluate a checkpoint on benchmarks, with latent diagnostics and ablations.

One call of :func:`run_eval` does, for every latent size K of the sweep (``EvalSettings.latent_sizes``;
default the model's own):

1. **Baseline run** per benchmark: batched generation with ``return_latents=True`` on the chosen
   engine (vLLM or HF, :mod:`monet.eval.engine`), scoring with :class:`monet.scoring.Scorer`
   (rules, then the optional judge), one :class:`~monet.eval.report.SampleRecord` per sample
   appended to ``<out>/K<k>/<benchmark>/records.jsonl`` as soon as its batch is scored, the
   latent vectors to ``latents/`` next to it (:mod:`monet.eval.latent_store`). Records hold the
   rendered text (spans shown as ``<abs_vis_token><latent></abs_vis_token>``), verdict, decided_by,
   the span count and the latent norms.
2. **Ablation runs** (``EvalSettings.ablations``; :mod:`monet.eval.ablations`): the same samples
   again with every latent replaced, each in ``<out>/K<k>/<benchmark>/ablation-<name>/``; the
   records hold the ablated latents (what the model was fed).
3. **Reports**: per K ``<out>/K<k>/report.json`` + ``report.csv`` (per benchmark and category,
   :mod:`monet.eval.report`) with the latent diagnostics (:mod:`monet.eval.diagnostics`) and
   the ablation rows; across K ``<out>/report.json`` / ``report.csv`` / ``ablations.csv``, plots
   in ``<out>/plots/`` and a self-contained ``<out>/report.html`` (:mod:`monet.eval.html_report`)
   with per-sample answers and "where the latent looks" heatmaps (:mod:`monet.eval.heatmap`;
   needs the HF model, loaded after a vLLM engine is shut down).

**Resume.** Every records file is append-only; a rerun with the same ``--out`` skips the sample
ids already recorded and continues. Each run folder keeps the generation settings it was started
with (``run.json``); resuming with different ones (K, layout, prompt, sampling, checkpoint, ...)
is refused instead of mixing two configurations in one file. With greedy decoding (the default) a
resumed run gives the same records as an uninterrupted one; noise ablations draw per-sample seeds,
independent of batching.

The checkpoint is identified by the sha256 of its weight files (:mod:`monet.eval.checkpoint_hash`,
cached in ``<out>/checkpoint_hash.json``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from monet.atomic import atomic_write_json
from monet.eval import diagnostics as diag
from monet.eval.ablations import (AblationRow, build_ablation, compare_runs, latent_usage_verdict, parse_ablations,
                                  partner_latents)
from monet.eval.bench import BENCHMARKS, EvalSample, LoadedBenchmark, load_benchmark
from monet.eval.checkpoint_hash import checkpoint_hash
from monet.eval.latent_store import LatentStore
from monet.eval.prompts import PromptConfig, build_messages
from monet.eval.report import (ALL, AccuracyRow, RecordWriter, SampleRecord, print_report, read_records,
                               scrub_secrets, summarize, write_report)
from monet.layout import SpanLayout
from monet.model.sampling import SamplingParams
from monet.scoring import JudgeConfig, ScoreItem, Scorer, ScorerConfig

log = logging.getLogger(__name__)

#: Benchmark names that read the synthetic split written by ``monet data synth``.
SYNTH_NAMES = ("synth", "Synth_Zoom")
#: Vectors used for the effective rank and the cosine histograms (a deterministic subsample beyond).
MAX_DIAGNOSTIC_VECTORS = 4096


class RunMismatchError(ValueError):
    """An output folder holds a run started with different generation settings."""


@dataclass(frozen=True)
class EvalSettings:
    """Everything ``monet eval`` needs (the CLI flags one to one).

    ``data``: one path for every benchmark (a VLMEvalKit data folder, a ``.tsv``, a Monet-SFT
    ``.json``, or the folder ``monet data synth`` wrote), or ``NAME=PATH`` entries per benchmark.
    ``latent_sizes``: the K sweep (empty = the model's default K). ``judge_config``: a YAML file
    with :class:`~monet.scoring.JudgeConfig` fields (optional). ``heatmap_samples``: samples of
    the first benchmark drawn as latent heatmaps in the HTML report; ``html_samples``: samples per
    benchmark listed there.
    """

    model: str
    benchmarks: tuple[str, ...]
    data: tuple[str, ...]
    out: str
    engine: str = "auto"
    latent_sizes: tuple[int, ...] = ()
    layout: str | None = None
    force_latent: bool = False
    system_prompt: str | None = None
    instruction: str | None = None
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    ablations: tuple[str, ...] = ()
    judge_config: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    image_root: str | None = None
    heatmap_samples: int = 3
    html_samples: int = 20
    progress: bool = True

    def __post_init__(self):
        if not self.benchmarks:
            raise ValueError("eval: at least one benchmark is required (--bench)")
        if not self.data:
            raise ValueError("eval: --data is required")
        if self.batch_size < 1:
            raise ValueError(f"eval: batch size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"eval: --limit must be >= 1, got {self.limit}")
        if any(k < 1 for k in self.latent_sizes):
            raise ValueError(f"eval: latent sizes must be >= 1, got {list(self.latent_sizes)}")
        if len(set(self.latent_sizes)) != len(self.latent_sizes):
            raise ValueError(f"eval: latent size listed twice in {list(self.latent_sizes)}")
        if self.layout is not None and self.layout not in ("standard", "monet-v1"):
            raise ValueError(f"eval: layout must be standard or monet-v1, got {self.layout!r}")
        parse_ablations(self.ablations)
        self.sampling()  # validates the sampling fields

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed if self.temperature > 0 else None)

    def prompt_config(self) -> PromptConfig:
        return PromptConfig(instruction=self.instruction, system_prompt=self.system_prompt)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- data


def data_sources(settings: EvalSettings) -> dict[str, Path]:
    """Benchmark -> the path its samples are read from (see :class:`EvalSettings`)."""
    named = [d for d in settings.data if "=" in d and not Path(d).exists()]
    plain = [d for d in settings.data if d not in named]
    if plain and named or len(plain) > 1:
        raise ValueError("--data: give one path for all benchmarks, or NAME=PATH for each benchmark")
    if plain:
        return {b: Path(plain[0]) for b in settings.benchmarks}
    by_name = dict(d.split("=", 1) for d in named)
    missing = [b for b in settings.benchmarks if b not in by_name]
    if missing:
        raise ValueError(f"--data: no path for benchmark(s) {missing} (given: {sorted(by_name)})")
    return {b: Path(by_name[b]) for b in settings.benchmarks}


def load_samples(name: str, path: Path, *, limit: int | None = None, image_root: str | None = None) -> LoadedBenchmark:
    """The samples of benchmark ``name`` from ``path``: a synthetic-split folder (its ``eval.json``)
    for ``synth``, else anything :func:`monet.eval.bench.load_benchmark` reads."""
    if not path.exists():
        raise FileNotFoundError(f"benchmark {name}: data path not found: {path}")
    if path.is_dir() and (name in SYNTH_NAMES or name not in BENCHMARKS):
        if not (path / "eval.json").is_file():
            raise FileNotFoundError(f"benchmark {name}: {path} has no eval.json (write one with `monet data synth`, "
                                    "or give a Monet-SFT .json file)")
        path = path / "eval.json"
    return load_benchmark(name, path, limit=limit, image_root=image_root)


def load_judge_config(path: str | os.PathLike, default_cache: Path | None = None) -> JudgeConfig:
    """A :class:`JudgeConfig` from a YAML mapping (top level or under ``judge:``); unknown keys are
    an error naming them. ``cache_path`` defaults to ``default_cache``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"judge config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({e})") from None
    if isinstance(data, dict) and set(data) == {"judge"}:
        data = data["judge"]
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of judge settings, got {type(data).__name__}")
    known = {f.name for f in fields(JudgeConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{p}: unknown judge setting(s) {unknown}; known: {sorted(known)}")
    if default_cache is not None and not data.get("cache_path"):
        data["cache_path"] = str(default_cache)
    try:
        return JudgeConfig(**data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: {e}") from None


# ----------------------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """One records file: ``records`` in sample order (only the current samples) and its latents."""

    name: str
    directory: Path
    records: list[SampleRecord]
    latents: dict[str, torch.Tensor] = field(default_factory=dict)


def _fingerprint(settings: EvalSettings, span: SpanLayout, engine: str, checkpoint: str, ablation: str | None) -> dict:
    return {"checkpoint_sha256": checkpoint, "engine": engine, "latent_size": span.latent_size, "layout": span.kind,
            "force_latent": settings.force_latent, "system_prompt": settings.system_prompt,
            "instruction": settings.instruction, "max_new_tokens": settings.max_new_tokens,
            "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
            "seed": settings.seed, "ablation": ablation, "dtype": settings.dtype}


def _check_run_dir(run_dir: Path, fingerprint: dict) -> None:
    path = run_dir / "run.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text()).get("fingerprint", {})
        except json.JSONDecodeError:
            raise RunMismatchError(f"{path}: unreadable; remove it or use a new --out") from None
        diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
            raise RunMismatchError(f"{run_dir} holds a run with other settings ({what}); resume with the same "
                                   "settings or use a new --out")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"fingerprint": fingerprint}, indent=1)


def _chunks(xs: Sequence, n: int):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


def run_samples(engine: Any, samples: Sequence[EvalSample], run_dir: Path, *, name: str, span: SpanLayout,
                settings: EvalSettings, scorer: Scorer, fingerprint: dict, ablation: str | None = None,
                partners: dict[str, tuple[str, torch.Tensor]] | None = None, hidden_size: int | None = None,
                on_record: Callable[[str, SampleRecord], None] | None = None) -> RunResult:
    """Generate, score and record every sample of ``samples`` not yet in ``run_dir``'s records.

    ``ablation`` (a name of :data:`monet.eval.ablations.ABLATIONS`) replaces the latents;
    ``partners`` (sample id -> (partner id, partner latents)) is needed for ``other``.
    ``on_record(name, record)`` is called after each record is written."""
    from tqdm.auto import tqdm

    _check_run_dir(run_dir, fingerprint)
    store = LatentStore(run_dir / "latents")
    sampling, prompt_cfg = settings.sampling(), settings.prompt_config()
    with RecordWriter(run_dir / "records.jsonl") as writer:
        done = writer.done_ids()
        todo = [s for s in samples if s.sample_id not in done]
        bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=name, unit="sample",
                   disable=not settings.progress, dynamic_ncols=True)
        try:
            for batch in _chunks(todo, settings.batch_size):
                reqs = [{"messages": build_messages(s, prompt_cfg), "force_latent": settings.force_latent}
                        for s in batch]
                abl = None
                if ablation is not None:
                    abl = [build_ablation(ablation, s.sample_id, settings.seed,
                                          partners[s.sample_id][1] if partners else None, hidden_size) for s in batch]
                outs = engine.generate(reqs, sampling, layout=span, return_latents=True, ablations=abl)
                if len(outs) != len(batch):
                    raise RuntimeError(f"{name}: the engine returned {len(outs)} results for {len(batch)} requests")
                results = scorer.score_many([ScoreItem(o.text, s.answer, s.options or None, s.question)
                                             for s, o in zip(batch, outs)])
                part = store.write_part({s.sample_id: o.latents for s, o in zip(batch, outs)})
                for s, o, r in zip(batch, outs, results):
                    lat = o.latents if o.latents is not None else torch.zeros(0)
                    extra = {"latent_spans": o.num_latent_spans, "num_latents": len(o.latent_positions),
                             "latent_norms": [round(float(x), 5) for x in lat.norm(dim=-1)] if lat.numel() else [],
                             "latents_part": part if lat.numel() else None, "finish_reason": o.finish_reason,
                             "num_tokens": len(o.token_ids), "ablation": ablation}
                    if ablation == "other" and partners:
                        extra["partner"] = partners[s.sample_id][0]
                    if r.extra:
                        extra["score"] = r.extra
                    rec = SampleRecord(sample_id=s.sample_id, benchmark=s.benchmark, category=s.category,
                                       answer=s.answer, prediction=r.extracted, text=o.rendered,
                                       verdict=r.verdict.value, decided_by=r.decided_by, detail=r.detail,
                                       num_options=s.num_options, extra=extra)
                    writer.write(rec)
                    bar.update(1)
                    if on_record is not None:
                        on_record(name, rec)
        finally:
            bar.close()
    return load_run(run_dir, samples, name)


def load_run(run_dir: Path, samples: Sequence[EvalSample], name: str = "") -> RunResult:
    """The records (in ``samples`` order; ids of other samples ignored) and latents of a run folder.
    A sample without a record is an error (the run is incomplete)."""
    records, _ = read_records(run_dir / "records.jsonl")
    by_id = {r.sample_id: r for r in records}
    missing = [s.sample_id for s in samples if s.sample_id not in by_id]
    if missing:
        raise ValueError(f"{run_dir}: no record for {len(missing)} sample(s), e.g. {missing[0]}; run again to resume")
    recs = [by_id[s.sample_id] for s in samples]
    latents = LatentStore(run_dir / "latents").load((r.sample_id, r.extra.get("latents_part")) for r in recs)
    return RunResult(name, run_dir, recs, latents)


# ------------------------------------------------------------------------------------- diagnostics


def _subsample(latents: list[torch.Tensor], cap: int, seed: int) -> list[torch.Tensor]:
    """Whole answers, in a fixed random order, until ``cap`` vectors (keeps within-answer pairs)."""
    if sum(x.shape[0] for x in latents if x.numel()) <= cap:
        return latents
    g = torch.Generator().manual_seed(seed)
    out, total = [], 0
    for i in torch.randperm(len(latents), generator=g).tolist():
        n = latents[i].shape[0] if latents[i].numel() else 0
        if total + n > cap:
            continue
        out.append(latents[i])
        total += n
    return out


def latent_diagnostics(records: Sequence[SampleRecord], latents: dict[str, torch.Tensor], seed: int = 0) -> dict:
    """Span rate, spans per answer, norms, mean cosine within / across answers and effective rank
    of the recorded latents (``effective_rank_vectors``: how many vectors the rank used)."""
    lat = [latents.get(r.sample_id, torch.zeros(0)) for r in records]
    lat = [x if x.numel() else torch.zeros(0) for x in lat]
    rate = diag.latent_span_rate([int(r.extra.get("latent_spans", 0)) for r in records])
    out: dict[str, Any] = {"answers": rate.n_answers, "share_with_span": rate.share_with_span,
                           "spans_per_answer": rate.spans_per_answer}
    norms = diag.latent_norms(lat)
    out["norms"] = asdict(norms) if norms is not None else None
    nonzero = [x for x in lat if x.numel() and bool((x.norm(dim=1) > 0).all())]
    out["cosine_within"] = diag.cosine_within_answers(nonzero) if nonzero else None
    out["cosine_across"] = diag.cosine_across_answers(nonzero) if nonzero else None
    sub = _subsample(lat, MAX_DIAGNOSTIC_VECTORS, seed)
    n_vec = sum(x.shape[0] for x in sub if x.numel())
    out["effective_rank"] = diag.effective_rank(sub) if n_vec else None
    out["effective_rank_vectors"] = n_vec
    return out


def cosine_values(latents: Sequence[torch.Tensor], seed: int = 0) -> dict[str, list[float]]:
    """Within- and across-answer pairwise cosines (for the histogram), on a bounded subsample."""
    sub = [x for x in _subsample([x for x in latents if x.numel()], 2000, seed) if bool((x.norm(dim=1) > 0).all())]
    if sum(x.shape[0] for x in sub) < 2:
        return {}
    return {m: diag.pairwise_cosines(sub, m, max_pairs=20000, seed=seed).tolist() for m in ("within", "across")}


# ---------------------------------------------------------------------------------------- the run


@dataclass
class KResult:
    """Everything measured at one latent size."""

    span: SpanLayout
    directory: Path
    baselines: dict[str, RunResult]
    ablation_runs: dict[str, dict[str, RunResult]]
    rows: list[AccuracyRow]
    diagnostics: dict[str, dict]
    ablation_rows: list[AblationRow]
    latent_usage: dict

    def to_dict(self) -> dict:
        return {"latent_size": self.span.latent_size, "layout": self.span.kind, "dir": str(self.directory),
                "rows": [asdict(r) for r in self.rows], "latent_diagnostics": self.diagnostics,
                "ablations": [r.to_dict() for r in self.ablation_rows], "latent_usage": self.latent_usage}


@dataclass
class EvalResult:
    out: Path
    settings: EvalSettings
    checkpoint: dict
    engine: str
    per_k: list[KResult]
    report: dict
    paths: dict[str, Path]


def resolve_spans(settings: EvalSettings, default: SpanLayout | None) -> list[SpanLayout]:
    """The span layouts of the sweep: explicit K's (and layout) over the model's defaults."""
    kind = settings.layout or (default.kind if default is not None else "standard")
    if settings.latent_sizes:
        return [SpanLayout(k, kind) for k in settings.latent_sizes]
    if default is None:
        raise ValueError("the checkpoint has no monet_config.json: give --latent-size")
    return [SpanLayout(default.latent_size, kind)]


def run_eval(settings: EvalSettings, *, engine: Any = None,
             on_record: Callable[[str, SampleRecord], None] | None = None,
             console: Any = None) -> EvalResult:
    """Run the whole evaluation (module doc); returns the results and the written paths.

    ``engine``: an already built engine adapter (:mod:`monet.eval.engine`) to use instead of
    loading one (it is not closed here). ``console``: a rich console for the tables."""
    from rich.console import Console

    import sys

    console = console or Console(**({} if sys.stdout.isatty() else {"width": 150}))  # logs: no truncated columns
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    ablation_names = parse_ablations(settings.ablations)
    ck = checkpoint_hash(settings.model, out / "checkpoint_hash.json")
    checkpoint = {k: v for k, v in ck.items() if k != "rehashed"}
    judge = load_judge_config(settings.judge_config, out / "judge_cache.sqlite") if settings.judge_config else None
    scorer = Scorer(ScorerConfig(judge=judge))
    loaded = {b: load_samples(b, p, limit=settings.limit, image_root=settings.image_root)
              for b, p in data_sources(settings).items()}
    for d in loaded.values():
        console.print(d.report.summary())
    own_engine = engine is None
    if own_engine:
        from monet.eval.engine import make_engine

        max_images = max(len(s.images) for d in loaded.values() for s in d.samples)
        engine = make_engine(settings.engine, settings.model, dtype=settings.dtype, device=settings.device,
                             max_images=max_images, max_new_tokens=settings.max_new_tokens, seed=settings.seed)
    per_k: list[KResult] = []
    try:
        spans = resolve_spans(settings, engine.default_layout)
        hidden = engine.hidden_size()
        for span in spans:
            per_k.append(_run_k(engine, span, settings, loaded, scorer, checkpoint["sha256"], ablation_names,
                                hidden, on_record))
            _print_k(console, per_k[-1])
        heat_engine = engine if getattr(engine, "name", "") == "hf" else None
        if settings.heatmap_samples > 0 and heat_engine is None:
            if own_engine:
                engine.close()
                own_engine = False
            from monet.eval.engine import HFEvalEngine

            heat_engine = HFEvalEngine(settings.model, dtype=settings.dtype, device=settings.device)
        report, paths = _write_outputs(out, settings, checkpoint, engine.name, per_k, loaded, heat_engine, judge)
    finally:
        if own_engine:
            engine.close()
        scorer.close()
    if len(per_k) > 1:
        console.print(f"[bold]latent usage[/bold]: {report['latent_usage_summary']}")
    console.print(f"report: {paths['json']}  html: {paths['html']}")
    return EvalResult(out, settings, checkpoint, engine.name, per_k, report, paths)


def _run_k(engine, span, settings, loaded, scorer, ck_sha, ablation_names, hidden, on_record) -> KResult:
    kdir = Path(settings.out) / f"K{span.latent_size}"
    baselines: dict[str, RunResult] = {}
    for bench, data in loaded.items():
        name = f"{bench} K={span.latent_size}"
        baselines[bench] = run_samples(engine, data.samples, kdir / bench, name=name, span=span, settings=settings,
                                       scorer=scorer,
                                       fingerprint=_fingerprint(settings, span, engine.name, ck_sha, None),
                                       on_record=on_record)
    ablation_runs: dict[str, dict[str, RunResult]] = {a: {} for a in ablation_names}
    ablation_rows: list[AblationRow] = []
    notes = []
    for a in ablation_names:
        for bench, data in loaded.items():
            base = baselines[bench]
            if not any(x.numel() for x in base.latents.values()):
                notes.append(f"{bench}: no latent span in the baseline run; ablation {a} skipped")
                continue
            partners = None
            if a == "other":
                if len(data.samples) < 2:
                    notes.append(f"{bench}: ablation other needs at least two samples; skipped")
                    continue
                partners = partner_latents([s.sample_id for s in data.samples], base.latents, settings.seed)
            ablation_runs[a][bench] = run_samples(
                engine, data.samples, kdir / bench / f"ablation-{a}", name=f"{bench} K={span.latent_size} {a}",
                span=span, settings=settings, scorer=scorer, ablation=a, partners=partners, hidden_size=hidden,
                fingerprint=_fingerprint(settings, span, engine.name, ck_sha, a), on_record=on_record)
        recs_b = [r for bench in ablation_runs[a] for r in baselines[bench].records]
        recs_a = [r for run in ablation_runs[a].values() for r in run.records]
        if recs_a:
            ablation_rows.extend(compare_runs(a, recs_b, recs_a))
    all_recs = [r for b in baselines.values() for r in b.records]
    all_lat = {k: v for b in baselines.values() for k, v in b.latents.items()}
    diagnostics = {bench: latent_diagnostics(b.records, b.latents, settings.seed) for bench, b in baselines.items()}
    if len(baselines) > 1:
        diagnostics[ALL] = latent_diagnostics(all_recs, all_lat, settings.seed)
    usage = latent_usage_verdict(ablation_rows) if ablation_names else {"uses_latents": None,
                                                                        "message": "no ablations were run"}
    if notes:
        usage["notes"] = notes
        if not ablation_rows:
            usage["message"] = "; ".join(notes)
    rows = summarize(all_recs)
    return KResult(span, kdir, baselines, ablation_runs, rows, diagnostics, ablation_rows, usage)


def _print_k(console, res: KResult) -> None:
    from rich.table import Table

    print_report(res.rows, console, title=f"monet eval: K={res.span.latent_size} ({res.span.kind})")
    t = Table(title=f"latent diagnostics, K={res.span.latent_size}")
    for c in ("benchmark", "with span", "spans/answer", "norm", "cos within", "cos across", "eff. rank"):
        t.add_column(c, justify="left" if c == "benchmark" else "right")

    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    for bench, d in res.diagnostics.items():
        t.add_row(bench, f(d["share_with_span"], "{:.1%}"), f(d["spans_per_answer"], "{:.2f}"),
                  f(d["norms"]["mean"] if d["norms"] else None, "{:.2f}"), f(d["cosine_within"]),
                  f(d["cosine_across"]), f(d["effective_rank"], "{:.2f}"))
    console.print(t)
    if res.ablation_rows:
        t = Table(title=f"ablations, K={res.span.latent_size} (accuracy change vs baseline, paired 95% CI)")
        for c in ("ablation", "benchmark", "n", "base", "ablated", "delta", "95% CI", "answer changed", "text changed"):
            t.add_column(c, justify="left" if c in ("ablation", "benchmark") else "right")
        for r in res.ablation_rows:
            t.add_row(r.ablation, r.benchmark, str(r.n), f"{100 * r.baseline_accuracy:.1f}",
                      f"{100 * r.ablated_accuracy:.1f}", f"{100 * r.delta:+.1f}",
                      f"{100 * r.delta_low:+.1f}..{100 * r.delta_high:+.1f}", f"{r.prediction_changed:.1%}",
                      f"{r.text_changed:.1%}")
        console.print(t)
    console.print(f"[bold]K={res.span.latent_size}: {res.latent_usage['message']}[/bold]")


def _settings_dict(settings: EvalSettings, engine: str, judge_dict: dict | None) -> dict:
    d = settings.to_dict()
    d["engine_used"] = engine
    d["sampling"] = asdict(settings.sampling())
    d["prompt"] = asdict(settings.prompt_config())
    d["judge"] = judge_dict
    return scrub_secrets(d)


def _write_outputs(out: Path, settings: EvalSettings, checkpoint: dict, engine: str, per_k: list[KResult],
                   loaded: dict[str, LoadedBenchmark], heat_engine: Any,
                   judge_config: JudgeConfig | None = None) -> tuple[dict, dict[str, Path]]:
    import csv

    from monet.eval import plots
    from monet.eval.html_report import HtmlSample, write_html_report

    sdict = _settings_dict(settings, engine, judge_config.to_dict() if judge_config is not None else None)
    load_reports = [d.report.to_dict() for d in loaded.values()]
    for res in per_k:
        write_report(res.rows, res.directory, settings={**sdict, "latent_size": res.span.latent_size,
                                                        "layout": res.span.kind},
                     extra={"checkpoint": checkpoint, "load_reports": load_reports,
                            "latent_diagnostics": res.diagnostics,
                            "ablations": [r.to_dict() for r in res.ablation_rows], "latent_usage": res.latent_usage})
    plot_dir = out / "plots"
    figures: list[tuple[str, Path]] = []
    sweep = {}
    for bench in loaded:
        pts = [(res.span.latent_size, r.accuracy, r.ci_low, r.ci_high) for res in per_k for r in res.rows
               if r.benchmark == bench and r.category == ALL]
        sweep[bench] = pts
    if len(per_k) > 1:
        figures.append(("accuracy vs latent size K", plots.plot_accuracy_vs_k(sweep, plot_dir / "accuracy_vs_k.png")))
    for res in per_k:
        k = res.span.latent_size
        pool = {r.ablation: r for r in res.ablation_rows if r.benchmark == ALL or len(loaded) == 1}
        if pool:
            deltas = {a: r.delta for a, r in pool.items()}
            errs = {a: max(r.delta - r.delta_low, r.delta_high - r.delta) for a, r in pool.items()}
            figures.append((f"ablations, K={k}: accuracy change (paired 95% CI, symmetric bar = the wider side)",
                            plots.plot_ablation_deltas(deltas, plot_dir / f"ablation_deltas_K{k}.png", errors=errs,
                                                       title=f"accuracy change under latent ablation (K={k})")))
        vals = cosine_values([x for b in res.baselines.values() for x in b.latents.values()], settings.seed)
        if vals and any(vals.values()):
            figures.append((f"latent cosine similarity, K={k}",
                            plots.plot_cosine_histogram(vals, plot_dir / f"latent_cosine_K{k}.png",
                                                        title=f"latent cosine similarity (K={k})")))
    heatmaps = _heatmaps(heat_engine, per_k[0], loaded, settings, plot_dir) if heat_engine is not None else {}
    verdicts = [f"K={res.span.latent_size}: {res.latent_usage['message']}" for res in per_k]
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": sdict, "checkpoint": checkpoint, "load_reports": load_reports,
        "runs": [res.to_dict() for res in per_k], "accuracy_vs_k": sweep,
        "latent_usage_summary": " | ".join(verdicts),
        "plots": [str(p) for _, p in figures], "heatmaps": {k: str(v) for k, v in heatmaps.items()},
    }
    jpath = out / "report.json"
    atomic_write_json(jpath, scrub_secrets(report), indent=2)
    cpath = out / "report.csv"
    names = [f.name for f in fields(AccuracyRow)]
    with open(cpath, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["latent_size", "layout", *names])
        w.writeheader()
        for res in per_k:
            for r in res.rows:
                w.writerow({"latent_size": res.span.latent_size, "layout": res.span.kind, **asdict(r)})
    apath = out / "ablations.csv"
    with open(apath, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["latent_size", *[fl.name for fl in fields(AblationRow)]])
        w.writeheader()
        for res in per_k:
            for r in res.ablation_rows:
                w.writerow({"latent_size": res.span.latent_size, **r.to_dict()})
    first = per_k[0]
    samples = []
    for bench, data in loaded.items():
        for i, (s, rec) in enumerate(zip(data.samples[:settings.html_samples], first.baselines[bench].records)):
            abl = {a: runs[bench].records[i] for a, runs in first.ablation_runs.items() if bench in runs}
            samples.append(HtmlSample(rec, question=s.question, ablated=abl, heatmap=heatmaps.get(s.sample_id)))
    hpath = write_html_report(out / "report.html", report=report, figures=figures, samples=samples)
    return report, {"json": jpath, "csv": cpath, "ablations_csv": apath, "html": hpath, "plots": plot_dir}


def _heatmaps(heat_engine, res: KResult, loaded, settings: EvalSettings, plot_dir: Path) -> dict[str, Path]:
    """Heatmap PNGs for the first samples of the first benchmark that have latents."""
    from monet.eval.heatmap import latent_heatmaps, plot_latent_heatmaps

    bench = next(iter(loaded))
    run = res.baselines[bench]
    out: dict[str, Path] = {}
    for s in loaded[bench].samples:
        if len(out) >= settings.heatmap_samples:
            break
        z = run.latents.get(s.sample_id)
        if z is None or not z.numel() or not s.images:
            continue
        images = s.load_images()
        maps = latent_heatmaps(heat_engine.model, heat_engine.processor, images[:1], z)[0]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in s.sample_id)
        png = plot_dir / f"heatmap_K{res.span.latent_size}_{safe}.png"
        out[s.sample_id] = plot_latent_heatmaps(images[0], maps, png,
                                                title=f"{s.sample_id}: cosine of each latent to the visual tokens")
    return out
