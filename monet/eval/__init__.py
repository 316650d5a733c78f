"""Evaluation: benchmarks, scoring glue, the ``monet eval`` harness, latent diagnostics and reports.

``run_eval(EvalSettings(...))`` is ``monet eval`` (:mod:`monet.eval.harness`);
``evaluate_sft_file`` is the quick held-out check used by the quickstart.
"""

from monet.eval.answers import extract_boxed, normalize_answer
from monet.eval.evaluate import EvalReport, evaluate_sft_file


def __getattr__(name: str):
    # the harness pulls in rich/tqdm/matplotlib; import it on first use
    if name in ("EvalSettings", "run_eval", "EvalResult"):
        from monet.eval import harness

        return getattr(harness, name)
    raise AttributeError(f"module 'monet.eval' has no attribute {name!r}")


__all__ = ["EvalReport", "EvalResult", "EvalSettings", "evaluate_sft_file", "extract_boxed", "normalize_answer",
           "run_eval"]
