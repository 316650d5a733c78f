"""Loads the compiled extension ``monet._C`` once, registers the autograd formulas of its
differentiable ops, and says what it has."""

from __future__ import annotations

import functools
import warnings

import torch


@functools.lru_cache(maxsize=1)
def _load():
    """Import monet._C (registers torch.ops.monet.*) and the autograd formulas below.
    Returns the module, or None with a reason."""
    rebuild = "rebuild it with `pip install -e . --no-build-isolation` (or `make setup`)"
    try:
        from monet import _C  # noqa: F401  (import registers the TORCH_LIBRARY ops)
    except ImportError as e:  # not built, or built against another torch (undefined symbols)
        return None, f"{type(e).__name__}: {e}; if torch changed since the build, {rebuild}"
    mismatch = torch_mismatch(str(_C.build_info().get("torch_version", "")), torch.__version__)
    if mismatch:  # an extension loaded into another torch than its own can misbehave silently: refuse it
        return None, f"{mismatch}; {rebuild}"
    _register_autograd()
    return _C, None


def torch_mismatch(built: str, running: str) -> str | None:
    """Why an extension compiled against torch ``built`` must not run under torch ``running``
    (release versions differ), or None."""
    if built.split("+")[0] != running.split("+")[0]:
        return f"monet._C was built against torch {built} but torch {running} is running"
    return None


# ------------------------------------------------------------------ autograd of the native ops
# latent_scatter(emb, hidden, mask)[b, p] = hidden[b, p - 1] if mask[b, p] else emb[b, p] is linear in
# (emb, hidden); its backward latent_scatter_backward(grad, mask) = (grad_emb, grad_hidden) is linear
# in grad, and the adjoint of that backward is latent_scatter again:
#   d grad[p] = gg_hidden[p - 1] if mask[p] else gg_emb[p]  ==  latent_scatter(gg_emb, gg_hidden, mask)[p]
# so both ops are differentiable to any order through each other.


def _save_mask(ctx, inputs, output) -> None:
    ctx.mask = inputs[-1]


def _scatter_backward(ctx, grad):
    grad_emb, grad_hidden = torch.ops.monet.latent_scatter_backward(grad.contiguous(), ctx.mask)
    return grad_emb, grad_hidden, None


def _scatter_backward_backward(ctx, gg_emb, gg_hidden):
    return torch.ops.monet.latent_scatter(gg_emb.contiguous(), gg_hidden.contiguous(), ctx.mask), None


def _register_autograd() -> None:
    torch.library.register_autograd("monet::latent_scatter", _scatter_backward, setup_context=_save_mask)
    torch.library.register_autograd("monet::latent_scatter_backward", _scatter_backward_backward,
                                    setup_context=_save_mask)


def available() -> bool:
    """True when monet._C imported and its ops are registered."""
    return _load()[0] is not None


@functools.lru_cache(maxsize=1)
def warn_fallback() -> None:
    """Warn once that the pure-PyTorch references are used instead of the native kernels."""
    reason = _load()[1]
    warnings.warn(
        "monet._C is not available (" + str(reason) + "); monet.ops falls back to the slower "
        "pure-PyTorch reference implementations. Build it with `pip install -e . "
        "--no-build-isolation`.",
        RuntimeWarning,
        stacklevel=3,
    )


def build_info() -> dict:
    """Version, torch versions, whether the native ops and their CUDA half are compiled."""
    mod, reason = _load()
    from monet import __version__

    info: dict = {
        "version": __version__,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "native_ops": mod is not None,
    }
    if mod is None:
        info["native_error"] = reason
        info["cuda_compiled"] = False
        return info
    built = dict(mod.build_info())
    info["compiled_with_torch"] = built.pop("torch_version")
    info["extension_version"] = built.pop("version")
    info.update(built)
    return info
