"""Load any Qwen2.5-VL (or Monet) checkpoint as a latent-reasoning model.

:class:`MonetQwen2_5_VL` subclasses transformers' ``Qwen2_5_VLForConditionalGeneration`` (same
weights, same modules) and carries a :class:`~monet.model.config.MonetConfig`; ``save_pretrained``
writes it next to ``config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from monet.atomic import atomic_write_json
from monet.layout import SpanLayout
from monet.model.config import MonetConfig
from monet.tokens import MONET_TOKENS, LatentTokenIds

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_REQUIRED_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


class MonetQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with Monet latent settings attached (``self.monet_config``)."""

    monet_config: MonetConfig

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as a plain Qwen2.5-VL checkpoint (``architectures`` names the transformers class, so
        vLLM and transformers load it as is) plus ``monet_config.json``."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        cfg_file = Path(save_directory) / "config.json"
        if cfg_file.is_file():
            data = json.loads(cfg_file.read_text())
            data["architectures"] = [Qwen2_5_VLForConditionalGeneration.__name__]
            atomic_write_json(cfg_file, data, indent=2)
        cfg = getattr(self, "monet_config", None)
        if cfg is not None:
            cfg.save(save_directory)
        return out


def _register_weight_names() -> None:
    """Checkpoints store Qwen2.5-VL weights under their original names (``model.layers...``);
    transformers maps them per class name, so the subclass gets the parent's public mapping."""
    from transformers import conversion_mapping as cm

    name = MonetQwen2_5_VL.__name__
    if cm.get_checkpoint_conversion_mapping(name) is None:
        parent = cm.get_checkpoint_conversion_mapping(Qwen2_5_VLForConditionalGeneration.__name__)
        if parent is not None:
            cm.register_checkpoint_conversion_mapping(name, parent)


_register_weight_names()


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
    return _DTYPES[dtype]


def _check_checkpoint(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON ({e})") from None
    if model_type != "qwen2_5_vl":
        raise ValueError(f"{path}: model_type is {model_type!r}; Monet needs a Qwen2.5-VL checkpoint (model_type 'qwen2_5_vl')")
    _check_weights(path)


def _check_weights(path: Path) -> None:
    """The checkpoint's safetensors files exist and are complete (header readable, every tensor's
    bytes present): a truncated copy is named here instead of failing deep inside the loader."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model weights (model.safetensors or model.safetensors.index.json); "
                                "Monet loads safetensors checkpoints only")
    for name in files:
        check_safetensors_file(path / name)


def check_safetensors_file(file: Path) -> None:
    """Raise a clear error when ``file`` is missing, has a corrupt header or is truncated."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: weight file listed by the checkpoint is missing")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ValueError(f"{file}: truncated or not a safetensors file ({size} bytes); re-copy or re-save it")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: corrupt safetensors header ({e})") from None
    if 8 + n + end > size:
        raise ValueError(f"{file}: truncated: the header promises {8 + n + end} bytes but the file has {size}; "
                         "re-copy or re-save the checkpoint")


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, refusing devices this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here "
                         f"(torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def add_monet_tokens(tokenizer: Any) -> list[str]:
    """Add the five Monet tokens (in their canonical order) if missing; returns those added."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in MONET_TOKENS if t not in vocab]
    for t in missing:  # one at a time so the ids follow MONET_TOKENS order
        tokenizer.add_tokens([t], special_tokens=True)
    return missing


def _check_tokenizer(tokenizer: Any, path: Path) -> None:
    vocab = tokenizer.get_vocab()
    absent = [t for t in _REQUIRED_TOKENS if t not in vocab]
    if absent:
        raise ValueError(f"{path}: tokenizer lacks the Qwen2.5-VL vision tokens {absent}; it is not a Qwen2.5-VL tokenizer")


@torch.no_grad()
def _grow_embeddings(model: Qwen2_5_VLForConditionalGeneration, n_tokens: int) -> bool:
    """Resize input/output embeddings to hold ``n_tokens`` rows; new rows = mean of old rows."""
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if n_tokens <= old:
        return False
    model.resize_token_embeddings(n_tokens, mean_resizing=False)
    emb = model.get_input_embeddings()
    emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
        head.weight[old:] = head.weight[:old].mean(0, keepdim=True)
    return True


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
    latent_size: int | None = None,
    layout: str | None = None,
) -> tuple[MonetQwen2_5_VL, Any]:
    """Load a Qwen2.5-VL / Monet checkpoint directory for latent decoding and training.

    Adds the Monet tokens to the tokenizer when missing (growing the embeddings only when the
    vocabulary no longer fits; new rows are the mean of the existing ones), reads or creates the
    :class:`MonetConfig` (``latent_size``/``layout`` override the saved defaults) and returns
    ``(model, processor)`` with the model in eval mode on ``device``.
    """
    path = Path(path)
    device = resolve_device(device)
    _check_checkpoint(path)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: cannot load the processor/tokenizer files ({type(e).__name__}: {e}); a checkpoint "
                         "directory needs the files save_pretrained() writes for the model and its processor") from None
    tokenizer = processor.tokenizer
    _check_tokenizer(tokenizer, path)
    added = add_monet_tokens(tokenizer)
    model = MonetQwen2_5_VL.from_pretrained(
        path, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
    )
    _grow_embeddings(model, len(tokenizer))
    ids = LatentTokenIds.from_tokenizer(tokenizer)
    saved = MonetConfig.load(path)
    if saved is not None and saved.token_ids is not None and saved.token_ids != ids and not added:
        raise ValueError(f"{path}: monet_config.json token ids {saved.token_ids} differ from the tokenizer's {ids}")
    cfg = saved or MonetConfig()
    cfg.token_ids = ids
    cfg.span_layout = SpanLayout.of(latent_size, layout, default=cfg.span_layout)
    model.monet_config = cfg
    model.to(device)
    model.eval()
    return model, processor
