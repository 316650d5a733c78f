"""What each supported benchmark's file looks like (VLMEvalKit's published TSVs).

All are multiple-choice TSVs with columns ``index``, ``question``, ``answer`` (an option letter),
an image column ``image`` (base64-encoded image; a Python-literal list of them for several images;
or, VLMEvalKit's deduplication, the ``index`` of another row holding the same image) — or, in a
"localized" TSV, ``image_path`` (a path relative to the TSV, or a list of them) — plus:

============================  =======================================  ===========================================
benchmark (file names)        options                                  task columns (category / subcategory / extra)
============================  =======================================  ===========================================
VStarBench                    ``A`` ``B`` (``C`` ``D``)                 ``category`` (direct_attributes, relative_position)
HRBench4K / HRBench8K         ``A`` .. ``D``                            ``category`` (single, cross); extra ``cycle_category``
(``hr_bench_4k.tsv`` ...)
MME-RealWorld-Lite            ``multi-choice options``: a literal list  ``category`` / ``l2-category``
(``mme_realworld_lite.tsv``)  ``['(A) ...', '(B) ...', ...]`` (five)
VisualPuzzles                 ``options``: a literal list of texts;     ``category``; extra ``difficulty``
                              empty = options drawn in the image (A-D)
============================  =======================================  ===========================================

VLMEvalKit stores a downloaded file as ``<name>.tsv`` (older versions: under the URL's file name);
both names are looked for. ``prompt_style`` selects how :mod:`monet.eval.prompts` phrases the
question (the benchmark's own VLMEvalKit prompt).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchmarkSpec:
    """How to read one benchmark's TSV.

    ``options_column``: a column holding the options as a Python-literal list (used when the
    letter columns are absent or empty); ``options_prefixed``: its items carry ``"(A) "``
    prefixes. ``options_in_image_letters``: letters to assume when the options cell is empty
    (the options are drawn in the image). ``extra_columns``: kept in ``EvalSample.extra``.
    """

    name: str
    file_names: tuple[str, ...]
    prompt_style: str = "mcq"
    category_column: str | None = "category"
    subcategory_column: str | None = None
    options_column: str | None = None
    options_prefixed: bool = False
    options_in_image_letters: tuple[str, ...] = ()
    extra_columns: tuple[str, ...] = ()
    min_options: int = 2


BENCHMARKS: dict[str, BenchmarkSpec] = {s.name: s for s in (
    BenchmarkSpec("VStarBench", ("VStarBench.tsv",)),
    BenchmarkSpec("HRBench4K", ("HRBench4K.tsv", "hr_bench_4k.tsv"), extra_columns=("cycle_category",)),
    BenchmarkSpec("HRBench8K", ("HRBench8K.tsv", "hr_bench_8k.tsv"), extra_columns=("cycle_category",)),
    BenchmarkSpec("MME-RealWorld-Lite", ("MME-RealWorld-Lite.tsv", "mme_realworld_lite.tsv"),
                  prompt_style="mme_realworld", subcategory_column="l2-category",
                  options_column="multi-choice options", options_prefixed=True),
    BenchmarkSpec("VisualPuzzles", ("VisualPuzzles.tsv",), prompt_style="visual_puzzles",
                  options_column="options", options_in_image_letters=("A", "B", "C", "D"),
                  extra_columns=("difficulty",)),
)}

#: Accepted spellings -> canonical name (case-insensitive, ``-``/``_`` ignored).
_ALIASES = {"vstar": "VStarBench", "vstarbench": "VStarBench", "v*": "VStarBench",
            "hrbench4k": "HRBench4K", "hrbench8k": "HRBench8K",
            "mmerealworldlite": "MME-RealWorld-Lite", "visualpuzzles": "VisualPuzzles"}


def get_spec(name: str) -> BenchmarkSpec:
    """The spec for a benchmark name (aliases like ``vstar``, ``hrbench_4k`` accepted)."""
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    key = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    if key in _ALIASES:
        return BENCHMARKS[_ALIASES[key]]
    raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
