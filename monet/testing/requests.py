"""A fixed mix of generation requests for parity tests of the latent decoders."""

from __future__ import annotations

from monet.testing.tiny_model import synthetic_image


def mixed_requests(extra_plain: bool = False) -> list:
    """Requests with 0, 1 and 2 images (different sizes), different prompt lengths, chat messages,
    and two prompts ending in START (``force_latent``). ``extra_plain`` adds a seventh, plain one."""
    from monet.model.requests import LatentRequest

    reqs = [
        LatentRequest(prompt="What is here?", images=[synthetic_image(0)]),
        LatentRequest(prompt="hello", force_latent=True),
        LatentRequest(prompt="Describe the two pictures in detail please.",
                      images=[synthetic_image(1), synthetic_image(2, size=(84, 56))]),
        LatentRequest(prompt="a b c d e f g"),
        LatentRequest(prompt="Count the shapes", images=[synthetic_image(3)], force_latent=True),
        {"messages": [{"role": "user", "content": [{"type": "image", "image": synthetic_image(4)},
                                                   {"type": "text", "text": "zzz"}]}]},
    ]
    if extra_plain:
        reqs.append(LatentRequest(prompt="one more plain question about nothing at all"))
    return reqs
