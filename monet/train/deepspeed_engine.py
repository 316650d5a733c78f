"""DeepSpeed ZeRO-2/3 for the SFT trainer (``SFTConfig.deepspeed = path/to/zero2.json``).

The JSON under ``scripts/deepspeed/`` holds the ZeRO settings; batch size, accumulation, clipping
and precision always come from the :class:`SFTConfig` (one source of truth), so those keys are
filled in here. DeepSpeed is imported only here, when a config asks for it, with its log output
on stderr (see :func:`import_deepspeed`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monet.train.config import SFTConfig

#: Keys this module owns; a value in the JSON other than "auto" must agree with the SFTConfig.
_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def deepspeed_config(cfg: SFTConfig) -> dict:
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    want = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": float(cfg.max_grad_norm or 0.0)}
    for key in _OWNED:
        if key in ds and ds[key] != "auto" and ds[key] != want[key]:
            raise ValueError(f"{path}: {key}={ds[key]} conflicts with the SFT config ({want[key]}); "
                             "set it to \"auto\" or change the SFT config")
        ds[key] = want[key]
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    bf16 = cfg.dtype in ("bfloat16", "bf16")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    ds.setdefault("zero_allow_untested_optimizer", True)  # our AdamW is torch's
    ds.setdefault("steps_per_print", 10 ** 9)  # we log ourselves
    return ds


def import_deepspeed():
    """Import DeepSpeed with its log output on stderr.

    DeepSpeed's logger binds a handler to ``sys.stdout`` when the package is first imported (and
    logs an accelerator banner right then), which would mix library chatter into a command's
    output. Importing it while ``sys.stdout`` points at stderr binds that handler to stderr."""
    import contextlib
    import sys

    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed
    except ImportError:
        raise ImportError("SFTConfig.deepspeed is set but DeepSpeed is not installed: pip install -e '.[train]'") from None
    return deepspeed


def _deepspeed_record_classes() -> list[type]:
    """The plain data classes DeepSpeed's ZeRO checkpoints pickle besides tensors and containers
    (a fragment's address, the ZeRO stage enum, the loss scaler's settings)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler]


def check_deepspeed_checkpoint(folder: str | Path) -> int:
    """Refuse a DeepSpeed checkpoint folder unless every pickle in it parses with torch's
    weights-only unpickler (tensors, plain containers and DeepSpeed's record classes only).

    DeepSpeed itself loads its files with ``torch.load(weights_only=False)``, which can execute
    code. Parsing the same bytes first with the weights-only unpickler, which resolves every
    global the stream names against an allowlist and fails on anything else, means DeepSpeed's
    full unpickling then meets only those globals. Tensors are memory-mapped, not read. Returns
    the number of files checked; raises :class:`monet.train.checkpoint.CheckpointError`."""
    import torch

    from monet.train.checkpoint import CheckpointError

    import_deepspeed()
    allowed = _deepspeed_record_classes()
    files = sorted(p for p in Path(folder).rglob("*.pt") if p.is_file())
    if not files:
        raise CheckpointError(f"{folder} holds no DeepSpeed checkpoint files (*.pt)")
    for f in files:
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            try:
                names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
            except Exception:
                names = []
            extra = [n for n in names if n not in {f"{c.__module__}.{c.__qualname__}" for c in allowed}]
            raise CheckpointError(
                f"{f}: refusing to let DeepSpeed unpickle it: it holds objects other than tensors, plain containers "
                f"and DeepSpeed's checkpoint records{f' ({extra})' if extra else ''}, and unpickling those can "
                f"execute code [{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]") from None
    return len(files)


def init_engine(cfg: SFTConfig, model: Any, optimizer: Any, scheduler: Any):
    """``deepspeed.initialize`` with our optimizer and scheduler. Returns the engine."""
    deepspeed = import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg), dist_init_required=False)
    return engine
