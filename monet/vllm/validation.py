"""Per-request settings validation at admission, through vLLM's logits-processor interface.

vLLM calls ``validate_params`` of every configured logits processor on each request before it is
admitted (in ``LLM.generate`` a bad request raises ``ValueError``; the OpenAI server answers
HTTP 400 after its own authentication). :class:`LatentSettingsValidator` uses that hook to run
:func:`monet.vllm.settings.parse_request_settings`, so a request with invalid Monet settings never
reaches the model runner. It does not touch the logits.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

from monet.layout import SpanLayout
from monet.vllm.settings import parse_request_settings

VALIDATOR = "monet.vllm.validation:LatentSettingsValidator"


class LatentSettingsValidator(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        try:
            parse_request_settings(sampling_params.extra_args, SpanLayout())
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid Monet request settings: {e}") from None

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
