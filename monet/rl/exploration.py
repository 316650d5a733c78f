"""Latent exploration for rollouts: feed ``z = mu + s * eps`` instead of ``mu``.

``mu`` is the final-norm hidden state the decoder would feed back; ``eps ~ N(0, I)``; ``s`` is
:attr:`VLPOConfig.latent_noise` (0 = no exploration, ``z == mu`` exactly). The noise is drawn in
fp32 and the result cast back to ``mu``'s dtype (what the model consumes). With ``s = 0`` the
policy's latent term has zero gradient at ``theta_old`` (``z == mu``); with ``s > 0`` it pulls
``mu`` towards latents that earned positive advantage, ``d/d mu log N(z; mu, sigma^2 I) = (z - mu) / sigma^2``.
"""

from __future__ import annotations

import torch


def explore_latents(mu: torch.Tensor, noise: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``mu`` ``[..., D]`` -> ``z`` of the same shape and dtype (``mu`` itself when ``noise == 0``)."""
    if not noise >= 0:
        raise ValueError(f"latent noise must be >= 0, got {noise}")
    if noise == 0:
        return mu
    eps = torch.randn(mu.shape, generator=generator, dtype=torch.float32, device=mu.device)
    return (mu.float() + noise * eps).to(mu.dtype)
