"""VLPO system pieces without a model: RL data, reward grading, weight packing, checkpoint state."""

from __future__ import annotations

import base64
import io
import json
import random

import numpy as np
import pytest
import torch

from monet.rl import VLPOConfig
from monet.rl import checkpoint as ck
from monet.rl.data import load_rl_parquet, reference_answer, rl_split_from_sft, synthesize_rl_split, write_rl_parquet
from monet.rl.rewards import format_ok, grade_rollouts
from monet.rl.run_config import VLPORunConfig
from monet.rl.sampler import DifficultySampler
from monet.rl.weight_sync import pack_weights, unpack_weights


def _png(colour=(200, 10, 10)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


# -- data -------------------------------------------------------------------------------------------
def test_synthetic_rl_split_roundtrip_and_determinism(tmp_path):
    a = synthesize_rl_split(tmp_path / "a.parquet", 5, seed=3)
    b = synthesize_rl_split(tmp_path / "b.parquet", 5, seed=3)
    assert a.read_bytes() == b.read_bytes()
    ex, rep = load_rl_parquet(a)
    assert rep.loaded == 5 and not rep.rejected
    from monet.data.synth import COLOURS, SHAPES

    for e in ex:
        assert e.answer in set(COLOURS) | set(SHAPES)
        assert "\\boxed{}" in e.question and e.images[0].size == (112, 112)
    assert [e.index for e in ex] == list(range(5))


@pytest.mark.parametrize("task", ["zoom", "multihop"])
def test_rl_split_from_sft_keeps_question_image_and_answer(tmp_path, task):
    """Each RL row is its SFT sample's question text, the question image's bytes and the reference
    boxed answer; no helper image or reasoning text is carried over."""
    from PIL import Image

    from monet.data import load_sft_dataset
    from monet.data.synth import synthesize_dataset
    from monet.data.synth_multihop import synthesize_multihop

    make = synthesize_dataset if task == "zoom" else synthesize_multihop
    ds = make(tmp_path / "d", 6, 0, seed=2)
    out = rl_split_from_sft(ds.train_json, tmp_path / "rl.parquet", image_root=ds.root, limit=5)
    ex, rep = load_rl_parquet(out)
    samples, _ = load_sft_dataset(ds.train_json, ds.root)
    assert rep.loaded == 5 and not rep.rejected
    for e, s in zip(ex, samples):
        raw = json.loads(ds.train_json.read_text())[[x.key for x in samples].index(s.key)]
        final = raw["data"][-1]["content"][-1]["text"]
        assert final.endswith(f"\\boxed{{{e.answer}}}.")
        assert e.question == raw["data"][1]["content"][1]["text"] and "<observation>" not in e.question
        assert len(e.images) == 1
        want = Image.open(s.question_images[0].file).convert("RGB")
        assert e.images[0].tobytes() == want.tobytes()
    bad = json.loads(ds.train_json.read_text())[:1]
    bad[0]["data"][-1]["content"][-1]["text"] = "<observation>x</observation> no box here."
    (ds.root / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="Synth_.*train-000000.*boxed"):
        rl_split_from_sft(ds.root / "bad.json", tmp_path / "bad.parquet", image_root=ds.root)


def test_bad_rows_are_rejected_with_reasons_not_fatal(tmp_path):
    png = _png()
    raw = [
        {"images": [png], "question": "q0", "solution": "\\boxed{7}"},  # ok, bytes
        {"images": [b"not an image"], "question": "q1", "solution": "1"},
        {"images": [png], "question": None, "solution": "1"},
        {"images": [png], "question": "q3", "solution": "   "},
        {"images": [], "question": "q4", "solution": "1"},
    ]
    b64 = [{"images": [base64.b64encode(png).decode()], "question": "q5", "solution": "seven"},  # ok, base64
           {"images": ["%%%not base64%%%"], "question": "q6", "solution": "1"}]
    struct = [{"image": {"bytes": png, "path": None}, "question": "q7", "solution": "x"}]  # ok, HF Image struct
    paths = [write_rl_parquet(tmp_path / "raw.parquet", raw), write_rl_parquet(tmp_path / "b64.parquet", b64),
             write_rl_parquet(tmp_path / "st.parquet", struct)]
    ex, rep = load_rl_parquet(paths)
    assert [e.question for e in ex] == ["q0", "q5", "q7"]
    assert [e.answer for e in ex] == ["7", "seven", "x"]
    assert [e.index for e in ex] == [0, 5, 7]  # row numbers continue across files
    assert rep.rejected == {"undecodable image": 1, "image string is not base64": 1, "missing question": 1,
                            "empty solution": 1, "no images": 1}
    assert rep.examples["missing question"] == ["raw.parquet:2"]
    assert "5 rejected" in rep.summary()


def test_missing_file_and_non_parquet_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_rl_parquet(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="bad.parquet"):
        load_rl_parquet(bad)


def test_reference_answer():
    assert reference_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert reference_answer("  B ") == "B"


# -- rewards ----------------------------------------------------------------------------------------
def test_format_needs_exactly_one_complete_box():
    assert format_ok("the answer is \\boxed{red}.")
    assert not format_ok("no box")
    assert not format_ok("\\boxed{a} and \\boxed{b}")
    assert not format_ok("\\boxed{unbalanced")
    assert not format_ok("\\boxed{ }")


def test_grade_rollouts_weights_and_degenerate():
    cfg = VLPOConfig(accuracy_weight=0.9, format_weight=0.1)
    loop = "\\boxed{red} " + "the the the the " * 40  # correct box, then a loop
    texts = ["so \\boxed{red}", "so \\boxed{blue}", "red", loop, ""]
    g = grade_rollouts(texts, ["red"] * 5, cfg)
    assert g.accuracy.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert g.format.tolist() == [True, True, False, True, False]
    assert g.degenerate.tolist() == [False, False, False, True, True]
    torch.testing.assert_close(g.reward, torch.tensor([1.0, 0.1, 0.9, 0.1, 0.0], dtype=torch.float64))
    # other weights + length penalty (0 up to 6 tokens, then linear to -0.5 at 10)
    cfg2 = VLPOConfig(accuracy_weight=0.5, format_weight=0.5, length_penalty=dict(max_tokens=10, buffer=4, weight=0.5))
    g2 = grade_rollouts(texts[:3], ["red"] * 3, cfg2, lengths=[6, 8, 20])
    torch.testing.assert_close(g2.reward, torch.tensor([1.0, 0.5 - 0.25, 0.5 - 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="references"):
        grade_rollouts(texts, ["red"], cfg)


# -- weight packing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_roundtrip(dtype):
    g = torch.Generator().manual_seed(0)
    w = [("a.weight", torch.randn(3, 5, generator=g).to(dtype)), ("b.bias", torch.randn(7, generator=g).to(dtype)),
         ("c.scalar", torch.tensor(2.5).to(dtype))]
    packed = pack_weights(w)
    assert all(isinstance(p[3], bytes) for p in packed)
    back = unpack_weights(packed)
    for (n0, t0), (n1, t1) in zip(w, back):
        assert n0 == n1 and t1.dtype == dtype and torch.equal(t0, t1)


def test_unpack_rejects_malformed():
    with pytest.raises(ValueError, match="bytes do not hold"):
        unpack_weights([("x", "float32", [2, 2], b"\0" * 12)])
    with pytest.raises(ValueError, match="unknown dtype"):
        unpack_weights([("x", "floaty", [1], b"\0" * 4)])


# -- checkpoint state -------------------------------------------------------------------------------
def test_optimizer_and_rng_state_roundtrip_through_files(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    tensors: dict = {}
    state = {"opt": ck.optimizer_state(opt, tensors), "rng": ck.rng_state(tensors)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps(state, allow_nan=False))
    expect = (random.random(), float(np.random.rand()), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    state2 = json.loads((tmp_path / "s.json").read_text())
    t2 = load_file(str(tmp_path / "t.safetensors"))
    ck.set_rng_state(state2["rng"], t2)
    assert (random.random(), float(np.random.rand())) == expect[:2] and torch.equal(torch.rand(3), expect[2])
    net2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-2)
    ck.load_optimizer_state(opt2, state2["opt"], t2)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for k in a["state"][pid]:
            assert torch.equal(torch.as_tensor(a["state"][pid][k]), torch.as_tensor(b["state"][pid][k]))


def test_run_lock_is_exclusive(tmp_path):
    lock = ck.RunLock(tmp_path)
    with pytest.raises(ck.RunBusy, match=str(tmp_path)):
        ck.RunLock(tmp_path)
    lock.release()
    ck.RunLock(tmp_path).release()  # free again once released


def test_sampler_without_filter_keeps_everything_and_roundtrips():
    s = DifficultySampler(2, 4, 0.6, filter=False)
    assert [s.offer(f"g{i}", a) for i, a in enumerate([[0, 0], [1, 1], [0.5, 0.5]])] == ["kept"] * 3
    s2 = DifficultySampler.from_json(s.to_json())
    assert s2.filter is False and [g.group_id for g in s2.buffer] == ["g0", "g1", "g2"]
    assert DifficultySampler(2, 4, 0.6).offer("x", [0, 0]) == "all_wrong"


# -- run config -------------------------------------------------------------------------------------
def test_run_config_yaml_overrides_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: ckpt\ndata: [d.parquet]\nlr: 2.0e-6\nvlpo:\n  n: 4\n  sigma: 5\n")
    cfg = VLPORunConfig.from_yaml(y, {"vlpo.sigma": 7.5, "steps": 3})
    assert cfg.model == str(tmp_path / "ckpt") and cfg.data == [str(tmp_path / "d.parquet")]
    assert cfg.vlpo.n == 4 and cfg.vlpo.sigma == 7.5 and cfg.steps == 3 and cfg.lr == 2e-6
    again = VLPORunConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown settings.*'lrr'"):
        VLPORunConfig.from_yaml(y, {"lrr": 1})
    with pytest.raises(ValueError, match="unknown fields.*'sigmaa'"):
        VLPORunConfig.from_yaml(y, {"vlpo.sigmaa": 1})
    with pytest.raises(ValueError, match="engine"):
        VLPORunConfig.from_yaml(y, {"engine": "tgi"})
