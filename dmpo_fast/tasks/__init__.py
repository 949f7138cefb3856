"""Tasks (a prompt dataset + a reward) and reward utilities.

    task = get_task("sudoku", max_blanks=8)
    rows = task.train(256, seed=0)                    # [{"prompt", "reference", <reward columns>...}]
    r = task.reward([r["prompt"] for r in rows], completions, **columns_of(rows))
    solved = task.is_correct(prompts, completions, **columns_of(rows))

Built-in: ``sudoku`` and ``countdown`` (procedural, no download), ``gsm8k`` and ``math500`` (Hub or local
files; the Hub and parquet need the optional extra: pip install "dmpo-fast[tasks]").
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from dmpo_fast.tasks.base import Task, columns_of, completion_text, final_answer
from dmpo_fast.tasks.countdown import CountdownTask
from dmpo_fast.tasks.data import DatasetTask, load_rows
from dmpo_fast.tasks.gsm8k import GSM8KTask
from dmpo_fast.tasks.math500 import Math500Task
from dmpo_fast.tasks.rewards import (
    RewardScores,
    resolve_reward,
    reward_name,
    reward_path,
    safe_rewards,
    score_rewards,
)
from dmpo_fast.tasks.sudoku import SudokuTask

_REGISTRY: dict[str, Callable[..., Task]] = {
    "sudoku": SudokuTask,
    "countdown": CountdownTask,
    "gsm8k": GSM8KTask,
    "math500": Math500Task,
}


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def register_task(name: str, factory: Callable[..., Task], *, overwrite: bool = False) -> None:
    """Make ``get_task(name, **kwargs)`` build ``factory(**kwargs)``."""
    if not isinstance(name, str) or not name or ":" in name or "." in name:
        raise ValueError(f"task name must be a non-empty string without ':' or '.', got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"task {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def get_task(name: str | Task, **kwargs: Any) -> Task:
    """Build a registered task, or a task class given by import path ("package.module:MyTask").
    A ``Task`` instance is returned as is (``kwargs`` must then be empty)."""
    if isinstance(name, Task):
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} cannot be applied to an already built task")
        return name
    if not isinstance(name, str):
        raise ValueError(f"task must be a name or a Task, got {type(name).__name__}")
    if name in _REGISTRY:
        factory = _REGISTRY[name]
    elif ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"task {name!r}: cannot import it ({e})") from e
    else:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(task_names())} "
            "(or an import path 'package.module:TaskClass')"
        )
    if dataclasses.is_dataclass(factory):
        allowed = [f.name for f in dataclasses.fields(factory) if f.init]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"task {name!r} has no option(s) {unknown}; allowed: {allowed}")
    return factory(**kwargs)


__all__ = [
    "Task",
    "DatasetTask",
    "SudokuTask",
    "CountdownTask",
    "GSM8KTask",
    "Math500Task",
    "get_task",
    "register_task",
    "task_names",
    "resolve_reward",
    "reward_name",
    "reward_path",
    "RewardScores",
    "safe_rewards",
    "score_rewards",
    "columns_of",
    "completion_text",
    "final_answer",
    "load_rows",
]
