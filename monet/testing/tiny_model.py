"""Build tiny random Qwen2.5-VL-architecture checkpoints offline (for tests, demos, benchmarks).

A checkpoint directory holds what a real Qwen2.5-VL release holds (``config.json``,
``generation_config.json``, safetensors weights, tokenizer, image/video processor config, chat
template), so ``transformers`` (``Qwen2_5_VLForConditionalGeneration`` / ``AutoProcessor``) and vLLM
load it like the real model. Weights are random but fully determined by ``seed``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from monet.testing.tokenizer import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    VIDEO_TOKEN,
    VISION_END_TOKEN,
    VISION_PAD_TOKEN,
    VISION_START_TOKEN,
    build_tokenizer,
)

#: Bump whenever the produced checkpoint changes (invalidates cached directories).
FACTORY_VERSION = 1
MARKER_FILE = "monet_tiny_checkpoint.json"
_PIXELS_PER_TOKEN = 28 * 28  # patch 14, spatial merge 2: one LM image token per 28x28 pixels


@dataclass(frozen=True)
class TinyPreset:
    """Architecture of a tiny checkpoint (language model + vision tower + image budget)."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    mrope_section: tuple[int, int, int]
    vision_depth: int
    vision_hidden_size: int
    vision_num_heads: int
    vision_intermediate_size: int
    fullatt_block_indexes: tuple[int, ...]
    max_position_embeddings: int = 4096
    rope_theta: float = 1000000.0
    vision_patch_size: int = 14
    vision_spatial_merge_size: int = 2
    vision_window_size: int = 112
    vision_temporal_patch_size: int = 2
    image_min_tokens: int = 4
    image_max_tokens: int = 64
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden_size // self.vision_num_heads

    def validate(self) -> None:
        """Raise ``ValueError`` if the preset cannot work (HF or vLLM)."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{self.name}: hidden_size must divide by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.name}: num_attention_heads must divide by num_key_value_heads")
        if self.head_dim < 32 or self.vision_head_dim < 32:
            raise ValueError(f"{self.name}: head_dim must be >= 32 (vLLM CPU attention)")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"{self.name}: mrope_section must sum to head_dim/2")
        if any(not 0 <= i < self.vision_depth for i in self.fullatt_block_indexes):
            raise ValueError(f"{self.name}: fullatt_block_indexes out of range")
        if self.vision_hidden_size % self.vision_num_heads:
            raise ValueError(f"{self.name}: vision_hidden_size must divide by vision_num_heads")


#: The presets: ``tiny`` (unit tests, ~1M params) and ``small`` (~70M params, benchmarks).
PRESETS: dict[str, TinyPreset] = {
    "tiny": TinyPreset(
        name="tiny",
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        mrope_section=(4, 6, 6),
        vision_depth=2,
        vision_hidden_size=64,
        vision_num_heads=2,
        vision_intermediate_size=128,
        fullatt_block_indexes=(1,),
        image_max_tokens=64,
    ),
    "small": TinyPreset(
        name="small",
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=2816,
        mrope_section=(8, 12, 12),
        vision_depth=8,
        vision_hidden_size=512,
        vision_num_heads=8,
        vision_intermediate_size=1376,
        fullatt_block_indexes=(3, 7),
        image_max_tokens=256,
    ),
}


def get_preset(preset: str | TinyPreset) -> TinyPreset:
    """Look a preset up by name (a :class:`TinyPreset` is returned as is)."""
    if isinstance(preset, TinyPreset):
        preset.validate()
        return preset
    try:
        p = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}") from None
    p.validate()
    return p


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def build_config(
    preset: str | TinyPreset = "tiny",
    tokenizer: Any = None,
    *,
    vocab_size: int | None = None,
    dtype: str = "float32",
    pad_vocab_to_multiple_of: int = 64,
):
    """A ``Qwen2_5_VLConfig`` for ``preset`` whose token ids match ``tokenizer``.

    The embedding has ``len(tokenizer)`` rounded up to ``pad_vocab_to_multiple_of`` rows unless
    ``vocab_size`` is given. Without a tokenizer the default one (with Monet tokens) is built.
    """
    from transformers import Qwen2_5_VLConfig

    p = get_preset(preset)
    if tokenizer is None:
        tokenizer = build_tokenizer(add_monet_tokens=True)
    if vocab_size is None:
        vocab_size = _round_up(len(tokenizer), max(1, pad_vocab_to_multiple_of))
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} < tokenizer length {len(tokenizer)}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (
        BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN,
        VISION_START_TOKEN, VISION_END_TOKEN, VISION_PAD_TOKEN,
    )}  # fmt: skip
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=p.max_position_embeddings,
        initializer_range=p.init_std,
        rms_norm_eps=1e-6,
        use_cache=True,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=p.num_hidden_layers,
        attention_dropout=0.0,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": p.rope_theta,
            "mrope_section": list(p.mrope_section),
        },
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        dtype=dtype,
    )
    vision_config = dict(
        depth=p.vision_depth,
        hidden_size=p.vision_hidden_size,
        hidden_act="silu",
        intermediate_size=p.vision_intermediate_size,
        num_heads=p.vision_num_heads,
        in_channels=3,
        patch_size=p.vision_patch_size,
        spatial_merge_size=p.vision_spatial_merge_size,
        temporal_patch_size=p.vision_temporal_patch_size,
        tokens_per_second=2,
        window_size=p.vision_window_size,
        out_hidden_size=p.hidden_size,
        fullatt_block_indexes=list(p.fullatt_block_indexes),
        initializer_range=p.init_std,
        dtype=dtype,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_TOKEN],
        video_token_id=ids[VIDEO_TOKEN],
        vision_start_token_id=ids[VISION_START_TOKEN],
        vision_end_token_id=ids[VISION_END_TOKEN],
        vision_token_id=ids[VISION_PAD_TOKEN],
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        tie_word_embeddings=False,
        dtype=dtype,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def build_processor(tokenizer: Any, preset: str | TinyPreset = "tiny"):
    """A ``Qwen2_5_VLProcessor`` (image + video processor, chat template) around ``tokenizer``."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    p = get_preset(preset)
    pixels_per_token = _PIXELS_PER_TOKEN * (p.vision_patch_size // 14) ** 2
    common = dict(
        patch_size=p.vision_patch_size,
        temporal_patch_size=p.vision_temporal_patch_size,
        merge_size=p.vision_spatial_merge_size,
        min_pixels=p.image_min_tokens * pixels_per_token,
        max_pixels=p.image_max_tokens * pixels_per_token,
    )
    image_processor = Qwen2VLImageProcessor(**common)
    video_processor = Qwen2VLVideoProcessor(cap_pixels_per_frame=True, **common)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def init_weights_(model: Any, seed: int, std: float = 0.02) -> None:
    """Re-initialise every parameter of ``model`` in place, determined by ``seed`` only.

    Norm weights are ones; everything else (weights and biases) is ``normal(0, std)`` drawn in
    parameter-name order from a private generator, so results do not depend on the global RNG or
    on how ``transformers`` initialises modules.
    """
    import torch

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 2)
            owners = leaf[:-1]
            if param.ndim == 1 and any("norm" in part or part == "ln_q" for part in owners):
                param.fill_(1.0)
            else:
                values = torch.empty(param.shape, dtype=torch.float32)
                values.normal_(0.0, std, generator=gen)
                param.copy_(values.to(param.dtype))


def count_parameters(preset: str | TinyPreset = "tiny", vocab_size: int | None = None) -> int:
    """Number of parameters of a preset's model, counted on the ``meta`` device (no memory)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    if vocab_size is None:
        config = build_config(preset)
    else:
        config = build_config(preset, _FakeTokenizer(), vocab_size=vocab_size)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


class _FakeTokenizer:
    """Stand-in with the two methods build_config needs (for counting params only)."""

    def __len__(self) -> int:
        return 0

    def convert_tokens_to_ids(self, token: str) -> int:
        return 0


def _marker(preset: TinyPreset, seed: int, add_monet_tokens: bool, dtype: str, vocab_multiple: int):
    import tokenizers
    import torch
    import transformers

    marker = {
        "factory_version": FACTORY_VERSION,
        "preset": asdict(preset),
        "seed": int(seed),
        "add_monet_tokens": bool(add_monet_tokens),
        "dtype": dtype,
        "pad_vocab_to_multiple_of": int(vocab_multiple),
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    return json.loads(json.dumps(marker))  # tuples -> lists, as read back from disk


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def default_cache_dir() -> Path:
    """Where ``build_tiny_checkpoint(None, ...)`` keeps checkpoints: the platform's user cache
    folder (XDG convention, ``~/.cache``) / ``monet/tiny``. Pass ``out_dir`` to choose another."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(root) / "monet" / "tiny"


def _write_checkpoint(
    out: Path, p: TinyPreset, seed: int, add_monet_tokens: bool, dtype: str, vocab_multiple: int
) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer(add_monet_tokens=add_monet_tokens)
    config = build_config(p, tokenizer, dtype=dtype, pad_vocab_to_multiple_of=vocab_multiple)
    torch_dtype = getattr(torch, dtype)
    model = Qwen2_5_VLForConditionalGeneration(config)
    init_weights_(model, seed, std=p.init_std)
    model = model.to(torch_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[config.text_config.eos_token_id, tokenizer.convert_tokens_to_ids(PAD_TOKEN)],
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    processor = build_processor(tokenizer, p)
    processor.save_pretrained(out)  # processor_config.json, tokenizer files, chat_template.jinja
    # Also the per-component files real Qwen2.5-VL releases ship (and older loaders look for).
    processor.image_processor.save_pretrained(out)  # preprocessor_config.json
    processor.video_processor.save_pretrained(out)  # video_preprocessor_config.json


def build_tiny_checkpoint(
    out_dir: str | os.PathLike | None = None,
    preset: str | TinyPreset = "tiny",
    seed: int = 0,
    add_monet_tokens: bool = True,
    *,
    cache: bool = False,
    dtype: str = "float32",
    pad_vocab_to_multiple_of: int = 64,
) -> Path:
    """Write a random Qwen2.5-VL-architecture checkpoint directory and return its path.

    ``out_dir=None`` means a folder under :func:`default_cache_dir` (and implies ``cache=True``).
    With ``cache=True`` an existing directory built with the same arguments (and library
    versions) is reused. Otherwise the directory is (re)built; an existing non-empty directory
    that is not a tiny checkpoint is never overwritten. The build happens in a temporary folder
    next to ``out_dir`` and is renamed into place, so readers never see a partial checkpoint.
    Same arguments -> byte-identical weights.
    """
    p = get_preset(preset)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
    if out_dir is None:
        monet = "" if add_monet_tokens else "-nomonet"
        tag = f"{p.name}-s{seed}{monet}-{dtype}-v{pad_vocab_to_multiple_of}"
        out_dir, cache = default_cache_dir() / tag, True
    out = Path(out_dir).absolute()
    marker = _marker(p, seed, add_monet_tokens, dtype, pad_vocab_to_multiple_of)
    if cache and _read_marker(out) == marker:
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and _read_marker(out) is None)):
        raise FileExistsError(f"{out} exists and is not a tiny checkpoint; refusing to overwrite")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_checkpoint(tmp, p, seed, add_monet_tokens, dtype, pad_vocab_to_multiple_of)
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, out)  # fails if `out` exists and is non-empty
        except OSError:
            if cache and _read_marker(out) == marker:  # someone else built the same thing
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "ckpt")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def synthetic_image(seed: int, size: tuple[int, int] = (56, 56)):
    """A deterministic RGB ``PIL.Image`` of random coloured shapes; ``size`` is (width, height)."""
    from PIL import Image, ImageDraw

    rng = random.Random(int(seed))
    w, h = int(size[0]), int(size[1])

    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    img = Image.new("RGB", (w, h), colour())
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 4)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1 = min(w - 1, x0 + rng.randint(max(2, w // 8), max(3, w // 2)))
        y1 = min(h - 1, y0 + rng.randint(max(2, h // 8), max(3, h // 2)))
        x0, y0 = min(x0, x1 - 1), min(y0, y1 - 1)
        kind = rng.choice(("rectangle", "ellipse", "triangle"))
        fill = colour()
        if kind == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif kind == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img
