"""The memory measurements the benchmarks report (monet.testing.memory), on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from monet.testing.memory import SavedActivationBytes, peak_live_bytes


def test_peak_live_bytes_cpu_hand_computed():
    keep = []

    def fn():
        a = torch.ones(1_000_000)          # 4 MB live
        b = torch.ones(2_000_000)          # 12 MB
        del a                              # 8 MB
        c = torch.ones(500_000)            # 10 MB
        keep.append(b + 0)                 # 18 MB: the peak (this one outlives the call)
        del b, c                           # 8 MB

    peak = peak_live_bytes(fn)
    assert peak == pytest.approx(18e6, rel=0.01)
    # memory alive before the call does not count
    big = torch.ones(5_000_000)
    assert peak_live_bytes(lambda: torch.ones(250_000)) == pytest.approx(1e6, rel=0.01)
    del big, keep


def test_saved_activation_bytes_excludes_parameters():
    lin = torch.nn.Linear(256, 512)
    x = torch.randn(64, 256, requires_grad=True)
    with SavedActivationBytes() as everything:
        lin(x).sum()
    with SavedActivationBytes(lin.parameters()) as activations:
        y = lin(x)
        torch.relu(y).sum()
    weight_bytes = lin.weight.numel() * 4
    assert everything.total == x.numel() * 4 + weight_bytes            # addmm saves its input and weight
    assert activations.total == x.numel() * 4 + y.numel() * 4          # input + relu's output; no weight


def test_peak_live_bytes_rejects_unknown_device():
    with pytest.raises(ValueError, match="unsupported device"):
        peak_live_bytes(lambda: None, "meta")
