import functools

import pytest
import torch

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine (CUDA kernels are compiled but cannot run)")

DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@functools.cache
def _load_tiny(device: str, dtype: str = "float32"):
    import monet
    from monet.testing import build_tiny_checkpoint

    return monet.load_model(build_tiny_checkpoint(cache=True), dtype=dtype, device=device)


@pytest.fixture(scope="session")
def tiny_on():
    """``tiny_on(device, dtype="float32") -> (model, processor)``: the tiny random checkpoint, loaded
    once per (device, dtype) for the whole session (tests that change it restore it)."""
    return _load_tiny


@pytest.fixture(scope="module")
def local_ray():
    """A local 2-CPU Ray instance for one test module (left alone if one is already running)."""
    ray = pytest.importorskip("ray", reason="the Ray controller needs ray (the rl extra)")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
