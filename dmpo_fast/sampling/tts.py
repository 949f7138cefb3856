"""Test-time scaling for masked-diffusion sampling (MRO, arXiv 2510.21473, §test-time scaling).

    out = generate_tts(model, prompt_ids, attention_mask, k=4, window=32, reward_fn=fn,
                       sampler="llada", gen_length=256, block_length=8, steps=128, temperature=0.7, seed=0)
    out.rollout          # [B, P + G]  the best of the k candidates of each prompt
    out.candidates       # [B * k, P + G] all final candidates (candidate j of prompt b is row b * k + j)

Each prompt is decoded as k candidates side by side (rows ``b * k + j``, Philox row key ``key_b * k + j``).
Every ``window`` model calls the candidates' partial states are scored with
``reward_fn(partial, final=False)`` and every candidate of a prompt continues from the best one's state — k
branches from the best state so far, which then diverge through their own noise. At the end the finished
candidates are scored with ``reward_fn(candidates, final=True)`` and the best is returned, so the result
never scores below any final candidate it was chosen from.

``reward_fn(rollout: Rollout, *, final: bool) -> Tensor[M]``: one score per row (higher is better; NaN counts
as the worst). A partial rollout has ``mask_id`` at uncommitted positions, whose ``commit_step`` is the row's
step count (masked in every state, as the samplers mark positions they never decoded), so
``Rollout.state_at`` and the MRO step rewards (``dmpo_fast.mro``) work on it unchanged.

Step-wise group sampling (``grouped=True``, MRO's rejection sampling and the trainer's ``mro_rs``): the rows
come already repeated, k consecutive rows per prompt with their own row keys, and every candidate is returned
(``out.rollout`` is ``out.candidates``): k siblings that share the best partial state of the last branch
point, each to be scored and kept or dropped by the caller.

Ties go to the lowest candidate index. With k = 1 nothing is ever replaced, so the tokens equal plain
decoding's. Branch points count model calls, not per-row steps: with a threshold sampler the rows of a batch
can take different numbers of steps per block, and the calls are the one clock they share. Sampling with a
temperature of 0 and low-confidence remasking is deterministic, so the k branches only differ at T > 0 or
with random remasking. The decoding runs through the ordinary samplers (``generate``) with
``dmpo_fast.sampling.engine.step_hook``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from dmpo_fast.ops.philox import draw_seed
from dmpo_fast.sampling.engine import DecodeState, step_hook
from dmpo_fast.sampling.rollout import Rollout, _positive_int, check_prompts, completion_mask_from_eos
from dmpo_fast.sampling.samplers import generate

RewardFn = Callable[..., torch.Tensor]


@dataclasses.dataclass
class TTSOutput:
    """rollout: [B] the chosen candidates; rewards [B] their final scores; candidates [B * k] every final
    candidate (prompt-major); candidate_rewards [B * k]; chosen [B] the winning candidate index in [0, k);
    branches: how many times the candidates were re-seeded from the best partial state."""

    rollout: Rollout
    rewards: torch.Tensor
    candidates: Rollout
    candidate_rewards: torch.Tensor
    chosen: torch.Tensor
    branches: int


def select_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The rollout restricted to (or reordered by) ``rows`` [M]."""
    out = {}
    for f in dataclasses.fields(rollout):
        v = getattr(rollout, f.name)
        out[f.name] = v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
    return Rollout(**out)


def partial_rollout(
    state: DecodeState, *, seed: int, row_keys: torch.Tensor, mask_id: int, eos_id: int | None
) -> Rollout:
    """A ``Rollout`` view of a decoding state; uncommitted positions carry commit_step = the row's steps."""
    P = state.prompt_length
    commit_step = torch.where(state.commit_step < 0, state.row_steps[:, None], state.commit_step)
    return Rollout(
        ids=state.ids.clone(), attention_mask=state.attention_mask, prompt_length=P,
        completion_mask=completion_mask_from_eos(state.ids[:, P:], eos_id), commit_step=commit_step,
        num_steps=state.row_steps.clone(), seed=seed, row_keys=row_keys, mask_id=mask_id,
    )  # fmt: skip


def _scores(reward_fn: RewardFn, rollout: Rollout, final: bool) -> torch.Tensor:
    r = reward_fn(rollout, final=final)
    r = torch.as_tensor(r, dtype=torch.float32).reshape(-1)
    if r.shape[0] != rollout.ids.shape[0]:
        raise ValueError(
            f"reward_fn must return one score per row ({rollout.ids.shape[0]} rows), got {r.shape[0]}"
        )
    return torch.nan_to_num(r.to(rollout.ids.device), nan=-float("inf"))


def _best(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B] index in [0, k) of the best candidate per prompt (first on ties)."""
    return scores.view(-1, k).argmax(dim=1)


def generate_tts(
    model,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    k: int = 4,
    window: int = 32,
    reward_fn: RewardFn,
    row_keys: torch.Tensor | None = None,
    grouped: bool = False,
    **sampler_kwargs,
) -> TTSOutput:
    """Best-of-k decoding with branching every ``window`` model calls (see the module docstring).

    Args:
        k: candidates per prompt; window: model calls between branch points; reward_fn: see the module
        docstring; row_keys: [B] Philox keys of the prompts (default 0..B-1), candidate j of prompt b gets
        ``row_keys[b] * k + j``; grouped: the rows are the candidates already (k consecutive rows per
        prompt, keyed by ``row_keys`` as given, default 0..rows-1) and ``out.rollout`` holds all of them;
        sampler_kwargs: ``generate``'s (``sampler``, ``gen_length``, ``seed``, ...).
    """
    k = _positive_int("k", k)
    window = _positive_int("window", window)
    if not callable(reward_fn):
        raise ValueError(
            f"reward_fn must be callable(rollout, *, final) -> Tensor, got {type(reward_fn).__name__}"
        )
    if sampler_kwargs.get("seed") is None:  # one seed for the whole search, drawn like the samplers do
        sampler_kwargs["seed"] = draw_seed(sampler_kwargs.pop("generator", None))
    mask = check_prompts(prompt_ids, attention_mask)
    rows_in = prompt_ids.shape[0]
    if grouped and rows_in % k:
        raise ValueError(f"grouped=True needs k consecutive rows per prompt: {rows_in} rows, k={k}")
    B = rows_in // k if grouped else rows_in
    if row_keys is None:
        row_keys = torch.arange(rows_in, device=prompt_ids.device)
    if not isinstance(row_keys, torch.Tensor) or row_keys.shape != (rows_in,):
        raise ValueError(f"row_keys must be None or a tensor of shape [{rows_in}], got {row_keys!r}")
    dev = prompt_ids.device
    if grouped:
        keys = row_keys.to(dev, torch.int64)
    else:
        keys = (row_keys.to(dev, torch.int64)[:, None] * k + torch.arange(k, device=dev)).reshape(-1)  # [B*k]
        prompt_ids, mask = prompt_ids.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)
    eos = sampler_kwargs.get("eos_id", "model")
    eos_id = getattr(model, "eos_id", None) if eos == "model" else eos
    branches = 0

    def hook(state: DecodeState):
        nonlocal branches
        if k == 1 or state.calls % window:
            return None
        if not bool((state.ids[:, state.prompt_length :] == model.mask_id).any()):
            return None  # decoding is over: the final selection decides, among k distinct candidates
        partial = partial_rollout(
            state, seed=sampler_kwargs["seed"], row_keys=keys, mask_id=model.mask_id, eos_id=eos_id
        )
        best = _best(_scores(reward_fn, partial, final=False), k)  # [B]
        branches += 1
        return (torch.arange(B, device=best.device) * k + best).repeat_interleave(k)

    with step_hook(hook):
        cands = generate(model, prompt_ids, mask, row_keys=keys, **sampler_kwargs)
    with torch.no_grad():
        scores = _scores(reward_fn, cands, final=True)
    chosen = _best(scores, k)
    if grouped:
        return TTSOutput(cands, scores, cands, scores, chosen, branches)
    rows = torch.arange(B, device=chosen.device) * k + chosen
    return TTSOutput(select_rows(cands, rows), scores[rows], cands, scores, chosen, branches)
