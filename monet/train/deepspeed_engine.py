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


def init_engine(cfg: SFTConfig, model: Any, optimizer: Any, scheduler: Any):
    """``deepspeed.initialize`` with our optimizer and scheduler. Returns the engine."""
    deepspeed = import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg), dist_init_required=False)
    return engine
