"""The models of a run: the policy (with LoRA when asked), its reference, the perplexity scorer, and the
learning-rate schedule of its optimizer."""

from __future__ import annotations

import contextlib
import copy
import math

import torch

from dmpo_fast.config import TrainConfig


def load_policy(cfg: TrainConfig, device: torch.device):
    """(policy DiffusionLM, tokenizer) for cfg.model: a built-in tiny model ("tiny" for Sudoku,
    "tiny_countdown"; ``dmpo_fast.assets.TINY_MODELS``), a local directory or a hub name."""
    from dmpo_fast import models
    from dmpo_fast.assets import TINY_MODELS, load_tiny

    dtype = getattr(torch, cfg.dtype)
    quant = dict(load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit)  # QLoRA: models.quantization
    if cfg.model in TINY_MODELS:
        lm, tokenizer = load_tiny(dtype=dtype, device=device, name=TINY_MODELS[cfg.model], **quant)
    else:
        lm = models.load(
            cfg.model, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code, **quant
        )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        tokenizer.padding_side = "left"
    lm.train()
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    if cfg.lora:
        lm = _add_lora(lm, cfg)
    return lm, tokenizer


def _add_lora(lm, cfg: TrainConfig):
    try:
        from dmpo_fast.models.peft_support import add_lora
    except ImportError as e:  # peft missing
        raise ValueError(f"lora=true needs the peft package: pip install 'dmpo_fast[lora]' ({e})") from e
    return add_lora(
        lm,
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
    )


def load_scorer(cfg: TrainConfig, tokenizer, device):
    """MRO's perplexity scorer: cfg.ppl_model (mro_ppl_model, "auto" resolved) with its own tokenizer (the
    policy's text is re-encoded)."""
    name = cfg.ppl_model
    if name is None:
        raise ValueError(
            f"the perplexity reward needs mro_ppl_model (a causal LM name or directory); 'auto' has no built-in "
            f"scorer for task {cfg.task!r}"
        )
    dtype = getattr(torch, cfg.dtype)
    from dmpo_fast import mro

    try:
        return mro.load_ar_scorer(name, bridge_from=tokenizer, device=device, dtype=dtype, impl=cfg.impl)
    except (OSError, ValueError) as e:  # not on disk and not fetchable (offline), or not a causal LM
        raise ValueError(
            f"mro_ppl_model {name!r} cannot be loaded (a causal LM's directory, or a hub name "
            f"that is cached or can be fetched): {e}"
        ) from e


class Reference:
    """Context manager factory giving the reference model: a frozen copy, or the adapter-off policy.
    ``uses``: whether the algorithm reads a reference at all (``Algorithm.needs_reference``)."""

    def __init__(self, cfg: TrainConfig, policy, *, uses: bool):
        self.kind = cfg.reference if uses else "none"
        self.policy = policy
        self.copy = None
        if self.kind == "frozen_copy":
            self.copy = copy.deepcopy(policy).eval().requires_grad_(False)

    def __call__(self):
        if self.kind == "frozen_copy":
            return contextlib.nullcontext(self.copy)
        if self.kind == "adapter_disabled":
            from dmpo_fast.models.peft_support import adapter_disabled

            return adapter_disabled(self.policy)
        raise ValueError("reference='none' has no reference model (use alpha=0)")


def scheduler(cfg: TrainConfig, optimizer):
    def factor(step: int) -> float:
        warm = cfg.warmup_steps if cfg.lr_scheduler != "constant" else 0
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_scheduler in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warm) / max(1, cfg.max_steps - warm)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
