"""Prompts for the evaluation benchmarks, phrased as VLMEvalKit phrases them for Qwen2-VL-family
models, and the chat messages handed to the model.

Styles (``EvalSample`` -> user text; the benchmark's spec picks the style):

``mcq`` (V*, HRBench; VLMEvalKit's Qwen2-VL multiple-choice prompt)::

    Hint: <hint>                       (only when the row has a hint)
    Question: <question>
    Options:
    A. <text>
    B. <text>
    Please select the correct answer from the options above.

  (with Chinese characters in the prompt the last line is ``请直接回答选项字母。``; trailing
  whitespace stripped).

``mme_realworld`` (MME-RealWorld-Lite; the dataset's own prompt)::

    <question> The choices are listed below:
    (A) <text>
    ...
    (E) <text>
    Select the best answer to the above multiple-choice question based on the image. Respond with only the letter (A, B, C, D, or E) of the correct option.
    The best answer is:

``visual_puzzles`` (VisualPuzzles; the dataset's own prompt)::

    <question>
    Options:
    (A) <text>
    ...
    Solve the multiple-choice question and then answer with the option letter from the given choices. The last line of your response should be of the following format:'Answer: $LETTER' (without quotes) where LETTER is one of options. Think step by step before answering.

  (``Options: Choose from (A) (B) (C) (D) in the image.`` when the options are drawn in the image).

``verbatim`` (Monet-SFT sources): the question text as it is.

The trailing instruction of each style can be replaced (``PromptConfig.instruction``), e.g. by a
``\\boxed{}`` instruction; ``system_prompt`` adds a system turn (an SFT sample's own system text is
used when none is given). Images come first in the user turn, as in VLMEvalKit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from monet.eval.bench.sample import EvalSample
from monet.eval.bench.specs import BENCHMARKS

MCQ_INSTRUCTION = "Please select the correct answer from the options above."
MCQ_INSTRUCTION_CN = "请直接回答选项字母。"
MME_RW_INSTRUCTION = ("Select the best answer to the above multiple-choice question based on the image. "
                      "Respond with only the letter (A, B, C, D, or E) of the correct option. \n"
                      "The best answer is:")
VISUAL_PUZZLES_INSTRUCTION = (
    "Solve the multiple-choice question and then answer with the option letter from the given choices. "
    "The last line of your response should be of the following format:'Answer: $LETTER' (without quotes) "
    "where LETTER is one of options. Think step by step before answering.")

STYLES = ("mcq", "mme_realworld", "visual_puzzles", "verbatim")
_CJK_RE = re.compile("[\u4e00-\u9fff]")


@dataclass(frozen=True)
class PromptConfig:
    """``style``: force a style (default: the benchmark's). ``instruction``: replaces the style's
    trailing instruction (``""`` drops it). ``system_prompt``: a system turn."""

    style: str | None = None
    instruction: str | None = None
    system_prompt: str | None = None

    def __post_init__(self):
        if self.style is not None and self.style not in STYLES:
            raise ValueError(f"PromptConfig.style must be one of {STYLES}, got {self.style!r}")


def prompt_style(sample: EvalSample, config: PromptConfig = PromptConfig()) -> str:
    if config.style:
        return config.style
    if "prompt_style" in sample.extra:
        return sample.extra["prompt_style"]
    spec = BENCHMARKS.get(sample.benchmark)
    if spec is not None:
        return spec.prompt_style
    return "mcq" if sample.options else "verbatim"


def _join(body: str, instruction: str, sep: str) -> str:
    return body if not instruction else body + sep + instruction


def build_prompt_text(sample: EvalSample, config: PromptConfig = PromptConfig()) -> str:
    """The user-turn text for ``sample`` (see the module docstring for each style)."""
    style = prompt_style(sample, config)
    instr = config.instruction
    if style == "mcq":
        text = f"Hint: {sample.hint}\n" if sample.hint else ""
        text += f"Question: {sample.question}\n"
        if sample.options:
            text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in sample.options.items())
            if instr is None:
                instr = MCQ_INSTRUCTION_CN if _CJK_RE.search(text) else MCQ_INSTRUCTION
            text += instr
        elif instr:
            text += instr
        return text.rstrip()
    if style == "mme_realworld":
        raw = sample.extra.get("options_raw") or [f"({k}) {v}" for k, v in sample.options.items()]
        body = f"{sample.question} The choices are listed below:\n" + "\n".join(raw) + "\n"
        return body + (MME_RW_INSTRUCTION if instr is None else instr)
    if style == "visual_puzzles":
        if sample.extra.get("options_in_image"):
            opts = "Options: Choose from (A) (B) (C) (D) in the image."
        else:
            opts = "Options:\n" + "\n".join(f"({k}) {v}" for k, v in sample.options.items())
        return _join(f"{sample.question}\n{opts}", VISUAL_PUZZLES_INSTRUCTION if instr is None else instr, "\n")
    # verbatim
    return _join(sample.question, instr or "", "\n")


def build_messages(sample: EvalSample, config: PromptConfig = PromptConfig(), *,
                   load_images: bool = True) -> list[dict]:
    """Chat messages in Qwen's content format: an optional system turn, then one user turn with
    ``{"type": "image", "image": <PIL.Image>}`` items (in order) followed by
    ``{"type": "text", "text": <prompt>}``. With ``load_images=False`` the image items carry the
    sample's raw image data (bytes / path) instead of decoded PIL images."""
    messages = []
    system = config.system_prompt if config.system_prompt is not None else sample.extra.get("system")
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    images = sample.load_images() if load_images else list(sample.images)
    content = [{"type": "image", "image": im} for im in images]
    content.append({"type": "text", "text": build_prompt_text(sample, config)})
    messages.append({"role": "user", "content": content})
    return messages
