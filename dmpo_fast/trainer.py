"""The trainer: a plain loop over the pure functions of ``dmpo_fast.dmpo`` (DMPO, the default),
``dmpo_fast.mro`` (MRO) and ``dmpo_fast.grpo`` (diffu-GRPO), and ``dmpo_fast.ops``.

One iteration (``num_iterations`` = F optimizer steps per rollout buffer):

    prompts --generate(policy)--> rollouts x [N = P·G, L]            (no grad, fast sampler)
    x --task reward--> r [N]                    (a failed / None reward -> NaN -> weight 0)
    x --elbo(ref), elbo(policy), same masks--> log p_ref, log p_old [N]
    (r, log p_ref − log p_old) --importance_weights--> w [N]    (softmax per prompt group, baseline)
    repeat F times: fresh masks --wdce / wddo--> loss --backward, clip, step

Departures from the paper / reference implementation are listed in ``dmpo_fast.dmpo``. All randomness
of a step derives from (seed, step), so a resumed run repeats an uninterrupted one exactly.

MRO and diffu-GRPO share the loop, the rollouts and the rewards; only the buffer and the loss change
(``algorithm_buffer``, ``algorithm_loss``):

    mro:         x --step rewards (token verification, perplexity) + task reward--> window returns,
                 group advantages [N, J]  --> num_iterations x SGRO REINFORCE loss over the windows' states
    diffu_grpo:  x --r - group mean--> advantages [N]; one-step log-probs of π_old (μ > 1) and π_ref
                 (grpo_beta > 0), one prompt mask per inner step --> μ x clipped-ratio loss + β·KL

Their row keys (mask and window draws) are global rows and their loss denominators the whole step's, so
micro-batches and processes add up to the one-batch loss, as DMPO's. ``eval_tts_k`` > 0 evaluates any
algorithm with MRO's test-time scaling (``dmpo_fast.sampling.generate_tts``), candidates ranked by the
MRO step rewards alone (never the task's answer).

Processes. Under ``accelerate launch`` (or ``torchrun``) each process takes ``prompts_per_step / world``
whole prompt groups (a group never straddles processes, so the per-group softmax is local), generates
their rollouts with the rows' global Philox keys, and backpropagates the sum of its groups' losses;
gradients are then summed over processes, which is exactly the one-process gradient of the whole batch.
Only the main process writes the run directory.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
import warnings
from dataclasses import dataclass

import torch

from dmpo_fast import dmpo, grpo, mro
from dmpo_fast.config import TrainConfig
from dmpo_fast.ops import importance_weights
from dmpo_fast.run_io import RunDir

# Fields a resumed run may change; any other difference from the saved config is refused.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "max_steps",
        "progress",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "plot",
        "tensorboard",
        "eval_size",
        "device",
        "impl",
        "fsdp",  # checkpoints hold the full state either way
        "fsdp_reshard_after_forward",
    }  # fmt: skip
)


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    eval_before: dict
    eval_after: dict
    wall_seconds: float
    metrics: list


def _derive_seed(*parts) -> int:
    """A 62-bit seed from the run seed and a purpose tag: independent streams, reproducible on resume."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


class Processes:
    """Rank, world size and the three collectives the loop needs; trivial in a single process."""

    def __init__(self, cfg: TrainConfig):
        from dmpo_fast import sharding

        self.rank, self.world, self.reshard_after_forward = 0, 1, True
        _refuse_deepspeed()
        self.fsdp = sharding.requested(cfg)
        if _launched_distributed():
            from accelerate import PartialState

            state = PartialState(cpu=cfg.device == "cpu")
            self.rank, self.world = state.process_index, state.num_processes
            self.device = torch.device("cpu") if state.device.type == "cpu" else state.device
        else:
            self.device = _device(cfg)
        if cfg.prompts_per_step % self.world:
            raise ValueError(
                f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the number of processes "
                f"({self.world}): each process takes whole prompt groups"
            )
        if self.fsdp:
            sharding.check_launch(self.world)
            self.reshard_after_forward = sharding.reshard_after_forward(cfg)
            self.fsdp = self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Wait for every process, then tear the process group down: left to interpreter exit, gloo's
        threads can abort the process ("terminate called without an active exception") after a finished run."""
        import torch.distributed as dist

        if self.world > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def sum_gradients(self, params) -> None:
        if self.world == 1 or self.fsdp:  # FSDP's reduce-scatter has summed them already
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate the processes' equal-length tensors along dim 0 (rank order)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        flag = t.dtype == torch.bool  # gloo has no bool collectives
        t = t.to(torch.uint8) if flag else t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        out = torch.cat(parts)
        return out.bool() if flag else out

    def gather_objects(self, obj) -> list:
        """Every process's ``obj`` (any picklable value), in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()


def _refuse_deepspeed() -> None:
    """``accelerate launch`` with a DeepSpeed config asks for DeepSpeed's engine, which the trainer does not
    use; refuse rather than silently replicate a model the user meant to shard, and name what does the same."""
    import os

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() in ("1", "true", "yes"):
        raise ValueError(
            "accelerate was launched with DeepSpeed (ACCELERATE_USE_DEEPSPEED=true), which the trainer does not "
            "use. For ZeRO-3 launch with configs/accelerate/fsdp.yaml, for ZeRO-2 with "
            "configs/accelerate/fsdp_zero2.yaml (PyTorch FSDP2, the same memory split: see "
            "dmpo_fast.sharding), or set fsdp=true under torchrun; configs/accelerate/ddp.yaml replicates."
        )


def _launched_distributed() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# --------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but CUDA is not available; use device=cpu or auto")
    return torch.device(cfg.device)


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


def _encode(tokenizer, prompts: list[str], device, chat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask; instruct tokenizers get their chat template."""
    if hasattr(tokenizer, "batch_encode"):  # the built-in character tokenizer
        ids, am = tokenizer.batch_encode(prompts, pad_left=True)
    else:
        if chat and getattr(tokenizer, "chat_template", None):
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
                for p in prompts
            ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids, am = enc["input_ids"], enc["attention_mask"]
    return ids.to(device), am.to(device)


def _decode(tokenizer, ids: torch.Tensor) -> list[str]:
    if hasattr(tokenizer, "batch_encode"):
        return tokenizer.batch_decode(ids.tolist(), skip_special=True, stop_at_eos=True)
    eos = tokenizer.eos_token_id
    out = []
    for row in ids.tolist():
        if eos in row:
            row = row[: row.index(eos)]
        out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def sample_kwargs(cfg: TrainConfig, *, temperature: float, gen_length: int | None = None) -> dict:
    """The chosen sampler's keyword arguments (each sampler takes only its own options)."""
    gen_length = gen_length or cfg.gen_length
    block = min(cfg.block_length, gen_length)
    kw = dict(
        sampler=cfg.sampler, gen_length=gen_length, block_length=block, temperature=temperature, impl=cfg.impl
    )
    steps = max(gen_length // block, round(cfg.steps * gen_length / cfg.gen_length))
    steps -= steps % (gen_length // block)
    if cfg.sampler == "llada":
        kw.update(steps=steps, remasking=cfg.remasking)
    elif cfg.sampler == "fast_dllm":
        kw.update(cache=cfg.cache, remasking=cfg.remasking)
        kw.update(threshold=cfg.threshold) if cfg.threshold is not None else kw.update(steps=steps)
    else:  # roar: one token per step
        kw.update(steps=gen_length)
    return kw


# --------------------------------------------------------------------------------------------------
# Rollouts and evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def rollout(policy, tokenizer, task, rows, *, repeat: int, cfg: TrainConfig, temperature: float, seed: int,
            reward_fns: list, first_row: int = 0, gen_length: int | None = None,
            tts: dict | None = None):  # fmt: skip
    """Generate ``repeat`` completions per row (group-consecutive) and score them.

    ``first_row`` is the global index of this batch's first rollout: its Philox row key, so a process
    holding rows i.. of a batch draws the same tokens as one process holding them all.
    ``tts``: ``generate_tts``'s k, window and reward_fn, to decode with test-time scaling.
    Returns (rollout, completions, rewards [N] fp32 with NaN for failed rewards, n_failed, solved [N]).
    """
    from dmpo_fast.sampling import generate, generate_tts
    from dmpo_fast.sampling.rollout import inference
    from dmpo_fast.tasks import columns_of, safe_rewards

    rows = [r for r in rows for _ in range(repeat)]
    prompts = [r["prompt"] for r in rows]
    ids, am = _encode(tokenizer, prompts, policy.head_weight.device, chat=cfg.chat_template)
    keys = torch.arange(first_row, first_row + len(rows), device=ids.device)
    kw = sample_kwargs(cfg, temperature=temperature, gen_length=gen_length)
    if tts:
        with inference(policy):  # the candidates' final scoring too runs in eval mode
            out = generate_tts(policy, ids, am, seed=seed, row_keys=keys, **tts, **kw).rollout
    else:
        out = generate(policy, ids, am, seed=seed, row_keys=keys, **kw)
    completions = _decode(tokenizer, out.ids[:, out.prompt_length :])
    columns = columns_of(rows)
    rewards, n_failed = safe_rewards(reward_fns, prompts, completions, columns)
    solved = torch.tensor(task.is_correct(prompts, completions, **columns), dtype=torch.float32)
    return out, completions, rewards, n_failed, solved


def evaluate(policy, tokenizer, task, rows, cfg: TrainConfig, reward_fns: list, *, procs: Processes | None = None,
             batch_size: int = 64, gen_length: int | None = None, progress: bool = False,
             scorer=None) -> dict:  # fmt: skip
    """Held-out solve rate and mean reward with the run's sampler at ``eval_temperature``.

    The same rows, seed and decoding before and after training, so the two numbers compare.
    With several processes each takes every world-th batch and the sums are combined.
    With ``cfg.eval_tts_k`` > 0 each prompt is decoded by test-time scaling (``eval_tts_k`` candidates,
    branching every ``eval_tts_window`` model calls, ranked by the MRO step rewards of ``cfg``; ``scorer``
    is the perplexity model, loaded here when needed and not given).
    """
    rank, world = (procs.rank, procs.world) if procs is not None else (0, 1)
    tts = None
    if cfg.eval_tts_k:
        if scorer is None and cfg.effective_ppl_weight:
            scorer = load_scorer(cfg, tokenizer, policy.head_weight.device)
        fn = mro.tts_reward_fn(
            policy, mro_config(cfg), scorer=scorer, window=cfg.eval_tts_window, impl=cfg.impl
        )
        tts = dict(k=cfg.eval_tts_k, window=cfg.eval_tts_window, reward_fn=fn)
    acc, rew, n = 0.0, 0.0, 0
    starts = list(range(0, len(rows), batch_size))[rank::world]
    from tqdm.auto import tqdm

    for s in tqdm(starts, desc="eval", unit="batch", disable=not progress, leave=False):
        chunk = rows[s : s + batch_size]
        _, _, rewards, _, solved = rollout(
            policy, tokenizer, task, chunk, repeat=1, cfg=cfg, temperature=cfg.eval_temperature,
            seed=_derive_seed(cfg.seed, "eval"), reward_fns=reward_fns, first_row=s, gen_length=gen_length,
            tts=tts,
        )  # fmt: skip
        acc += solved.sum().item()
        rew += torch.nan_to_num(rewards, nan=0.0).sum().item()
        n += len(chunk)
    if procs is not None:
        acc, rew, n = procs.sum([acc, rew, float(n)])
    return {"accuracy": acc / max(n, 1), "reward_mean": rew / max(n, 1), "n": int(n)}


# --------------------------------------------------------------------------------------------------
# The buffer: rollouts + weights, reused for num_iterations optimizer steps
# --------------------------------------------------------------------------------------------------


def make_buffer(policy, reference, tokenizer, task, cfg: TrainConfig, reward_fns, rows, buffer_index: int,
                *, first_row: int = 0) -> dict:  # fmt: skip
    """Rollouts of ``rows`` (G each), their rewards, ELBO log-ratios and importance weights."""
    seed = _derive_seed(cfg.seed, "rollout", buffer_index)
    out, _, rewards, n_failed, solved = rollout(
        policy, tokenizer, task, rows, repeat=cfg.num_generations, cfg=cfg, temperature=cfg.temperature, seed=seed,
        reward_fns=reward_fns, first_row=first_row,
    )  # fmt: skip
    maskable = _maskable(out, policy.eos_id, cfg)
    # A group whose rollouts all scored the same teaches nothing about the reward: with drop_tied_groups its
    # rewards enter the weights as NaN, i.e. weight 0 (the stored rewards stay the real ones, for the log).
    G = cfg.num_generations
    tied = dmpo.tied_groups(rewards, G) if cfg.drop_tied_groups else torch.zeros(len(rows), dtype=torch.bool)
    weighted_rewards = torch.where(tied.repeat_interleave(G), float("nan"), rewards.float())
    # WDCE never reads the ELBO of a weightless rollout (WDDO's second term and the model baseline do).
    scored = (~tied).repeat_interleave(G) if cfg.loss == "wdce" and cfg.baseline != "model" else None
    noise = _noise(cfg, cfg.elbo_replicates)
    elbo_seed = _derive_seed(cfg.seed, "elbo", buffer_index)
    # The masks are keyed by (seed, global row): a process's rows get the masks of a one-process run.
    with torch.no_grad():
        elbo = lambda m: dmpo.elbo(  # noqa: E731
            m, out.ids, maskable, noise=noise, attention_mask=out.attention_mask, seed=elbo_seed,
            row_offset=first_row, rows=scored, impl=cfg.impl,
        )  # fmt: skip
        log_p_old = elbo(policy)
        if cfg.alpha > 0:
            with reference() as ref:
                log_p_ref = elbo(ref)
        else:
            log_p_ref = log_p_old
    log_ratio = log_p_ref - log_p_old
    iw = importance_weights(
        weighted_rewards.to(log_p_old.device), log_ratio, group_size=G, alpha=cfg.alpha,
        coeff=cfg.coeff, baseline=cfg.baseline, centering_strength=cfg.centering_strength,
        ess_target=cfg.ess_target,
    )  # fmt: skip
    return {
        "ids": out.ids.cpu(),
        "attention_mask": out.attention_mask.cpu(),
        "maskable": maskable.cpu(),
        "weights": iw.weights.float().cpu(),
        "raw": iw.raw.float().cpu(),
        "log_p_old": log_p_old.float().cpu(),
        "log_ratio": log_ratio.float().cpu(),
        "rewards": rewards.float().cpu(),
        "solved": solved.cpu(),
        "ess": iw.ess.float().cpu(),
        "kept": torch.isfinite(weighted_rewards) & torch.isfinite(log_ratio).cpu(),
        "dropped": int(iw.dropped),
        "tied_groups": int(tied.sum()),
        "n_failed": int(n_failed),
        "first_row": first_row,
    }


def loss_step(
    policy, buf: dict, cfg: TrainConfig, step: int, device, total_rows: int | None = None
) -> dmpo.LossOutput:
    """The DMPO loss of one optimizer step on (a slice of) the buffer, with fresh masks.

    WDCE is a sum over rollouts, so slices add up; WDDO is a mean, so a slice's loss is rescaled
    by its share of the ``total_rows`` rollouts of the step.
    """
    ids, am, maskable = buf["ids"].to(device), buf["attention_mask"].to(device), buf["maskable"].to(device)
    noise = _noise(cfg, cfg.num_replicates)
    seed, offset = _derive_seed(cfg.seed, "loss", step), buf["first_row"]
    if cfg.loss == "wddo":
        out = dmpo.wddo(
            policy, ids, maskable, buf["raw"].to(device), buf["log_p_old"].to(device),
            group_size=cfg.num_generations, noise=noise, attention_mask=am, beta=cfg.ddo_beta, a=cfg.ddo_a,
            independent_sets=cfg.ddo_independent_sets, seed=seed, row_offset=offset, impl=cfg.impl,
        )  # fmt: skip
        share = ids.shape[0] / (total_rows or ids.shape[0])
        return dmpo.LossOutput(out.loss * share, out.stats)
    weights = buf["raw"] if cfg.baseline == "model" else buf["weights"]
    return dmpo.wdce(
        policy, ids, maskable, weights.to(device), group_size=cfg.num_generations, noise=noise,
        attention_mask=am, baseline=cfg.baseline, log_p_old=buf["log_p_old"].to(device),
        centering_strength=cfg.centering_strength, keep=_to(buf.get("kept"), device), seed=seed,
        row_offset=offset, impl=cfg.impl,
    )  # fmt: skip


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _slice_buffer(buf: dict, start: int, stop: int) -> dict:
    """Rows start..stop-1 of a buffer (whole prompt groups), keeping their global row index."""
    n = buf["ids"].shape[0]
    part = {
        k: (v[start:stop] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v)
        for k, v in buf.items()
    }
    part["first_row"] = buf["first_row"] + start
    return part


# --------------------------------------------------------------------------------------------------
# MRO and diffu-GRPO: DMPO's rollouts and rewards, their own buffer and loss
# --------------------------------------------------------------------------------------------------

# Loss statistics summed over micro-batches and processes (besides the loss and masked_tokens).
SUMMED_STATS = {"diffu_grpo": ("kl_sum", "clip_sum", "ratio_sum"), "mro": ("states", "windows")}


def grpo_config(cfg: TrainConfig) -> grpo.GRPOConfig:
    """The run's diffu-GRPO options (μ = num_iterations, G = num_generations)."""
    return grpo.GRPOConfig(
        group_size=cfg.num_generations, num_iterations=cfg.num_iterations, epsilon=cfg.grpo_epsilon,
        beta=cfg.grpo_beta, p_mask_prompt=cfg.grpo_p_mask_prompt, random_masking=cfg.grpo_random_masking,
        scale_rewards=cfg.grpo_scale_rewards, normalize=cfg.grpo_normalize,
    )  # fmt: skip


def mro_config(cfg: TrainConfig) -> mro.MROConfig:
    """The run's MRO options (G = num_generations); its step rewards also rank TTS candidates."""
    return mro.MROConfig(
        group_size=cfg.num_generations, window=cfg.mro_window, verification=cfg.mro_verification,
        verification_score=cfg.mro_verification_score, ppl_text=cfg.mro_ppl_text, tv_weight=cfg.mro_tv_weight,
        ppl_weight=cfg.effective_ppl_weight, task_weight=cfg.mro_task_weight, shaping=cfg.mro_shaping,
        returns=cfg.mro_returns, scale_std=cfg.mro_scale_rewards == "std", importance=cfg.mro_importance,
        windows_per_rollout=cfg.mro_windows_per_rollout, num_iterations=cfg.num_iterations,
    )  # fmt: skip


def load_scorer(cfg: TrainConfig, tokenizer, device):
    """MRO's perplexity scorer: cfg.mro_ppl_model with its own tokenizer (the policy's text is re-encoded)."""
    if cfg.mro_ppl_model is None:
        raise ValueError("the perplexity reward needs mro_ppl_model (a causal LM name or directory)")
    dtype = getattr(torch, cfg.dtype)
    return mro.load_ar_scorer(
        cfg.mro_ppl_model, bridge_from=tokenizer, device=device, dtype=dtype, impl=cfg.impl
    )


def algorithm_buffer(policy, reference, tokenizer, task, cfg: TrainConfig, reward_fns, rows, buffer_index: int,
                     *, first_row: int = 0, procs: Processes | None = None, scorer=None) -> dict:  # fmt: skip
    """MRO / diffu-GRPO: rollouts of ``rows`` (G each, drawn as DMPO's), the algorithm's buffer, on the CPU.

    The buffer's row keys start at ``first_row`` and its loss denominators count every process's rows and
    tokens, so the processes' (and micro-batches') losses add up to the whole step's.
    """
    out, _, rewards, n_failed, solved = rollout(
        policy, tokenizer, task, rows, repeat=cfg.num_generations, cfg=cfg, temperature=cfg.temperature,
        seed=_derive_seed(cfg.seed, "rollout", buffer_index), reward_fns=reward_fns, first_row=first_row,
    )  # fmt: skip
    world = procs.world if procs is not None else 1
    rewards, algo_seed = rewards.to(out.ids.device), _derive_seed(cfg.seed, cfg.algorithm, buffer_index)
    if cfg.algorithm == "diffu_grpo":
        tokens = [float(out.completion_mask.sum())]
        buf = grpo.make_buffer(
            policy, out, rewards, grpo_config(cfg), seed=algo_seed,
            reference=reference if cfg.grpo_beta > 0 else None, row_offset=first_row,
            rows_total=out.ids.shape[0] * world, tokens_total=(procs.sum(tokens) if procs else tokens)[0],
            impl=cfg.impl,
        )  # fmt: skip
    elif cfg.algorithm == "mro":
        buf = mro.make_buffer(
            policy, out, rewards, mro_config(cfg), seed=algo_seed, scorer=scorer, row_offset=first_row,
            rows_total=out.ids.shape[0] * world, impl=cfg.impl,
        )  # fmt: skip
    elif cfg.algorithm == "rejection_sft":
        buf = _rejection_buffer(policy, out, rewards, cfg, procs)
    else:
        raise ValueError(
            f"algorithm must be 'mro', 'diffu_grpo' or 'rejection_sft' here (dmpo uses make_buffer), got "
            f"{cfg.algorithm!r}"
        )
    buf = {k: v.cpu() if torch.is_tensor(v) else v for k, v in buf.items()}
    buf.update(
        rewards=rewards.float().cpu(), solved=solved.cpu(), n_failed=int(n_failed), first_row=first_row
    )
    return buf


def _noise(cfg: TrainConfig, replicates: int) -> dmpo.NoiseConfig:
    """The forward-mask settings of the config with ``replicates`` noisy copies per rollout."""
    return dmpo.NoiseConfig(replicates, cfg.antithetic, cfg.mask_rate_min, cfg.mask_rate_max)


def _maskable(out, eos_id: int | None, cfg: TrainConfig) -> torch.Tensor:
    """[N, L] bool: the completion positions a loss may mask (``dmpo.completion_mask``); never the prompt."""
    P = out.prompt_length
    maskable = torch.zeros_like(out.ids, dtype=torch.bool)
    maskable[:, P:] = dmpo.completion_mask(out.ids[:, P:], eos_id, include_eos_padding=cfg.include_eos_padding)
    return maskable


def _rejection_buffer(policy, out, rewards: torch.Tensor, cfg: TrainConfig, procs: Processes | None) -> dict:
    """Rejection sampling: each group's best rollout by reward (the first on ties; dropped below
    ``rs_min_reward``), to be trained on with the masked-diffusion loss. ``selected_total`` counts every
    process's selections: the loss is their mean."""
    G = cfg.num_generations
    best = mro.select_best(rewards, G, min_reward=cfg.rs_min_reward)
    selected = torch.zeros(rewards.shape[0], dtype=torch.bool, device=rewards.device)
    selected[best] = True
    count = [float(selected.sum())]
    total = int((procs.sum(count) if procs is not None else count)[0])
    maskable = _maskable(out, policy.eos_id, cfg)
    return {"ids": out.ids, "attention_mask": out.attention_mask, "maskable": maskable, "selected": selected,
            "selected_total": total}  # fmt: skip


def algorithm_loss(policy, buf: dict, cfg: TrainConfig, step: int, device) -> dmpo.LossOutput:
    """The MRO / diffu-GRPO loss of optimizer step ``step`` on (a row slice of) a buffer. Its stats are the
    sums the trainer adds over micro-batches and processes: masked_tokens (tokens in the loss) and
    ``SUMMED_STATS`` (diffu-GRPO's token-weighted KL, clip share and ratio; MRO's states and windows)."""
    part = {k: v.to(device) if torch.is_tensor(v) else v for k, v in buf.items()}
    if cfg.algorithm == "diffu_grpo":
        out = grpo.loss_step(policy, part, grpo_config(cfg), step, impl=cfg.impl)
        n = out.stats["masked_tokens"]
        kl = out.stats.get("kl", torch.zeros((), device=n.device))  # no KL without a reference
        stats = {"masked_tokens": n, "kl_sum": kl * n, "clip_sum": out.stats["clip_ratio"] * n,
                 "ratio_sum": out.stats["ratio_mean"] * n}  # fmt: skip
    elif cfg.algorithm == "mro":
        out = mro.loss_step(policy, part, mro_config(cfg), step, impl=cfg.impl)
        stats = {k: out.stats[k] for k in ("masked_tokens", "states", "windows")}
    else:  # rejection_sft: fresh masks every step, as DMPO's loss
        noise = _noise(cfg, cfg.num_replicates)
        out = mro.rejection_sft_loss(
            policy, part["ids"], part["maskable"], noise=noise, attention_mask=part["attention_mask"],
            selected=part["selected"], total=part["selected_total"], seed=_derive_seed(cfg.seed, "loss", step),
            row_offset=part["first_row"], impl=cfg.impl,
        )  # fmt: skip
        stats = {"masked_tokens": out.stats["masked_tokens"]}
    loss_device = out.loss.device
    return dmpo.LossOutput(out.loss, {k: v.detach().to(loss_device) for k, v in stats.items()})


def _algorithm_row_stats(algorithm: str, rows: dict, stats: dict) -> dict:
    """The metrics row's MRO / diffu-GRPO columns, from the step's merged buffer rows and loss sums."""
    n = max(stats["masked_tokens"], 1)
    if algorithm == "rejection_sft":
        return {"selected": int(rows["selected"].sum())}
    if algorithm == "diffu_grpo":
        return {
            "kl": stats["kl_sum"] / n,
            "clip_ratio": stats["clip_sum"] / n,
            "ratio_mean": stats["ratio_sum"] / n,
            "advantage_abs_mean": float(rows["advantages"].abs().mean()),
        }
    out = {
        "states": int(stats["states"]),
        "windows": int(stats["windows"]),
        "steps_mean": float(rows["num_steps"].float().mean()),
    }
    for name in ("tv_mean", "ppl_mean"):  # per-rollout mean step rewards, when the term is on
        if name in rows:
            out[f"{name[:-5]}_reward_mean"] = float(torch.nanmean(rows[name]))
    return out


def _merge_rows(parts: list[dict]) -> dict:
    """The per-rollout ([N]) tensors of every process's buffer, concatenated in rank order, and the summed
    failure count."""
    rows = {
        k: torch.cat([p[k] for p in parts])
        for k, v in parts[0].items()
        if torch.is_tensor(v) and v.dim() == 1
    }
    for k, v in parts[0].items():  # counts (failed rewards, dropped samples, tied groups) add up
        if isinstance(v, int) and not isinstance(v, bool) and k != "first_row":
            rows[k] = sum(p[k] for p in parts)
    return rows


def _local_buffer(parts: list[dict] | None, procs: Processes, step: int, cfg: TrainConfig) -> dict | None:
    """This process's buffer of a resumed run (None: the next step draws a new one)."""
    if parts is None or step % cfg.num_iterations == 0:
        return None
    if len(parts) != procs.world:
        raise ValueError(
            f"resume=true at step {step}, inside a rollout buffer written by {len(parts)} processes, with "
            f"{procs.world} processes: resume with {len(parts)} processes (or from a checkpoint at a "
            f"multiple of num_iterations={cfg.num_iterations})"
        )
    return parts[procs.rank]


def update(
    policy, optimizer, params, buf: dict, cfg: TrainConfig, step: int, device, procs: Processes
) -> dict:
    """One optimizer step on this process's buffer: micro-batches of whole groups, summed gradients,
    clipping, and a skipped step when the loss or gradient is not finite. Returns its statistics."""
    G = cfg.num_generations
    groups = buf["ids"].shape[0] // G
    micro = max(1, math.ceil(groups / cfg.gradient_accumulation_steps))
    extra = SUMMED_STATS.get(cfg.algorithm, ())
    optimizer.zero_grad(set_to_none=True)
    # Sums stay on the device through the micro-batches: one host sync per step, not two per micro-batch.
    totals = torch.zeros(2 + len(extra), dtype=torch.float64, device=device)  # (loss, masked tokens, extra)
    for g0 in range(0, groups, micro):
        part = _slice_buffer(buf, g0 * G, min(groups, g0 + micro) * G)
        if cfg.algorithm == "dmpo":
            out = loss_step(policy, part, cfg, step, device, total_rows=cfg.rollouts_per_step)
        else:
            out = algorithm_loss(policy, part, cfg, step, device)
        out.loss.backward()
        totals += torch.stack(
            [
                out.loss.detach().double(),
                out.stats["masked_tokens"].double(),
                *(out.stats[k].double() for k in extra),
            ]
        )
    procs.sum_gradients(params)
    loss_total, masked_tokens, *sums = procs.sum(totals.tolist())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients (FSDP): the norm is a DTensor
        grad_norm = grad_norm.full_tensor()
    finite = math.isfinite(loss_total) and bool(torch.isfinite(grad_norm))
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return {
        "loss": loss_total,
        "masked_tokens": int(masked_tokens),
        "grad_norm": float(grad_norm),
        "finite": finite,
        **dict(zip(extra, sums, strict=True)),
    }


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class _Reference:
    """Context manager factory giving the reference model: a frozen copy, or the adapter-off policy."""

    def __init__(self, cfg: TrainConfig, policy):
        uses = (
            cfg.alpha > 0 if cfg.algorithm == "dmpo" else cfg.algorithm == "diffu_grpo" and cfg.grpo_beta > 0
        )
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


def _scheduler(cfg: TrainConfig, optimizer):
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


def _check_resume_config(run: RunDir, cfg: TrainConfig) -> None:
    import yaml

    saved_file = run.path / "config.yaml"
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    now = cfg.to_dict()
    changed = sorted(k for k in now if k in saved and saved[k] != now[k] and k not in RESUMABLE_CHANGES)
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"resume=true but the config differs from the saved run in {str(saved_file)!r} ({diffs}); only "
            f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume. Start a new output_dir instead."
        )


def _log_row(step, stats, buf_all, lr, seconds, algorithm: str = "dmpo") -> dict:
    if isinstance(buf_all, list):  # one buffer per process
        buf_all = _merge_rows(buf_all)
    rewards = buf_all["rewards"]
    finite_r = rewards[torch.isfinite(rewards)]
    row = {
        "step": step,
        "loss": stats["loss"],
        "reward_mean": float(finite_r.mean()) if finite_r.numel() else float("nan"),
        "reward_std": float(finite_r.std()) if finite_r.numel() > 1 else 0.0,
        "accuracy": float(buf_all["solved"].mean()),
    }
    if algorithm != "dmpo":
        row.update(_algorithm_row_stats(algorithm, buf_all, stats))
    else:
        row.update({
            # Over the groups that carry weight (a dropped group's ESS is 0).
            "ess_mean": _finite_mean(buf_all["ess"].masked_fill(buf_all["ess"] <= 0, float("nan"))),
            "weights_min": float(buf_all["weights"].min()),
            "weights_max": float(buf_all["weights"].max()),
            "weights_std": float(buf_all["weights"].std()),
            "log_ratio_mean": _finite_mean(buf_all["log_ratio"]),  # scored rollouts only
            "dropped": buf_all["dropped"],
            "tied_groups": buf_all["tied_groups"],
        })  # fmt: skip
    return row | {
        "reward_failures": buf_all["n_failed"],
        "grad_norm": stats["grad_norm"],
        "lr": lr,
        "skipped": not stats["finite"],
        "masked_tokens": stats["masked_tokens"],
        "tokens_per_s": stats["masked_tokens"] / max(seconds, 1e-9),
        "seconds": seconds,
    }


def _training_state(policy, optimizer, *, sharded: bool) -> tuple[dict, dict, str]:
    """(model state, optimizer state, optimizer format) to checkpoint. The model state is always the full,
    unsharded one; the optimizer's is keyed by parameter index ("index", ``optimizer.state_dict()``) or, for a
    sharded model, by parameter name ("fqn", gathered in full). A collective when sharded."""
    if sharded:
        from dmpo_fast import sharding

        model_state, optimizer_state = sharding.full_state(policy, optimizer)
        return model_state, optimizer_state, "fqn"
    return policy.state_dict(), optimizer.state_dict(), "index"


def _load_training_state(policy, optimizer, state: dict, *, sharded: bool) -> None:
    """Load a checkpoint's model and optimizer into a sharded or an unsharded run, whichever wrote it."""
    fqn = state.get("optimizer_format") == "fqn"
    if not sharded and not fqn:
        policy.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optim = state["optimizer"] if fqn else _optimizer_state_by_name(policy, state["optimizer"])
    if sharded:
        from dmpo_fast import sharding

        sharding.load_full_state(policy, optimizer, state["model"], optim)
    else:
        policy.load_state_dict(state["model"])
        set_optimizer_state_dict(policy, optimizer, optim, options=StateDictOptions(full_state_dict=True))


def _optimizer_state_by_name(policy, index_state: dict) -> dict:
    """An ``optimizer.state_dict()`` of this trainer (one group over the trainable parameters in order) keyed
    by parameter name, as ``set_optimizer_state_dict`` reads it."""
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    groups = index_state["param_groups"]
    return {
        "state": {names[i]: v for i, v in index_state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups],
    }


def _finite_mean(t: torch.Tensor) -> float:
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else 0.0


def train(cfg: TrainConfig | None = None) -> TrainResult:
    """Run the configured algorithm; returns the evaluations and where everything was written."""
    cfg = cfg or TrainConfig()
    from dmpo_fast.tasks import get_task, resolve_reward

    t0 = time.time()
    procs = Processes(cfg)
    run = RunDir(cfg.output_dir, resume=cfg.resume, main=procs.main)
    if cfg.resume:
        _check_resume_config(run, cfg)
    device = procs.device
    torch.manual_seed(cfg.seed)
    policy, tokenizer = load_policy(cfg, device)
    task = get_task(cfg.task, **cfg.task_options())
    reward_fns = [task.reward, *(resolve_reward(s) for s in cfg.reward_funcs)]
    reference = _Reference(cfg, policy)
    needs_scorer = cfg.effective_ppl_weight > 0 and (cfg.algorithm == "mro" or cfg.eval_tts_k > 0)
    scorer = load_scorer(cfg, tokenizer, device) if needs_scorer else None
    if cfg.algorithm == "mro" and cfg.num_iterations > 1 and procs.main:
        warnings.warn(
            f"algorithm='mro' with num_iterations={cfg.num_iterations}: each buffer is reused off-policy "
            "(the SGRO loss has no policy ratio); num_iterations=1 is on-policy",
            stacklevel=2,
        )
    gathered = contextlib.nullcontext
    if procs.fsdp:  # shard after the frozen copy was taken; rollouts and evals run gathered
        from dmpo_fast import sharding

        for model in (policy, reference.copy):
            if model is not None:
                sharding.shard(model, reshard_after_forward=procs.reshard_after_forward)

        def gathered():
            return sharding.gathered(policy, reference.copy)

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    scheduler = _scheduler(cfg, optimizer)
    train_rows = task.train(seed=cfg.seed)
    eval_rows = task.test(cfg.eval_size, seed=cfg.seed)
    G, P = cfg.num_generations, cfg.prompts_per_step
    P_local = P // procs.world

    start, buf_all, eval_before = 0, None, None
    latest = run.latest_checkpoint() if cfg.resume else None
    if latest is not None:
        state = RunDir.load_checkpoint(latest)
        _load_training_state(policy, optimizer, state, sharded=procs.fsdp)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start, buf_all, eval_before = state["step"], state["buffer"], state["eval_before"]
        if procs.main:
            run.truncate_metrics(start)
            print(f"resumed from {latest.name} (step {start})")
    else:
        if cfg.resume and procs.main:
            warnings.warn(
                f"resume=true but {str(run.path)!r} has no checkpoint: starting from step 0", stacklevel=2
            )
        run.write_config(cfg.to_dict())
        with gathered():
            eval_before = evaluate(
                policy, tokenizer, task, eval_rows, cfg, reward_fns, procs=procs, progress=cfg.progress,
                scorer=scorer,
            )  # fmt: skip
        if procs.main:
            print(
                f"eval before: solve rate {eval_before['accuracy']:.3f}, reward {eval_before['reward_mean']:.3f}"
            )
    if isinstance(buf_all, dict):  # a DMPO checkpoint that stored the buffer as one concatenated dict
        buf = _slice_buffer(buf_all, procs.rank * P_local * G, (procs.rank + 1) * P_local * G)
    else:
        buf = _local_buffer(buf_all, procs, start, cfg)

    tb = run.tensorboard() if cfg.tensorboard else None
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and procs.main), desc=cfg.algorithm,
               unit="step", dynamic_ncols=True)  # fmt: skip
    skipped_in_a_row = 0
    for step in range(start, cfg.max_steps):
        t_step = time.time()
        if step % cfg.num_iterations == 0 or buf is None:
            b = step // cfg.num_iterations
            rng = torch.Generator().manual_seed(_derive_seed(cfg.seed, "prompts", b))
            picks = torch.randint(len(train_rows), (P,), generator=rng).tolist()
            mine = [train_rows[i] for i in picks[procs.rank * P_local : (procs.rank + 1) * P_local]]
            with gathered():
                if cfg.algorithm == "dmpo":
                    buf = make_buffer(policy, reference, tokenizer, task, cfg, reward_fns, mine, b,
                                      first_row=procs.rank * P_local * G)  # fmt: skip
                else:
                    buf = algorithm_buffer(policy, reference, tokenizer, task, cfg, reward_fns, mine, b,
                                           first_row=procs.rank * P_local * G, procs=procs,
                                           scorer=scorer)  # fmt: skip
            # Whole buffers, not concatenated tensors: their widths differ between processes when the
            # prompts' lengths do (left padding is per process).
            buf_all = procs.gather_objects(buf)

        stats = update(policy, optimizer, params, buf, cfg, step, device, procs)
        scheduler.step()
        if stats["finite"]:
            skipped_in_a_row = 0
        else:
            skipped_in_a_row += 1
            if procs.main:
                warnings.warn(
                    f"step {step + 1}: non-finite loss or gradient, the update was skipped", stacklevel=1
                )

        row = _log_row(
            step + 1, stats, buf_all, scheduler.get_last_lr()[0], time.time() - t_step, cfg.algorithm
        )
        if procs.main:
            run.log(row)
            if tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        tb.add_scalar(f"train/{k}", float(v), step + 1)
        bar.update(1)
        bar.set_postfix(
            loss=f"{row['loss']:.3f}", reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.2f}"
        )
        if skipped_in_a_row >= 3:
            bar.close()
            raise RuntimeError(
                f"three non-finite steps in a row (the last at step {step + 1}): the run stopped. The last good "
                f"checkpoint in {str(run.checkpoints)!r} is intact; lower learning_rate or check the rewards, "
                "then resume from it."
            )

        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            with gathered():
                ev = evaluate(policy, tokenizer, task, eval_rows, cfg, reward_fns, procs=procs, scorer=scorer)
            if procs.main:
                run.log_eval(step + 1, ev)
                if tb is not None:
                    tb.add_scalar("eval/accuracy", ev["accuracy"], step + 1)
                    tb.add_scalar("eval/reward_mean", ev["reward_mean"], step + 1)
        done = step + 1 == cfg.max_steps
        if stats["finite"] and ((step + 1) % cfg.save_every == 0 or done):
            model_state, optimizer_state, fmt = _training_state(policy, optimizer, sharded=procs.fsdp)
            if procs.main:
                run.save_checkpoint(
                    step + 1,
                    {
                        "model": model_state, "optimizer": optimizer_state, "optimizer_format": fmt,
                        "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": step + 1,
                        "buffer": buf_all, "eval_before": eval_before, "config": cfg.to_dict(),
                    },
                    keep=cfg.keep_checkpoints,
                )  # fmt: skip
    bar.close()

    with gathered():
        eval_after = evaluate(
            policy, tokenizer, task, eval_rows, cfg, reward_fns, procs=procs, progress=cfg.progress,
            scorer=scorer,
        )  # fmt: skip
    wall = time.time() - t0
    if procs.main:
        print(f"eval after:  solve rate {eval_after['accuracy']:.3f}, reward {eval_after['reward_mean']:.3f}")
        run.write_summary(
            {
                "eval_before": eval_before,
                "eval_after": eval_after,
                "steps": cfg.max_steps,
                "wall_seconds": wall,
                "processes": procs.world,
                "sharding": ("fsdp-zero3" if procs.reshard_after_forward else "fsdp-zero2") if procs.fsdp else "none",
                "config": cfg.to_dict(),
            }  # fmt: skip
        )
        if tb is not None:
            tb.add_scalar("eval/accuracy", eval_before["accuracy"], 0)
            tb.add_scalar("eval/accuracy", eval_after["accuracy"], cfg.max_steps)
            tb.close()
        if cfg.plot:
            run.plot(eval_before, eval_after)
    procs.close()
    return TrainResult(str(run.path), cfg.max_steps, eval_before, eval_after, wall, run.read_metrics())


# --------------------------------------------------------------------------------------------------
# Evaluation of a model or checkpoint (``dmpo-fast eval``)
# --------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str):
    """A checkpoint directory from a run directory (its newest checkpoint) or a checkpoint directory."""
    from pathlib import Path

    p = Path(path)
    if (p / "state.pt").is_file():
        return p
    if (p / "checkpoints").is_dir():
        latest = RunDir(p, resume=True, main=False).latest_checkpoint()
        if latest is not None:
            return latest
    raise ValueError(
        f"checkpoint {path!r} is neither a run directory with checkpoints nor a checkpoint directory"
    )


def evaluate_model(cfg: TrainConfig, *, checkpoint: str | None = None, gen_lengths: list[int] | None = None,
                   n: int | None = None) -> list[dict]:  # fmt: skip
    """Solve rate and mean reward of cfg.model (or a trainer checkpoint) on cfg.task's held-out rows,
    one row per generation length, with cfg's sampler and ``eval_temperature`` (and test-time scaling with
    ``eval_tts_k`` > 0)."""
    from dmpo_fast.tasks import get_task, resolve_reward

    if checkpoint is not None:
        ckpt_dir = resolve_checkpoint(checkpoint)
        state = RunDir.load_checkpoint(ckpt_dir)
        saved = TrainConfig.from_dict(state["config"])
        # The model comes from the checkpoint's run; decoding and task options come from cfg.
        cfg = cfg.replace(model=saved.model, dtype=saved.dtype, lora=saved.lora, lora_r=saved.lora_r,
                          lora_alpha=saved.lora_alpha, lora_target_modules=saved.lora_target_modules,
                          load_in_4bit=saved.load_in_4bit, load_in_8bit=saved.load_in_8bit)  # fmt: skip
    procs = Processes(cfg)
    policy, tokenizer = load_policy(cfg, procs.device)
    if checkpoint is not None:
        policy.load_state_dict(state["model"])
    policy.eval()
    task = get_task(cfg.task, **cfg.task_options())
    reward_fns = [task.reward, *(resolve_reward(s) for s in cfg.reward_funcs)]
    rows = task.test(n or cfg.eval_size, seed=cfg.seed)
    scorer = (
        load_scorer(cfg, tokenizer, procs.device) if cfg.eval_tts_k and cfg.effective_ppl_weight else None
    )
    results = []
    for g in gen_lengths or [cfg.gen_length]:
        if g % min(cfg.block_length, g):
            raise ValueError(f"gen_lengths: {g} is not a multiple of block_length ({cfg.block_length})")
        t = time.time()
        ev = evaluate(
            policy, tokenizer, task, rows, cfg, reward_fns, procs=procs, gen_length=g, progress=cfg.progress,
            scorer=scorer,
        )  # fmt: skip
        ev.update(gen_length=g, sampler=cfg.sampler, tts_k=cfg.eval_tts_k, seconds=round(time.time() - t, 2),
                  task=cfg.task,
                  model=cfg.model if checkpoint is None else str(checkpoint))  # fmt: skip
        results.append(ev)
    procs.close()
    return results
