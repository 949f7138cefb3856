"""4x4 Sudoku (2x2 boxes): procedural puzzles with a unique solution, split by solution grid.

Formats (``prompt_style="compact"``, the default; every character is in the tiny model's vocabulary):

    prompt      "1204/3400/0010/4000="     the puzzle row by row, '0' = blank, rows joined by '/', then '='
    completion  "1234/3412/2143/4321"      the solved grid in the same layout (the '/' are optional)

``prompt_style="instruct"`` wraps the same puzzle in an English instruction for instruction-tuned models
and asks for the grid inside ``<answer>...</answer>``.

Reward (as in d1 / DMPO): the fraction of the puzzle's blank cells filled correctly. The answer is the
content of the last ``<answer>`` block if any, else the last non-empty line; its first 16 ASCII digits
are read as the grid row by row, missing digits count as wrong cells, so malformed output scores
partially or 0 and never raises. ``is_correct`` (solved) asks for the whole grid to equal the solution,
so changing a given clue is not "solved" even though the reward only looks at the blanks.
``reward_preset="d1"`` (needs ``prompt_style="instruct"``): d1's reward, the same fraction of blank cells
read only from a closed ``<answer>...</answer>`` block (0.0 without one).

Split: there are exactly 288 valid 4x4 grids. They are ranked by a SHA-256 of (split_seed, grid) and the
first ``round(test_fraction * 288)`` are held out: a test puzzle's solution never appears in training.
Uniqueness: blanks are added one at a time in random order, keeping a blank only while the backtracking
solver still finds exactly one solution (removing clues never restores uniqueness, so this is exact).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from dmpo_fast.tasks import presets
from dmpo_fast.tasks.answers import answer_tag
from dmpo_fast.tasks.base import (
    Task,
    check_count,
    check_split,
    completion_text,
    final_answer,
    require_columns,
    stable_rng,
)

SIZE = 4
CELLS = SIZE * SIZE
DIGITS = "1234"
NUM_GRIDS = 288
MAX_BLANKS = 12  # a 4x4 Sudoku needs at least 4 clues to have a unique solution

# Each cell's row, column and box; a unit's used digits are kept as a 4-bit mask.
_ROW = [i // SIZE for i in range(CELLS)]
_COL = [i % SIZE for i in range(CELLS)]
_BOX = [(i // SIZE // 2) * 2 + (i % SIZE) // 2 for i in range(CELLS)]


def _check_puzzle(puzzle: str) -> None:
    if not isinstance(puzzle, str) or len(puzzle) != CELLS or any(c not in "01234" for c in puzzle):
        raise ValueError(f"puzzle must be 16 characters from '01234' ('0' = blank), got {puzzle!r}")


def solve(puzzle: str, limit: int = 2) -> list[str]:
    """Up to ``limit`` solutions of ``puzzle`` (16 chars, '0' = blank), by backtracking on the most
    constrained blank. Returns [] when the clues contradict each other."""
    _check_puzzle(puzzle)
    cells = [int(c) for c in puzzle]
    rows, cols, boxes = [0] * SIZE, [0] * SIZE, [0] * SIZE
    for i, d in enumerate(cells):
        if d:
            bit = 1 << (d - 1)
            if (rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]]) & bit:
                return []
            rows[_ROW[i]] |= bit
            cols[_COL[i]] |= bit
            boxes[_BOX[i]] |= bit
    found: list[str] = []

    def search() -> None:
        best, best_free = -1, 0
        for i in range(CELLS):
            if cells[i] == 0:
                free = ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]]) & 0b1111
                if best < 0 or free.bit_count() < best_free.bit_count():
                    best, best_free = i, free
                    if free == 0:
                        return
        if best < 0:
            found.append("".join(map(str, cells)))
            return
        r, c, b = _ROW[best], _COL[best], _BOX[best]
        for d in range(SIZE):
            bit = 1 << d
            if best_free & bit:
                cells[best] = d + 1
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
                search()
                rows[r] &= ~bit
                cols[c] &= ~bit
                boxes[b] &= ~bit
                cells[best] = 0
                if len(found) >= limit:
                    return

    search()
    return found


@functools.cache
def all_grids() -> tuple[str, ...]:
    """The 288 valid 4x4 Sudoku grids as 16-digit strings, sorted."""
    return tuple(sorted(solve("0" * CELLS, limit=NUM_GRIDS + 1)))


@functools.cache
def split_grids(test_fraction: float = 0.2, split_seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train grids, test grids): a fixed pseudo-random ``test_fraction`` of the 288 grids is held out."""
    grids = all_grids()
    ranked = sorted(grids, key=lambda g: hashlib.sha256(f"sudoku-split:{split_seed}:{g}".encode()).digest())
    n_test = round(test_fraction * len(grids))
    return tuple(sorted(ranked[n_test:])), tuple(sorted(ranked[:n_test]))


def make_puzzle(solution: str, num_blanks: int, rng) -> str | None:
    """Blank ``num_blanks`` cells of ``solution`` so the puzzle keeps a unique solution, trying cells in
    ``rng``'s order; None when this order cannot reach that many blanks."""
    order = list(range(CELLS))
    rng.shuffle(order)
    cells = list(solution)
    blanks = 0
    for i in order:
        if blanks == num_blanks:
            break
        cells[i] = "0"
        if len(solve("".join(cells), limit=2)) == 1:
            blanks += 1
        else:
            cells[i] = solution[i]
    return "".join(cells) if blanks == num_blanks else None


def format_grid(cells: str) -> str:
    """'1234341221434321' -> '1234/3412/2143/4321'."""
    return "/".join(cells[r * SIZE : (r + 1) * SIZE] for r in range(SIZE))


def _digits(answer: str) -> str:
    return "".join(c for c in answer if "0" <= c <= "9")[:CELLS]


def parse_grid(text: str) -> str:
    """The first 16 ASCII digits of a completion's answer part (fewer when the answer is short)."""
    return _digits(final_answer(completion_text(text)))


def cell_accuracy(puzzle: str, solution: str, answer_digits: str, cells: str = "blanks") -> float:
    """Fraction of the puzzle's blank cells (``cells="all"``: of all 16 cells) whose digit in
    ``answer_digits`` matches ``solution``."""
    blanks = [i for i, c in enumerate(puzzle) if c == "0" or cells == "all"]
    if not blanks:
        return 1.0
    right = sum(1 for i in blanks if i < len(answer_digits) and answer_digits[i] == solution[i])
    return right / len(blanks)


def _grid_of(value: Any) -> str:
    """A puzzle/solution column value as 16 chars: accepts '1204/3400/...' or a list of digits."""
    if isinstance(value, (list, tuple)):
        value = "".join(str(v) for v in value)
    text = "".join(c for c in str(value) if c != "/")
    _check_puzzle(text)
    return text


INSTRUCT_TEMPLATE = (
    "Solve this 4x4 Sudoku. Every row, every column and every 2x2 box must contain each of the digits "
    "1, 2, 3 and 4 exactly once. The grid is written row by row, rows separated by '/', with 0 for an "
    "empty cell:\n{puzzle}\nGive the completed grid in the same format inside <answer></answer>."
)


@dataclass
class SudokuTask(Task):
    """4x4 Sudoku with ``min_blanks..max_blanks`` blank cells (uniform per puzzle)."""

    name: ClassVar[str] = "sudoku"
    reward_columns: ClassVar[tuple[str, ...]] = ("puzzle", "solution")

    min_blanks: int = 4
    max_blanks: int = 10
    test_fraction: float = 0.2
    split_seed: int = 0
    prompt_style: Literal["compact", "instruct"] = "compact"
    # "blanks": the papers' reward, the blank cells filled correctly; "all": every cell of the answer grid
    # must match, so a completion that changes a given clue loses reward too (a small model that has not
    # learned to copy the clues is otherwise free to drift on them).
    reward_cells: Literal["blanks", "all"] = "blanks"
    # "cells": the fraction of those cells that are right (the papers' reward); "solved": 1 for a solved
    # grid, else 0 (sparse, but it never rewards a wrong answer: with a weight baseline or group filter,
    # only groups with a solved and an unsolved rollout teach anything).
    reward_type: Literal["cells", "solved"] = "cells"
    train_size: int = 2000  # rows returned by train() when n is None
    test_size: int = 200
    reward_preset: presets.RewardPreset = "default"

    def __post_init__(self) -> None:
        presets.check_preset(self.name, self.reward_preset)
        if self.reward_preset == "d1" and (
            self.prompt_style != "instruct" or (self.reward_type, self.reward_cells) != ("cells", "blanks")
        ):
            raise ValueError(
                "reward_preset='d1' is d1's blank-cell reward on the <answer> block that "
                f"prompt_style='instruct' asks for: got prompt_style={self.prompt_style!r}, "
                f"reward_type={self.reward_type!r}, reward_cells={self.reward_cells!r}"
            )
        for field in ("min_blanks", "max_blanks"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_BLANKS:
                raise ValueError(f"{field} must be an int in [1, {MAX_BLANKS}], got {v!r}")
        if self.min_blanks > self.max_blanks:
            raise ValueError(f"min_blanks ({self.min_blanks}) must be <= max_blanks ({self.max_blanks})")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.reward_cells not in ("blanks", "all"):
            raise ValueError(f"reward_cells must be one of ('blanks', 'all'), got {self.reward_cells!r}")
        if self.reward_type not in ("cells", "solved"):
            raise ValueError(f"reward_type must be one of ('cells', 'solved'), got {self.reward_type!r}")
        if self.prompt_style not in ("compact", "instruct"):
            raise ValueError(
                f"prompt_style must be one of ('compact', 'instruct'), got {self.prompt_style!r}"
            )
        train, test = split_grids(self.test_fraction, self.split_seed)
        if not train or not test:
            raise ValueError(f"test_fraction={self.test_fraction} leaves an empty split of the 288 grids")

    def grids(self, split: str) -> tuple[str, ...]:
        check_split(split)
        train, test = split_grids(self.test_fraction, self.split_seed)
        return train if split == "train" else test

    def prompt(self, puzzle: str) -> str:
        if self.prompt_style == "compact":
            return format_grid(puzzle) + "="
        return INSTRUCT_TEMPLATE.format(puzzle=format_grid(puzzle))

    def reference(self, solution: str) -> str:
        grid = format_grid(solution)
        return grid if self.prompt_style == "compact" else f"<answer>{grid}</answer>"

    def rows(self, split: str, n: int | None, seed: int | None) -> list[dict]:
        grids = self.grids(split)
        n = check_count(n, self.train_size if split == "train" else self.test_size)
        rng = stable_rng("sudoku", split, seed, self.min_blanks, self.max_blanks)
        out = []
        while len(out) < n:
            solution = rng.choice(grids)
            num_blanks = rng.randint(self.min_blanks, self.max_blanks)
            puzzle = make_puzzle(solution, num_blanks, rng)
            if puzzle is None:  # this cell order got stuck before num_blanks: draw again
                continue
            out.append(
                {
                    "prompt": self.prompt(puzzle),
                    "reference": self.reference(solution),
                    "puzzle": puzzle,
                    "solution": solution,
                    "num_blanks": num_blanks,
                }
            )
        return out

    def _scored(self, completions: Sequence, columns: dict) -> list[tuple[str, str, str]]:
        puzzles, solutions = require_columns("sudoku", columns, ("puzzle", "solution"), len(completions))
        return [
            (_grid_of(p), _grid_of(s), parse_grid(c))
            for p, s, c in zip(puzzles, solutions, completions, strict=True)
        ]

    def reward(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float | None]:
        if self.reward_preset == "d1":
            puzzles, solutions = require_columns("sudoku", columns, ("puzzle", "solution"), len(completions))
            blocks = [answer_tag(completion_text(c)) for c in completions]
            return [
                0.0 if b is None else cell_accuracy(_grid_of(p), _grid_of(s), _digits(b))
                for p, s, b in zip(puzzles, solutions, blocks, strict=True)
            ]
        scored = self._scored(completions, columns)
        if self.reward_type == "solved":
            return [float(a == s) for _, s, a in scored]
        return [cell_accuracy(p, s, a, self.reward_cells) for p, s, a in scored]

    def is_correct(self, prompts: Sequence, completions: Sequence, **columns: Any) -> list[float]:
        return [float(a == s) for _, s, a in self._scored(completions, columns)]
