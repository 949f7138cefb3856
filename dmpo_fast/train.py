"""The DMPO trainer: a plain loop over the pure functions of ``dmpo_fast.dmpo`` and ``dmpo_fast.ops``.

One iteration (``num_iterations`` = F optimizer steps per rollout buffer):

    prompts --generate(policy)--> rollouts x [N = P·G, L]            (no grad, fast sampler)
    x --task reward--> r [N]                    (a failed / None reward -> NaN -> weight 0)
    x --elbo(ref), elbo(policy), same masks--> log p_ref, log p_old [N]
    (r, log p_ref − log p_old) --importance_weights--> w [N]    (softmax per prompt group, baseline)
    repeat F times: fresh masks --wdce / wddo--> loss --backward, clip, step

Departures from the paper / reference implementation are listed in ``dmpo_fast.dmpo``. All randomness
of a step derives from (seed, step), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import torch

from dmpo_fast import dmpo
from dmpo_fast.config import TrainConfig
from dmpo_fast.ops import importance_weights
from dmpo_fast.run_io import RunDir


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
# Setup
# --------------------------------------------------------------------------------------------------


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but CUDA is not available; use device=cpu or auto")
    return torch.device(cfg.device)


def _load_policy(cfg: TrainConfig, device: torch.device):
    """(policy DiffusionLM, tokenizer) for cfg.model."""
    from dmpo_fast import models

    dtype = getattr(torch, cfg.dtype)
    if cfg.model == "tiny":
        from dmpo_fast.assets import load_tiny

        lm, tokenizer = load_tiny(dtype=dtype, device=device)
    else:
        lm = models.load(cfg.model, dtype=dtype, device=device)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=True)
        tokenizer.padding_side = "left"
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    return lm, tokenizer


def _encode(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(tokenizer, "batch_encode"):  # the built-in character tokenizer
        ids, am = tokenizer.batch_encode(prompts, pad_left=True)
    else:
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


def _sample_kwargs(cfg: TrainConfig, *, temperature: float) -> dict:
    """The chosen sampler's keyword arguments (each sampler takes only its own options)."""
    kw = dict(
        sampler=cfg.sampler, gen_length=cfg.gen_length, block_length=cfg.block_length, temperature=temperature,
        impl=cfg.impl,
    )  # fmt: skip
    if cfg.sampler == "llada":
        kw.update(steps=cfg.steps, remasking=cfg.remasking)
    elif cfg.sampler == "fast_dllm":
        kw.update(cache=cfg.cache, remasking=cfg.remasking)
        kw.update(threshold=cfg.threshold) if cfg.threshold is not None else kw.update(steps=cfg.steps)
    else:  # roar: one token per step
        kw.update(steps=cfg.gen_length)
    return kw


# --------------------------------------------------------------------------------------------------
# Rollouts and evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def rollout(policy, tokenizer, task, rows, *, repeat: int, cfg: TrainConfig, temperature: float, seed: int,
            reward_fns: list):
    """Generate ``repeat`` completions per row (group-consecutive) and score them.

    Returns (rollout, completions, rewards [N] fp32 with NaN for failed rewards, n_failed, solved [N]).
    """
    from dmpo_fast.sampling import generate
    from dmpo_fast.tasks import columns_of, safe_rewards

    rows = [r for r in rows for _ in range(repeat)]
    prompts = [r["prompt"] for r in rows]
    ids, am = _encode(tokenizer, prompts, policy.head_weight.device)
    was_training = policy.training
    policy.eval()
    out = generate(policy, ids, am, seed=seed, **_sample_kwargs(cfg, temperature=temperature))
    policy.train(was_training)
    completions = _decode(tokenizer, out.ids[:, out.prompt_length :])
    columns = columns_of(rows)
    rewards, n_failed = safe_rewards(reward_fns, prompts, completions, columns)
    solved = torch.tensor(task.is_correct(prompts, completions, **columns), dtype=torch.float32)
    return out, completions, rewards, n_failed, solved


def evaluate(policy, tokenizer, task, rows, cfg: TrainConfig, reward_fns: list, *, batch_size: int = 64) -> dict:
    """Held-out solve rate and mean reward with the run's sampler at ``eval_temperature``."""
    acc, rew, n = 0.0, 0.0, 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        _, _, rewards, _, solved = rollout(
            policy, tokenizer, task, chunk, repeat=1, cfg=cfg, temperature=cfg.eval_temperature,
            seed=_derive_seed(cfg.seed, "eval", s), reward_fns=reward_fns,
        )  # fmt: skip
        acc += solved.sum().item()
        rew += torch.nan_to_num(rewards, nan=0.0).sum().item()
        n += len(chunk)
    return {"accuracy": acc / max(n, 1), "reward_mean": rew / max(n, 1), "n": n}


# --------------------------------------------------------------------------------------------------
# The buffer: rollouts + weights, reused for num_iterations optimizer steps
# --------------------------------------------------------------------------------------------------


def make_buffer(policy, reference, tokenizer, task, cfg: TrainConfig, reward_fns, rows, buffer_index: int) -> dict:
    seed = _derive_seed(cfg.seed, "rollout", buffer_index)
    out, _, rewards, n_failed, solved = rollout(
        policy, tokenizer, task, rows, repeat=cfg.num_generations, cfg=cfg, temperature=cfg.temperature, seed=seed,
        reward_fns=reward_fns,
    )
    P = out.prompt_length
    maskable = torch.zeros_like(out.ids, dtype=torch.bool)
    eos_id = policy.eos_id
    maskable[:, P:] = dmpo.completion_mask(
        out.ids[:, P:], eos_id, include_eos_padding=cfg.include_eos_padding
    )  # [N, L]: completion positions only
    noise = dmpo.NoiseConfig(cfg.elbo_replicates, cfg.antithetic, cfg.mask_rate_min, cfg.mask_rate_max)
    elbo_seed = _derive_seed(cfg.seed, "elbo", buffer_index)
    with torch.no_grad():
        log_p_old = dmpo.elbo(
            policy, out.ids, maskable, noise=noise, attention_mask=out.attention_mask, seed=elbo_seed, impl=cfg.impl
        )
        if cfg.alpha > 0:
            with reference() as ref:
                log_p_ref = dmpo.elbo(
                    ref, out.ids, maskable, noise=noise, attention_mask=out.attention_mask, seed=elbo_seed,
                    impl=cfg.impl,
                )  # fmt: skip
        else:
            log_p_ref = log_p_old
    iw = importance_weights(
        rewards.to(log_p_old.device), log_p_ref - log_p_old, group_size=cfg.num_generations, alpha=cfg.alpha,
        coeff=cfg.coeff, baseline=cfg.baseline, centering_strength=cfg.centering_strength,
        ess_target=cfg.ess_target,
    )  # fmt: skip
    return {
        "ids": out.ids.cpu(),
        "attention_mask": out.attention_mask.cpu(),
        "maskable": maskable.cpu(),
        "weights": iw.weights.cpu(),
        "raw": iw.raw.cpu(),
        "log_p_old": log_p_old.cpu(),
        "rewards": rewards.cpu(),
        "solved": solved.cpu(),
        "ess": iw.ess.cpu(),
        "dropped": int(iw.dropped),
        "n_failed": int(n_failed),
    }


def loss_step(policy, buf: dict, cfg: TrainConfig, step: int, device) -> dmpo.LossOutput:
    """The DMPO loss of one optimizer step on the buffer, with fresh masks."""
    ids, am, maskable = buf["ids"].to(device), buf["attention_mask"].to(device), buf["maskable"].to(device)
    noise = dmpo.NoiseConfig(cfg.num_replicates, cfg.antithetic, cfg.mask_rate_min, cfg.mask_rate_max)
    seed = _derive_seed(cfg.seed, "loss", step)
    if cfg.loss == "wddo":
        return dmpo.wddo(
            policy, ids, maskable, buf["raw"].to(device), buf["log_p_old"].to(device),
            group_size=cfg.num_generations, noise=noise, attention_mask=am, beta=cfg.ddo_beta, a=cfg.ddo_a,
            independent_sets=cfg.ddo_independent_sets, seed=seed, impl=cfg.impl,
        )  # fmt: skip
    weights = buf["raw"] if cfg.baseline == "model" else buf["weights"]
    return dmpo.wdce(
        policy, ids, maskable, weights.to(device), group_size=cfg.num_generations, noise=noise,
        attention_mask=am, baseline=cfg.baseline, log_p_old=buf["log_p_old"].to(device),
        centering_strength=cfg.centering_strength, seed=seed, impl=cfg.impl,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


class _Reference:
    """Context manager factory giving the reference model: a frozen copy, or the adapter-off policy."""

    def __init__(self, cfg: TrainConfig, policy):
        self.kind = cfg.reference
        self.policy = policy
        self.copy = None
        if self.kind == "frozen_copy" and cfg.alpha > 0:
            import copy

            self.copy = copy.deepcopy(policy).eval().requires_grad_(False)

    def __call__(self):
        import contextlib

        if self.kind == "frozen_copy":
            return contextlib.nullcontext(self.copy)
        if self.kind == "adapter_disabled":
            return self.policy.disable_adapter()
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


def _progress(cfg: TrainConfig, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not cfg.progress, desc="dmpo", unit="step", dynamic_ncols=True)


def train(cfg: TrainConfig | None = None) -> TrainResult:
    """Run DMPO as configured; returns the evaluations and where everything was written."""
    cfg = cfg or TrainConfig()
    if cfg.algorithm != "dmpo":
        raise ValueError(f"algorithm={cfg.algorithm!r} is not available yet; the trainer runs algorithm='dmpo'")
    if cfg.lora:
        raise ValueError("lora=true is not available yet in the trainer; use full fine-tuning (lora=false)")
    from dmpo_fast.tasks import get_task, resolve_reward

    t0 = time.time()
    run = RunDir(cfg.output_dir, resume=cfg.resume)
    device = _device(cfg)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = _load_policy(cfg, device)
    task = get_task(cfg.task, **cfg.task_kwargs)
    reward_fns = [task.reward, *(resolve_reward(s) for s in cfg.reward_funcs)]
    reference = _Reference(cfg, policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    scheduler = _scheduler(cfg, optimizer)
    train_rows = task.train(seed=cfg.seed)
    eval_rows = task.test(cfg.eval_size, seed=cfg.seed)

    start, buf, eval_before, skipped_in_a_row = 0, None, None, 0
    latest = run.latest_checkpoint() if cfg.resume else None
    if latest is not None:
        state = RunDir.load_checkpoint(latest)
        policy.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start, buf, eval_before = state["step"], state["buffer"], state["eval_before"]
        run.truncate_metrics(start)
    else:
        import yaml

        (run.path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        eval_before = evaluate(policy, tokenizer, task, eval_rows, cfg, reward_fns)
        print(f"eval before: solve rate {eval_before['accuracy']:.3f}, reward {eval_before['reward_mean']:.3f}")

    G, P = cfg.num_generations, cfg.prompts_per_step
    micro = max(1, P // cfg.gradient_accumulation_steps)  # prompt groups per micro-batch
    bar = _progress(cfg, cfg.max_steps, start)
    for step in range(start, cfg.max_steps):
        t_step = time.time()
        if step % cfg.num_iterations == 0 or buf is None:
            b = step // cfg.num_iterations
            rng = torch.Generator().manual_seed(_derive_seed(cfg.seed, "prompts", b))
            rows = [train_rows[i] for i in torch.randint(len(train_rows), (P,), generator=rng).tolist()]
            buf = make_buffer(policy, reference, tokenizer, task, cfg, reward_fns, rows, b)

        optimizer.zero_grad(set_to_none=True)
        loss_total, masked_tokens = 0.0, 0
        for g0 in range(0, P, micro):
            sl = slice(g0 * G, min(P, g0 + micro) * G)
            part = {k: (v[sl] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == P * G else v) for k, v in buf.items()}
            out = loss_step(policy, part, cfg, step, device)
            out.loss.backward()
            loss_total += out.loss.item()
            masked_tokens += int(out.stats["masked_tokens"])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        finite = math.isfinite(loss_total) and bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
            skipped_in_a_row = 0
        else:
            skipped_in_a_row += 1
            import warnings

            warnings.warn(f"step {step}: non-finite loss or gradient, step skipped", stacklevel=1)
            if skipped_in_a_row >= 3:
                raise RuntimeError(
                    f"three non-finite steps in a row (last at step {step}); the run stopped and the last good "
                    f"checkpoint in {run.checkpoints} is intact"
                )
        scheduler.step()

        seconds = time.time() - t_step
        rewards = buf["rewards"]
        row = {
            "step": step + 1,
            "loss": loss_total,
            "reward_mean": float(torch.nanmean(rewards)),
            "reward_std": float(rewards[torch.isfinite(rewards)].std()) if torch.isfinite(rewards).sum() > 1 else 0.0,
            "accuracy": float(buf["solved"].mean()),
            "ess_mean": float(buf["ess"].mean()),
            "weights_min": float(buf["weights"].min()),
            "weights_max": float(buf["weights"].max()),
            "dropped": buf["dropped"],
            "reward_failures": buf["n_failed"],
            "grad_norm": float(grad_norm),
            "lr": scheduler.get_last_lr()[0],
            "skipped": not finite,
            "tokens_per_s": masked_tokens / max(seconds, 1e-9),
            "seconds": seconds,
        }
        run.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_total:.3f}", reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.2f}")
        done = step + 1 == cfg.max_steps
        if finite and ((step + 1) % cfg.save_every == 0 or done):
            run.save_checkpoint(
                step + 1,
                {
                    "model": policy.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": step + 1,
                    "buffer": buf, "eval_before": eval_before, "config": cfg.to_dict(),
                },
                keep=cfg.keep_checkpoints,
            )  # fmt: skip
    bar.close()

    eval_after = evaluate(policy, tokenizer, task, eval_rows, cfg, reward_fns)
    print(f"eval after:  solve rate {eval_after['accuracy']:.3f}, reward {eval_after['reward_mean']:.3f}")
    wall = time.time() - t0
    run.write_summary(
        {"eval_before": eval_before, "eval_after": eval_after, "steps": cfg.max_steps, "wall_seconds": wall,
         "config": cfg.to_dict()}  # fmt: skip
    )
    if cfg.plot:
        run.plot(eval_before, eval_after)
    return TrainResult(str(run.path), cfg.max_steps, eval_before, eval_after, wall, run.read_metrics())
