"""Evaluation: answer extraction and held-out accuracy with latent diagnostics."""

from monet.eval.answers import extract_boxed, normalize_answer
from monet.eval.evaluate import EvalReport, evaluate_sft_file

__all__ = ["EvalReport", "evaluate_sft_file", "extract_boxed", "normalize_answer"]
