"""The five Monet special tokens and how to find their ids.

Single source of truth for the token strings. Ids are always read from the tokenizer (with the
real Qwen2.5 tokenizer they come out as 151665..151669), never hard-coded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

LATENT_PAD = "<abs_vis_token_pad>"
LATENT_START = "<abs_vis_token>"
LATENT_END = "</abs_vis_token>"
OBSERVATION_START = "<observation>"
OBSERVATION_END = "</observation>"

#: In the order they are added to a tokenizer (this order gives the released Monet-7B ids).
MONET_TOKENS: tuple[str, ...] = (
    LATENT_PAD,
    LATENT_START,
    LATENT_END,
    OBSERVATION_START,
    OBSERVATION_END,
)

#: What a latent span is rendered as for humans.
LATENT_PLACEHOLDER = "<latent>"


@dataclass(frozen=True)
class LatentTokenIds:
    """Token ids a latent decoder needs. Build with :meth:`from_tokenizer`."""

    pad: int
    start: int
    end: int
    observation_start: int
    observation_end: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "LatentTokenIds":
        ids = {}
        unk = getattr(tokenizer, "unk_token_id", None)
        for field, tok in zip(
            ("pad", "start", "end", "observation_start", "observation_end"), MONET_TOKENS
        ):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or (unk is not None and tid == unk):
                raise ValueError(
                    f"tokenizer has no token {tok!r}; add the Monet tokens first "
                    f"(monet.load_model does this, or tokenizer.add_special_tokens)"
                )
            ids[field] = int(tid)
        return cls(**ids)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)
