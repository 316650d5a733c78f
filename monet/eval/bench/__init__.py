"""Benchmark data for ``monet eval``: uniform :class:`EvalSample` objects from VLMEvalKit TSVs
(V*, HRBench 4K/8K, MME-RealWorld-Lite, VisualPuzzles) and from Monet-SFT JSON files.

Directory layout looked up by :func:`load_benchmark` (VLMEvalKit's own ``LMUData`` folder works
as is)::

    <data_root>/
        VStarBench.tsv
        HRBench4K.tsv           (or hr_bench_4k.tsv)
        HRBench8K.tsv           (or hr_bench_8k.tsv)
        MME-RealWorld-Lite.tsv  (or mme_realworld_lite.tsv)
        VisualPuzzles.tsv

A path to a ``.tsv`` file may be given instead of a folder, and a ``.json`` path is read as
Monet-SFT format. Malformed rows are skipped and counted (``LoadedBenchmark.report``); a file with
no valid row raises :class:`BenchmarkFileError`.
"""

from __future__ import annotations

import os
from pathlib import Path

from monet.eval.bench.sample import (BenchmarkFileError, EvalSample, LoadedBenchmark, LoadReport,
                                     SkippedRow)
from monet.eval.bench.sft import load_sft_eval, parse_inline_options
from monet.eval.bench.specs import BENCHMARKS, BenchmarkSpec, get_spec
from monet.eval.bench.tsv import load_vlmeval_tsv


def find_benchmark_file(name: str, data_root: str | os.PathLike) -> Path:
    """The TSV of benchmark ``name`` under ``data_root`` (either accepted file name)."""
    spec = get_spec(name)
    root = Path(data_root)
    for fname in spec.file_names:
        if (root / fname).is_file():
            return root / fname
    raise BenchmarkFileError(f"{spec.name}: none of {', '.join(spec.file_names)} found in {root}")


def load_benchmark(name: str, source: str | os.PathLike, *, limit: int | None = None,
                   image_root: str | os.PathLike | None = None) -> LoadedBenchmark:
    """Load benchmark ``name`` from ``source``: a data folder (layout above), a ``.tsv`` file, or —
    for any name — a Monet-SFT ``.json`` file (``image_root`` then defaults to its folder)."""
    src = Path(source)
    if src.suffix.lower() == ".json":
        return load_sft_eval(src, image_root=image_root, benchmark=name, limit=limit)
    spec = get_spec(name)
    path = src if src.suffix.lower() == ".tsv" else find_benchmark_file(spec.name, src)
    return load_vlmeval_tsv(path, spec, limit=limit)


__all__ = ["BENCHMARKS", "BenchmarkFileError", "BenchmarkSpec", "EvalSample", "LoadReport", "LoadedBenchmark",
           "SkippedRow", "find_benchmark_file", "get_spec", "load_benchmark", "load_sft_eval",
           "load_vlmeval_tsv", "parse_inline_options"]
