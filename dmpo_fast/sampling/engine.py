"""The blockwise semi-autoregressive decoding loop every sampler runs.

    for each block of block_length completion positions (left to right):
        for each step (fixed count, or until the block has no mask left):
            hidden = model call (full sequence, or the block against a prefix / dual KV cache)
            x_block, committed, _ = denoise_step((hidden_block, head), x_block, active, ...)
        rows whose completion holds an EOS are finished: their later blocks are filled with EOS
        stop when every row is finished

Rows advance through the blocks in lockstep, but each keeps its own step counter (incremented only by a model
call in which it had something to decode) and its own Philox row key; the noise is keyed by (row key, index
within the completion, row step), so a row decodes the same tokens alone as in any batch.

Step hook (test-time search, ``dmpo_fast.sampling.tts``). Inside ``with step_hook(fn):`` every ``decode``
calls ``fn(DecodeState)`` after each model call; ``fn`` returns None (carry on) or ``src [B]``: row b
continues from row ``src[b]``'s state (tokens, commit steps, step counter, finished flag, log-probs, ROAR
order) with its own row key, so copies of one state diverge through their noise. A re-seeded row invalidates
the block's KV cache, so the next step refreshes it with a full forward. Without a hook nothing changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from typing import Literal

import torch

from dmpo_fast.ops.denoise_step import STREAM_ORDER, denoise_step
from dmpo_fast.ops.linear_ce import linear_logprob
from dmpo_fast.ops.philox import philox4x32, uniform_from_bits
from dmpo_fast.sampling.rollout import Rollout, completion_mask_from_eos

Rule = Literal["schedule", "threshold", "factor", "order"]
CacheMode = Literal["none", "prefix", "dual"]


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """How a sampler decodes a block.

    rule: "schedule" commits ``transfer_schedule(block_length, steps_per_block)[i]`` tokens at step i;
        "threshold" / "factor" the Fast-dLLM parallel rules (steps until the block is done, at most
        block_length); "order" one token per step at the position whose ROAR rank is i.
    """

    rule: Rule
    steps_per_block: int
    threshold: float | None = None
    factor: float | None = None
    remasking: str = "low_confidence"
    cache: CacheMode = "none"
    temperature: float = 0.0
    logprobs: bool = False


@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What a step hook sees after a model call (the tensors are the engine's own: read, do not write).

    ids [B, P + G] (uncommitted positions hold mask_id), commit_step [B, G] (-1 where not committed yet),
    row_steps [B], finished [B] bool; ``calls`` model calls so far (over all blocks), ``block`` the current
    block index, ``prompt_length`` P.
    """

    ids: torch.Tensor
    commit_step: torch.Tensor
    row_steps: torch.Tensor
    finished: torch.Tensor
    attention_mask: torch.Tensor
    calls: int
    block: int
    prompt_length: int


StepHook = Callable[[DecodeState], "torch.Tensor | None"]
_STEP_HOOK: contextvars.ContextVar[StepHook | None] = contextvars.ContextVar("step_hook", default=None)


@contextlib.contextmanager
def step_hook(hook: StepHook) -> Iterator[None]:
    """Call ``hook(DecodeState)`` after every model call of every ``decode`` run inside the block (see the
    module docstring); a context variable, so samplers need no extra argument."""
    if not callable(hook):
        raise ValueError(f"hook must be callable, got {type(hook).__name__}")
    token = _STEP_HOOK.set(hook)
    try:
        yield
    finally:
        _STEP_HOOK.reset(token)


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """Tokens committed at each of ``steps`` steps of a block: as even as possible, the remainder first
    (LLaDA's linear schedule: the expected number of unmasked tokens per step is constant)."""
    base, extra = divmod(block_length, steps)
    return [base + 1] * extra + [base] * (steps - extra)


def roar_ranks(seed: int, row_keys: torch.Tensor, gen_length: int, block_length: int) -> torch.Tensor:
    """[B, G] rank of each completion position within its block: ROAR decodes rank i at the block's step i.

    The order sorts u(j) = uniform(word 0 of philox(seed; 0, j, row key, STREAM_ORDER)) over the block's
    completion indices j (ties by position): a uniformly random permutation per row and block.
    """
    B = row_keys.shape[0]
    j = torch.arange(gen_length, device=row_keys.device)[None, :]
    bits = philox4x32(seed, torch.zeros_like(j), j, row_keys[:, None], torch.full_like(j, STREAM_ORDER))[0]
    u = uniform_from_bits(bits).view(B, gen_length // block_length, block_length)
    order = torch.argsort(u, dim=-1, stable=True)
    return torch.argsort(order, dim=-1).reshape(B, gen_length)


def _block_hidden(model, ids, attn, s: int, e: int, mode: CacheMode, cache, first: bool):
    """(hidden of positions [s, e) [B, e - s, H], cache to reuse at the block's next step)."""
    if mode == "none":
        return model.hidden(ids, attn)[:, s:e], None
    if first:  # refresh: one full forward, exact for this step; its keys/values serve the block's other steps
        hidden, full = model.prefill(ids, attn)
        cache = full.truncate(s) if mode == "prefix" else full.exclude(s, e)
        return hidden[:, s:e], cache
    if mode == "prefix":  # queries: the block and everything after it
        return model.hidden(ids[:, s:], cache=cache)[:, : e - s], cache
    return model.hidden(ids[:, s:e], cache=cache, positions=s), cache  # dual: the block only


def _scaled_logprob(
    model, hidden_rows: torch.Tensor, tokens: torch.Tensor, scale: float, impl: str
) -> torch.Tensor:
    """log softmax(hidden · headᵀ · scale)[token] per row, [n] fp32; scale folded into hidden as in dmpo."""
    head = model.head_weight
    if scale != 1.0:
        hidden_rows = hidden_rows * scale
    return linear_logprob(hidden_rows, head.to(hidden_rows.dtype), tokens, impl=impl).to(torch.float32)


def decode(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    gen_length: int,
    block_length: int,
    plan: DecodePlan,
    seed: int,
    row_keys: torch.Tensor,
    eos_id: int | None,
    stop_at_eos: bool,
    ref_model=None,
    impl: str = "auto",
) -> Rollout:
    """Run ``plan`` over a validated batch (public entry points: ``dmpo_fast.sampling.samplers``)."""
    B, P = prompt_ids.shape
    G, bl = gen_length, block_length
    device, mask_id = prompt_ids.device, model.mask_id
    ids = torch.cat((prompt_ids, torch.full((B, G), mask_id, dtype=prompt_ids.dtype, device=device)), dim=1)
    attn = None if bool(prompt_mask.all()) else torch.cat((prompt_mask, prompt_mask.new_ones(B, G)), dim=1)
    head, scale = model.head_weight, float(getattr(model, "logit_scale", 1.0))
    commit_step = torch.full((B, G), -1, dtype=torch.int64, device=device)
    row_steps = torch.zeros(B, dtype=torch.int64, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    ranks = roar_ranks(seed, row_keys, G, bl) if plan.rule == "order" else None
    schedule = transfer_schedule(bl, plan.steps_per_block) if plan.rule == "schedule" else None
    want_sampling = plan.logprobs and plan.temperature > 0
    logprobs = torch.zeros(B, G, device=device) if plan.logprobs else None
    ref_logprobs = torch.zeros(B, G, device=device) if plan.logprobs and ref_model is not None else None
    sampling_logprobs = torch.zeros(B, G, device=device) if want_sampling else None
    hook, calls, refresh = _STEP_HOOK.get(), 0, False
    rule = {}
    if plan.rule == "threshold":
        rule = dict(threshold=plan.threshold)
    elif plan.rule == "factor":
        rule = dict(factor=plan.factor)
    elif plan.rule == "order":
        rule = dict(num_transfer=1)

    for k in range(G // bl):
        s, e, c = (
            P + k * bl,
            P + (k + 1) * bl,
            k * bl,
        )  # block [s, e) of the sequence, [c, c + bl) of the completion
        cache = None
        for i in range(plan.steps_per_block):
            block = ids[:, s:e]
            active = block == mask_id  # [B, bl]
            if ranks is not None:
                active &= ranks[:, c : c + bl] == i
            if plan.rule in ("threshold", "factor") and not bool(active.any()):
                break  # every row's block is done (one host sync per step, as Fast-dLLM's loop)
            hidden, cache = _block_hidden(model, ids, attn, s, e, plan.cache, cache, first=i == 0 or refresh)
            refresh = False
            if schedule is not None:
                rule = dict(num_transfer=schedule[i])
            out = denoise_step(
                (hidden, head), block, active,
                temperature=plan.temperature, remasking=plan.remasking, seed=seed, step=row_steps,
                rows=row_keys, position_offset=c, mask_id=mask_id, logit_scale=scale, impl=impl, **rule,
            )  # fmt: skip
            if plan.logprobs:  # ROAR: exactly one committed position per row that still decodes
                at = out.committed.to(torch.int8).argmax(dim=1)  # [B]
                rows = torch.arange(B, device=device)
                tok = out.x[rows, at].to(torch.int64)
                keep = out.committed  # [B, bl]
                lp = _scaled_logprob(model, hidden[rows, at], tok, scale, impl)
                logprobs[:, c : c + bl] = torch.where(keep, lp[:, None], logprobs[:, c : c + bl])
                if sampling_logprobs is not None:
                    lps = _scaled_logprob(model, hidden[rows, at], tok, scale / plan.temperature, impl)
                    sampling_logprobs[:, c : c + bl] = torch.where(
                        keep, lps[:, None], sampling_logprobs[:, c : c + bl]
                    )
                if ref_logprobs is not None:
                    h_ref = ref_model.hidden(ids, attn)[
                        rows, s + at
                    ]  # the state the policy saw (before the write)
                    lpr = _scaled_logprob(
                        ref_model, h_ref, tok, float(getattr(ref_model, "logit_scale", 1.0)), impl
                    )
                    ref_logprobs[:, c : c + bl] = torch.where(keep, lpr[:, None], ref_logprobs[:, c : c + bl])
            ids[:, s:e] = out.x
            commit_step[:, c : c + bl] = torch.where(
                out.committed, row_steps[:, None], commit_step[:, c : c + bl]
            )
            row_steps += active.any(dim=1)
            calls += 1
            if hook is not None:
                full_mask = torch.cat((prompt_mask, prompt_mask.new_ones(B, G)), dim=1)
                src = hook(DecodeState(ids, commit_step, row_steps, finished, full_mask, calls, k, P))
                if src is not None:  # re-seed rows from other rows' states (their row keys stay)
                    src = torch.as_tensor(src, dtype=torch.int64, device=device)
                    if src.shape != (B,) or bool(((src < 0) | (src >= B)).any()):
                        raise ValueError(f"a step hook must return None or row indices [{B}] in [0, {B})")
                    ids, commit_step, prompt_mask = ids[src], commit_step[src], prompt_mask[src]
                    row_steps, finished = row_steps[src], finished[src]
                    attn = None if attn is None else attn[src]
                    ranks = None if ranks is None else ranks[src]
                    logprobs = None if logprobs is None else logprobs[src]
                    ref_logprobs = None if ref_logprobs is None else ref_logprobs[src]
                    sampling_logprobs = None if sampling_logprobs is None else sampling_logprobs[src]
                    refresh = True  # the cache holds the old rows' keys/values
        if eos_id is not None and stop_at_eos:
            newly = (ids[:, P:e] == eos_id).any(dim=1) & ~finished
            # A finished row's undecoded blocks become EOS, "committed" after its last step (masked in every
            # state the row was decoded from); it has nothing left to decode, so its step counter stops.
            ids[:, e:] = torch.where(newly[:, None], eos_id, ids[:, e:])
            commit_step[:, c + bl :] = torch.where(
                newly[:, None], row_steps[:, None], commit_step[:, c + bl :]
            )
            finished |= newly
            if bool(finished.all()):
                break

    completion = ids[:, P:]
    return Rollout(
        ids=ids,
        attention_mask=torch.cat((prompt_mask, prompt_mask.new_ones(B, G)), dim=1),
        prompt_length=P,
        completion_mask=completion_mask_from_eos(completion, eos_id),
        commit_step=commit_step,
        num_steps=row_steps,
        seed=seed,
        row_keys=row_keys,
        mask_id=mask_id,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        sampling_logprobs=sampling_logprobs,
    )
