"""GSM8K grade-school math (``openai/gsm8k``, config ``main``, or a local copy).

Row: ``prompt`` (the question with ``prompt_template``'s instruction), ``question``, ``answer`` (the
reference's final number: the text after '####', commas removed) and ``reference`` (the original worked
solution, ending in '#### <number>').

Reward (``reward_preset="default"``) = correct + ``format_score`` * formatted, so 1.1 / 1.0 / 0.1 / 0.0 with
the default 0.1: ``correct`` when the completion's final answer is the reference number (as fractions: '72',
'72.00' and '$72' agree; an answer that is not a plain number, such as ``\\frac{144}{2}``, is compared by
math-verify); ``formatted`` when that answer was marked explicitly (``\\boxed{}``, ``<answer>`` tags or
'####') rather than taken as the last number in the text. ``answer`` may hold the final number or a whole
reference solution with '####'. ``reward_preset="d1"``: d1's five reward functions, up to 4.0 (``presets``).
math-verify is required (extra ``tasks``): the task refuses to start without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from dmpo_fast.tasks import presets
from dmpo_fast.tasks.answers import (
    extract_final,
    gsm8k_reference,
    math_equal,
    parse_number,
    require_math_verify,
)
from dmpo_fast.tasks.base import completion_text, require_columns
from dmpo_fast.tasks.data import DatasetTask, get_field

PROMPT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def gsm8k_judge(completion: Any, answer: Any) -> tuple[bool, bool]:
    """(correct, formatted) for one completion against a GSM8K answer or reference solution."""
    text = completion_text(completion)
    predicted, formatted = extract_final(text, numeric=True)  # '18 dollars' -> '18'
    reference = gsm8k_reference(str(answer))
    gold, value = parse_number(reference), parse_number(predicted)
    if gold is not None and value is not None and value == gold:
        return True, formatted
    marked, _ = extract_final(text, numeric=False)  # '\\frac{5}{2}', which the numeric reading cuts to '2'
    return marked is not None and parse_number(marked) is None and math_equal(marked, reference), formatted


@dataclass
class GSM8KTask(DatasetTask):
    name: ClassVar[str] = "gsm8k"
    reward_columns: ClassVar[tuple[str, ...]] = ("answer",)

    source: str | Mapping[str, str] = "openai/gsm8k"
    config: str | None = "main"
    prompt_template: str | None = None  # None: the preset's (PROMPT_TEMPLATE; d1: presets.D1_GSM8K_TEMPLATE)
    format_score: float = 0.1  # the default preset's bonus for a marked answer
    reward_preset: presets.RewardPreset = "default"

    def __post_init__(self) -> None:
        presets.check_math_task(self.name, self.reward_preset, self.prompt_template, "question", self.format_score)
        require_math_verify(self.name)

    @property
    def template(self) -> str:
        if self.prompt_template is not None:
            return self.prompt_template
        return presets.D1_GSM8K_TEMPLATE if self.reward_preset == "d1" else PROMPT_TEMPLATE

    def convert(self, row: dict) -> dict:
        question = get_field(self.name, row, "question")
        solution = str(get_field(self.name, row, "answer"))
        out = dict(row)
        out.update(
            prompt=self.template.format(question=question),
            answer=gsm8k_reference(solution),
            reference=solution,
        )
        return out

    def reward_functions(self) -> dict[str, Callable]:
        return dict(presets.D1_GSM8K) if self.reward_preset == "d1" else super().reward_functions()

    def reward(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float | None]:
        if self.reward_preset == "d1":
            return presets.summed(presets.D1_GSM8K, prompts, completions, columns)
        (answers,) = require_columns(self.name, columns, ("answer",), len(completions))
        out = []
        for c, a in zip(completions, answers, strict=True):
            correct, formatted = gsm8k_judge(c, a)
            out.append(float(correct) + self.format_score * float(formatted))
        return out

    def is_correct(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float]:
        (answers,) = require_columns(self.name, columns, ("answer",), len(completions))
        return [float(gsm8k_judge(c, a)[0]) for c, a in zip(completions, answers, strict=True)]
