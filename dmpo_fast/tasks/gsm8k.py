"""GSM8K grade-school math (``openai/gsm8k``, config ``main``, or a local copy).

Row: ``prompt`` (the question followed by ``prompt_template``'s instruction), ``question``, ``answer``
(the reference's final number: the text after '####', commas removed) and ``reference`` (the original
worked solution, ending in '#### <number>').

Reward = correct + ``format_score`` * formatted, so 1.1 / 1.0 / 0.1 / 0.0 with the default 0.1:
``correct`` when the completion's final answer equals the reference number exactly (as fractions:
'72', '72.00' and '$72' agree); ``formatted`` when that answer was marked explicitly (``\\boxed{}``,
``<answer>`` tags or '####') rather than taken as the last number in the text. ``answer`` may hold the
final number or a whole reference solution with '####'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from dmpo_fast.tasks.answers import extract_final, gsm8k_reference, parse_number
from dmpo_fast.tasks.base import completion_text, require_columns
from dmpo_fast.tasks.data import DatasetTask, get_field

PROMPT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def gsm8k_judge(completion: Any, answer: Any) -> tuple[bool, bool]:
    """(correct, formatted) for one completion against a GSM8K answer or reference solution."""
    predicted, formatted = extract_final(completion_text(completion), numeric=True)
    gold = parse_number(gsm8k_reference(str(answer)))
    value = parse_number(predicted)
    return (gold is not None and value is not None and value == gold), formatted


@dataclass
class GSM8KTask(DatasetTask):
    name: ClassVar[str] = "gsm8k"
    reward_columns: ClassVar[tuple[str, ...]] = ("answer",)

    source: str | Mapping[str, str] = "openai/gsm8k"
    config: str | None = "main"
    prompt_template: str = PROMPT_TEMPLATE
    format_score: float = 0.1

    def __post_init__(self) -> None:
        if "{question}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{question}}', got {self.prompt_template!r}")

    def convert(self, row: dict) -> dict:
        question = get_field(self.name, row, "question")
        solution = str(get_field(self.name, row, "answer"))
        out = dict(row)
        out.update(
            prompt=self.prompt_template.format(question=question),
            answer=gsm8k_reference(solution),
            reference=solution,
        )
        return out

    def reward(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float | None]:
        (answers,) = require_columns(self.name, columns, ("answer",), len(completions))
        out = []
        for c, a in zip(completions, answers, strict=True):
            correct, formatted = gsm8k_judge(c, a)
            out.append(float(correct) + self.format_score * float(formatted))
        return out

    def is_correct(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float]:
        (answers,) = require_columns(self.name, columns, ("answer",), len(completions))
        return [float(gsm8k_judge(c, a)[0]) for c, a in zip(completions, answers, strict=True)]
