"""A small Qwen-style byte-level BPE tokenizer, trained offline in code.

The tokenizer uses the same pipeline as Qwen2's (NFC normalisation, Qwen's pre-tokenisation regex,
byte-level BPE without an unknown token), so any text encodes and decodes losslessly. Its merges are
learnt from a small built-in English corpus; the Qwen special tokens follow the learnt vocabulary in
Qwen's order, and the Monet tokens come last (like the real Qwen2.5 tokenizer plus Monet).
"""

from __future__ import annotations

import json

from monet.tokens import MONET_TOKENS

#: Qwen2.5's added tokens, in Qwen's id order, with whether each is "special" (skipped on decode).
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|endoftext|>"  # what Qwen's config calls bos; the tokenizer itself adds no bos
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
VISION_PAD_TOKEN = "<|vision_pad|>"

#: Target size of the learnt (byte-level BPE) part of the vocabulary.
BPE_VOCAB_SIZE = 1024

# Qwen-style chat template: "<|im_start|>role\n...<|im_end|>\n", a default system turn when the
# conversation has none, images/videos as vision_start + pad + vision_end.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or item['type'] == 'image_url' or 'image' in item "
    "or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_COLOURS = "red green blue yellow orange purple black white gray pink brown cyan".split()
_SHAPES = "circle square triangle box star line dot rectangle ellipse cube sphere".split()
_SENTENCES = """
The box is red. The circle is blue and the square is green.
What colour is the triangle in the image? The triangle is yellow.
How many shapes are there? There are 3 shapes: a circle, a square and a star.
Question: which object is on the left? Answer: the red box is on the left.
Look at the image carefully, then think step by step before you answer.
First, find the blue circle. Next, count the dots inside it. Finally, give the number.
The answer is \\boxed{4}. So the final answer is \\boxed{red}.
Let me zoom in on the top right corner to see the small object more clearly.
I can see a large green rectangle below a small purple ellipse.
Is the star above or below the line? It is above the line, near the middle.
The image shows 2 cubes, 1 sphere and 5 dots; in total there are 8 objects.
Compute 12 + 7 = 19, then 19 * 2 = 38, and 38 - 8 = 30; 30 / 3 = 10.
Coordinates: (x, y) = (14, 28); width 56, height 112; area = 6272 pixels.
"Where is the cat?" she asked. 'On the mat,' he said; it was not there!
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 25 50 64 100 128 256 1000.
Symbols: # $ % & @ ^ _ ~ ` | < > [ ] { } ( ) + - * / = ! ? . , : ; " ' \\
You are a helpful assistant. The user gives you an image and a question.
The observation shows that the shape in the region is a white circle with a black border.
Options: (A) red (B) green (C) blue (D) yellow. The correct option is (C).
Therefore, the count of squares is six, and the colour of the biggest one is orange.
""".strip()


def training_corpus() -> list[str]:
    """The built-in English corpus the BPE merges are learnt from (deterministic)."""
    lines = _SENTENCES.splitlines()
    for i, colour in enumerate(_COLOURS):
        shape = _SHAPES[i % len(_SHAPES)]
        other = _SHAPES[(i * 5 + 3) % len(_SHAPES)]
        lines.append(
            f"The {shape} is {colour}. There are {i + 2} {other}s next to the {colour} {shape}."
        )
        lines.append(
            f"Is the {colour} {shape} left of the {other}? Yes, the answer is \\boxed{{{colour}}}."
        )
    for n in range(0, 40, 3):
        lines.append(f"Step {n}: count {n} and {n + 1}, so the total is {2 * n + 1}.")
    return lines


def _train_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE vocab and merges with Qwen2's pre-tokenisation pipeline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    # Take Qwen2's normaliser / pre-tokeniser / decoder from an empty instance so the training
    # pipeline is exactly the one transformers rebuilds when it loads a Qwen2Tokenizer.
    reference = Qwen2Tokenizer(vocab={PAD_TOKEN: 0}, merges=[]).backend_tokenizer
    tk = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tk.normalizer = reference.normalizer
    tk.pre_tokenizer = reference.pre_tokenizer
    tk.decoder = reference.decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(training_corpus(), trainer=trainer)
    model = json.loads(tk.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges


def build_tokenizer(add_monet_tokens: bool = True, bpe_vocab_size: int = BPE_VOCAB_SIZE):
    """Build the tiny Qwen2-style fast tokenizer (a ``transformers`` ``Qwen2Tokenizer``).

    Ids: learnt BPE vocabulary first, then :data:`QWEN_ADDED_TOKENS` in order, then (optionally)
    the Monet tokens in ``MONET_TOKENS`` order. eos is ``<|im_end|>``, pad ``<|endoftext|>``.
    """
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = _train_bpe(bpe_vocab_size)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=None,
        pad_token=None,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=131072,
        errors="replace",
    )
    added = [AddedToken(t, special=s, normalized=False) for t, s in QWEN_ADDED_TOKENS]
    if add_monet_tokens:
        added += [AddedToken(t, special=True, normalized=False) for t in MONET_TOKENS]
    for t in added:  # one at a time so ids follow the given order exactly
        tok.add_tokens([t], special_tokens=t.special)
    specials = [t.content for t in added if t.special and t.content not in (EOS_TOKEN, PAD_TOKEN)]
    tok.add_special_tokens(
        {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "extra_special_tokens": specials},
        replace_extra_special_tokens=True,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
