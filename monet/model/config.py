"""Typed Monet settings saved next to a checkpoint (``monet_config.json``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from monet.atomic import atomic_write_json
from monet.layout import check_latent_size, check_layout
from monet.tokens import LatentTokenIds

CONFIG_FILE = "monet_config.json"


@dataclass
class MonetConfig:
    """Latent-decoding defaults and the latent token ids of one checkpoint.

    ``latent_size`` (K) is the number of latent steps per span; ``layout`` is ``"standard"``
    (what SFT trains) or ``"monet-v1"`` (how the released Monet-7B is served).
    """

    latent_size: int = 8
    layout: str = "standard"
    token_ids: LatentTokenIds | None = None
    format_version: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_latent_size(self.latent_size)
        check_layout(self.layout)
        if isinstance(self.token_ids, dict):
            self.token_ids = LatentTokenIds(**self.token_ids)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["token_ids"] = self.token_ids.to_dict() if self.token_ids is not None else None
        return d

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``monet_config.json`` atomically into ``directory``."""
        return atomic_write_json(Path(directory) / CONFIG_FILE, self.to_dict(), indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "MonetConfig | None":
        """Read ``monet_config.json`` from ``directory``; None when the file does not exist."""
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        known = {"latent_size", "layout", "token_ids", "format_version", "extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}")
        return cls(**data)
