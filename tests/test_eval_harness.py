"""``monet eval`` on the tiny random checkpoint (HF engine): CLI runs on the synthetic split and the
benchmark TSV fixtures, resume after an interruption, ablation records, heatmaps, the HTML report,
and the pure pieces (paired interval, derangement, checkpoint hash, latent store, verdict)."""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from monet.cli import main
from monet.data.synth import synthesize_dataset
from monet.eval.ablations import (AblationRow, compare_runs, derangement, latent_usage_verdict,
                                  paired_difference_interval, parse_ablations)
from monet.eval.checkpoint_hash import checkpoint_hash
from monet.eval.engine import HFEvalEngine
from monet.eval.harness import EvalSettings, RunMismatchError, load_run, load_samples, run_eval
from monet.eval.heatmap import latent_heatmaps
from monet.eval.latent_store import LatentStore
from monet.eval.report import SampleRecord, read_records
from monet.testing import build_tiny_checkpoint

FIXTURES = Path(__file__).parent / "data_fixtures" / "bench"
K = 2


@pytest.fixture(scope="module")
def ckpt():
    return build_tiny_checkpoint(cache=True)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthesize_dataset(tmp_path_factory.mktemp("synth"), 0, 5, seed=3).root


@pytest.fixture(scope="module")
def full_run(ckpt, synth, tmp_path_factory):
    """One CLI run with every ablation (4 samples, K=2, spans forced)."""
    out = tmp_path_factory.mktemp("eval_full")
    rc = main(["eval", "--model", str(ckpt), "--bench", "synth", "--data", str(synth), "--out", str(out),
               "--engine", "hf", "--device", "cpu", "--latent-size", str(K), "--force-latent", "--limit", "4",
               "--max-new-tokens", "8", "--batch-size", "4", "--ablations", "zeros,start,other,noise",
               "--heatmaps", "1", "--no-progress"])
    assert rc == 0
    return out


def _hf_engine(tiny_on):
    model, processor = tiny_on("cpu")
    return HFEvalEngine("", model=model, processor=processor)


def _run(out, ckpt, synth, **kw):
    base = dict(model=str(ckpt), benchmarks=("synth",), data=(str(synth),), out=str(out), engine="hf",
                latent_sizes=(K,), force_latent=True, max_new_tokens=6, batch_size=2, heatmap_samples=0,
                progress=False)
    base.update(kw)
    return EvalSettings(**base)


# ------------------------------------------------------------------------------------- full CLI run


def test_cli_synth_report_and_records(full_run, ckpt):
    rep = json.loads((full_run / "report.json").read_text())
    rows = rep["runs"][0]["rows"]
    assert rows[0]["benchmark"] == "synth" and rows[0]["category"] == "ALL" and rows[0]["n"] == 4
    recs, torn = read_records(full_run / f"K{K}" / "synth" / "records.jsonl")
    assert torn == 0 and len(recs) == 4
    assert sum(r.verdict == "correct" for r in recs) == rows[0]["correct"]
    for r in recs:
        assert r.text.startswith("<abs_vis_token><latent></abs_vis_token>")  # --force-latent opened a span
        assert r.extra["latent_spans"] == r.text.count("<latent>") >= 1
        assert len(r.extra["latent_norms"]) == r.extra["num_latents"] == K * r.extra["latent_spans"]
        assert r.verdict in ("correct", "incorrect", "degenerate") and r.decided_by
    # latent norms recorded per sample are the norms of the stored vectors
    samples = load_samples("synth", Path(rep["settings"]["data"][0]), limit=4).samples
    run = load_run(full_run / f"K{K}" / "synth", samples)
    for r in run.records:
        assert r.extra["latent_norms"] == pytest.approx(run.latents[r.sample_id].norm(dim=1).tolist(), abs=1e-4)
    # settings, sampling and the checkpoint hash (independent sha256 of the weight files)
    s = rep["settings"]
    assert s["engine_used"] == "hf" and s["latent_sizes"] == [K] and s["sampling"]["max_new_tokens"] == 8
    files = sorted(p for p in Path(ckpt).iterdir() if p.suffix == ".safetensors")
    lines = "".join(f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in files)
    assert rep["checkpoint"]["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    # diagnostics match the recorded latents
    d = rep["runs"][0]["latent_diagnostics"]["synth"]
    assert d["share_with_span"] == 1.0 and d["spans_per_answer"] == pytest.approx(
        sum(r.extra["latent_spans"] for r in recs) / 4)
    allv = torch.cat([run.latents[r.sample_id] for r in recs]).double()
    assert d["norms"]["mean"] == pytest.approx(float(allv.norm(dim=1).mean()), rel=1e-6)
    with open(full_run / "report.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert csv_rows[0]["latent_size"] == str(K) and csv_rows[0]["n"] == "4"
    assert (full_run / f"K{K}" / "report.json").is_file() and (full_run / "ablations.csv").is_file()


def test_ablation_records_hold_the_ablated_latents(full_run, synth, tiny_on):
    model, _ = tiny_on("cpu")
    ids = model.monet_config.token_ids
    start = model.get_input_embeddings().weight[ids.start].detach().float()
    samples = load_samples("synth", synth, limit=4).samples
    kdir = full_run / f"K{K}" / "synth"
    base = load_run(kdir, samples)
    runs = {a: load_run(kdir / f"ablation-{a}", samples) for a in ("zeros", "start", "other", "noise")}
    for a, run in runs.items():
        assert all(r.extra["ablation"] == a for r in run.records)
        assert all(run.latents[r.sample_id].shape[0] >= K for r in run.records), a  # spans forced
    for sid, z in runs["zeros"].latents.items():
        assert torch.count_nonzero(z) == 0, sid
    for sid, z in runs["start"].latents.items():
        torch.testing.assert_close(z, start.expand_as(z), rtol=0, atol=0)
    perm = derangement(len(samples), 0)
    for i, s in enumerate(samples):
        partner = samples[perm[i]].sample_id
        rec = runs["other"].records[i]
        assert rec.extra["partner"] == partner != s.sample_id
        z, src = runs["other"].latents[s.sample_id], base.latents[partner]
        n = min(len(z), len(src))
        torch.testing.assert_close(z[:n], src[:n], rtol=0, atol=0)
        assert torch.count_nonzero(z[n:]) == 0  # beyond the partner's latents: zeros
    for s in samples:
        z, b = runs["noise"].latents[s.sample_id], base.latents[s.sample_id]
        # the first latent (hidden state at START) is the same in both runs; noise keeps its norm only
        assert float(z[0].norm()) == pytest.approx(float(b[0].norm()), rel=1e-4)
        assert float(torch.nn.functional.cosine_similarity(z[0], b[0], dim=0)) < 0.9
    # the ablation table: recomputed from the records
    rep = json.loads((full_run / "report.json").read_text())
    rows = {r["ablation"]: r for r in rep["runs"][0]["ablations"]}
    assert set(rows) == {"zeros", "start", "other", "noise"}
    for a, run in runs.items():
        n = len(samples)
        changed = sum(x.prediction != y.prediction for x, y in zip(base.records, run.records)) / n
        text = sum(x.text != y.text for x, y in zip(base.records, run.records)) / n
        acc_b = sum(x.verdict == "correct" for x in base.records) / n
        acc_a = sum(x.verdict == "correct" for x in run.records) / n
        assert rows[a]["prediction_changed"] == pytest.approx(changed)
        assert rows[a]["text_changed"] == pytest.approx(text)
        assert rows[a]["delta"] == pytest.approx(acc_a - acc_b)
        assert rows[a]["delta_low"] <= rows[a]["delta"] <= rows[a]["delta_high"]
    assert rep["runs"][0]["latent_usage"]["uses_latents"] == (max(r["text_changed"] for r in rows.values()) > 0)


def test_html_report_is_self_contained(full_run):
    text = (full_run / "report.html").read_text()
    srcs = re.findall(r"""\bsrc\s*=\s*['"]([^'"]*)['"]""", text)
    assert len(srcs) >= 3  # ablation deltas, cosine histogram, one heatmap
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    assert not re.search(r"<script|<link|@import|url\(|https?://", text, re.I)
    assert "heatmap" in text and "synth/Synth_Zoom/" in text
    assert '<span class="latent">' in text


# ------------------------------------------------------------------------------------------ fixtures


def test_cli_on_benchmark_tsv_fixtures_with_k_sweep_and_judge(ckpt, tmp_path, capsys):
    out = tmp_path / "tsv"
    files = {"VStarBench": "VStarBench.tsv", "HRBench4K": "hr_bench_4k.tsv",
             "MME-RealWorld-Lite": "mme_realworld_lite.tsv", "VisualPuzzles": "VisualPuzzles.tsv"}
    judge = tmp_path / "judge.yaml"  # a judge nobody listens to: every call fails at once, stays undecided
    judge.write_text("judge:\n  model: judge-model\n  base_url: http://127.0.0.1:9/v1\n  api_key: sk-SECRET-123\n"
                     "  max_retries: 0\n  timeout_s: 2\n")
    data = [a for b, f in files.items() for a in ("--data", f"{b}={FIXTURES / f}")]
    rc = main(["eval", "--model", str(ckpt), "--bench", ",".join(files), *data, "--out", str(out),
               "--engine", "hf", "--device", "cpu", "--latent-size", "1,2", "--limit", "2", "--max-new-tokens", "3",
               "--batch-size", "4", "--heatmaps", "0", "--judge-config", str(judge), "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert [r["latent_size"] for r in rep["runs"]] == [1, 2]
    for run in rep["runs"]:
        k = run["latent_size"]
        rows = run["rows"]
        alls = {r["benchmark"]: r for r in rows if r["category"] == "ALL"}
        assert set(alls) == set(files)
        for bench, r in alls.items():
            recs, _ = read_records(out / f"K{k}" / bench / "records.jsonl")  # one records file per K
            assert r["n"] == len(recs) == 2
            assert r["chance"] == pytest.approx(sum(1 / x.num_options for x in recs) / 2)
            cats = {x.category for x in recs if x.category is not None}
            assert {c["category"] for c in rows if c["benchmark"] == bench and c["category"] != "ALL"} == cats
            for x in recs:
                if x.decided_by == "undecided":
                    assert x.detail == "judge:error"  # it went to the judge
        assert rep["accuracy_vs_k"]["VStarBench"][run is rep["runs"][1]][0] == k
    assert (out / "plots" / "accuracy_vs_k.png").is_file()
    assert {lr["benchmark"] for lr in rep["load_reports"]} == set(files)
    assert rep["settings"]["judge"]["model"] == "judge-model"
    for f in (out / "report.json", out / "K1" / "report.json", out / "report.html"):
        assert "sk-SECRET-123" not in f.read_text()
    with open(out / "report.csv") as f:
        assert sorted({r["latent_size"] for r in csv.DictReader(f)}) == ["1", "2"]
    console = capsys.readouterr().out
    assert "VStarBench" in console and "latent diagnostics" in console


# ---------------------------------------------------------------------------------------------- resume


def _flatten(x, prefix=""):
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _flatten(val, f"{prefix}.{key}").items()}
    if isinstance(x, list):
        return {k: v for i, val in enumerate(x) for k, v in _flatten(val, f"{prefix}[{i}]").items()}
    return {prefix: x}


class _Stop(RuntimeError):
    pass


def test_resume_after_interruption_gives_the_same_report(ckpt, synth, tiny_on, tmp_path):
    engine = _hf_engine(tiny_on)
    ref = run_eval(_run(tmp_path / "ref", ckpt, synth, ablations=("zeros",)), engine=engine)

    seen = []

    def stop_after_3(name, rec):
        seen.append(rec.sample_id)
        if len(seen) == 3:
            raise _Stop("injected interruption")

    out = tmp_path / "resumed"
    with pytest.raises(_Stop):
        run_eval(_run(out, ckpt, synth, ablations=("zeros",)), engine=engine, on_record=stop_after_3)
    part, _ = read_records(out / f"K{K}" / "synth" / "records.jsonl")
    assert [r.sample_id for r in part] == seen  # three written, nothing else
    # a torn last line (killed mid-write) is dropped and redone
    with open(out / f"K{K}" / "synth" / "records.jsonl", "ab") as f:
        f.write(b'{"sample_id": "synth/Synth_Zoom/eval-0000')
    redone = []
    res = run_eval(_run(out, ckpt, synth, ablations=("zeros",)), engine=engine,
                   on_record=lambda n, r: redone.append((n, r.sample_id)))
    all_ids = [r.sample_id for r in ref.per_k[0].baselines["synth"].records]
    assert [sid for n, sid in redone if "zeros" not in n] == [s for s in all_ids if s not in seen]
    a = json.loads((out / "report.json").read_text())
    b = json.loads(ref.paths["json"].read_text())
    for rep in (a, b):
        for key in ("created", "settings", "checkpoint"):
            rep.pop(key)
        rep["runs"][0].pop("dir")
        rep.pop("plots"), rep.pop("heatmaps")
    # batches are composed differently after the resume: latent statistics agree to float32 rounding
    assert _flatten(a).keys() == _flatten(b).keys()
    for key, x in _flatten(a).items():
        y = _flatten(b)[key]
        assert x == (pytest.approx(y, rel=1e-5) if isinstance(y, float) else y), key
    for sub in ("synth", "synth/ablation-zeros"):
        ra = {r.sample_id: r for r in read_records(out / f"K{K}" / sub / "records.jsonl")[0]}
        rb = {r.sample_id: r for r in read_records(tmp_path / "ref" / f"K{K}" / sub / "records.jsonl")[0]}
        assert ra.keys() == rb.keys()
        for sid in ra:
            assert ra[sid].text == rb[sid].text and ra[sid].verdict == rb[sid].verdict, sid
    # nothing left to do: a third run writes no record
    again = []
    run_eval(_run(out, ckpt, synth, ablations=("zeros",)), engine=engine, on_record=lambda n, r: again.append(r))
    assert again == []
    # resuming with other generation settings is refused, naming the difference
    with pytest.raises(RunMismatchError, match="max_new_tokens: 6 -> 7"):
        run_eval(_run(out, ckpt, synth, max_new_tokens=7), engine=engine)


# ------------------------------------------------------------------------------------------- heatmap


def test_heatmap_matches_naive_float64_loop(tiny_on):
    from monet.model.forward import embed_multimodal, image_token_id
    from monet.model.requests import LatentRequest, encode_requests
    from monet.testing import synthetic_image

    model, processor = tiny_on("cpu")
    img = synthetic_image(5, size=(112, 84))
    g = torch.Generator().manual_seed(0)
    D = model.get_input_embeddings().weight.shape[1]
    z = torch.randn(3, D, generator=g)
    heat = latent_heatmaps(model, processor, [img], z)[0]
    # reference: the rows of the language model's input that the image's pad tokens get
    batch, _ = encode_requests(processor, [LatentRequest(prompt="look", images=[img])])
    with torch.no_grad():
        emb = embed_multimodal(model, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])[0]
    tokens = emb[batch["input_ids"][0] == image_token_id(model)].double().tolist()
    t, h, w = batch["image_grid_thw"][0].tolist()
    rows, cols = h // 2, w // 2
    assert heat.maps.shape == (3, t, rows, cols) and len(tokens) == t * rows * cols
    assert heat.size == (w * 14, h * 14)
    zz = z.double().tolist()
    for j in range(3):
        for k, v in enumerate(tokens):
            dot = sum(a * b for a, b in zip(zz[j], v))
            cos = dot / (math.sqrt(sum(a * a for a in zz[j])) * math.sqrt(sum(b * b for b in v)))
            r, c = divmod(k % (rows * cols), cols)
            assert float(heat.maps[j, k // (rows * cols), r, c]) == pytest.approx(cos, abs=1e-6)


# ---------------------------------------------------------------------------------------- pure pieces


def test_paired_difference_interval_hand_computed():
    both, a_only, b_only, neither = 30, 10, 3, 57
    n = 100

    def wilson(x):
        z = 1.959963984540054
        p = x / n
        c = (2 * x + z * z) / (2 * (n + z * z))
        hw = z * math.sqrt(z * z + 4 * x * (1 - p)) / (2 * (n + z * z))
        return c - hw, c + hw

    p1, p2 = 0.40, 0.33
    l1, u1 = wilson(40)
    l2, u2 = wilson(33)
    phi = (30 * 57 - 10 * 3) / math.sqrt(40 * 60 * 33 * 67)
    lo = (p2 - p1) - math.sqrt((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2)
    hi = (p2 - p1) + math.sqrt((u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2)
    d, got_lo, got_hi = paired_difference_interval(both, a_only, b_only, neither)
    assert d == pytest.approx(-0.07)
    assert got_lo == pytest.approx(lo, abs=1e-12) and got_hi == pytest.approx(hi, abs=1e-12)
    # no discordant pairs: no change; the interval holds 0
    d, lo, hi = paired_difference_interval(5, 0, 0, 5)
    assert d == 0 and lo <= 0 <= hi
    d, lo, hi = paired_difference_interval(0, 4, 0, 0)  # every answer lost: delta -1, interval below 0
    assert d == -1 and -1 <= lo < hi < 0
    with pytest.raises(ValueError, match="no pairs"):
        paired_difference_interval(0, 0, 0, 0)


@pytest.mark.parametrize("n", [2, 3, 7, 50])
def test_derangement_has_no_fixed_point(n):
    p = derangement(n, seed=4)
    assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
    assert p == derangement(n, seed=4)
    with pytest.raises(ValueError, match="two samples"):
        derangement(1, 0)


def test_parse_ablations_rejects_unknown_names():
    assert parse_ablations("zeros, other") == ("zeros", "other")
    with pytest.raises(ValueError, match="unknown ablation"):
        parse_ablations("zeros,blur")


def _rec(sid, text, pred, verdict="incorrect"):
    return SampleRecord(sid, "b", None, "A", pred, text, verdict, "rule", num_options=2)


def test_latent_usage_verdict_says_when_latents_are_unused():
    base = [_rec("1", "x A", "A", "correct"), _rec("2", "y B", "B")]
    same = compare_runs("zeros", base, [_rec("1", "x A", "A", "correct"), _rec("2", "y B", "B")])
    v = latent_usage_verdict(same)
    assert v["uses_latents"] is False and "does not use its latents" in v["message"]
    worded = compare_runs("noise", base, [_rec("1", "z A", "A", "correct"), _rec("2", "y B", "B")])
    assert latent_usage_verdict(same + worded)["uses_latents"] is True
    moved = compare_runs("other", base, [_rec("1", "x B", "B"), _rec("2", "y B", "B")])
    assert moved[0].prediction_changed == 0.5 and moved[0].delta == -0.5
    assert "50.0%" in latent_usage_verdict(moved)["message"]
    assert isinstance(moved[0], AblationRow)


def test_checkpoint_hash_is_cached_by_size_and_mtime(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"abc" * 1000)
    (d / "config.json").write_text("{}")
    cache = tmp_path / "hash.json"
    first = checkpoint_hash(d, cache)
    assert first["files"]["model.safetensors"]["sha256"] == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert first["rehashed"] == ["model.safetensors"] and "config.json" not in first["files"]
    # a cached digest is trusted while size and mtime match (poison it to prove the file is not re-read)
    data = json.loads(cache.read_text())
    data["files"]["model.safetensors"]["sha256"] = "f" * 64
    cache.write_text(json.dumps(data))
    assert checkpoint_hash(d, cache)["rehashed"] == []
    assert checkpoint_hash(d, cache)["files"]["model.safetensors"]["sha256"] == "f" * 64
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = checkpoint_hash(d, cache)
    assert again["rehashed"] == ["model.safetensors"] and again["sha256"] == first["sha256"]
    with pytest.raises(ValueError, match="no weight files"):
        checkpoint_hash(tmp_path)


def test_latent_store_round_trip_and_errors(tmp_path):
    store = LatentStore(tmp_path / "lat")
    a = torch.randn(3, 8)
    part = store.write_part({"s/1": a, "s/2": torch.zeros(0, 8)})
    assert part == "part-00000.safetensors"
    got = store.load([("s/1", part), ("s/2", None)])
    torch.testing.assert_close(got["s/1"], a) and got["s/2"].numel() == 0
    assert store.write_part({"s/3": torch.ones(1, 8)}) == "part-00001.safetensors"
    with pytest.raises(ValueError, match="no latents for record s/9"):
        store.load([("s/9", part)])
    with pytest.raises(FileNotFoundError, match="part-00007"):
        store.load([("s/1", "part-00007.safetensors")])
    with pytest.raises(ValueError, match="invalid latents part"):
        store.load([("s/1", "../x.safetensors")])


def test_cli_errors_are_clear(ckpt, synth, tmp_path, capsys):
    rc = main(["eval", "--model", str(ckpt), "--bench", "synth", "--data", str(tmp_path / "nope"), "--out",
               str(tmp_path / "o"), "--engine", "hf", "--latent-size", "2"])
    assert rc == 2 and "data path not found" in capsys.readouterr().err
    rc = main(["eval", "--model", str(ckpt), "--bench", "synth", "--data", str(synth), "--out", str(tmp_path / "o"),
               "--engine", "hf", "--ablations", "zeros,blur"])
    assert rc == 2 and "unknown ablation" in capsys.readouterr().err
    bad = tmp_path / "judge.yaml"
    bad.write_text("model: m\nbase_url: http://localhost/v1\ntemprature: 0\n")
    rc = main(["eval", "--model", str(ckpt), "--bench", "synth", "--data", str(synth), "--out", str(tmp_path / "o"),
               "--engine", "hf", "--latent-size", "2", "--judge-config", str(bad)])
    assert rc == 2 and "temprature" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- vLLM


@pytest.mark.slow
def test_vllm_engine_matches_hf_records(ckpt, synth, tiny_on, tmp_path):
    pytest.importorskip("vllm")
    from monet.eval.engine import VllmEvalEngine

    engine = VllmEvalEngine(str(ckpt), dtype="float32", max_new_tokens=6, seed=0,
                            engine_kwargs=dict(max_model_len=512, kv_cache_memory_bytes=64 << 20, max_num_seqs=4))
    try:
        v = run_eval(_run(tmp_path / "v", ckpt, synth, engine="vllm", limit=2, ablations=("zeros",), dtype="float32"),
                     engine=engine)
    finally:
        engine.close()
    h = run_eval(_run(tmp_path / "h", ckpt, synth, limit=2, ablations=("zeros",), dtype="float32"),
                 engine=_hf_engine(tiny_on))
    for run in ("baselines",):
        for a, b in zip(v.per_k[0].baselines["synth"].records, h.per_k[0].baselines["synth"].records):
            assert a.text == b.text
    for sid, z in v.per_k[0].ablation_runs["zeros"]["synth"].latents.items():
        assert torch.count_nonzero(z) == 0, sid
