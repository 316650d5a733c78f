"""Tests for monet.testing: the offline tiny Qwen2.5-VL checkpoint factory."""

from __future__ import annotations

import hashlib
import json
import string

import pytest
import torch

from monet.testing import (
    MARKER_FILE,
    PRESETS,
    build_tiny_checkpoint,
    count_parameters,
    synthetic_image,
)
from monet.tokens import MONET_TOKENS

transformers = pytest.importorskip("transformers")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", preset="tiny", seed=0)


@pytest.fixture(scope="module")
def loaded(ckpt):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).eval()
    processor = transformers.AutoProcessor.from_pretrained(ckpt)
    return model, processor


@pytest.fixture(scope="module")
def forward(loaded):
    model, processor = loaded
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": synthetic_image(3, size=(84, 112))},
                {"type": "text", "text": "What colour is the box? Answer in \\boxed{}."},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
    )
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return inputs, out


def test_checkpoint_files(ckpt):
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.jinja",
        MARKER_FILE,
    ):
        assert (ckpt / name).is_file(), name
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert cfg["model_type"] == "qwen2_5_vl"
    assert cfg["tie_word_embeddings"] is False
    assert not list(ckpt.parent.glob(".*tmp-*")), "temporary build folder left behind"


def test_config_matches_tokenizer(loaded):
    model, processor = loaded
    cfg, tok = model.config, processor.tokenizer
    text = cfg.text_config
    assert isinstance(processor, transformers.Qwen2_5_VLProcessor)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.image_token_id == processor.image_token_id
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert text.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert text.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    # Embedding rows: tokenizer length rounded up to a multiple of 64, strictly more rows.
    assert text.vocab_size % 64 == 0 and text.vocab_size >= len(tok)
    assert model.get_input_embeddings().weight.shape[0] == text.vocab_size
    assert model.lm_head.weight.shape[0] == text.vocab_size
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert 200 <= len(tok) <= 2100


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_geometry(name):
    p = PRESETS[name]
    assert p.head_dim >= 32 and p.vision_head_dim >= 32
    assert 2 * sum(p.mrope_section) == p.head_dim
    assert all(0 <= i < p.vision_depth for i in p.fullatt_block_indexes)


def test_loaded_head_dim_and_mrope(loaded):
    text = loaded[0].config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim >= 32
    assert 2 * sum(text.rope_parameters["mrope_section"]) == head_dim


def test_forward_with_image(loaded, forward):
    model, processor = loaded
    inputs, out = forward
    ids = inputs["input_ids"]
    cfg = model.config
    n_img = int((ids == cfg.image_token_id).sum())
    # 84x112 image: 6x8 patches of 14 -> 3x4 merged tokens
    assert n_img == 12
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 6]]
    logits = out.logits
    assert logits.shape == (1, ids.shape[1], cfg.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    # non-degenerate: logits differ between positions and argmax is not constant
    assert logits[0].std(dim=0).mean() > 1e-2
    assert logits[0].argmax(-1).unique().numel() > 1


def test_last_hidden_state_is_final_norm(loaded, forward):
    model, _ = loaded
    _, out = forward
    assert len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1
    with torch.no_grad():
        recomputed = model.lm_head(out.hidden_states[-1])
    torch.testing.assert_close(recomputed, out.logits, atol=1e-5, rtol=0)


def test_chat_template_layout(loaded):
    _, processor = loaded
    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
    ]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nsys<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")


def test_tokenizer_roundtrip_ascii(loaded):
    tok = loaded[1].tokenizer
    rng = torch.Generator().manual_seed(0)
    alphabet = string.printable
    samples = [
        "The box is red. \\boxed{42}",
        alphabet,
        "  leading and trailing spaces  \n\n\ttabs",
        "zqxj qwxz 0123456789 ~!@#$%^&*()_+`-=[]{}|;':\",./<>?",
    ]
    for _ in range(20):
        length = int(torch.randint(1, 80, (1,), generator=rng))
        idx = torch.randint(len(alphabet), (length,), generator=rng)
        samples.append("".join(alphabet[i] for i in idx.tolist()))
    unk = tok.unk_token_id
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False)
        assert unk is None or unk not in ids
        assert tok.decode(ids) == s


def test_monet_tokens_single_consecutive_ids(loaded):
    tok = loaded[1].tokenizer
    ids = []
    for t in MONET_TOKENS:
        enc = tok.encode(t, add_special_tokens=False)
        assert len(enc) == 1, (t, enc)
        assert enc[0] == tok.convert_tokens_to_ids(t)
        ids.append(enc[0])
    assert ids == list(range(ids[0], ids[0] + len(MONET_TOKENS)))
    assert ids[-1] == len(tok) - 1  # added last, like on top of the real Qwen tokenizer
    # inside text they still come out as single ids
    text = "a<abs_vis_token><abs_vis_token_pad></abs_vis_token>b"
    enc = tok.encode(text, add_special_tokens=False)
    assert ids[1] in enc and ids[0] in enc and ids[2] in enc


def test_same_seed_identical_different_seed_differs(ckpt, tmp_path):
    again = build_tiny_checkpoint(tmp_path / "again", preset="tiny", seed=0)
    other = build_tiny_checkpoint(tmp_path / "other", preset="tiny", seed=1)
    w = "model.safetensors"
    assert _sha(again / w) == _sha(ckpt / w)
    assert _sha(again / "tokenizer.json") == _sha(ckpt / "tokenizer.json")
    assert _sha(other / w) != _sha(ckpt / w)
    from safetensors.torch import load_file

    a, b = load_file(ckpt / w), load_file(other / w)
    assert a.keys() == b.keys()
    differing = [k for k in a if a[k].numel() > 1 and not torch.equal(a[k], b[k])]
    assert len(differing) > len(a) // 2


def test_cache_reuse_and_rebuild(tmp_path):
    out = tmp_path / "cached"
    first = build_tiny_checkpoint(out, seed=5, cache=True)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = build_tiny_checkpoint(out, seed=5, cache=True)
    assert second == first
    assert (second / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    third = build_tiny_checkpoint(out, seed=6, cache=True)  # different seed: rebuilt in place
    assert json.loads((third / MARKER_FILE).read_text())["seed"] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        build_tiny_checkpoint(foreign)
    assert (foreign / "keep.txt").read_text() == "user data"


def test_without_monet_tokens(tmp_path):
    out = build_tiny_checkpoint(tmp_path / "plain", seed=0, add_monet_tokens=False)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    for t in MONET_TOKENS:
        assert t not in vocab
        assert len(tok.encode(t, add_special_tokens=False)) > 1
    assert tok.convert_tokens_to_ids("<|image_pad|>") is not None
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] >= len(tok)
    # exact-size embedding (no spare rows), so adding the Monet tokens later needs a resize
    exact = build_tiny_checkpoint(
        tmp_path / "exact", seed=0, add_monet_tokens=False, pad_vocab_to_multiple_of=1
    )
    cfg = json.loads((exact / "config.json").read_text())
    assert cfg["text_config"]["vocab_size"] == len(tok)


def test_unknown_preset_rejected(tmp_path):
    with pytest.raises(ValueError):
        build_tiny_checkpoint(tmp_path / "x", preset="huge")


def test_small_preset_param_count():
    n = count_parameters("small")
    assert 50_000_000 <= n <= 100_000_000, n
    assert count_parameters("tiny") < 5_000_000


def test_synthetic_image_deterministic():
    a, b, c = synthetic_image(7), synthetic_image(7), synthetic_image(8)
    assert a.size == (56, 56) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    assert len(a.getcolors(maxcolors=1 << 16)) > 1
    assert synthetic_image(1, size=(112, 84)).size == (112, 84)
