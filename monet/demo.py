"""Temporary embedded-default demo: runs the latent decode ops through a few decode steps."""

from __future__ import annotations

import torch

import monet
from monet import ops
from monet.ops.reference import latent_active


def main() -> None:
    print("monet build:", monet.build_info())
    start, pad, end, k, d = 5, 6, 7, 3, 8
    weight = torch.randn(10, d)
    remaining = torch.zeros(2, dtype=torch.int32)
    prev = torch.zeros(2, d)
    slots = torch.tensor([0, 1])
    tokens = torch.tensor([1, 2])
    for step in range(8):
        x = torch.empty(2, d)
        ops.latent_embed_(x, tokens, slots, remaining, prev, weight, k)
        hidden = torch.tanh(x @ torch.randn(d, d))
        sampled = torch.tensor([start if step == 1 else 3, 4])
        ops.latent_advance_(sampled, hidden, slots, remaining, prev, start_id=start, pad_id=pad, end_id=end, latent_size=k)
        print(f"step {step}: emitted {sampled.tolist()} next-input-latent {latent_active(remaining, k).tolist()}")
        tokens = sampled


if __name__ == "__main__":
    main()
