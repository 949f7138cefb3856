"""The public samplers: ``llada``, ``fast_dllm``, ``roar`` and the ``generate`` dispatcher."""

from __future__ import annotations

from typing import Literal

import torch

from dmpo_fast.ops.denoise_step import REMASKING
from dmpo_fast.sampling.engine import DecodePlan, decode
from dmpo_fast.sampling.rollout import (
    Rollout,
    _positive_int,
    check_lengths,
    check_prompts,
    check_temperature,
    inference,
    resolve_row_keys,
    resolve_seed,
)

SAMPLERS: tuple[str, ...] = ("llada", "fast_dllm", "roar")
CACHES: tuple[str, ...] = ("none", "prefix", "dual")


def _common(
    model,
    prompt_ids,
    attention_mask,
    gen_length,
    block_length,
    temperature,
    seed,
    generator,
    row_keys,
    eos_id,
):
    mask = check_prompts(prompt_ids, attention_mask)
    for name in ("mask_id", "hidden", "head_weight"):
        if not hasattr(model, name):
            raise ValueError(
                f"model must be a DiffusionLM (mask_id, hidden, head_weight); it has no {name!r}"
            )
    gen_length, n_blocks = check_lengths(model, prompt_ids.shape[1], gen_length, block_length)
    temperature = check_temperature(temperature)
    seed = resolve_seed(seed, generator)
    row_keys = resolve_row_keys(row_keys, prompt_ids.shape[0], prompt_ids.device)
    if eos_id == "model":
        eos_id = getattr(model, "eos_id", None)
    elif eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or eos_id < 0):
        raise ValueError(f"eos_id must be 'model', None or a non-negative int, got {eos_id!r}")
    return mask, n_blocks, temperature, seed, row_keys, eos_id


def _steps_per_block(steps, n_blocks: int, block_length: int) -> int:
    steps = _positive_int("steps", steps)
    if steps % n_blocks:
        raise ValueError(
            f"steps ({steps}) must be a multiple of the number of blocks "
            f"({n_blocks} = gen_length / block_length)"
        )
    per_block = steps // n_blocks
    if per_block > block_length:
        raise ValueError(
            f"steps ({steps}) gives {per_block} steps per block, more than block_length ({block_length}) "
            "tokens to commit"
        )
    return per_block


def llada(
    model,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float = 0.0,
    remasking: Literal["low_confidence", "random"] = "low_confidence",
    eos_id: int | None | Literal["model"] = "model",
    stop_at_eos: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    row_keys: torch.Tensor | None = None,
    impl: str = "auto",
) -> Rollout:
    """LLaDA's sampler: ``steps / (gen_length / block_length)`` steps per block, each committing an even share
    of the block (the remainder first) — the highest-confidence positions, or random ones with
    ``remasking="random"``. Every step is a full forward over the sequence (no cache)."""
    mask, n_blocks, temperature, seed, row_keys, eos_id = _common(
        model,
        prompt_ids,
        attention_mask,
        gen_length,
        block_length,
        temperature,
        seed,
        generator,
        row_keys,
        eos_id,
    )
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    plan = DecodePlan(
        "schedule",
        _steps_per_block(steps, n_blocks, block_length),
        remasking=remasking,
        temperature=temperature,
    )
    with inference(model):
        return decode(
            model,
            prompt_ids,
            mask,
            gen_length=gen_length,
            block_length=block_length,
            plan=plan,
            seed=seed,
            row_keys=row_keys,
            eos_id=eos_id,
            stop_at_eos=stop_at_eos,
            impl=impl,
        )


def fast_dllm(
    model,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gen_length: int,
    block_length: int,
    threshold: float | None = None,
    factor: float | None = None,
    steps: int | None = None,
    cache: Literal["none", "prefix", "dual"] = "prefix",
    temperature: float = 0.0,
    remasking: Literal["low_confidence", "random"] = "low_confidence",
    eos_id: int | None | Literal["model"] = "model",
    stop_at_eos: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    row_keys: torch.Tensor | None = None,
    impl: str = "auto",
) -> Rollout:
    """Fast-dLLM: parallel decoding with a KV cache.

    Commit rule (one of): ``threshold`` — every masked position of the block with confidence >= threshold,
    at least the best (default 0.9 when none is given); ``factor`` — the n best with
    (i + 1)·(1 − c_(i)) <= factor for i <= n; ``steps`` — LLaDA's fixed schedule. With threshold / factor a
    block takes as many steps as it needs (at most block_length).

    ``cache``: "prefix" refreshes a cache of everything before the block at the block's first step, then runs
    the block plus the rest of the sequence against it; "dual" also caches the (still masked) positions after
    the block and runs the block alone; "none" runs the full sequence every step.
    """
    mask, n_blocks, temperature, seed, row_keys, eos_id = _common(
        model,
        prompt_ids,
        attention_mask,
        gen_length,
        block_length,
        temperature,
        seed,
        generator,
        row_keys,
        eos_id,
    )
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    if cache != "none" and not getattr(model, "supports_cache", False):
        raise ValueError(f"cache={cache!r} needs a model with a KV cache (supports_cache); use cache='none'")
    given = [
        name for name, v in (("threshold", threshold), ("factor", factor), ("steps", steps)) if v is not None
    ]
    if len(given) > 1:
        raise ValueError(f"give at most one of threshold, factor, steps; got {given}")
    if not given:
        threshold = 0.9
    if steps is not None:
        plan = DecodePlan(
            "schedule",
            _steps_per_block(steps, n_blocks, block_length),
            remasking=remasking,
            cache=cache,
            temperature=temperature,
        )
    elif factor is not None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"factor must be a positive number, got {factor!r}")
        plan = DecodePlan(
            "factor",
            block_length,
            factor=float(factor),
            remasking=remasking,
            cache=cache,
            temperature=temperature,
        )
    else:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        plan = DecodePlan(
            "threshold",
            block_length,
            threshold=float(threshold),
            remasking=remasking,
            cache=cache,
            temperature=temperature,
        )
    with inference(model):
        return decode(
            model,
            prompt_ids,
            mask,
            gen_length=gen_length,
            block_length=block_length,
            plan=plan,
            seed=seed,
            row_keys=row_keys,
            eos_id=eos_id,
            stop_at_eos=stop_at_eos,
            impl=impl,
        )


def roar(
    model,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gen_length: int,
    block_length: int,
    steps: int | None = None,
    temperature: float = 1.0,
    ref_model=None,
    eos_id: int | None | Literal["model"] = "model",
    stop_at_eos: bool = True,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    row_keys: torch.Tensor | None = None,
    impl: str = "auto",
) -> Rollout:
    """ROAR: one token per step, in a uniformly random order inside each block (blocks left to right), with
    exact per-token log-probs.

    ``Rollout.logprobs[b, j]`` = log softmax(z)[token], z the policy's logits (temperature 1) at position j
    of the state from which the token was committed — so Σ_j logprobs is log p_θ(completion | prompt, order)
    of the any-order autoregressive factorisation along the sampled order. The token itself is drawn from
    softmax(z / T): its log-prob under that distribution is ``sampling_logprobs`` (T > 0; equal to logprobs
    at T = 1). ``ref_logprobs`` (with ``ref_model``) scores the same tokens at the same states under the
    reference. ``steps`` is gen_length (the default); any other value is an error.
    """
    mask, n_blocks, temperature, seed, row_keys, eos_id = _common(
        model,
        prompt_ids,
        attention_mask,
        gen_length,
        block_length,
        temperature,
        seed,
        generator,
        row_keys,
        eos_id,
    )
    if steps is not None and steps != gen_length:
        raise ValueError(
            f"steps must be None or gen_length ({gen_length}) for roar (one token per step), got {steps!r}"
        )
    if ref_model is not None and getattr(ref_model, "mask_id", None) != model.mask_id:
        raise ValueError(
            f"ref_model must share the policy's mask_id {model.mask_id}, "
            f"got {getattr(ref_model, 'mask_id', None)!r}"
        )
    plan = DecodePlan("order", block_length, temperature=temperature, logprobs=True)
    with inference(model, ref_model):
        return decode(
            model,
            prompt_ids,
            mask,
            gen_length=gen_length,
            block_length=block_length,
            plan=plan,
            seed=seed,
            row_keys=row_keys,
            eos_id=eos_id,
            stop_at_eos=stop_at_eos,
            ref_model=ref_model,
            impl=impl,
        )


def generate(
    model,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    sampler: Literal["llada", "fast_dllm", "roar"] = "llada",
    **kwargs,
) -> Rollout:
    """Sample completions with the named sampler; ``kwargs`` are that sampler's keyword arguments."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    fn = {"llada": llada, "fast_dllm": fast_dllm, "roar": roar}[sampler]
    return fn(model, prompt_ids, attention_mask, **kwargs)
