"""SFT data: the Monet-SFT-125K format, validation, stage layouts, batches, cache, synthetic data.

* :mod:`monet.data.sft_format`: sample dataclasses (``SFTSample``, ``Turn``, ``TextItem``,
  ``ImageItem``) and JSON (de)serialisation.
* :mod:`monet.data.sft_loader`: ``load_sft_dataset(json_paths, image_root) -> (samples, report)``.
* :mod:`monet.data.image_budget`: per-stage image token budgets and how they are split.
* :mod:`monet.data.stage_layout`: ``build_stage_example`` (tokens, labels under the
  ``"decodable"``/``"research"`` label rules, observation/latent positions, image plans) for
  stages 1-3.
* :mod:`monet.data.collate`: ``StageCollator`` -> padded ``StageBatch`` (``StageCollator.load``
  skips and records samples that fail to load).
* :mod:`monet.data.preprocess_cache`: ``preprocess_dataset`` (tokenise once, reuse).
* :mod:`monet.data.synth`: ``synthesize_dataset`` (deterministic synthetic data).

Names are imported lazily (``import monet.data.synth`` does not pull in torch/transformers).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "collate": ("SkippedSample", "StageBatch", "StageCollator"),
    "image_budget": ("STAGE_BUDGETS", "ImageBudget", "plan_image_tokens", "stage_budget"),
    "preprocess_cache": ("PreprocessedDataset", "preprocess_dataset"),
    "sft_format": ("PLACEHOLDER", "ImageItem", "SFTSample", "TextItem", "Turn", "parse_sample"),
    "sft_loader": ("REASONS", "DatasetFileError", "Rejection", "RejectionReport", "load_sft_dataset"),
    "stage_layout": ("DEFAULT_CE_EMPHASIZE", "IGNORE_INDEX", "LABEL_RULES", "ImagePlan", "LayoutTokens",
                     "SampleLoadError", "StageExample", "build_stage_example", "load_pixels"),
    "synth": ("SynthDataset", "synthesize_dataset"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"monet.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'monet.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
