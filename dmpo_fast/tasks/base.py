"""The task interface: a prompt dataset (train/test rows) plus a reward.

A row is a dict with at least ``prompt`` (the text the model continues) and ``reference`` (a completion
that earns the task's top reward: used for supervised warm-up and to test the reward), plus the
columns the reward reads (``solution``, ``nums``, ``target``, ``answer``, ...).

Rewards follow TRL's convention ``reward(prompts, completions, **columns) -> list[float | None]``:
``columns`` are the rows' other fields as lists aligned with ``completions`` (``columns_of(rows)``
builds them). A completion is a string or a chat-style list of ``{"role", "content"}`` messages.
A built-in reward never raises on model output; it raises ``ValueError`` only when a column it
needs is missing or misaligned, which is a caller bug.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

# Completions longer than this are cut to their last part before any parsing: every built-in
# answer format puts the answer at the end, and parsing cost must not grow with a runaway sample.
MAX_COMPLETION_CHARS = 20_000


class Task:
    """Base class of the built-in tasks. Subclasses are dataclasses holding their configuration."""

    name: ClassVar[str] = "task"
    reward_columns: ClassVar[tuple[str, ...]] = ()

    def train(self, n: int | None = None, seed: int | None = 0) -> list[dict]:
        """``n`` training rows (all of them, or the task's default size, when ``n`` is None)."""
        return self.rows("train", n, seed)

    def test(self, n: int | None = None, seed: int | None = 0) -> list[dict]:
        """``n`` held-out rows; never overlapping the training rows' problems."""
        return self.rows("test", n, seed)

    def rows(self, split: str, n: int | None, seed: int | None) -> list[dict]:
        raise NotImplementedError

    def reward(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float | None]:
        raise NotImplementedError

    def reward_functions(self) -> dict[str, Callable]:
        """The named reward functions whose sum is ``reward``: the trainer scores them one by one and logs
        each one's mean as ``rewards/<name>/mean``. One function, named after the task, unless a reward
        preset splits it (``presets``)."""
        return {self.name: self.reward}

    def is_correct(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float]:
        """Per-sample 0/1 "solved" judgement: the headline accuracy metric."""
        raise NotImplementedError

    def accuracy(self, rows: Sequence[Mapping], completions: Sequence) -> float:
        """Mean of ``is_correct`` over ``rows`` and their ``completions`` (0.0 for no rows)."""
        if len(rows) != len(completions):
            raise ValueError(
                f"rows and completions must have the same length, got {len(rows)} and {len(completions)}"
            )
        if not rows:
            return 0.0
        prompts = [r.get("prompt", "") for r in rows]
        flags = self.is_correct(prompts, completions, **columns_of(rows))
        return sum(flags) / len(flags)


# --------------------------------------------------------------------------- helpers for subclasses
def columns_of(rows: Sequence[Mapping], exclude: Sequence[str] = ("prompt",)) -> dict[str, list]:
    """TRL-style reward columns from rows: ``{key: [row[key] for row in rows]}`` for every key
    present in all rows, except ``exclude``."""
    if not rows:
        return {}
    keys = [k for k in rows[0] if k not in exclude and all(k in r for r in rows)]
    return {k: [r[k] for r in rows] for k in keys}


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the content of the last message of a chat-style
    list of ``{"role", "content"}`` dicts. Anything else becomes ``""`` (it cannot be an answer)."""
    if isinstance(completion, str):
        text = completion
    elif isinstance(completion, Mapping):
        text = completion.get("content", "")
    elif isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], Mapping):
        text = completion[-1].get("content", "")
    else:
        text = ""
    if not isinstance(text, str):
        return ""
    return text[-MAX_COMPLETION_CHARS:]


def final_answer(text: str) -> str:
    """The answer part of a completion: the content of the last ``<answer>...</answer>`` block
    (an unclosed final ``<answer>`` runs to the end), else the last non-empty line."""
    start = text.rfind("<answer>")
    if start >= 0:
        body = text[start + len("<answer>") :]
        end = body.find("</answer>")
        return (body if end < 0 else body[:end]).strip()
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


def require_columns(task: str, columns: Mapping[str, Any], names: Sequence[str], n: int) -> list[list]:
    """The reward columns ``names`` as lists of length ``n``; ValueError naming what is missing."""
    out = []
    for name in names:
        if name not in columns or columns[name] is None:
            raise ValueError(f"{task} reward needs the column {name!r} (got columns {sorted(columns)})")
        values = list(columns[name])
        if len(values) != n:
            raise ValueError(f"{task} reward: column {name!r} has {len(values)} values for {n} completions")
        out.append(values)
    return out


def stable_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from ``parts`` through SHA-256, so row generation is the same on
    every Python version and process (``hash()`` of strings is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def stable_fraction(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``: used to assign problems to train or test."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def check_count(n: int | None, default: int) -> int:
    if n is None:
        return default
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    return n


def check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be one of ('train', 'test'), got {split!r}")


def task_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]
