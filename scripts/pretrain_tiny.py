"""Pretrain a built-in tiny model: masked-diffusion training on a procedural task, on a CPU.

    python scripts/pretrain_tiny.py                      # 4x4 Sudoku: writes dmpo_fast/assets/tiny_sudoku/
    python scripts/pretrain_tiny.py --task countdown     # Countdown: writes dmpo_fast/assets/tiny_countdown/
    python scripts/pretrain_tiny.py --steps 300 --out my_tiny --eval-every 50

The model is ``dmpo_fast.models.build_tiny`` over the character tokenizer (55 ids). Each training
sequence is a task prompt followed by its reference answer (the solved grid, or an expression reaching the
Countdown target) and EOS padding up to ``--gen-length`` tokens, the layout the default run decodes. The
loss is LLaDA's supervised masked-diffusion objective: a rate t ~ U(eps, 1) per sequence, every
completion token (EOS padding included, the prompt never) masked with probability t, and the
cross-entropy of the masked tokens weighted by 1/t and divided by the completion length.

Training stops on purpose long before the model is good: the default run starts from this checkpoint
and must have room to improve by reinforcement learning. ``--steps`` is the one knob; the committed
model's value and its held-out solve rate at every evaluation are written to ``pretrain.json`` next to
the weights, together with the exact command line, so the asset can be rebuilt and checked.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dmpo_fast.assets import ASSETS, TINY_ASSETS, TINY_TASK_KWARGS
from dmpo_fast.models import build_tiny, save_llada
from dmpo_fast.sampling import generate
from dmpo_fast.tasks import get_task
from dmpo_fast.tokenizer import CharTokenizer

TASKS = tuple(TINY_ASSETS.values())  # sudoku, countdown
# --gen-length per task: the trainer's default of 24 completion tokens fits both. Sudoku's answer is the
# 19-character grid; a Countdown reference is at most 15 characters (four numbers of at most 2 digits,
# 3 operators, at most 2 pairs of parentheses since the root is never wrapped) and 10 on average.
GEN_LENGTH = {"sudoku": 24, "countdown": 24}
# The committed models' --steps per task (the task options are dmpo_fast.assets.TINY_TASK_KWARGS). On its
# easier problem set the Countdown model plateaus near a 5% solve rate after about 1250 steps.
STEPS = {"sudoku": 160, "countdown": 2000}


def default_out(task: str) -> Path:
    """dmpo_fast/assets/tiny_<task>/ (the directory ``dmpo_fast.assets.load_tiny`` reads)."""
    return ASSETS / f"tiny_{task}"


def encode_pairs(
    tok: CharTokenizer, rows: list[dict], gen_length: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids [N, P + gen_length], attention mask, P): prompts left-padded, completions EOS-padded."""
    prompt_ids, prompt_am = tok.batch_encode([r["prompt"] for r in rows], pad_left=True)
    comp = torch.full((len(rows), gen_length), tok.eos_id, dtype=torch.long)
    for i, r in enumerate(rows):
        c = tok.encode(r["reference"])
        if len(c) > gen_length:
            raise ValueError(
                f"--gen-length {gen_length} is shorter than a reference completion ({len(c)} tokens)"
            )
        comp[i, : len(c)] = torch.tensor(c)
    ids = torch.cat([prompt_ids, comp], dim=1)
    am = torch.cat([prompt_am, torch.ones_like(comp)], dim=1)
    return ids, am, prompt_ids.shape[1]


def diffusion_loss(lm, ids, am, P: int, gen: torch.Generator, eps: float = 1e-3) -> torch.Tensor:
    N, L = ids.shape
    t = eps + (1 - eps) * torch.rand(N, 1, generator=gen)
    masked = torch.rand(N, L, generator=gen) < t
    masked[:, :P] = False
    noisy = ids.masked_fill(masked, lm.mask_id)
    logits = lm.logits(noisy, am)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten(), reduction="none").view(N, L)
    return ((ce * masked) / t).sum() / (N * (L - P))


@torch.no_grad()
def solve_rate(lm, tok, task, rows, *, gen_length: int, steps: int) -> tuple[float, float]:
    """(solve rate, mean reward) with greedy Fast-dLLM decoding: the default run's evaluation."""
    lm.eval()
    ids, am = tok.batch_encode([r["prompt"] for r in rows], pad_left=True)
    out = generate(lm, ids, am, sampler="fast_dllm", gen_length=gen_length, block_length=gen_length,
                   steps=steps, temperature=0.0, cache="prefix", seed=0)  # fmt: skip
    lm.train()
    completions = tok.batch_decode(
        out.ids[:, out.prompt_length :].tolist(), skip_special=True, stop_at_eos=True
    )
    columns = {k: [r[k] for r in rows] for k in task.reward_columns}
    prompts = [r["prompt"] for r in rows]
    solved = task.is_correct(prompts, completions, **columns)
    reward = task.reward(prompts, completions, **columns)
    return sum(solved) / len(rows), sum(reward) / len(rows)


def _without_out(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default="sudoku", help="the task whose rows it trains on")
    p.add_argument("--task-kwargs", default=None,
                   help="the task's options as a YAML mapping, e.g. '{num_counts: [3], max_number: 9}' (default: "
                   "dmpo_fast.assets.TINY_TASK_KWARGS; the trainer must be given the same task_kwargs)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: STEPS, the committed models')")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--gen-length", type=int, default=None, help="completion tokens (default: GEN_LENGTH)")
    p.add_argument("--eval-steps", type=int, default=12, help="denoising steps of the evaluation decode")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="default: dmpo_fast/assets/tiny_<task>/")
    args = p.parse_args(argv)
    if args.gen_length is None:
        args.gen_length = GEN_LENGTH[args.task]
    if args.steps is None:
        args.steps = STEPS[args.task]
    out = args.out if args.out is not None else default_out(args.task)
    for name in ("steps", "batch_size", "gen_length", "eval_steps", "eval_every", "eval_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    import yaml

    if args.task_kwargs is None:
        task_kwargs = TINY_TASK_KWARGS[f"tiny_{args.task}"]
    else:
        task_kwargs = yaml.safe_load(args.task_kwargs) or {}
    if not isinstance(task_kwargs, dict):
        p.error(f"--task-kwargs must be a YAML mapping such as '{{max_number: 9}}', got {args.task_kwargs!r}")
    args.task_kwargs = task_kwargs
    torch.set_num_threads(args.threads)
    tok = CharTokenizer()
    task = get_task(args.task, **task_kwargs)
    lm = build_tiny(tok.vocab_size, tok.mask_id, tok.eos_id, seed=args.seed)
    # The run's seed differs from the pretraining seed, so the RL run never replays these puzzles.
    train_rows = task.train(n=args.steps * args.batch_size // 4, seed=10_000 + args.seed)
    test_rows = task.test(args.eval_size, seed=0)  # the default run's held-out puzzles (seed 0)
    ids_all, am_all, P = encode_pairs(tok, train_rows, args.gen_length)

    opt = torch.optim.AdamW(lm.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))),
    )
    gen = torch.Generator().manual_seed(args.seed)
    log, t0 = [], time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(train_rows), (args.batch_size,), generator=gen)
        loss = diffusion_loss(lm, ids_all[idx], am_all[idx], P, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.eval_every == 0 or step == args.steps:
            acc, reward = solve_rate(
                lm, tok, task, test_rows, gen_length=args.gen_length, steps=args.eval_steps
            )
            log.append({"step": step, "loss": round(loss.item(), 4), "solve_rate": acc,
                        "reward": round(reward, 4), "seconds": round(time.time() - t0, 1)})  # fmt: skip
            print(json.dumps(log[-1]), flush=True)

    out.mkdir(parents=True, exist_ok=True)
    save_llada(lm.model, str(out))
    tok.save(str(out))
    given = sys.argv[1:] if argv is None else argv
    record = {
        # The command without --out, so the record names no machine path.
        "command": "python scripts/pretrain_tiny.py " + shlex.join(_without_out(given)),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "log": log,
    }
    (out / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
