"""Typed Monet settings saved next to a checkpoint (``monet_config.json``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from monet.atomic import atomic_write_json
from monet.layout import SpanLayout
from monet.tokens import LatentTokenIds

CONFIG_FILE = "monet_config.json"


@dataclass
class MonetConfig:
    """Latent-decoding defaults and the latent token ids of one checkpoint.

    ``span_layout`` holds the default latent size K and layout (``"standard"``, what SFT trains,
    or ``"monet-v1"``, how the released Monet-7B is served). On disk the file keeps the flat keys
    ``latent_size`` and ``layout``.
    """

    span_layout: SpanLayout = field(default_factory=SpanLayout)
    token_ids: LatentTokenIds | None = None
    format_version: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.span_layout, SpanLayout):
            raise TypeError(f"span_layout must be a SpanLayout, got {type(self.span_layout).__name__}")
        if isinstance(self.token_ids, dict):
            self.token_ids = LatentTokenIds(**self.token_ids)

    def to_dict(self) -> dict:
        return {
            **self.span_layout.to_dict(),
            "token_ids": self.token_ids.to_dict() if self.token_ids is not None else None,
            "format_version": self.format_version,
            "extra": dict(self.extra),
        }

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
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        known = {"latent_size", "layout", "token_ids", "format_version", "extra"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}")
        try:
            span = SpanLayout.of(data.get("latent_size"), data.get("layout"))
            return cls(span_layout=span, token_ids=data.get("token_ids"),
                       format_version=int(data.get("format_version", 1)), extra=dict(data.get("extra") or {}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
