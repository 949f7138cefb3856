"""MATH-500 competition math (``HuggingFaceH4/MATH-500``, test split only, or a local copy).

Row: the source columns (``problem``, ``solution``, ``answer``, ``subject``, ``level``, ...) plus
``prompt`` (the problem with ``prompt_template``'s instruction) and ``reference`` (the worked solution). A
source without an ``answer`` column (the MATH training set) gets the last ``\\boxed{}`` of its solution.
MATH-500 has no training split: give one with ``source={"train": ..., "test": ...}``.

Reward (``reward_preset="default"``) = correct + ``format_score`` * formatted: the completion's final answer
is the last ``\\boxed{}`` (else ``<answer>`` tags, else '####'); ``formatted`` when one was found, ``correct``
when it is equivalent to ``answer`` by math-verify (``answers.math_equal``; extra ``tasks``: the task refuses
to start without it). ``reward_preset="d1"``: d1's boxed-format and correctness rewards, up to 3.0
(``presets``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from dmpo_fast.tasks import presets
from dmpo_fast.tasks.answers import extract_final, last_boxed, math_equal, require_math_verify
from dmpo_fast.tasks.base import completion_text, require_columns
from dmpo_fast.tasks.data import DatasetTask, get_field

PROMPT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def math_judge(completion: Any, answer: Any) -> tuple[bool, bool]:
    """(correct, formatted) for one completion against a MATH reference answer."""
    predicted, formatted = extract_final(completion_text(completion), numeric=False)
    if predicted is None or answer is None:
        return False, formatted
    return math_equal(predicted, str(answer)), formatted


@dataclass
class Math500Task(DatasetTask):
    name: ClassVar[str] = "math500"
    reward_columns: ClassVar[tuple[str, ...]] = ("answer",)

    source: str | Mapping[str, str] = "HuggingFaceH4/MATH-500"
    config: str | None = None
    train_split: str | None = None
    prompt_template: str | None = None  # None: the preset's (PROMPT_TEMPLATE; d1: presets.D1_MATH_TEMPLATE)
    format_score: float = 0.1  # the default preset's bonus for a marked answer
    reward_preset: presets.RewardPreset = "default"

    def __post_init__(self) -> None:
        presets.check_math_task(self.name, self.reward_preset, self.prompt_template, "problem", self.format_score)
        require_math_verify(self.name)

    @property
    def template(self) -> str:
        if self.prompt_template is not None:
            return self.prompt_template
        return presets.D1_MATH_TEMPLATE if self.reward_preset == "d1" else PROMPT_TEMPLATE

    def convert(self, row: dict) -> dict:
        problem = get_field(self.name, row, "problem")
        solution = row.get("solution")
        answer = row.get("answer")
        if answer is None:
            answer = last_boxed(str(get_field(self.name, row, "solution")))
            if answer is None:
                raise ValueError(
                    f"{self.name}: row has no 'answer' and its solution has no \\boxed{{}}: {row}"
                )
        out = dict(row)
        out.update(
            prompt=self.template.format(problem=problem),
            answer=str(answer),
            reference=solution if solution is not None else f"\\boxed{{{answer}}}",
        )
        return out

    def reward_functions(self) -> dict[str, Callable]:
        return dict(presets.D1_MATH) if self.reward_preset == "d1" else super().reward_functions()

    def reward(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float | None]:
        if self.reward_preset == "d1":
            return presets.summed(presets.D1_MATH, prompts, completions, columns)
        (answers,) = require_columns(self.name, columns, ("answer",), len(completions))
        out = []
        for c, a in zip(completions, answers, strict=True):
            correct, formatted = math_judge(c, a)
            out.append(float(correct) + self.format_score * float(formatted))
        return out

    def is_correct(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float]:
        (answers,) = require_columns(self.name, columns, ("answer",), len(completions))
        return [float(math_judge(c, a)[0]) for c, a in zip(completions, answers, strict=True)]
