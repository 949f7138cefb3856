"""The trainer: a plain loop, the same for every algorithm (``dmpo_fast.algorithms``).

One iteration (``num_iterations`` = F optimizer steps per rollout buffer):

    prompts --generate(policy)--> rollouts x [N = P·G, L]            (no grad, the run's sampler)
    x --task reward + reward_funcs--> r [N]       (a failed / None reward -> NaN -> weight 0)
    (x, r) --algorithm.build--> Buffer            (DMPO: ELBO log-ratios, importance weights; MRO: step
                                                   rewards, window advantages; diffu-GRPO: advantages,
                                                   old / reference log-probs; rejection_sft: best of group)
    repeat F times: micro-batches of whole groups --algorithm.loss--> backward, clip, step

The algorithms and their departures from the papers are documented in their modules (DMPO's in
``dmpo_fast.dmpo``); docs/architecture.md draws the data flow and says where each piece lives. All
randomness of a step derives from (seed, purpose tag, step or buffer index), so a resumed run repeats an
uninterrupted one exactly, and each row's streams are keyed by its global index, so N processes (each taking
whole prompt groups, ``dmpo_fast.processes``) compute the one-process update on the same rollouts.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass

import torch

from dmpo_fast import algorithms
from dmpo_fast.algorithms import Algorithm, Buffer, derive_seed
from dmpo_fast.algorithms.base import merge_for_log
from dmpo_fast.checkpointing import load_training_state, resume_point, save_model_files, training_state
from dmpo_fast.config import TrainConfig
from dmpo_fast.evaluation import evaluate, evaluate_model, resolve_checkpoint  # noqa: F401 (re-exported)
from dmpo_fast.guards import non_finite_count, non_finite_names, preflight, restore, snapshot
from dmpo_fast.policy import Reference, load_policy, load_scorer, scheduler
from dmpo_fast.processes import Processes
from dmpo_fast.rollouts import rollout
from dmpo_fast.run_io import RunDir
from dmpo_fast.tracking import Trackers

SAMPLES_LOGGED = 8  # rollouts per completions table


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    eval_before: dict
    eval_after: dict
    wall_seconds: float
    metrics: list
    main: bool = True  # False in the other processes of a multi-process run


def make_buffer(algo: Algorithm, policy, reference, tokenizer, task, cfg: TrainConfig, reward_fns, rows,
                buffer_index: int, *, first_row: int = 0, procs: Processes | None = None,
                scorer=None) -> Buffer:  # fmt: skip
    """Rollouts of ``rows`` (G each), their rewards, and the algorithm's buffer of them, on the CPU.
    ``first_row`` is the global index of this process's first rollout; totals are summed over processes."""
    result = rollout(
        policy, tokenizer, task, rows, repeat=cfg.num_generations, cfg=cfg, temperature=cfg.temperature,
        seed=derive_seed(cfg.seed, "rollout", buffer_index), reward_fns=reward_fns, first_row=first_row,
        tts=algo.rollout_tts(policy, scorer),
    )  # fmt: skip
    out, completions, rewards, n_failed, solved = result
    buf = algo.build(policy, out, rewards, reference=reference, scorer=scorer, buffer_index=buffer_index,
                     first_row=first_row, solved=solved)  # fmt: skip
    buf.rows.update(rewards=rewards.float().to(out.ids.device), solved=solved.to(out.ids.device))
    parts = getattr(result, "reward_parts", {})  # each reward function's own values, NaN where it failed
    buf.rows.update({f"rewards/{k}": v.float().to(out.ids.device) for k, v in parts.items()})
    buf.totals["n_failed"] = int(n_failed)
    G = cfg.num_generations
    buf.meta["samples"] = [  # the first rollouts, for the completions table of the log
        {"prompt": rows[i // G]["prompt"], "completion": completions[i], "reward": float(rewards[i])}
        for i in range(min(len(completions), SAMPLES_LOGGED))
    ]
    buf.sum_totals(procs)
    return buf.to("cpu")


def update(algo: Algorithm, policy, optimizer, params, buf: Buffer, cfg: TrainConfig, step: int,
           procs: Processes) -> dict:  # fmt: skip
    """One optimizer step on this process's buffer: micro-batches of whole groups, summed gradients,
    clipping, and a skipped step when the loss or gradient is not finite. Returns its statistics."""
    G = cfg.num_generations
    groups = len(buf) // G
    micro = max(1, math.ceil(groups / cfg.gradient_accumulation_steps))
    names = ("masked_tokens", *algo.summed_stats)
    optimizer.zero_grad(set_to_none=True)
    # Sums stay on the device through the micro-batches: one host sync per step, not two per micro-batch.
    sums = torch.zeros(1 + len(names), dtype=torch.float64, device=procs.device)  # (loss, *names)
    for g0 in range(0, groups, micro):
        part = buf.slice(g0 * G, min(groups, g0 + micro) * G).to(procs.device)
        out = algo.loss(policy, part, step)
        out.loss.backward()
        sums += torch.stack([out.loss.detach().double(), *(out.stats[k].double() for k in names)])
    procs.sum_gradients(params)
    loss_total, masked_tokens, *extra = procs.sum(sums.tolist())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients (FSDP): the norm is a DTensor
        grad_norm = grad_norm.full_tensor()
    finite = math.isfinite(loss_total) and bool(torch.isfinite(grad_norm))
    if finite:
        # A finite gradient can still give non-finite parameters (float16 overflow, an absurd learning rate):
        # such a step is undone from the copy taken before it (undo_non_finite) and counted as skipped.
        before = snapshot(params, optimizer) if cfg.undo_non_finite else None
        optimizer.step()
        finite = procs.sum([non_finite_count(params)])[0] == 0
        if not finite and before is None:
            raise RuntimeError(
                f"step {step + 1}: the update made the parameters non-finite and undo_non_finite=false keeps no "
                "copy to undo it: the run stopped, and no checkpoint holds these parameters. Lower "
                "learning_rate (or set undo_non_finite=true), then resume from the last good checkpoint."
            )
        if not finite:
            restore(params, optimizer, before)
    if not finite:
        optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_total, "masked_tokens": int(masked_tokens), "grad_norm": float(grad_norm),
            "finite": finite, **dict(zip(algo.summed_stats, extra, strict=True))}  # fmt: skip


def log_row(algo: Algorithm, step: int, stats: dict, bufs: list[Buffer], lr: float, seconds: float) -> dict:
    """The metrics line of one step: rewards and accuracy of the buffer's rollouts (every process's), the
    algorithm's columns, and the step's loss, gradient norm and throughput."""
    rows, totals = merge_for_log(bufs)
    r = rows["rewards"][torch.isfinite(rows["rewards"])]
    row = {
        "step": step,
        "loss": stats["loss"],
        "reward_mean": float(r.mean()) if r.numel() else float("nan"),
        "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
        "accuracy": float(rows["solved"].mean()),
        **algo.log_columns(rows, totals, stats),
    }
    for k, v in rows.items():  # rewards/<function>/mean, as TRL logs them
        if k.startswith("rewards/"):
            finite = v[torch.isfinite(v)]
            row[f"{k}/mean"] = float(finite.mean()) if finite.numel() else float("nan")
    return row | {
        "reward_failures": totals["n_failed"],
        "grad_norm": stats["grad_norm"],
        "lr": lr,
        "skipped": not stats["finite"],
        "masked_tokens": stats["masked_tokens"],
        "tokens_per_s": stats["masked_tokens"] / max(seconds, 1e-9),
        "seconds": seconds,
    }


def _prompts(train_rows: list, cfg: TrainConfig, buffer_index: int, procs: Processes) -> list:
    """This process's share of buffer ``buffer_index``'s prompts (the same draw in every process)."""
    rng = torch.Generator().manual_seed(derive_seed(cfg.seed, "prompts", buffer_index))
    picks = torch.randint(len(train_rows), (cfg.prompts_per_step,), generator=rng).tolist()
    n = cfg.prompts_per_step // procs.world
    return [train_rows[i] for i in picks[procs.rank * n : (procs.rank + 1) * n]]


def _saved_buffers(algo: Algorithm, saved, procs: Processes, step: int, cfg: TrainConfig):
    """(every process's buffers, this process's) of a resumed run; (None, None) draws a new one."""
    if saved is None:
        return None, None
    if isinstance(saved, dict):  # the oldest format: DMPO's buffer as one concatenated dict
        whole = algo.from_saved([saved])[0]
        n = len(whole) // procs.world
        return [whole], whole.slice(procs.rank * n, (procs.rank + 1) * n)
    if step % cfg.num_iterations == 0:
        return None, None
    if len(saved) != procs.world:
        raise ValueError(
            f"resume=true at step {step}, inside a rollout buffer written by {len(saved)} processes, with "
            f"{procs.world} processes: resume with {len(saved)} processes (or from a checkpoint at a "
            f"multiple of num_iterations={cfg.num_iterations})"
        )
    bufs = algo.from_saved(saved)
    return bufs, bufs[procs.rank]


def _wall_before(run: RunDir, state: dict) -> float:
    """Seconds the run had spent up to the checkpoint it resumes from (checkpoints of earlier releases do not
    say: a finished run's summary does)."""
    if "wall_seconds" in state:
        return float(state["wall_seconds"])
    import json

    try:
        summary = json.loads((run.path / "summary.json").read_text())
        return float(summary["wall_seconds"]) if summary.get("steps") == state["step"] else 0.0
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def train(cfg: TrainConfig | None = None) -> TrainResult:
    """Run the configured algorithm; returns the evaluations and where everything was written."""
    cfg = cfg or TrainConfig()
    t0 = time.time()
    procs = Processes(cfg)
    device = procs.device
    task, reward_fns = preflight(cfg, device)
    run = RunDir(cfg.output_dir, resume=cfg.resume, main=procs.main)
    latest, state = resume_point(run, cfg, main=procs.main) if cfg.resume else (None, None)
    torch.manual_seed(cfg.seed)
    algo = algorithms.get(cfg.algorithm)(cfg)
    policy, tokenizer = load_policy(cfg, device)
    reference = Reference(cfg, policy, uses=algo.needs_reference)
    needs_scorer = algo.needs_scorer or (cfg.eval_tts_k > 0 and cfg.effective_ppl_weight > 0)
    scorer = load_scorer(cfg, tokenizer, device) if needs_scorer else None
    for note in algo.notes() if procs.main else ():
        warnings.warn(note, stacklevel=2)
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
    lr_schedule = scheduler(cfg, optimizer)
    train_rows, eval_rows = task.train(seed=cfg.seed), task.test(cfg.eval_size, seed=cfg.seed)

    def evaluation(progress: bool = False) -> dict:
        with gathered():
            return evaluate(policy, tokenizer, task, eval_rows, cfg, reward_fns, procs=procs, progress=progress,
                            scorer=scorer)  # fmt: skip

    start, saved, eval_before, wall_before = 0, None, None, 0.0
    if state is not None:
        load_training_state(policy, optimizer, state, sharded=procs.fsdp, directory=latest)
        lr_schedule.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start, saved, eval_before = state["step"], state["buffer"], state["eval_before"]
        wall_before = _wall_before(run, state)
        del state  # the model and optimizer hold their copies now
        if procs.main:
            run.discard_checkpoints_after(start)
            run.truncate_metrics(start)
            print(f"resumed from {latest.name} (step {start})")
    else:
        if cfg.resume and procs.main:
            warnings.warn(
                f"resume=true but {str(run.path)!r} has no checkpoint: starting from step 0", stacklevel=2
            )
            run.truncate_metrics(0)  # the lines of a run killed before its first checkpoint
        run.write_config(cfg.to_dict())
        eval_before = evaluation(progress=cfg.progress)
        if procs.main:
            print(
                f"eval before: solve rate {eval_before['accuracy']:.3f}, reward {eval_before['reward_mean']:.3f}"
            )
    bufs, buf = _saved_buffers(algo, saved, procs, start, cfg)

    trackers = Trackers(run, cfg, main=procs.main)
    if start == 0:
        trackers.log_eval(eval_before, 0)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and procs.main), desc=cfg.algorithm,
               unit="step", dynamic_ncols=True)  # fmt: skip
    skipped_in_a_row = 0
    for step in range(start, cfg.max_steps):
        t_step = time.time()
        if step % cfg.num_iterations == 0 or buf is None:  # rollout -> reward -> buffer
            b = step // cfg.num_iterations
            mine = _prompts(train_rows, cfg, b, procs)
            with gathered():
                buf = make_buffer(algo, policy, reference, tokenizer, task, cfg, reward_fns, mine, b,
                                  first_row=procs.rank * len(mine) * cfg.num_generations, procs=procs,
                                  scorer=scorer)  # fmt: skip
            # Whole buffers, not concatenated tensors: their widths differ between processes when the
            # prompts' lengths do (left padding is per process).
            bufs = procs.gather_objects(buf)

        lr = lr_schedule.get_last_lr()[0]  # the rate this step's update uses
        stats = update(algo, policy, optimizer, params, buf, cfg, step, procs)  # loss -> step
        lr_schedule.step()
        skipped_in_a_row = 0 if stats["finite"] else skipped_in_a_row + 1
        if not stats["finite"] and procs.main:
            warnings.warn(
                f"step {step + 1}: non-finite loss, gradient or updated parameters, the update was skipped "
                "(the parameters and optimizer state are those before it)",
                stacklevel=1,
            )

        row = log_row(algo, step + 1, stats, bufs, lr, time.time() - t_step)
        if procs.main:
            run.log(row)
            trackers.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step + 1)
            if cfg.log_completions_every and (step + 1) % cfg.log_completions_every == 0:
                trackers.log_completions(buf.meta.get("samples", []), step + 1)
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
            ev = evaluation()
            if procs.main:
                run.log_eval(step + 1, ev)
                trackers.log_eval(ev, step + 1)
                bar.write(f"eval at step {step + 1}: solve rate {ev['accuracy']:.3f}, reward {ev['reward_mean']:.3f}")
        if stats["finite"] and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps):
            model_state, optimizer_state, fmt = training_state(policy, optimizer, sharded=procs.fsdp)
            # Only a model loaded with non-finite values gets here (updates that make them are undone).
            bad = non_finite_names(model_state) if procs.main else []
            if procs.sum([float(len(bad))])[0]:
                names = ", ".join(bad[:5]) or "named by the main process"
                raise RuntimeError(
                    f"step {step + 1}: the model holds non-finite values ({names}); no checkpoint was written "
                    f"over the last good one in {str(run.checkpoints)!r}"
                )
            if procs.main:
                run.save_checkpoint(
                    step + 1,
                    {
                        "optimizer": optimizer_state, "optimizer_format": fmt, "scheduler": lr_schedule.state_dict(),
                        "rng": torch.get_rng_state(), "step": step + 1, "buffer": [b.to_dict() for b in bufs],
                        "eval_before": eval_before, "config": cfg.to_dict(), "wall_seconds": wall_before + time.time() - t0,
                    },
                    keep=cfg.keep_checkpoints,
                    write_files=lambda d: save_model_files(policy, model_state, tokenizer, cfg, d),
                )  # fmt: skip
    bar.close()

    eval_after = evaluation(progress=cfg.progress)
    wall = wall_before + time.time() - t0  # every session of the run, up to its checkpoint, and this one
    if procs.main:
        print(f"eval after:  solve rate {eval_after['accuracy']:.3f}, reward {eval_after['reward_mean']:.3f}")
        sharding_name = (
            ("fsdp-zero3" if procs.reshard_after_forward else "fsdp-zero2") if procs.fsdp else "none"
        )
        run.write_summary({"eval_before": eval_before, "eval_after": eval_after, "steps": cfg.max_steps,
                           "wall_seconds": wall, "processes": procs.world, "sharding": sharding_name,
                           "config": cfg.to_dict()})  # fmt: skip
        trackers.log_eval(eval_after, cfg.max_steps)
        trackers.finish()
        if cfg.plot:
            run.plot(eval_before, eval_after)
    procs.close()
    return TrainResult(str(run.path), cfg.max_steps, eval_before, eval_after, wall, run.read_metrics(), procs.main)
