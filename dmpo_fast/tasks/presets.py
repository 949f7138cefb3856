"""Reward presets: which reward functions a built-in task scores with, and so the scale of its rewards.

DMPO's target p_ref·exp(r/α) depends on the reward's scale (rewards c·r at α are rewards r at α/c), so a
recipe reproduces a paper only with that paper's rewards. Two presets (``reward_preset``, a task option
that ``TrainConfig.reward_preset`` sets):

``"default"``   each task's own reward (see its module): correct + 0.1 for a marked answer on GSM8K and
                MATH-500 (at most 1.1), 1 / 0.1 / 0 on Countdown, the solved flag or the fraction of blank
                cells on Sudoku (at most 1.0).
``"d1"``        the reward functions of d1 (arXiv 2504.12216, ``diffu-grpo/reward_func.py``), which DMPO's
                reference code trains with; each is a separate function, logged as ``rewards/<name>/mean``:

    gsm8k     xmlcount (up to 0.5), soft_format 0.5, strict_format 0.5, integer 0.5, correctness 2.0  (4.0)
    math500   boxed_format (up to 1.0), correctness 2.0                                             (3.0)
    countdown countdown: 1.0 correct, 0.1 for any other answer in <answer> tags, 0 without them     (1.0)
    sudoku    sudoku: the fraction of blank cells right in the <answer> block, 0 without one        (1.0)

  The completion is asked for d1's layout, ``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>``
  (GSM8K and MATH-500 get a prompt asking for it; Countdown and Sudoku need ``prompt_style="instruct"``).

The format rewards follow d1's current code, whose patterns match across lines (``re.DOTALL``; its first
release matched a one-line reasoning block only). Where this implementation departs from d1's code, and why:

- GSM8K correctness compares the answer block and the reference as numbers (``parse_number``), where d1
  compares the strings: "1,200" or "72.0" earn the 2.0 here. The integer reward still asks for plain digits.
- MATH-500 correctness compares the last ``\\boxed{}`` with the reference by math-verify, where d1 uses a
  string normaliser (``is_equiv``) that rejects e.g. ``\\sqrt2`` for ``\\sqrt{2}``.
- MATH-500 boxed_format is 0.5 × (1 for an ``<answer>`` block + 1 when it holds a ``\\boxed``, else 0.5), at
  most 1.0, total 3.0 as the DMPO paper reports. d1's code tests ``"\\boxed" in r`` in a non-raw string, where
  ``\\b`` is a backspace, so its boxed term is always 0.5 and its format reward at most 0.75.
- Countdown reads the expression with this package's checker (``countdown.evaluate``: ``ast``, exact
  fractions, never ``eval``) and drops a trailing "= target" as the default reward does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

from dmpo_fast.tasks.answers import gsm8k_reference, last_boxed, math_equal, parse_number
from dmpo_fast.tasks.base import completion_text, require_columns

RewardPreset = Literal["default", "d1"]
REWARD_PRESETS: tuple[str, ...] = ("default", "d1")

# d1's answer layout, asked for by the GSM8K and MATH-500 prompts of the d1 preset.
D1_FORMAT = "Respond in this format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n\n"
D1_GSM8K_TEMPLATE = D1_FORMAT + "Put only the final number in the answer block.\n\n{question}"
D1_MATH_TEMPLATE = (
    D1_FORMAT + "Solve the problem step by step and wrap the final answer in \\boxed{{}}.\n\n{problem}"
)

_SOFT_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)  # at the start
# The whole completion; Python's "$" (d1's anchor) also accepts one newline after the final one.
_STRICT_FORMAT = re.compile(r"<reasoning>\n.*\n</reasoning>\n<answer>\n.*\n</answer>\n\n?", re.DOTALL)


def check_preset(task: str, preset: Any) -> None:
    if preset not in REWARD_PRESETS:
        raise ValueError(
            f"{task}: reward_preset must be one of {', '.join(map(repr, REWARD_PRESETS))}, got {preset!r}"
        )


def check_math_task(task: str, preset: Any, prompt_template: str | None, field: str, format_score: float) -> None:
    """The checks the math tasks (gsm8k, math500) share: the preset, a template that has ``{field}``, and no
    ``format_score`` (the default preset's) with the d1 preset."""
    check_preset(task, preset)
    if prompt_template is not None and "{" + field + "}" not in prompt_template:
        raise ValueError(f"prompt_template must contain '{{{field}}}', got {prompt_template!r}")
    if preset == "d1" and format_score != 0.1:
        raise ValueError("format_score is the default preset's: it does not apply with reward_preset='d1'")


def answer_block(text: str) -> str:
    """The text after the last ``<answer>`` up to the next ``</answer>`` (or the end), stripped; the whole
    text when there is no ``<answer>`` (d1's reading of the answer)."""
    _, tag, rest = text.rpartition("<answer>")
    body = rest if tag else text
    return body.split("</answer>", 1)[0].strip()


def xml_count(text: str) -> float:
    """d1's partial credit for the layout: 0.125 for each of ``<reasoning>\\n``, ``\\n</reasoning>\\n``,
    ``\\n<answer>\\n`` and ``\\n</answer>`` that appears exactly once, less 0.001 per character after the
    closing answer tag (charged once per answer tag, so at most 0.5 and negative for long trailing text)."""
    score = 0.0
    if text.count("<reasoning>\n") == 1:
        score += 0.125
    if text.count("\n</reasoning>\n") == 1:
        score += 0.125
    if text.count("\n<answer>\n") == 1:
        score += 0.125 - 0.001 * len(text.rpartition("\n</answer>\n")[2])
    if text.count("\n</answer>") == 1:
        score += 0.125 - 0.001 * (len(text.rpartition("\n</answer>")[2]) - 1)
    return score


def soft_format(text: str) -> float:
    """0.5 when the completion starts with a reasoning block followed by an answer block."""
    return 0.5 if _SOFT_FORMAT.match(text) else 0.0


def strict_format(text: str) -> float:
    """0.5 when the completion is exactly the layout, each tag on its own line."""
    return 0.5 if _STRICT_FORMAT.fullmatch(text) else 0.0


def integer_answer(text: str) -> float:
    """0.5 when the answer block is a plain run of digits."""
    return 0.5 if answer_block(text).isdigit() else 0.0


def gsm8k_correct(text: str, answer: Any) -> float:
    """2.0 when the answer block is the reference number."""
    gold = parse_number(gsm8k_reference(str(answer)))
    value = parse_number(answer_block(text))
    return 2.0 if gold is not None and value is not None and value == gold else 0.0


def boxed_format(text: str) -> float:
    """0.5 × (1 for an ``<answer>`` block + 1 when the first block (else the whole text) holds a
    ``\\boxed``, else 0.5): 1.0, 0.75, 0.5 or 0.25."""
    _, tag, rest = text.partition("<answer>")
    block = rest.split("<answer>", 1)[0].split("</answer>", 1)[0] if tag else text
    return 0.5 * (float(bool(tag)) + (1.0 if "\\boxed" in block else 0.5))


def math_correct(text: str, answer: Any) -> float:
    """2.0 when the last ``\\boxed{}`` of the completion is equivalent to the reference (math-verify)."""
    boxed = last_boxed(text)
    return 2.0 if boxed is not None and answer is not None and math_equal(boxed, str(answer)) else 0.0


def per_sample(name: str, score: Callable[..., float], columns: Sequence[str] = ()) -> Callable:
    """A TRL-style reward ``fn(prompts, completions, **columns)`` named ``name`` that applies
    ``score(text, *column values)`` to each completion."""

    def reward(prompts: Sequence, completions: Sequence, **cols: Any) -> list[float]:
        values = require_columns(name, cols, columns, len(completions)) if columns else []
        return [score(completion_text(c), *(v[i] for v in values)) for i, c in enumerate(completions)]

    reward.__name__ = reward.__qualname__ = name
    return reward


D1_GSM8K: dict[str, Callable] = {
    "xmlcount": per_sample("xmlcount", xml_count),
    "soft_format": per_sample("soft_format", soft_format),
    "strict_format": per_sample("strict_format", strict_format),
    "integer": per_sample("integer", integer_answer),
    "correctness": per_sample("correctness", gsm8k_correct, ("answer",)),
}
D1_MATH: dict[str, Callable] = {
    "boxed_format": per_sample("boxed_format", boxed_format),
    "correctness": per_sample("correctness", math_correct, ("answer",)),
}


def summed(fns: dict[str, Callable], prompts: Sequence, completions: Sequence, columns: dict) -> list[float]:
    """The per-completion sum of the rewards ``fns`` (built-in functions: they never return None)."""
    total = [0.0] * len(completions)
    for fn in fns.values():
        total = [t + float(v) for t, v in zip(total, fn(prompts, completions, **columns), strict=True)]
    return total
