"""DeepSpeed ZeRO-2/3 for the trainers (``SFTConfig.deepspeed`` / ``VLPORunConfig.deepspeed`` =
path/to/zero2.json).

The JSON under ``scripts/deepspeed/`` holds the ZeRO settings; batch size, accumulation, clipping
and precision always come from the trainer's own config (one source of truth), passed here as
:class:`EngineSettings`, so those keys are filled in here. DeepSpeed is imported only here, when a
config asks for it, with its log output on stderr (see :func:`import_deepspeed`).

ZeRO-3 partitions every parameter across the ranks: a parameter is whole only while its module's
forward or backward runs (DeepSpeed's module hooks gather and release it). Code that reads a weight
outside a module call must either call the module (the CE head, see
:func:`monet.train.losses.weighted_ce_sum`) or gather it explicitly (:func:`full_weights`).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

#: Keys this module owns; a value in the JSON other than "auto" must agree with the trainer's config.
_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


@dataclass(frozen=True)
class EngineSettings:
    """What DeepSpeed needs from a trainer's config: the ZeRO JSON ``path``, the per-rank
    ``micro_batch_size`` and the number of micro-batches per optimizer step (``grad_accum``),
    the clipping norm (``max_grad_norm``, None/0 = off) and ``dtype`` ("bfloat16" or "float32")."""

    path: str
    micro_batch_size: int
    grad_accum: int
    max_grad_norm: float | None
    dtype: str
    owner: str = "trainer"  # named in error messages ("SFT config", "VLPO run config")


def engine_settings(cfg: Any) -> EngineSettings:
    """:class:`EngineSettings` of an :class:`monet.train.config.SFTConfig`."""
    return EngineSettings(path=cfg.deepspeed, micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
                          max_grad_norm=cfg.max_grad_norm, dtype=cfg.dtype, owner="SFT config")


def read_zero_config(path: str | Path) -> dict:
    """The JSON object at ``path`` (a DeepSpeed config); a clear error when it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ValueError(f"{path}: a DeepSpeed config is a JSON object, got {type(ds).__name__}")
    return ds


def deepspeed_config(settings: EngineSettings) -> dict:
    """The DeepSpeed config dict: the JSON's ZeRO settings plus the keys the trainer owns."""
    path = Path(settings.path)
    ds = read_zero_config(path)
    want = {"train_micro_batch_size_per_gpu": settings.micro_batch_size,
            "gradient_accumulation_steps": settings.grad_accum,
            "gradient_clipping": float(settings.max_grad_norm or 0.0)}
    for key in _OWNED:
        if key in ds and ds[key] != "auto" and ds[key] != want[key]:
            raise ValueError(f"{path}: {key}={ds[key]} conflicts with the {settings.owner} ({want[key]}); "
                             f"set it to \"auto\" or change the {settings.owner}")
        ds[key] = want[key]
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    bf16 = settings.dtype in ("bfloat16", "bf16")
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


class ForwardRunner(torch.nn.Module):
    """The module DeepSpeed wraps: the model as its only child, and a forward that runs whatever
    computation it is handed, ``runner(fn, *args, **kwargs) = fn(*args, **kwargs)``.

    Why: DeepSpeed does per-micro-step bookkeeping in ``engine.forward`` (ZeRO-3 counts the
    micro-steps of an accumulation window there: without it each backward *overwrites* the
    accumulated gradient partition instead of adding to it, and resets its parameter-fetch trace),
    but our training forward is not the model's ``forward`` (it recombines the model's parts:
    :mod:`monet.model.training`). Running it as ``engine(fn, ...)`` keeps DeepSpeed's contract.
    Engine checkpoints therefore name the weights ``model.<name>``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


def init_engine(settings: EngineSettings, model: Any, optimizer: Any, scheduler: Any = None):
    """``deepspeed.initialize`` on ``ForwardRunner(model)`` with our optimizer and scheduler (the
    process group is already up: :func:`monet.train.distributed.init_distributed`). Run each
    micro-batch's forward as ``engine(fn, *args)`` and its backward as ``engine.backward(loss)``.
    Returns the engine."""
    deepspeed = import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=ForwardRunner(model), optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(settings), dist_init_required=False)
    return engine


def is_zero3(engine: Any) -> bool:
    """Whether ``engine`` (a DeepSpeed engine, or None for the plain path) partitions parameters."""
    return engine is not None and engine.zero_optimization_stage() == 3


def full_weights(engine: Any, model: Any):
    """A context in which every parameter of ``model`` is whole on every rank: DeepSpeed's
    ``zero.GatheredParameters`` (read-only; collective, so every rank must enter it) under
    ZeRO-3, a no-op otherwise. For reading weights outside a forward: saving, finiteness checks,
    checksums, weight sync."""
    if not is_zero3(engine):
        return nullcontext()
    return import_deepspeed().zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def gather_from_ranks(local: "torch.Tensor", world_size: int) -> "torch.Tensor":
    """Every rank's copy of ``local`` (same shape and dtype on all ranks), stacked in rank order:
    ``[world_size, *local.shape]``; one ``all_gather`` (no communication in a world of one).

    ZeRO-3 lockstep: every module call gathers that module's parameters with a collective, so all
    ranks must make the same module calls in the same order. The trainers gather the per-micro-batch
    counts that decide how often a module is called (latent decode steps, CE chunks) and run the
    largest count on every rank, and refuse micro-batches that would take different code paths."""
    if world_size <= 1:
        return local.unsqueeze(0)
    out = [torch.empty_like(local) for _ in range(world_size)]
    torch.distributed.all_gather(out, local.contiguous())
    return torch.stack(out)
