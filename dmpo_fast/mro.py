"""MRO (Multi-Reward Optimization, arXiv 2510.21473) as pure functions: step rewards, SGRO, rejection SFT.

A rollout is (final ids, commit step per position) (``dmpo_fast.sampling.Rollout``): the state before step t
shows the tokens committed before t and masks the rest, so every state of a trajectory is rebuilt from the
final ids alone. Steps are counted per row; positions a sampler never decoded (EOS fill) are not actions.

Rewards of step t of a rollout (U_t = the positions committed at step t, s_t the state before step t):
- token verification (do the tokens decoded in parallel agree with each other and the context?), mean over
  i ∈ U_t of the model's probability (``verification_score="prob"``, in [0, 1]) or log-prob of x_i when it
  is re-masked, from one of three contexts (``verification``):
    "leave_one_out"  s_{t+1} with only i masked: each token checked against the others of its step
                     (default; one forward per token; equals "pre_step" when a step commits one token);
    "pre_step"       s_t, all of U_t masked (the policy's confidence in its own choices; a forward per step);
    "final"          the final sequence with U_t masked (checked against everything decoded later);
- perplexity (fluency of the partial text): the text committed after step t (``ppl_text``:
  "visible" = every committed completion token in position order, "prefix" = the committed run from the
  completion's start), without the positions after the finished answer's first EOS, scored by an
  autoregressive LM (``ARScorer``):
  r = (C − min(PPL, C)) / F, C = F = 100 by default, so r ∈ [0, C / F] and an empty text scores 0;
- the task (quality) reward of the final answer, added to the last window.

SGRO (step-wise group reward optimisation): the steps of a row are cut into windows of w consecutive steps;
window j's reward R_j is the sum of its steps' λ_tv·r_tv + λ_ppl·r_ppl (+ λ_q·r_task in the row's last
window). Its return is R_j alone (``returns="window"``) or the reward-to-go Σ_{j' ≥ j} R_j' (default), and
its advantage the return minus the mean return of window j over the prompt's group (``baseline="group"``).
The loss is REINFORCE over the tokens committed in each window:

    loss = Σ_rows Σ_windows c_j · A_j · Σ_{t ∈ window j} Σ_{i ∈ U_t} −log p_θ(x_i | s_t)  /  (n_row · N)

with n_row the tokens the row committed and N the rollouts, computed by ``weighted_linear_ce`` on the
committed positions only (one state per step). c_j = 1, or the importance factor of a window sampled for
this optimizer step (``importance``) so the estimate stays unbiased while fewer states are run. Likewise
the sum over a window's steps can be estimated from k of them drawn per optimizer step, each weighted
m / k (``states_per_window``): the loss then runs k states per window instead of all of them.

Readings of what the paper leaves open (each an option; defaults in ``MROConfig``):
- "group size": ``window`` is the number of denoising steps per group step (SGRO's grouping of steps);
  ``group_size`` is the number of rollouts per prompt that share a baseline.
- importance sampling: read as sampling which windows enter the loss (for sampling efficiency), K per
  rollout uniformly ("uniform") or with probability ∝ |A_j| ("advantage"), weighted by 1 / (K q_j); "none"
  trains on every window. No policy ratio is used: with ``num_iterations`` > 1 the reuse is off-policy.
- shaping: "none" sums the perplexity rewards of the states; "potential" treats the perplexity reward as a
  potential Φ and rewards its change Φ(s_{t+1}) − Φ(s_t) (Ng et al. 1999), so a window earns only the
  fluency it adds and the sum over the trajectory telescopes to the final text's reward.
- the log-prob of a token is read at its own step's state and temperature 1, ignoring which positions the
  sampler chose to commit (the usual treatment of the denoising policy, as in d1).
- the window length (default 8) and K are choices of this implementation, not numbers from the paper.

Test-time scaling is ``dmpo_fast.sampling.tts.generate_tts`` (``tts_reward_fn`` below scores candidates);
rejection sampling is SFT with the masked-diffusion loss on the best rollout of each group
(``select_best`` + ``rejection_sft_loss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from dmpo_fast import dmpo
from dmpo_fast.dmpo import LossOutput, NoiseConfig, _hidden_and_head
from dmpo_fast.grpo import group_advantages
from dmpo_fast.ops import linear_logprob, weighted_linear_ce
from dmpo_fast.ops.philox import philox_uniform

STREAM_WINDOWS = 6  # Philox stream (c3 word) of the window sampling
STREAM_VERIFY = 7  # Philox stream of the token each step verifies (verification_tokens="one")
STREAM_STATES = 8  # Philox stream of the steps whose states enter the loss (states_per_window)
STREAM_VERIFY_STEPS = 9  # Philox stream of the steps whose tokens are verified (verification_steps)
Verification = Literal["leave_one_out", "pre_step", "final"]


@dataclass(frozen=True)
class MROConfig:
    """MRO / SGRO options. Rewards: weights tv_weight, ppl_weight, task_weight (1 each, as the paper sums
    them); verification / verification_score / verification_tokens (see the module docstring);
    verification_steps k: of each window's m steps, the token-verification reward is computed at k drawn
    once per buffer and each weighted m / k in the window's reward (an unbiased estimate of its sum at k / m
    of the forwards; None: every step); ppl_cap C and ppl_scale F of the
    bounded perplexity reward (100, 100); ppl_text "visible" | "prefix"; shaping "none" | "potential".
    SGRO: group_size rollouts per prompt; window w steps per group step (8); window_reward "sum" | "mean"
    (a window's step rewards summed, or averaged over its steps so they weigh like the task reward);
    returns "reward_to_go" | "window"; baseline "group" | "none"; scale_std divides advantages by the group
    std; importance "none" | "uniform" | "advantage" with windows_per_rollout K draws; states_per_window k: the steps of each window
    whose states run through the policy in an optimizer step (None: all; k: k drawn afresh per step, without
    replacement, each weighted m / k for the window's m steps); num_iterations optimizer steps per buffer
    (1: REINFORCE is on-policy). micro_batch: rows per model call when scoring rewards (no grad).
    anchor "none" | "denoise" | "best": add anchor_weight × the masked-diffusion loss (fresh masks) of the
    buffer's rollouts ("denoise", weight 1/N each) or of each group's best rollout by task reward ("best",
    rejection sampling's rows, weight 1/groups each) to the SGRO loss, which keeps the denoiser from
    drifting (docs/mro.md); "kl": anchor_weight × the KL to the reference model instead, k3 = e^d − d − 1
    (d = log p_ref − log p_θ) on each token of the loss's states, token weights as the SGRO loss's
    (``make_buffer`` needs the reference)."""

    group_size: int = 8
    window: int = 8
    verification: Verification = "leave_one_out"
    verification_score: Literal["prob", "logprob"] = "prob"
    verification_tokens: Literal["all", "one"] = "all"
    verification_steps: int | None = None
    ppl_cap: float = 100.0
    ppl_scale: float = 100.0
    ppl_text: Literal["visible", "prefix"] = "visible"
    tv_weight: float = 1.0
    ppl_weight: float = 1.0
    task_weight: float = 1.0
    shaping: Literal["none", "potential"] = "none"
    returns: Literal["reward_to_go", "window"] = "reward_to_go"
    window_reward: Literal["sum", "mean"] = "sum"
    baseline: Literal["group", "none"] = "group"
    scale_std: bool = False
    importance: Literal["none", "uniform", "advantage"] = "none"
    windows_per_rollout: int = 4
    states_per_window: int | None = None
    num_iterations: int = 1
    micro_batch: int = 64
    anchor: Literal["none", "denoise", "best", "kl"] = "none"
    anchor_weight: float = 1.0

    def __post_init__(self):
        for name in ("group_size", "window", "windows_per_rollout", "num_iterations", "micro_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("states_per_window", "verification_steps"):
            k = getattr(self, name)
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ValueError(f"{name} must be an int >= 1 or None (every step), got {k!r}")
        choices = {
            "verification": ("leave_one_out", "pre_step", "final"), "verification_score": ("prob", "logprob"),
            "verification_tokens": ("all", "one"),
            "ppl_text": ("visible", "prefix"), "shaping": ("none", "potential"),
            "returns": ("reward_to_go", "window"), "window_reward": ("sum", "mean"), "baseline": ("group", "none"),
            "importance": ("none", "uniform", "advantage"), "anchor": ("none", "denoise", "best", "kl"),
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.anchor_weight >= 0:
            raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight!r}")
        if not (self.ppl_cap > 0 and self.ppl_scale > 0):
            raise ValueError(f"ppl_cap and ppl_scale must be > 0, got {self.ppl_cap!r}, {self.ppl_scale!r}")


# --------------------------------------------------------------------------------------------------
# Rebuilding states and scoring positions
# --------------------------------------------------------------------------------------------------


def _states(rollout, rows: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """[M, P + G] prompt of ``rows`` + their completion where ``visible`` [M, G], mask_id elsewhere."""
    P = rollout.prompt_length
    completion = torch.where(visible, rollout.ids[rows, P:], rollout.mask_id)
    return torch.cat((rollout.ids[rows, :P], completion), dim=1)


def _score(model, rollout, rows, visible, target, micro_batch: int, impl: str) -> torch.Tensor:
    """log p(x_j | state) for every True of ``target`` [M, G] in row-major order, the state of query m being
    row rows[m] with ``visible[m]`` shown. Only target positions are projected."""
    P = rollout.prompt_length
    out = []
    for s in range(0, rows.shape[0], micro_batch):
        r, tgt = rows[s : s + micro_batch], target[s : s + micro_batch]
        states = _states(rollout, r, visible[s : s + micro_batch])
        hidden, head = _hidden_and_head(model, states, rollout.attention_mask[r])  # [m, L, H]
        m_idx, j_idx = tgt.nonzero(as_tuple=True)
        lp = linear_logprob(hidden[m_idx, P + j_idx], head, rollout.ids[r[m_idx], P + j_idx], impl=impl)
        out.append(lp.float())
    return torch.cat(out) if out else torch.zeros(0)


def _step_grid(rollout, steps_from) -> torch.Tensor:
    """[N, T] bool: (row, step) pairs to score: steps_from[n] <= t < num_steps[n]."""
    ns = rollout.num_steps
    T = max(int(ns.max()), 1)
    t = torch.arange(T, device=ns.device)[None, :]
    lo = torch.as_tensor(0 if steps_from is None else steps_from, device=ns.device).reshape(-1, 1)
    return (t < ns[:, None]) & (t >= lo)


# --------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def token_verification_rewards(
    model,
    rollout,
    *,
    verification: Verification = "leave_one_out",
    score: Literal["prob", "logprob"] = "prob",
    tokens: Literal["all", "one"] = "all",
    steps_from: torch.Tensor | int | None = None,
    steps: torch.Tensor | None = None,
    micro_batch: int = 64,
    impl: str = "auto",
) -> torch.Tensor:
    """[N, T] fp32 token-verification reward of each step (module docstring); NaN outside a row's steps
    (and before ``steps_from``, and where ``steps`` [N, T] bool is False), 0 for a step that committed
    nothing. ``tokens="one"``: each step verifies
    one of its tokens, drawn uniformly (Philox keyed by the rollout's seed, row key and the token's position
    and step), as the paper does; with "leave_one_out" that is one forward per step instead of per token."""
    if verification not in ("leave_one_out", "pre_step", "final"):
        raise ValueError(
            f"verification must be one of ('leave_one_out', 'pre_step', 'final'), got {verification!r}"
        )
    if score not in ("prob", "logprob"):
        raise ValueError(f"score must be one of ('prob', 'logprob'), got {score!r}")
    if tokens not in ("all", "one"):
        raise ValueError(f"tokens must be one of ('all', 'one'), got {tokens!r}")
    cs = rollout.commit_step  # [N, G]
    N, G = cs.shape
    grid = _step_grid(rollout, steps_from)  # [N, T]
    T = grid.shape[1]
    if steps is not None:
        grid = grid & steps[:, :T].to(grid.device)
    col = torch.arange(G, device=cs.device)[None, :]
    ok = (cs >= 0) & (cs < T) & grid.gather(1, cs.clamp(0, T - 1))  # decoded, in a scored step
    if tokens == "one":
        ok &= _one_per_step(rollout, ok, T)
    if verification == "leave_one_out":  # one query per committed token
        rows, j = ok.nonzero(as_tuple=True)
        t = cs[rows, j]
        visible = (cs[rows] <= t[:, None]) & (col != j[:, None])
        target = col == j[:, None]
    else:  # one query per step
        rows, t = grid.nonzero(as_tuple=True)
        committed = cs[rows] == t[:, None]
        target = committed & ok[rows]
        visible = cs[rows] < t[:, None] if verification == "pre_step" else ~committed
    logp = _score(model, rollout, rows, visible, target, micro_batch, impl)
    q = target.nonzero(as_tuple=True)[0]  # query of each scored token
    flat = (rows[q] * T + t[q]).to(cs.device)
    val = logp.exp() if score == "prob" else logp
    sums = torch.zeros(N * T, device=cs.device).index_add_(0, flat, val.to(cs.device))
    counts = torch.zeros(N * T, device=cs.device).index_add_(0, flat, torch.ones_like(val).to(cs.device))
    out = (sums / counts.clamp_min(1)).view(N, T)
    return torch.where(grid, out, float("nan"))


def _one_per_step(rollout, ok: torch.Tensor, T: int) -> torch.Tensor:
    """[N, G] bool: of the ``ok`` tokens committed at each (row, step), the one with the largest Philox
    uniform (seed; position, row key, step, STREAM_VERIFY): a uniform draw per step, keyed by row."""
    cs = rollout.commit_step
    N, G = cs.shape
    keys = torch.as_tensor(rollout.row_keys, device=cs.device).reshape(N, 1)
    pos = torch.arange(G, device=cs.device)[None, :]
    u = philox_uniform(rollout.seed, pos, keys, cs.clamp_min(0), torch.full_like(cs, STREAM_VERIFY))
    u = torch.where(ok, u, -1.0)
    flat = (torch.arange(N, device=cs.device)[:, None] * T + cs.clamp(0, T - 1)).reshape(-1)
    top = torch.full((N * T,), -1.0, device=cs.device).scatter_reduce(0, flat, u.reshape(-1), "amax")
    return ok & (u == top[flat].view(N, G))


@torch.no_grad()
def committed_logprobs(model, rollout, *, micro_batch: int = 64, impl: str = "auto") -> torch.Tensor:
    """[N, G] fp32 log p(x_i | s_t) of every token the sampler decoded, at the state before its own step
    (NaN elsewhere): one forward per (row, step). The reference's, for the KL anchor."""
    cs = rollout.commit_step
    N, G = cs.shape
    rows, t = _step_grid(rollout, None).nonzero(as_tuple=True)
    target = cs[rows] == t[:, None]
    logp = _score(model, rollout, rows, cs[rows] < t[:, None], target, micro_batch, impl)
    q, j = target.nonzero(as_tuple=True)
    out = torch.full((N, G), float("nan"), device=cs.device)
    out[rows[q].to(cs.device), j.to(cs.device)] = logp.to(cs.device)
    return out


@torch.no_grad()
def perplexity_rewards(
    scorer,
    rollout,
    *,
    text: Literal["visible", "prefix"] = "visible",
    cap: float = 100.0,
    scale: float = 100.0,
    steps_from: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """[N, T] fp32 (C − min(PPL, C)) / F of the completion text after each step (module docstring); NaN
    outside a row's steps. Identical texts are scored once."""
    if text not in ("visible", "prefix"):
        raise ValueError(f"text must be one of ('visible', 'prefix'), got {text!r}")
    cs, cm = rollout.commit_step, rollout.completion_mask
    comp = rollout.ids[:, rollout.prompt_length :]
    grid = _step_grid(rollout, steps_from)
    rows, t = grid.nonzero(as_tuple=True)
    shown = cs[rows] <= t[:, None]  # [M, G] committed after step t
    if text == "prefix":
        shown = torch.cumprod(shown.to(torch.int8), dim=1).bool()
    shown &= cm[rows]
    seqs = [row[keep].tolist() for row, keep in zip(comp[rows].cpu(), shown.cpu(), strict=True)]
    unique = list(dict.fromkeys(map(tuple, seqs)))
    ppl = scorer.perplexity([list(u) for u in unique]) if unique else torch.zeros(0)
    lookup = dict(zip(unique, ppl.tolist(), strict=True))
    ppl_rows = torch.tensor([lookup[tuple(s)] for s in seqs], dtype=torch.float32, device=cs.device)
    out = torch.full(grid.shape, float("nan"), device=cs.device)
    out[rows, t] = (cap - ppl_rows.clamp(max=cap)) / scale  # PPL = inf (nothing to score) -> 0
    return out


def combine_step_rewards(tv: torch.Tensor | None, ppl: torch.Tensor | None, cfg: MROConfig) -> torch.Tensor:
    """[N, T] λ_tv·r_tv + λ_ppl·r_ppl per step (NaN outside a row's steps); with ``shaping="potential"`` the
    perplexity term is Φ(s_{t+1}) − Φ(s_t), Φ(all masked) = 0."""
    parts = [x for x in (tv, ppl) if x is not None]
    if not parts:
        raise ValueError("at least one of tv and ppl must be given")
    total = torch.zeros_like(parts[0])
    if tv is not None:
        total = total + cfg.tv_weight * tv
    if ppl is not None:
        if cfg.shaping == "potential":
            prev = torch.nan_to_num(torch.cat((torch.zeros_like(ppl[:, :1]), ppl[:, :-1]), dim=1), nan=0.0)
            ppl = ppl - prev
        total = total + cfg.ppl_weight * ppl
    return total


# --------------------------------------------------------------------------------------------------
# SGRO: windows, returns, advantages, window sampling, loss
# --------------------------------------------------------------------------------------------------


def window_returns(
    step_rewards: torch.Tensor,
    num_steps: torch.Tensor,
    task_rewards: torch.Tensor,
    *,
    window: int,
    task_weight: float = 1.0,
    returns: str = "reward_to_go",
    reduce: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(returns [N, J], valid [N, J]): window sums (``reduce="sum"``) or means over the row's steps in the
    window (``"mean"``) of the step rewards, λ_q·task in each row's last window, then reward-to-go or
    per-window. A row with a non-finite task reward has no valid window."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be one of ('sum', 'mean'), got {reduce!r}")
    N, T = step_rewards.shape
    J = max(1, math.ceil(T / window))
    r = torch.nan_to_num(step_rewards.float(), nan=0.0)
    r = torch.cat((r, r.new_zeros(N, J * window - T)), dim=1)
    R = r.view(N, J, window).sum(dim=2)  # [N, J]
    if reduce == "mean":
        starts = torch.arange(J, device=R.device)[None, :] * window
        R = R / (num_steps[:, None].to(R.device) - starts).clamp(1, window)
    n_windows = (num_steps + window - 1) // window  # [N]
    valid = torch.arange(J, device=R.device)[None, :] < n_windows[:, None]
    valid &= torch.isfinite(task_rewards)[:, None]
    last = (n_windows - 1).clamp_min(0)[:, None]
    R = R.scatter_add(1, last, task_weight * torch.nan_to_num(task_rewards.float(), nan=0.0)[:, None])
    R = torch.where(valid, R, 0.0)
    if returns == "reward_to_go":
        R = R.flip(1).cumsum(1).flip(1)
    elif returns != "window":
        raise ValueError(f"returns must be one of ('reward_to_go', 'window'), got {returns!r}")
    return torch.where(valid, R, 0.0), valid


def window_advantages(
    returns: torch.Tensor,
    valid: torch.Tensor,
    group_size: int,
    *,
    baseline: str = "group",
    scale_std: bool = False,
) -> torch.Tensor:
    """[N, J] return − mean return of the same window index over the group's rows that reach it (0 where
    invalid); ``baseline="none"`` keeps the returns."""
    if baseline == "none":
        return torch.where(valid, returns, 0.0)
    if baseline != "group":
        raise ValueError(f"baseline must be one of ('group', 'none'), got {baseline!r}")
    cols = [
        group_advantages(torch.where(valid[:, j], returns[:, j], float("nan")), group_size,
                         scale="std" if scale_std else "none")
        for j in range(returns.shape[1])
    ]  # fmt: skip
    return torch.stack(cols, dim=1)


def sample_windows(
    advantages: torch.Tensor,
    valid: torch.Tensor,
    *,
    importance: str,
    k: int,
    seed: int,
    step: int,
    row_keys: torch.Tensor,
) -> torch.Tensor:
    """[N, J] fp32 window weights c: 1 on every valid window ("none"), or for K draws with replacement from
    q (uniform or ∝ |A|) the count of draws over K·q — an unbiased estimate of "every window". Draws are
    Philox (seed; draw, row key, step, stream), so a row draws the same windows in any micro-batch."""
    if importance == "none":
        return valid.float()
    if importance not in ("uniform", "advantage"):
        raise ValueError(f"importance must be one of ('none', 'uniform', 'advantage'), got {importance!r}")
    w = valid.float() if importance == "uniform" else advantages.abs() * valid
    w = torch.where(valid & (w.sum(1, keepdim=True) == 0), 1.0, w)  # all |A| = 0: uniform
    q = w / w.sum(1, keepdim=True).clamp_min(1e-30)  # [N, J]
    draw = torch.arange(k, device=q.device)[None, :]
    u = philox_uniform(
        seed, draw, row_keys[:, None], torch.full_like(draw, step), torch.full_like(draw, STREAM_WINDOWS)
    )
    cdf = q.cumsum(1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1:]).contiguous(), right=True).clamp(max=q.shape[1] - 1)
    counts = torch.zeros_like(q).scatter_add_(1, idx, torch.ones_like(u))
    return torch.where(counts > 0, counts / (k * q.clamp_min(1e-30)), 0.0) * valid


def sample_steps(
    num_steps: torch.Tensor,
    *,
    window: int,
    k: int | None,
    seed: int,
    step: int,
    row_keys: torch.Tensor,
    stream: int = STREAM_STATES,
) -> torch.Tensor:
    """[N, T] fp32 step weights: of each row's window of m steps, k drawn uniformly without replacement, each
    weighted m / k, 0 on the others — an unbiased estimate of the window's sum over its steps; 1 on every
    step with ``k=None`` or k >= m. The draw of (row, step t) is the Philox uniform (seed; t, row key,
    optimizer step, ``stream``), so a row draws the same states in any micro-batch or process."""
    ns = num_steps
    T = max(int(ns.max()), 1) if ns.numel() else 1
    t = torch.arange(T, device=ns.device)[None, :]
    live = t < ns[:, None]  # [N, T]
    if k is None:
        return live.float()
    J = math.ceil(T / window)
    u = philox_uniform(seed, t.expand_as(live), row_keys.reshape(-1, 1).to(ns.device).expand_as(live),
                       torch.full_like(live, step, dtype=torch.long),
                       torch.full_like(live, stream, dtype=torch.long))  # fmt: skip
    u = torch.where(live, u, 2.0)  # steps past the row's end sort last
    pad = J * window - T
    u = torch.cat((u, u.new_full((u.shape[0], pad), 2.0)), dim=1).view(-1, J, window)
    rank = u.argsort(dim=2).argsort(dim=2)  # rank of each step's draw within its window
    m = (u < 2.0).sum(dim=2, keepdim=True)  # the window's steps in this row
    weight = torch.where(rank < k, m.float() / m.clamp(max=k).clamp_min(1).float(), 0.0)
    return (weight.view(-1, J * window)[:, :T] * live).float()


def sgro_loss(
    policy,
    rollout,
    coef: torch.Tensor,
    *,
    window: int,
    step_weights: torch.Tensor | None = None,
    kl: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    impl: str = "auto",
) -> LossOutput:
    """Σ over (row, step t) of coef[row, t // window] · s[row, t] · Σ_{i ∈ U_t} −log p_θ(x_i | s_t), the
    states of the steps with a non-zero weight rebuilt from the rollout and run through the policy (with
    grad).

    coef: [N, J] per-window token weight (A · c / normaliser, see ``loss_step``); step_weights s: [N, T]
    (``sample_steps``; None: 1 on every step). kl = (ref_logp [N, G], kl_coef [N, T], weight): adds
    weight × Σ kl_coef[row, t] · k3(log p_ref(x_i) − log p_θ(x_i | s_t)) over the same tokens, the states
    with a non-zero kl_coef included (``stats["kl"]`` holds the sum before the weight)."""
    cs, ns = rollout.commit_step, rollout.num_steps
    N, G = cs.shape
    T = max(int(ns.max()), 1)
    t = torch.arange(T, device=cs.device)[None, :]
    step_coef = coef.repeat_interleave(window, dim=1)[:, :T]  # [N, T]
    if step_weights is not None:
        step_coef = step_coef * step_weights[:, :T]
    chosen = step_coef != 0
    if kl is not None:
        chosen = chosen | (kl[1][:, :T] != 0)
    rows, steps = ((t < ns[:, None]) & chosen).nonzero(as_tuple=True)
    P = rollout.prompt_length
    if rows.numel() == 0:  # nothing selected: an exact zero that still reaches the parameters
        hidden, head = _hidden_and_head(policy, rollout.ids[:1], rollout.attention_mask[:1])
        return LossOutput(
            hidden.sum() * 0.0 + head.sum() * 0.0,
            {"states": torch.tensor(0), "masked_tokens": torch.tensor(0)},
        )
    states = _states(rollout, rows, cs[rows] < steps[:, None])  # [M, L]
    target = cs[rows] == steps[:, None]  # [M, G]
    hidden, head = _hidden_and_head(policy, states, rollout.attention_mask[rows])
    m_idx, j_idx = target.nonzero(as_tuple=True)
    w = step_coef[rows[m_idx], steps[m_idx]].float()
    h, y = hidden[m_idx, P + j_idx], rollout.ids[rows[m_idx], P + j_idx]
    loss = weighted_linear_ce(h, head, y, w, impl=impl)
    stats = {"states": torch.tensor(rows.numel()), "masked_tokens": torch.tensor(m_idx.numel())}
    if kl is not None:
        ref_logp, kl_coef, weight = kl
        d = ref_logp[rows[m_idx], j_idx].float() - linear_logprob(h, head, y, impl=impl).float()
        term = (kl_coef[rows[m_idx], steps[m_idx]].float() * (d.exp() - d - 1.0)).sum()
        stats["kl"] = term.detach()
        loss = loss + weight * term
    return LossOutput(loss, stats)


# --------------------------------------------------------------------------------------------------
# The autoregressive scorer of the perplexity reward
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerBridge:
    """dLLM ids -> text (``source``, special tokens skipped) -> ids of the AR model (``target``, no special
    tokens added). Either side may be the built-in ``CharTokenizer`` or a Hugging Face tokenizer."""

    source: Any
    target: Any

    def __call__(self, ids: list[int]) -> list[int]:
        if hasattr(self.source, "batch_encode"):  # the built-in character tokenizer
            text = self.source.decode(ids, skip_special=True)
        else:
            text = self.source.decode(ids, skip_special_tokens=True)
        if hasattr(self.target, "batch_encode"):
            return self.target.encode(text)
        return list(self.target.encode(text, add_special_tokens=False))


class ARScorer:
    """Perplexity of token sequences under a causal LM, through ``linear_logprob`` on its final hidden
    states (the [M, n, V] logits are never built; the read-out is verified once against the model's own
    logits by ``dmpo_fast.models.HFAdapter``).

    model: a transformers causal LM. bridge: a ``TokenizerBridge`` (dLLM ids -> AR ids), or None when the AR
    model reads the dLLM's ids directly; then ``skip_ids`` (e.g. pad / EOS / mask ids) are dropped first.
    bos_id: prepended so the first token is scored too (default: the model config's bos_token_id).
    max_length: keep the first max_length AR tokens (default: the config's n_positions or
    max_position_embeddings).
    """

    def __init__(
        self,
        model,
        *,
        bridge=None,
        bos_id: int | None | str = "config",
        max_length: int | None = None,
        batch_size: int = 32,
        skip_ids=(),
        impl: str = "auto",
    ):
        from dmpo_fast.models import HFAdapter

        config = getattr(model, "config", None)
        self.model = model.eval().requires_grad_(False)
        self.lm = HFAdapter(model, mask_id=0)
        self.bridge, self.skip_ids, self.impl, self.batch_size = bridge, frozenset(skip_ids), impl, batch_size
        self.bos_id = getattr(config, "bos_token_id", None) if bos_id == "config" else bos_id
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        self.max_length = max_length or limit

    def ar_ids(self, ids: list[int]) -> list[int]:
        """The AR model's input for dLLM ids: bridged or filtered, BOS first, cut to max_length."""
        out = self.bridge(ids) if self.bridge is not None else [i for i in ids if i not in self.skip_ids]
        out = ([self.bos_id] if self.bos_id is not None else []) + list(out)
        return out[: self.max_length] if self.max_length else out

    @torch.no_grad()
    def perplexity(self, sequences: list[list[int]]) -> torch.Tensor:
        """[M] fp32 exp(mean NLL of tokens 2..n given the previous ones); inf with nothing to predict."""
        seqs = [self.ar_ids(s) for s in sequences]
        device = self.lm.head_weight.device
        out = torch.full((len(seqs),), float("inf"))
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
        order = [i for i in order if len(seqs[i]) >= 2]
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            n = max(len(seqs[i]) for i in idx)
            ids = torch.zeros(len(idx), n, dtype=torch.long)
            am = torch.zeros(len(idx), n, dtype=torch.long)
            for r, i in enumerate(idx):  # right padding: absolute positions stay 0..len-1
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                am[r, : len(seqs[i])] = 1
            ids, am = ids.to(device), am.to(device)
            hidden, head = _hidden_and_head(self.lm, ids, am)  # position i predicts token i + 1
            keep = am[:, 1:].bool()  # [b, n - 1]
            r_idx, p_idx = keep.nonzero(as_tuple=True)
            logp = linear_logprob(hidden[r_idx, p_idx], head, ids[r_idx, p_idx + 1], impl=self.impl).float()
            nll = torch.zeros(len(idx), device=device).index_add_(0, r_idx, -logp)
            out[idx] = (nll / keep.sum(1)).exp().cpu()
        return out


def load_ar_scorer(name_or_path, *, bridge_from=None, device=None, dtype=None, **kwargs) -> ARScorer:
    """An ``ARScorer`` for a causal LM given by hub name or local path (e.g. "gpt2"), a built-in scorer
    ("tiny_ar_sudoku": ``dmpo_fast.assets``, made by scripts/build_ar_scorer.py), or an already built model. ``bridge_from``: the dLLM's tokenizer — its ids are decoded to text and re-encoded with the AR
    model's tokenizer (loaded from the same name); None feeds the dLLM ids straight in (same vocabulary).
    ``kwargs`` go to ``ARScorer``."""
    from dmpo_fast.assets import TINY_AR_SCORERS, tiny_ar_scorer_dir

    if isinstance(name_or_path, torch.nn.Module):
        model, tokenizer = name_or_path, kwargs.pop("tokenizer", None)
    elif name_or_path in TINY_AR_SCORERS:  # built in: a GPT-2 over the tiny models' character tokenizer
        import transformers  # noqa: PLC0415

        from dmpo_fast.tokenizer import CharTokenizer

        path = tiny_ar_scorer_dir(name_or_path)
        model = transformers.GPT2LMHeadModel.from_pretrained(path, **({"dtype": dtype} if dtype else {}))
        tokenizer = kwargs.pop("tokenizer", None) or CharTokenizer.load(path)
    elif isinstance(name_or_path, str):
        import transformers  # noqa: PLC0415

        model = transformers.AutoModelForCausalLM.from_pretrained(
            name_or_path, **({"dtype": dtype} if dtype else {})
        )
        tokenizer = kwargs.pop("tokenizer", None) or transformers.AutoTokenizer.from_pretrained(name_or_path)
    else:
        raise ValueError(f"name_or_path must be a model name, a path or an nn.Module, got {name_or_path!r}")
    if device is not None:
        model = model.to(device)
    if bridge_from is not None:
        if tokenizer is None:
            raise ValueError("bridge_from needs the AR model's tokenizer: pass tokenizer=...")
        kwargs["bridge"] = TokenizerBridge(bridge_from, tokenizer)
    return ARScorer(model, **kwargs)


# --------------------------------------------------------------------------------------------------
# Trainer entry points
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def step_rewards(
    policy, rollout, cfg: MROConfig, *, scorer=None, steps_from=None, verify_keys=None, impl: str = "auto"
) -> dict:
    """{"tv", "ppl", "total"}: [N, T] per-step rewards of a rollout (a term of weight 0 is None).

    ``verify_keys`` = (seed, row keys [N]): with ``cfg.verification_steps`` = k, token verification runs at
    k steps per window drawn from them (``sample_steps``, stream STREAM_VERIFY_STEPS); "tv" holds the
    verified steps' rewards (NaN elsewhere) and "total" each weighted m / k."""
    tv = ppl = None
    tv_total = None
    if cfg.tv_weight:
        steps = None
        if cfg.verification_steps is not None and verify_keys is not None:
            seed, keys = verify_keys
            weights = sample_steps(rollout.num_steps, window=cfg.window, k=cfg.verification_steps, seed=seed,
                                   step=0, row_keys=keys, stream=STREAM_VERIFY_STEPS)  # fmt: skip
            steps = weights > 0
        tv = token_verification_rewards(
            policy, rollout, verification=cfg.verification, score=cfg.verification_score,
            tokens=cfg.verification_tokens, steps_from=steps_from, steps=steps, micro_batch=cfg.micro_batch,
            impl=impl,
        )  # fmt: skip
        tv_total = tv
        if steps is not None:
            live = _step_grid(rollout, steps_from)
            tv_total = torch.where(steps, tv * weights, torch.where(live, 0.0, float("nan")))
    if cfg.ppl_weight:
        if scorer is None:
            raise ValueError(
                "ppl_weight > 0 needs an ARScorer (load_ar_scorer); set ppl_weight=0 to go without"
            )
        ppl = perplexity_rewards(scorer, rollout, text=cfg.ppl_text, cap=cfg.ppl_cap, scale=cfg.ppl_scale,
                                 steps_from=steps_from)  # fmt: skip
    if tv is None and ppl is None:
        T = max(int(rollout.num_steps.max()), 1)
        return {
            "tv": None,
            "ppl": None,
            "total": torch.zeros(rollout.ids.shape[0], T, device=rollout.ids.device),
        }
    return {"tv": tv, "ppl": ppl, "total": combine_step_rewards(tv_total, ppl, cfg)}


def make_buffer(policy, rollout, task_rewards: torch.Tensor, cfg: MROConfig, *, seed: int, scorer=None,
                row_offset: int = 0, rows_total: int | None = None, maskable: torch.Tensor | None = None,
                reference=None, impl: str = "auto") -> dict:  # fmt: skip
    """Rewards, returns and advantages of one rollout batch (N = prompts × group_size rows, groups
    consecutive), and the rollout tensors ``loss_step`` rebuilds the states from. Row-indexed tensors can be
    sliced by rows (micro-batches); ``rows_total`` and ``seed`` are scalars.

    ``row_offset`` and ``rows_total``: when this batch is one process's share of a larger one, the index of
    its first row in the whole batch (the rows' window-draw keys) and the whole batch's rollouts (the loss
    denominator), so the shares' losses add up to the whole batch's. Defaults: this batch alone.
    ``maskable``: [N, L] bool, the positions the denoising anchor may mask (default: the completion up to
    its first EOS). ``reference``: the reference model (a model or a zero-arg callable returning a context
    that gives it) whose log-probs of the decoded tokens the KL anchor (``anchor="kl"``) needs."""
    task = task_rewards.float().to(rollout.ids.device)
    rows = torch.arange(row_offset, row_offset + len(task), device=task.device)  # keys of the row draws
    r = step_rewards(policy, rollout, cfg, scorer=scorer, verify_keys=(seed, rows), impl=impl)
    returns, valid = window_returns(r["total"], rollout.num_steps, task, window=cfg.window,
                                    task_weight=cfg.task_weight, returns=cfg.returns,
                                    reduce=cfg.window_reward)  # fmt: skip
    adv = window_advantages(returns, valid, cfg.group_size, baseline=cfg.baseline, scale_std=cfg.scale_std)
    decoded = rollout.commit_step < rollout.num_steps[:, None]  # the tokens the policy chose
    if maskable is None:
        maskable = torch.zeros_like(rollout.ids, dtype=torch.bool)
        maskable[:, rollout.prompt_length :] = rollout.completion_mask
    buf = {
        "ids": rollout.ids, "attention_mask": rollout.attention_mask, "commit_step": rollout.commit_step,
        "num_steps": rollout.num_steps, "completion_mask": rollout.completion_mask,
        "advantages": adv, "valid": valid, "returns": returns, "task_rewards": task,
        "tokens": decoded.sum(1).clamp_min(1).float(), "row_keys": rows, "maskable": maskable,
        "prompt_length": rollout.prompt_length, "mask_id": rollout.mask_id,
        "rows_total": len(task) if rows_total is None else rows_total,
        "seed": seed,
    }  # fmt: skip
    for name in ("tv", "ppl"):
        if r[name] is not None:
            buf[f"{name}_mean"] = torch.nanmean(r[name], dim=1)  # [N] for logging
    if cfg.anchor == "kl":
        from dmpo_fast.grpo import _reference_scope

        if reference is None:
            raise ValueError("anchor='kl' needs the reference model: pass reference=...")
        with _reference_scope(reference) as ref:
            buf["ref_logp"] = committed_logprobs(ref, rollout, micro_batch=cfg.micro_batch, impl=impl)
    return buf


class _RolloutView:
    """The fields of a buffer (or a row slice of it) that state rebuilding reads."""

    def __init__(self, buf: dict):
        self.ids, self.attention_mask = buf["ids"], buf["attention_mask"]
        self.commit_step, self.num_steps = buf["commit_step"], buf["num_steps"]
        self.prompt_length, self.mask_id = buf["prompt_length"], buf["mask_id"]


def loss_step(policy, buf: dict, cfg: MROConfig, step: int, *, noise: NoiseConfig | None = None,
              anchor_seed: int | None = None, impl: str = "auto") -> LossOutput:  # fmt: skip
    """The SGRO loss of optimizer step ``step`` on a buffer or a row slice of it: windows and their states
    drawn afresh (``importance``, ``states_per_window``), token weights A · c / (n_row · N) with N the whole
    buffer's rollouts; with ``cfg.anchor="denoise"`` plus anchor_weight × the masked-diffusion loss of the
    rows with a finite task reward (``rejection_sft_loss`` with weight 1/N), with ``"best"`` of each group's
    best row by task reward (weight 1/groups); masks from ``noise`` keyed by ``anchor_seed`` and the rows'
    global index, so slices of whole groups add up to the whole buffer's loss. With ``"kl"`` plus
    anchor_weight × the k3 KL to the reference on the tokens of the drawn states (weight s / (n_row · N))."""
    c = sample_windows(buf["advantages"], buf["valid"], importance=cfg.importance, k=cfg.windows_per_rollout,
                       seed=buf["seed"], step=step, row_keys=buf["row_keys"])  # fmt: skip
    coef = buf["advantages"] * c / (buf["tokens"][:, None] * buf["rows_total"])
    states = None
    if cfg.states_per_window is not None:
        states = sample_steps(buf["num_steps"], window=cfg.window, k=cfg.states_per_window, seed=buf["seed"],
                              step=step, row_keys=buf["row_keys"])  # fmt: skip
    kl = None
    if cfg.anchor == "kl":  # k3 on every token of the drawn states, weighted as one token of the row's SGRO
        live = (torch.arange(buf["advantages"].shape[1] * cfg.window, device=coef.device)[None, :]
                < buf["num_steps"][:, None]).float()  # fmt: skip
        s = states if states is not None else live
        kl_coef = s[:, : live.shape[1]] / (buf["tokens"][:, None] * buf["rows_total"])
        kl = (buf["ref_logp"], kl_coef, cfg.anchor_weight)
    out = sgro_loss(policy, _RolloutView(buf), coef, window=cfg.window, step_weights=states, kl=kl, impl=impl)
    out.stats["windows"] = (c > 0).sum()
    if kl is not None:
        out.stats["anchor_loss"] = out.stats.pop("kl")
        out.stats["pg_loss"] = out.loss.detach() - cfg.anchor_weight * out.stats["anchor_loss"]
    else:
        out.stats["pg_loss"] = out.loss.detach()
    if cfg.anchor in ("denoise", "best") and cfg.anchor_weight > 0:
        if cfg.anchor == "best":
            keep = torch.zeros_like(buf["task_rewards"], dtype=torch.bool)
            keep[select_best(buf["task_rewards"], cfg.group_size)] = True
            keep &= torch.isfinite(buf["task_rewards"])
            total = buf["rows_total"] // cfg.group_size
        else:
            keep, total = torch.isfinite(buf["task_rewards"]), buf["rows_total"]
        first = int(buf["row_keys"][0]) if buf["row_keys"].numel() else 0
        anchor = rejection_sft_loss(
            policy, buf["ids"], buf["maskable"], noise=noise, attention_mask=buf["attention_mask"],
            selected=keep, total=total, seed=anchor_seed, row_offset=first, impl=impl,
        )  # fmt: skip
        out.stats["anchor_loss"] = anchor.loss.detach()
        out.stats["masked_tokens"] = out.stats["masked_tokens"] + anchor.stats["masked_tokens"]
        out = LossOutput(out.loss + cfg.anchor_weight * anchor.loss, out.stats)
    return out


def majority_vote(answers: list, group_size: int) -> torch.Tensor:
    """[M] fp32: 1 where a row's answer equals the most common answer of its group (``group_size``
    consecutive rows; ties go to the answer seen first), 0 elsewhere; None or "" never votes nor wins."""
    if len(answers) % group_size:
        raise ValueError(f"answers ({len(answers)}) must be a multiple of group_size ({group_size})")
    out = torch.zeros(len(answers))
    for g in range(0, len(answers), group_size):
        group = answers[g : g + group_size]
        counts: dict = {}
        for a in group:
            if a is not None and a != "":
                counts[a] = counts.get(a, 0) + 1
        if counts:
            top = max(counts.values())
            winner = next(a for a in counts if counts[a] == top)
            out[g : g + group_size] = torch.tensor([float(a == winner) for a in group])
    return out


def tts_reward_fn(
    policy, cfg: MROConfig, *, scorer=None, task_reward=None, window: int | None = None, vote=None,
    group_size: int | None = None, impl: str = "auto",
):  # fmt: skip
    """A ``reward_fn`` for ``generate_tts``: the summed step rewards (λ_tv·r_tv + λ_ppl·r_ppl) of the last
    ``window`` steps of each candidate (default ``cfg.window``; pass generate_tts's window), plus on the final
    call λ_q·task_reward(rollout) ([M] tensor) when ``task_reward`` is given, and the paper's quality reward
    by majority vote when ``vote`` is: ``vote(rollout)`` gives each row's final answer (a hashable, None for
    none) and a candidate whose answer is its prompt's most common one (``group_size`` = k consecutive rows)
    earns λ_q (``majority_vote``): the answer is never checked against the truth."""
    window = cfg.window if window is None else window
    if vote is not None and not group_size:
        raise ValueError("vote needs group_size: the candidates per prompt (generate_tts's k)")

    def reward_fn(rollout, *, final: bool) -> torch.Tensor:
        lo = (rollout.num_steps - window).clamp_min(0)
        r = step_rewards(policy, rollout, cfg, scorer=scorer, steps_from=lo, impl=impl)["total"]
        score = torch.nan_to_num(r, nan=0.0).sum(1)
        if final and task_reward is not None:
            task = torch.as_tensor(task_reward(rollout), dtype=score.dtype)
            score = score + cfg.task_weight * task.to(score)
        if final and vote is not None:
            score = score + cfg.task_weight * majority_vote(list(vote(rollout)), group_size).to(score)
        return score

    return reward_fn


# --------------------------------------------------------------------------------------------------
# Rejection sampling
# --------------------------------------------------------------------------------------------------


def select_best(rewards: torch.Tensor, group_size: int, *, min_reward: float | None = None) -> torch.Tensor:
    """Row indices of the best rollout of each group (first on ties; NaN counts as worst), dropping groups
    whose best reward is below ``min_reward``."""
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be [N] with N a multiple of group_size ({group_size}), got {list(rewards.shape)}"
        )
    r = torch.nan_to_num(rewards.float(), nan=-float("inf")).view(-1, group_size)
    best, j = r.max(dim=1)
    rows = torch.arange(r.shape[0], device=r.device) * group_size + j
    return rows if min_reward is None else rows[best >= min_reward]


def rejection_sft_loss(
    model,
    ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    noise: NoiseConfig | None = None,
    attention_mask: torch.Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    selected: torch.Tensor | None = None,
    total: int | None = None,
    seed: int | None = None,
    row_offset: int = 0,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> LossOutput:
    """Masked-diffusion SFT on selected trajectories: ``dmpo.wdce`` with the same weight for every selected
    row (1, or 1/n with ``reduction="mean"``), fresh forward masks (``noise``), no baseline.

    ``selected``: optional [N] bool, the rows to train on (default all; the others cost no model call).
    ``total``: the n of the mean when these rows are a slice of a larger batch (a micro-batch, one process's
    share), so the slices' losses add up to the whole batch's. ``row_offset``: the rows' index in that
    batch (their masks' random-stream key)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be one of ('mean', 'sum'), got {reduction!r}")
    N = ids.shape[0]
    keep = torch.ones(N, dtype=torch.bool, device=ids.device) if selected is None else selected.to(ids.device)
    n = int(keep.sum()) if total is None else total
    w = keep.float() / max(n, 1) if reduction == "mean" else keep.float()
    return dmpo.wdce(
        model, ids, maskable, w, group_size=1, noise=noise or NoiseConfig(), attention_mask=attention_mask,
        baseline="none", seed=seed, row_offset=row_offset, generator=generator, impl=impl,
    )  # fmt: skip
