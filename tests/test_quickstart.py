"""monet quickstart: control data layouts, the evaluation rows, and an end-to-end --fast run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from monet.data import PLACEHOLDER, load_sft_dataset, synthesize_dataset
from monet.data.controls import control_sample, write_control
from monet.data.synth import COLOURS


def _boxed(text):
    return re.findall(r"\\boxed\{([^{}]*)\}", text)


def _texts(turn):
    return [c for c in turn["content"] if c["type"] == "text"]


def test_direct_control_is_only_the_boxed_answer(tmp_path):
    ds = synthesize_dataset(tmp_path / "d", n=10, n_eval=0, seed=4)
    raw = json.loads(ds.train_json.read_text())
    dst = write_control(ds.train_json, tmp_path / "d" / "direct.json", "direct")
    out = json.loads(dst.read_text())
    assert len(out) == len(raw)
    for src, ctl in zip(raw, out):
        assert ctl["data"][:-1] == src["data"][:-1]  # system + user turns (question image) untouched
        ref = _boxed("".join(c["text"] for c in _texts(src["data"][-1])))[-1]
        assert ctl["data"][-1]["content"] == [{"type": "text", "text": f"\\boxed{{{ref}}}"}]
        assert ctl["metadata"]["sample_id"] == src["metadata"]["sample_id"]
    samples, report = load_sft_dataset(dst, ds.root)
    assert report.rejected == 0 and len(samples) == 10
    assert all(not s.helper_images for s in samples)


def test_text_control_drops_helper_images_and_spans_keeps_observations(tmp_path):
    ds = synthesize_dataset(tmp_path / "d", n=10, n_eval=0, seed=5)
    raw = json.loads(ds.train_json.read_text())
    out = json.loads(write_control(ds.train_json, tmp_path / "d" / "text.json", "text").read_text())
    for src, ctl in zip(raw, out):
        turn = ctl["data"][-1]
        assert [c["type"] for c in turn["content"]] == ["text"]
        text = turn["content"][0]["text"]
        assert PLACEHOLDER not in text and "<abs_vis_token>" not in text
        original = "".join(c["text"] for c in _texts(src["data"][-1]))
        assert text == original.replace(PLACEHOLDER, "")
        obs = re.search(r"<observation>.*?</observation>", original).group(0)
        assert obs in text
    samples, report = load_sft_dataset(tmp_path / "d" / "text.json", ds.root)
    assert report.rejected == 0 and all(not s.helper_images for s in samples)


def test_controls_reject_bad_samples_by_name(tmp_path):
    good = json.loads(synthesize_dataset(tmp_path / "d", n=1, n_eval=0, seed=1).train_json.read_text())[0]
    with pytest.raises(ValueError, match="control must be one of"):
        control_sample(good, "latent")
    no_box = json.loads(json.dumps(good))
    no_box["data"][-1]["content"] = [{"type": "text", "text": "no answer"}]
    with pytest.raises(ValueError, match=r"s7: the assistant turn has no \\boxed"):
        control_sample(no_box, "direct", where="s7")
    no_assistant = {"metadata": {}, "data": good["data"][:-1]}
    with pytest.raises(ValueError, match="x.json sample 0: the last turn is not an assistant turn"):
        (tmp_path / "x.json").write_text(json.dumps([no_assistant]))
        write_control(tmp_path / "x.json", tmp_path / "y.json", "text")
    assert control_sample(good, "text")["data"][-1] != good["data"][-1]  # input not modified in place
    assert len(good["data"][-1]["content"]) == 3


def test_control_samples_build_stage1_examples_with_answer_targets(tmp_path):
    """Each control trains with the stage-1 layout: the boxed answer's tokens are CE targets."""
    from data_fixtures.samples import tiny_processor
    from monet.data import build_stage_example

    processor = tiny_processor()
    ds = synthesize_dataset(tmp_path / "d", n=3, n_eval=0, seed=6)
    for kind in ("direct", "text"):
        samples, _ = load_sft_dataset(write_control(ds.train_json, tmp_path / "d" / f"{kind}.json", kind), ds.root)
        for s in samples:
            ex = build_stage_example(s, processor, 1, 4)
            targets = ex.labels[ex.labels != -100].tolist()
            answer = _boxed(s.assistant.content[-1].text)[-1]
            assert answer in processor.tokenizer.decode(targets)
            assert int(ex.image_grid_thw.shape[0]) == 1  # only the question image


def _wilson(k, n, z=1.959963984540054):
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def test_evaluate_ablation_zeros_reaches_generate_per_request(tmp_path, monkeypatch):
    """``ablation="zeros"`` hands one zeros LatentAblation per request to generate; ``other`` the
    partner's latents; helper-image mode refuses ablations."""
    import monet.model.decoding as decoding
    from data_fixtures.samples import tiny_processor
    from monet.eval.evaluate import evaluate_sft_file
    from monet.model.outputs import LatentGeneration

    seen = []

    def fake(model, processor, requests, **kw):
        seen.append(kw.get("ablations"))
        return [LatentGeneration("\\boxed{red}", "\\boxed{red}", [1], [], torch.zeros(0, 4), 3, "stop")
                for _ in requests]

    monkeypatch.setattr(decoding, "generate", fake)
    ds = synthesize_dataset(tmp_path / "d", n=0, n_eval=3, seed=2)
    rep = evaluate_sft_file(None, tiny_processor(), ds.eval_json, batch_size=2, progress=False, ablation="zeros")
    assert [a.mode for batch in seen for a in batch] == ["zeros"] * 3 and rep.ablation == "zeros"
    refs = [r["reference"] for r in rep.samples]
    assert rep.accuracy == pytest.approx(sum(r == "red" for r in refs) / 3)
    seen.clear()
    keys = [r["key"] for r in rep.samples]
    partners = {k: torch.full((2, 5), float(i)) for i, k in enumerate(keys)}
    evaluate_sft_file(None, tiny_processor(), ds.eval_json, batch_size=3, progress=False, ablation="other",
                      partner_latents=partners)
    fed = [a for batch in seen for a in batch]
    assert [a.mode for a in fed] == ["replace"] * 3
    assert all(torch.equal(a.vectors, partners[k]) for a, k in zip(fed, keys))
    with pytest.raises(ValueError, match="helper_images=True"):
        evaluate_sft_file(None, tiny_processor(), ds.eval_json, progress=False, ablation="zeros", helper_images=True)
    with pytest.raises(ValueError, match="needs partner_latents"):
        evaluate_sft_file(None, tiny_processor(), ds.eval_json, progress=False, ablation="other")


def test_quickstart_fast_end_to_end(tmp_path, capsys):
    """`monet quickstart --fast`: every stage and control trains, every row is evaluated with its
    own checkpoint, and report.json / report.png have the documented structure."""
    from PIL import Image

    from monet.cli import main
    from monet.eval.checkpoint_hash import checkpoint_hash
    from monet.quickstart import ROWS

    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--fast"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["checkpoints"]) == {"stage0", "stage1", "stage2", "stage3", "direct", "text", "vlpo"}
    assert (out / "teacher_reps" / "index.json").is_file() and (out / "teacher_latents" / "index.json").is_file()
    # every row from its own model: the recorded weights digest is the digest of the right checkpoint,
    # and the four trained models the rows use are four different sets of weights
    own = {"direct": "direct", "text": "text", "stage3": "stage3", "oracle": "stage1",
           "stage3-zeros": "stage3", "stage3-other": "stage3", "vlpo": "vlpo"}
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == list(ROWS)
    shas = {name: checkpoint_hash(report["checkpoints"][name])["sha256"] for name in set(own.values())}
    # VLPO changes the stage-3 weights iff some step had a learning signal (a group whose rewards
    # differ; after 3 SFT steps every answer usually scores 0, so all advantages are 0)
    vlpo_steps = [json.loads(line) for line in (out / "vlpo" / "metrics.jsonl").read_text().splitlines()]
    signal = any(r["batch/adv_abs_mean"] > 0 for r in vlpo_steps)
    assert signal == (shas["vlpo"] != shas["stage3"])
    assert len({v for k, v in shas.items() if k != "vlpo"}) == 4
    # stage 0 (captions) is the start of stage 1: its weights are neither the base's nor stage 1's
    s0 = checkpoint_hash(report["checkpoints"]["stage0"])["sha256"]
    assert s0 not in shas.values() and s0 != checkpoint_hash(out / "base")["sha256"]
    ck1 = Path(report["checkpoints"]["stage1"])
    assert yaml.safe_load((ck1 / "sft_config.yaml").read_text())["model"] == report["checkpoints"]["stage0"]
    # the VLPO phase: its own run folder and metrics, its policy exported, before/after from the rows
    v = report["vlpo"]
    assert v["steps"] == 2 == len(v["per_step"]) and [r["step"] for r in v["per_step"]] == [1, 2]
    assert v["before"]["accuracy"] == rows["stage3"]["accuracy"] and v["after"]["accuracy"] == rows["vlpo"]["accuracy"]
    assert v["after"]["latent_span_rate"] == rows["vlpo"]["latent_span_rate"]
    assert len((out / "vlpo" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "vlpo_policy" / "monet_config.json").is_file()
    answers = [re.findall(r"\\boxed\{([^{}]*)\}", s["data"][-1]["content"][-1]["text"])[-1]
               for s in json.loads((out / "data" / "eval.json").read_text())]
    # keys (the default task): 1/3 for every question (enumerated in tests/test_data_synth_keys.py);
    # zoom / multihop: guessing within the asked attribute
    assert report["data"]["task"] == "keys" and all(a in COLOURS for a in answers)
    chance = 1 / 3
    for name, r in rows.items():
        assert r["checkpoint"] == report["checkpoints"][own[name]]
        assert r["checkpoint_sha256"] == shas[own[name]]
        assert r["n"] == 8 == len(answers) and r["accuracy"] == r["correct"] / 8
        assert r["ci95"] == pytest.approx(list(_wilson(r["correct"], 8)))
        assert r["chance"] == pytest.approx(chance)
        assert r["helper_images"] == (name == "oracle")
        assert r["ablation"] == {"stage3-zeros": "zeros", "stage3-other": "other"}.get(name)
        assert (r["answers_changed_vs_stage3"] is None) == (r["ablation"] is None)
        assert 0.0 <= r["latent_span_rate"] <= 1.0
    assert set(report["goals"]) == {"stage3_vs_best_control", "zeroing_cost", "latent_cosine"}
    assert {k: len(v) for k, v in report["curves"].items()} == {k: 3 for k in report["checkpoints"] if k != "vlpo"}
    # latent-route probes: on the validation split, each stage's model in its own layout
    route = report["latent_route"]
    assert route["split"] == "val" and route["n"] == 4
    import monet
    from monet.data import load_sft_dataset
    from monet.eval.latent_route import teacher_forced_accuracy

    val, _ = load_sft_dataset(out / "data" / "val.json", out / "data")
    m2, p2 = monet.load_model(report["checkpoints"]["stage2"], dtype="float32", latent_size=4)
    assert route["stage2"] == {**teacher_forced_accuracy(m2, p2, val[:4], 2, 4).as_dict(),
                               "sensitivity": route["stage2"]["sensitivity"]}
    for k in (1, 2):
        sens = route[f"stage{k}"]["sensitivity"]
        assert sens["before"] == 0.0 and sens["image_tokens"] > 0
    assert "sensitivity" not in route["stage3"] and 0.0 <= route["stage3"]["answer_accuracy"] <= 1.0
    with Image.open(out / "report.png") as im:
        assert im.format == "PNG" and im.size[0] > 800
    text = capsys.readouterr().out
    assert "latent route (4 validation samples" in text
    assert "(c) Monet stage 3" in text and "95% Wilson" in text and "goal: zeroing the latents" in text
    assert "VLPO (2 steps): accuracy" in text


def test_oracle_inserts_both_multihop_helper_images_in_order(tmp_path, monkeypatch):
    """Row (d) on the two-hop task: each <|vision_start|> the model emits gets the next reference
    helper image (hop 1, then hop 2), and the answer after the second is scored."""
    from data_fixtures.samples import tiny_processor
    from monet.data.synth_multihop import synthesize_multihop
    from monet.eval.evaluate import evaluate_sft_file
    from monet.model.outputs import LatentGeneration

    processor = tiny_processor()
    ds = synthesize_multihop(tmp_path / "d", n=0, n_eval=1, seed=2)
    ref = _boxed(json.loads(ds.eval_json.read_text())[0]["data"][-1]["content"][-1]["text"])[-1]
    replies = ["Find the arrow.<|vision_start|>x", "Follow it.<|vision_start|>y", f"\\boxed{{{ref}}}<|im_end|>"]
    calls = []

    def fake(model, proc, requests, **kw):
        calls.append(list(requests))
        text = replies[len(calls) - 1]
        ids = proc.tokenizer.encode(text, add_special_tokens=False)
        return [LatentGeneration(proc.tokenizer.decode(ids, skip_special_tokens=True), text, ids, [],
                                 torch.zeros(0, 4), 3, "stop")]

    monkeypatch.setattr("monet.model.decoding.generate", fake)
    rep = evaluate_sft_file(None, processor, ds.eval_json, batch_size=1, progress=False, helper_images=True,
                            max_new_tokens=96)
    assert len(calls) == 3
    assert [len(c[0].images) for c in calls] == [1, 2, 3]
    assert calls[1][0].images[-1].endswith("000000_hop1.png") and calls[2][0].images[-1].endswith("000000_hop2.png")
    assert calls[2][0].prompt.endswith("Follow it.<|vision_start|><|image_pad|><|vision_end|>")
    assert rep.samples[0]["helper_images"] == 2 and rep.accuracy == 1.0


@pytest.mark.parametrize("args,msg", [(["--epochs", "1,2"], "--epochs: expected three positive numbers"),
                                      (["--epochs", "1,x,2"], "--epochs: expected three positive numbers"),
                                      (["--epochs", "1,0,2"], "--epochs: expected three positive numbers"),
                                      (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
                                      (["--split", "val", "--n-val", "0"], "eval_split='val' needs n_val >= 1"),
                                      (["--vlpo-steps", "-1"], "vlpo_steps must be >= 0"),
                                      (["--lr", "0"], "lr must be > 0")])
def test_quickstart_bad_options_exit_2_before_writing(tmp_path, capsys, args, msg):
    from monet.cli import main

    assert main(["quickstart", "--out", str(tmp_path / "qs"), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "qs").exists()


def test_quickstart_settings_refuse_an_unknown_task():
    from monet.quickstart import QuickstartSettings

    with pytest.raises(ValueError, match="task must be one of"):
        QuickstartSettings(task="zoomz")
    with pytest.raises(ValueError, match="keys_observe must be one of"):
        QuickstartSettings(task="keys", keys_observe="hop")


def test_colour_reading_probe_runs_and_writes_its_curves(tmp_path):
    """benchmarks/probe_colour_reading.py (the evidence for the quickstart's lr): two steps per lr,
    one curve point per step, accuracies are counts over the 128 held-out images, and a learning rate
    too small to move the weights leaves the held-out predictions (hence accuracy) unchanged."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "probe.json"
    res = subprocess.run([sys.executable, str(repo / "benchmarks" / "probe_colour_reading.py"), "--lr", "1e-12", "5e-4",
                          "--steps", "2", "--every", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["chance"] == pytest.approx(1 / 6) and set(r["curves"]) == {"1e-12", "0.0005"}
    for curve in r["curves"].values():
        assert [p["step"] for p in curve] == [1, 2]
        assert all(math.isfinite(p["loss"]) and (p["accuracy"] * 128) == round(p["accuracy"] * 128) for p in curve)
    frozen = r["curves"]["1e-12"]
    assert frozen[0]["accuracy"] == frozen[1]["accuracy"]
    for task in ("side", "key"):
        res = subprocess.run([sys.executable, str(repo / "benchmarks" / "probe_colour_reading.py"), "--task", task,
                              "--lr", "5e-4", "--steps", "1", "--out", str(out)], capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        r = json.loads(out.read_text())
        assert r["task"] == task and r["colours_without_side"] == 0.5 and len(r["curves"]["0.0005"]) == 1


def test_chance_per_task_and_answer_budget():
    """Zoom/multihop: guessing within the asked attribute (6 colours, 3 shapes); keys: 1/3 whatever
    the colour (monet.data.synth_keys.CHANCE); every task has its own answer budget."""
    from monet.eval.diagnostics import chance_level
    from monet.quickstart import ANSWER_TOKENS, TASKS, QuickstartSettings, chance_of

    assert chance_level([chance_of("red"), chance_of("circle")]) == pytest.approx((1 / 6 + 1 / 3) / 2)
    assert chance_level([chance_of("red", "keys"), chance_of("blue", "keys")]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="not a colour of the keys task"):
        chance_of("circle", "keys")
    with pytest.raises(ValueError, match="neither a colour nor a shape"):
        chance_of("seven")
    for task in TASKS:
        assert QuickstartSettings(task=task).max_new_tokens == ANSWER_TOKENS[task]
