"""Tokenise a dataset for a stage once, store it on disk, reuse it.

:func:`preprocess_dataset` writes ``cache_dir/stage{S}-k{K}-{hash}/`` holding safetensors shards
and a ``manifest.json``. ``hash`` covers everything the result depends on: the samples (their
JSON and each image file's path, size and mtime), the stage, K, the label rule, the image budget, the tokenizer,
chat template and image-processor settings, and :data:`CACHE_VERSION`. Any change gives a new
folder; the same inputs find the finished folder and tokenise nothing.

Every file is written to a temporary name and renamed into place (``os.replace``), shards first
and the manifest last, so a reader never sees a partial cache; an interrupted run resumes and keeps
the shards it already finished.

Shards hold token-level data only (ids, target/observation/latent flags, answer starts, image
plans); pixels are computed when an example is read (:class:`PreprocessedDataset.__getitem__`),
because pixel tensors of the real data set would need terabytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from monet.atomic import atomic_write_bytes
from monet.data.image_budget import ImageBudget, stage_budget
from monet.data.sft_format import SFTSample
from monet.data.stage_layout import (
    DEFAULT_LABEL_RULE,
    IGNORE_INDEX,
    ImagePlan,
    LayoutTokens,
    StageExample,
    build_stage_example,
    check_label_rule,
    check_stage,
    load_pixels,
)
from monet.layout import SpanLayout

#: Bump when the stored layout or the tokenisation rules change.
CACHE_VERSION = 2  # 2: <observation>/</observation>/helper <|vision_start|> are targets
MANIFEST = "manifest.json"

_TARGET, _OBSERVATION, _LATENT = 1, 2, 4


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def processor_fingerprint(processor: Any) -> str:
    """Hash of what tokenisation depends on: vocabulary/merges, special tokens, chat template,
    image processor settings."""
    tok = processor.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else sorted(tok.get_vocab().items())
    ip = processor.image_processor
    ip_conf = ip.to_dict() if hasattr(ip, "to_dict") else vars(ip)
    return _sha({
        "vocab": hashlib.sha256(str(vocab).encode()).hexdigest(),
        "added": sorted((str(k), int(v)) for k, v in tok.get_added_vocab().items()),
        "chat_template": getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None),
        "image_processor": ip_conf,
        "image_token": getattr(processor, "image_token", None),
    })


def samples_fingerprint(samples: Sequence[SFTSample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps(s.to_json(), sort_keys=True).encode())
        for t in s.turns:
            for im in t.images:
                try:
                    st = os.stat(im.file)
                    h.update(f"|{im.file}|{st.st_size}|{st.st_mtime_ns}".encode())
                except OSError:
                    h.update(f"|{im.file}|missing".encode())
        h.update(b"\n")
    return h.hexdigest()


_atomic_write = atomic_write_bytes


def _encode_shard(examples: list[StageExample]) -> bytes:
    from safetensors.torch import save

    flags = [(ex.target_mask.to(torch.uint8) * _TARGET) | (ex.observation_mask.to(torch.uint8) * _OBSERVATION)
             | (ex.latent_mask.to(torch.uint8) * _LATENT) for ex in examples]
    lengths = torch.tensor([0] + [len(ex) for ex in examples], dtype=torch.long)
    n_img = torch.tensor([0] + [len(ex.images) for ex in examples], dtype=torch.long)
    plans = [p for ex in examples for p in ex.images]
    tensors = {
        "input_ids": torch.cat([ex.input_ids for ex in examples]).to(torch.int32),
        "flags": torch.cat(flags),
        "offsets": lengths.cumsum(0),
        "answer_start": torch.tensor([ex.answer_start for ex in examples], dtype=torch.long),
        "image_offsets": n_img.cumsum(0),
        "grids": torch.tensor([p.grid_thw for p in plans], dtype=torch.long).reshape(-1, 3),
        "max_tokens": torch.tensor([p.max_tokens for p in plans], dtype=torch.long),
    }
    meta = {"keys": json.dumps([ex.key for ex in examples]),
            "image_files": json.dumps([p.file for p in plans]),
            "image_roles": json.dumps([p.role for p in plans])}
    return save(tensors, metadata=meta)


def _decode_shard(path: Path, stage: int, latent_size: int) -> list[StageExample]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    keys = json.loads(meta["keys"])
    files, roles = json.loads(meta["image_files"]), json.loads(meta["image_roles"])
    off, ioff = t["offsets"].tolist(), t["image_offsets"].tolist()
    out = []
    for i, key in enumerate(keys):
        ids = t["input_ids"][off[i]:off[i + 1]].long()
        flags = t["flags"][off[i]:off[i + 1]]
        target = (flags & _TARGET) != 0
        plans = tuple(ImagePlan(files[j], roles[j], int(t["max_tokens"][j]), tuple(t["grids"][j].tolist()))
                      for j in range(ioff[i], ioff[i + 1]))
        out.append(StageExample(key, stage, latent_size, ids,
                                torch.where(target, ids, torch.full_like(ids, IGNORE_INDEX)),
                                (flags & _OBSERVATION) != 0, (flags & _LATENT) != 0,
                                int(t["answer_start"][i]), plans))
    return out


@dataclass
class PreprocessedDataset:
    """A tokenised stage dataset on disk (map-style: ``len`` and ``[i]``).

    ``dataset[i]`` is a :class:`StageExample` with pixels (``with_pixels=True``, needs
    ``processor``). ``max_length`` hides examples longer than it (``dropped`` lists their keys);
    ``lengths`` are the lengths of the visible examples (for length-grouped sampling).
    ``built_shards``/``reused_shards`` say what this call tokenised.
    """

    path: Path
    stage: int
    latent_size: int
    keys: list[str]
    all_lengths: list[int]
    shard_size: int
    processor: Any = None
    with_pixels: bool = True
    max_length: int | None = None
    built_shards: int = 0
    reused_shards: int = 0
    _indices: list[int] = field(default_factory=list, repr=False)
    _shards: dict[int, list[StageExample]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._indices = [i for i, n in enumerate(self.all_lengths)
                         if self.max_length is None or n <= self.max_length]

    @property
    def cache_hit(self) -> bool:
        return self.built_shards == 0

    @property
    def dropped(self) -> list[str]:
        kept = set(self._indices)
        return [k for i, k in enumerate(self.keys) if i not in kept]

    @property
    def lengths(self) -> list[int]:
        return [self.all_lengths[i] for i in self._indices]

    def __len__(self) -> int:
        return len(self._indices)

    def _shard(self, s: int) -> list[StageExample]:
        if s not in self._shards:
            if len(self._shards) >= 4:
                self._shards.pop(next(iter(self._shards)))
            self._shards[s] = _decode_shard(self.path / _shard_name(s), self.stage, self.latent_size)
        return self._shards[s]

    def example(self, i: int, with_pixels: bool | None = None) -> StageExample:
        j = self._indices[i]
        ex = self._shard(j // self.shard_size)[j % self.shard_size]
        if self.with_pixels if with_pixels is None else with_pixels:
            if self.processor is None:
                raise ValueError("loading pixels needs the processor (PreprocessedDataset.processor)")
            ex = load_pixels(ex, self.processor)
        return ex

    def __getitem__(self, i: int) -> StageExample:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.example(i % len(self))


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def _shard_ok(path: Path, n: int) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return len(json.loads(f.metadata()["keys"])) == n
    except Exception:
        return False


def preprocess_dataset(
    samples: Sequence[SFTSample],
    processor: Any,
    stage: int,
    latent_size: int,
    cache_dir: str | os.PathLike,
    *,
    budget: ImageBudget | None = None,
    shard_size: int = 512,
    max_length: int | None = None,
    with_pixels: bool = True,
    labels: str = DEFAULT_LABEL_RULE,
) -> PreprocessedDataset:
    """Tokenise ``samples`` for ``stage`` into ``cache_dir`` (or reuse an identical earlier run)
    and return a :class:`PreprocessedDataset` over it. ``labels`` is the label rule of
    :mod:`monet.data.stage_layout`. See the module docstring."""
    check_stage(stage)
    check_label_rule(labels)
    SpanLayout(latent_size)  # validates
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    budget = budget or stage_budget(stage)
    settings = {"version": CACHE_VERSION, "stage": stage, "latent_size": latent_size, "labels": labels,
                "budget": asdict(budget), "shard_size": shard_size}
    key = _sha({**settings, "processor": processor_fingerprint(processor),
                "samples": samples_fingerprint(samples)})
    path = Path(cache_dir) / f"stage{stage}-k{latent_size}-{key[:20]}"
    path.mkdir(parents=True, exist_ok=True)
    common = dict(path=path, stage=stage, latent_size=latent_size, shard_size=shard_size,
                  processor=processor, with_pixels=with_pixels, max_length=max_length)

    manifest_file = path / MANIFEST
    if manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text())
        except ValueError:
            manifest = None
        if manifest and manifest.get("key") == key:
            n_shards = len(manifest["shards"])
            return PreprocessedDataset(keys=manifest["keys"], all_lengths=manifest["lengths"],
                                       reused_shards=n_shards, **common)

    tokens = LayoutTokens.from_processor(processor)
    keys: list[str] = []
    lengths: list[int] = []
    shards: list[str] = []
    built = reused = 0
    for s, start in enumerate(range(0, len(samples), shard_size)):
        chunk = samples[start:start + shard_size]
        name = _shard_name(s)
        if _shard_ok(path / name, len(chunk)):  # finished by an interrupted earlier run
            examples = _decode_shard(path / name, stage, latent_size)
            reused += 1
        else:
            examples = [build_stage_example(x, processor, stage, latent_size, budget=budget,
                                            with_pixels=False, tokens=tokens, labels=labels) for x in chunk]
            _atomic_write(path / name, _encode_shard(examples))
            built += 1
        keys += [ex.key for ex in examples]
        lengths += [len(ex) for ex in examples]
        shards.append(name)
    manifest = {**settings, "key": key, "num_samples": len(keys), "shards": shards,
                "keys": keys, "lengths": lengths}
    _atomic_write(manifest_file, (json.dumps(manifest) + "\n").encode())
    return PreprocessedDataset(keys=keys, all_lengths=lengths, built_shards=built, reused_shards=reused, **common)
