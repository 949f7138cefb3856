"""Files shipped inside the package: the built-in tiny models.

Each ``tiny_<task>/`` is a 4-layer LLaDA (d_model 128, about 0.8M parameters, float32) over the character
tokenizer, pretrained by ``scripts/pretrain_tiny.py --task <task>`` with masked diffusion on that task and
stopped early on purpose, so reinforcement learning has room to improve it. ``pretrain.json`` next to the
weights records the command, the seed and the held-out solve rate during pretraining.

    tiny_sudoku/       4x4 Sudoku (TrainConfig ``model: tiny``)
    tiny_countdown/    Countdown on three single-digit numbers, targets up to 30 (``model: tiny_countdown``;
                       train it with ``task_kwargs`` = ``TINY_TASK_KWARGS["tiny_countdown"]``)
    tiny_ar_sudoku/    MRO's perplexity scorer for Sudoku: a 2-layer GPT-2 (0.1M parameters) over the same
                       character tokenizer, trained on the reference answers by scripts/build_ar_scorer.py
                       (``mro_ppl_model: tiny_ar_sudoku``; ``build.json`` records the command)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent
# Asset directory -> the task it was pretrained on.
TINY_ASSETS: dict[str, str] = {"tiny_sudoku": "sudoku", "tiny_countdown": "countdown"}
# TrainConfig.model names of the tiny models: "tiny" is the default run's Sudoku model.
TINY_MODELS: dict[str, str] = {"tiny": "tiny_sudoku", **{name: name for name in TINY_ASSETS}}
TINY_SUDOKU = ASSETS / "tiny_sudoku"
# Built-in perplexity scorers (MRO's mro_ppl_model) -> the task whose answers they were trained on.
TINY_AR_SCORERS: dict[str, str] = {"tiny_ar_sudoku": "sudoku", "tiny_ar_countdown": "countdown"}
# The task options each tiny model was pretrained on. With Countdown's defaults (3-4 numbers up to 99) the
# 0.8M-parameter model never writes a valid expression, so its model sees an easier problem set.
TINY_TASK_KWARGS: dict[str, dict] = {
    "tiny_sudoku": {},
    "tiny_countdown": {"num_counts": [3], "max_number": 9, "max_target": 30},
}


def _asset_dir(name: str) -> Path:
    if name not in TINY_ASSETS:
        raise ValueError(f"name must be one of {tuple(TINY_ASSETS)}, got {name!r}")
    return ASSETS / name


def build_command(name: str) -> str:
    """The command that (re)builds the tiny model ``name`` (run from the repository root)."""
    _asset_dir(name)
    return f"python scripts/pretrain_tiny.py --task {TINY_ASSETS[name]}"


def load_tiny(
    dtype: torch.dtype | str | None = torch.float32,
    device=None,
    *,
    name: str = "tiny_sudoku",
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
):
    """``(DiffusionLM, CharTokenizer)`` of the built-in tiny model ``name``, in train mode.

    ``load_in_4bit`` / ``load_in_8bit`` quantize it as ``dmpo_fast.models.load`` does (QLoRA tests on CPU).

    A model that is not there (``tiny_countdown`` until it is built) raises ``FileNotFoundError`` naming
    the command that builds it."""
    from dmpo_fast.models import load
    from dmpo_fast.tokenizer import CharTokenizer

    path = _asset_dir(name)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the tiny model {name!r} is not in this installation ({path}); build it from the repository "
            f"root with `{build_command(name)}` (about ten minutes on two CPU cores)"
        )
    lm = load(str(path), dtype=dtype, device=device, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
    lm = lm.train()
    return lm, CharTokenizer.load(str(path))


def tiny_ar_scorer_dir(name: str) -> Path:
    """The directory of the built-in perplexity scorer ``name`` (a GPT-2 and its character tokenizer);
    ``FileNotFoundError`` naming the command that builds it when it is not there."""
    if name not in TINY_AR_SCORERS:
        raise ValueError(f"name must be one of {tuple(TINY_AR_SCORERS)}, got {name!r}")
    path = ASSETS / name
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the perplexity scorer {name!r} is not in this installation ({path}); build it from the repository "
            f"root with `python scripts/build_ar_scorer.py --task {TINY_AR_SCORERS[name]}` (a minute or two of CPU)"
        )
    return path


def tiny_pretrain_record(name: str = "tiny_sudoku") -> dict:
    """The pretraining record of the tiny model ``name`` (command, args, solve rate per evaluation)."""
    return json.loads((_asset_dir(name) / "pretrain.json").read_text())
