"""Evaluation: the held-out solve rate and mean reward of a policy, before, during and after training,
and of a model or checkpoint (``dmpo-fast eval``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dmpo_fast.algorithms import derive_seed
from dmpo_fast.algorithms.mro import tts_reward
from dmpo_fast.checkpointing import checkpoint_model_state
from dmpo_fast.config import TrainConfig
from dmpo_fast.policy import load_policy, load_scorer
from dmpo_fast.processes import Processes
from dmpo_fast.rollouts import rollout
from dmpo_fast.run_io import RunDir


def evaluate(policy, tokenizer, task, rows, cfg: TrainConfig, reward_fns: list, *, procs: Processes | None = None,
             batch_size: int = 64, gen_length: int | None = None, progress: bool = False,
             scorer=None) -> dict:  # fmt: skip
    """Held-out solve rate and mean reward with the run's sampler at ``eval_temperature``.

    The same rows, seed and decoding before and after training, so the two numbers compare.
    With several processes each takes every world-th batch and the sums are combined.
    With ``cfg.eval_tts_k`` > 0 each prompt is decoded by test-time scaling (``eval_tts_k`` candidates,
    branching every ``eval_tts_window`` model calls, ranked by the MRO step rewards of ``cfg`` and, with
    ``mro_tts_vote``, the majority vote of the final candidates' answers; ``scorer``
    is the perplexity model, loaded here when needed and not given).
    """
    rank, world = (procs.rank, procs.world) if procs is not None else (0, 1)
    tts = None
    if cfg.eval_tts_k:
        if scorer is None and cfg.effective_ppl_weight:
            scorer = load_scorer(cfg, tokenizer, policy.head_weight.device)
        fn = tts_reward(policy, cfg, tokenizer, scorer=scorer)
        tts = dict(k=cfg.eval_tts_k, window=cfg.eval_tts_window, reward_fn=fn)
    acc, rew, n = 0.0, 0.0, 0
    starts = list(range(0, len(rows), batch_size))[rank::world]
    from tqdm.auto import tqdm

    for s in tqdm(starts, desc="eval", unit="batch", disable=not progress, leave=False):
        chunk = rows[s : s + batch_size]
        _, _, rewards, _, solved = rollout(
            policy, tokenizer, task, chunk, repeat=1, cfg=cfg, temperature=cfg.eval_temperature,
            seed=derive_seed(cfg.seed, "eval"), reward_fns=reward_fns, first_row=s, gen_length=gen_length,
            tts=tts,
        )  # fmt: skip
        acc += solved.sum().item()
        rew += torch.nan_to_num(rewards, nan=0.0).sum().item()
        n += len(chunk)
    if procs is not None:
        acc, rew, n = procs.sum([acc, rew, float(n)])
    return {"accuracy": acc / max(n, 1), "reward_mean": rew / max(n, 1), "n": int(n)}


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


def saved_config(path: str) -> TrainConfig:
    """The config a run was trained with, from a run directory or one of its checkpoints: the newest
    checkpoint's own copy (the truth a resume is checked against), else the run's ``config.yaml``. Reads only
    the small ``state.pt`` (the model's files are separate) and verifies nothing: the trainer and the
    evaluation verify the checkpoint they load, once."""
    from pathlib import Path

    p = Path(path)
    candidates = [p] if (p / "state.pt").is_file() else RunDir(p, resume=True, main=False).checkpoint_dirs()[::-1]
    for ckpt in candidates:
        try:
            state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False, mmap=True)
            return TrainConfig.from_saved(state["config"])
        except Exception:  # a damaged checkpoint: the next older one, or config.yaml, says the same
            continue
    if (p / "config.yaml").is_file():
        return TrainConfig.from_yaml(p / "config.yaml", saved=True)
    raise ValueError(f"{path!r} is neither a run directory (config.yaml, checkpoints/) nor a checkpoint directory")


def evaluate_model(cfg: TrainConfig, *, checkpoint: str | None = None, gen_lengths: list[int] | None = None,
                   n: int | None = None) -> list[dict]:  # fmt: skip
    """Solve rate and mean reward of cfg.model (or a trainer checkpoint) on cfg.task's held-out rows,
    one row per generation length, with cfg's sampler and ``eval_temperature`` (and test-time scaling with
    ``eval_tts_k`` > 0). With a checkpoint the model (and its LoRA and quantization) is the checkpoint's run's;
    everything else is ``cfg``: start from ``saved_config(checkpoint)`` to evaluate as the run did (what
    ``dmpo-fast eval --checkpoint`` does)."""
    from dmpo_fast.tasks import get_task, resolve_reward

    if checkpoint is not None:
        ckpt_dir = resolve_checkpoint(checkpoint)  # a run's newest intact checkpoint (verified), or the one given
        from_run = ckpt_dir != Path(checkpoint)
        state = RunDir.load_checkpoint(ckpt_dir, with_model=False, verify=not from_run)
        saved = TrainConfig.from_saved(state["config"])
        # The model comes from the checkpoint's run; decoding and task options come from cfg.
        cfg = cfg.replace(model=saved.model, dtype=saved.dtype, lora=saved.lora, lora_r=saved.lora_r,
                          lora_alpha=saved.lora_alpha, lora_target_modules=saved.lora_target_modules,
                          load_in_4bit=saved.load_in_4bit, load_in_8bit=saved.load_in_8bit)  # fmt: skip
    procs = Processes(cfg)
    policy, tokenizer = load_policy(cfg, procs.device)
    if checkpoint is not None:
        policy.load_state_dict(checkpoint_model_state(policy, ckpt_dir, state, policy.state_dict()))
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
