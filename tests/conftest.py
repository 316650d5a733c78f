import pytest
import torch

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine (CUDA kernels are compiled but cannot run)")

DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
