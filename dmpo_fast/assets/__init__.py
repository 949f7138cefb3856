"""Files shipped inside the package: the built-in tiny model of the default run.

``tiny_sudoku/`` is a 4-layer LLaDA (d_model 128, about 0.8M parameters, float32) over the character
tokenizer, pretrained by ``scripts/pretrain_tiny.py`` with masked diffusion on 4x4 Sudoku and stopped
early on purpose, so reinforcement learning has room to improve it. ``pretrain.json`` next to the
weights records the command, the seed and the held-out solve rate during pretraining.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_SUDOKU = Path(__file__).resolve().parent / "tiny_sudoku"


def load_tiny(dtype: torch.dtype | str | None = torch.float32, device=None):
    """``(DiffusionLM, CharTokenizer)`` of the built-in tiny Sudoku model, in train mode."""
    from dmpo_fast.models import load
    from dmpo_fast.tokenizer import CharTokenizer

    if not (TINY_SUDOKU / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the built-in tiny model is missing from this installation ({TINY_SUDOKU}); reinstall dmpo_fast "
            "or rebuild it with `python scripts/pretrain_tiny.py`"
        )
    lm = load(str(TINY_SUDOKU), dtype=dtype, device=device).train()
    return lm, CharTokenizer.load(str(TINY_SUDOKU))


def tiny_pretrain_record() -> dict:
    """The pretraining record of the built-in tiny model (command, args, solve rate per evaluation)."""
    return json.loads((TINY_SUDOKU / "pretrain.json").read_text())
