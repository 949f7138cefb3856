"""Benchmark: the wall time of one MRO rollout buffer against one DMPO buffer, as the trainer runs them.

One buffer, for each algorithm at its defaults (``TrainConfig(algorithm=...)``, nothing else changed):

    rollout    ``prompts`` x G completions with the run's sampler (``rollouts.rollout``: generate, decode,
               task reward)
    build      ``Algorithm.build``: DMPO's ELBO of the policy and the reference on the same masks and the
               importance weights; MRO's step rewards (token verification of every step), window returns,
               advantages
    update     ``num_iterations`` optimizer steps on the buffer (``trainer.update``: loss, backward, clip,
               AdamW): DMPO's WDCE; MRO's SGRO over the steps' states plus its denoising anchor

The two algorithms run on the same prompts, timed round-robin (dmpo, mro, dmpo, mro, ...), so a change in
the host's load slows both alike; each has its own policy, reference and optimizer (the work does not depend
on the weights' values beyond when rows stop). The row ``mro`` carries ``vs_dmpo``: its median buffer time
over DMPO's. Model: the built-in tiny Sudoku model (0.8M parameters, fp32), the trainer's shapes (24
completion tokens, 12 steps, G = 8); ``--prompts`` sets the prompts per buffer (default 8; the default run
uses 32).
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import check_target, environment, finish, parse, parser

PROVIDERS = ("dmpo", "mro")


def _setup(algorithm: str, prompts: int, group: int, device: torch.device):
    from dmpo_fast import algorithms
    from dmpo_fast.config import TrainConfig
    from dmpo_fast.policy import Reference, load_policy, load_scorer
    from dmpo_fast.processes import Processes
    from dmpo_fast.tasks import get_task

    cfg = TrainConfig(algorithm=algorithm, prompts_per_step=prompts, num_generations=group, device=device.type,
                      progress=False, tensorboard=False)  # fmt: skip
    algo = algorithms.get(algorithm)(cfg)
    policy, tokenizer = load_policy(cfg, device)
    reference = Reference(cfg, policy, uses=algo.needs_reference)
    scorer = load_scorer(cfg, tokenizer, device) if algo.needs_scorer else None
    task = get_task(cfg.task, **cfg.task_options())
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    rows = task.train(seed=0)[:prompts]
    procs = Processes(cfg)
    return dict(cfg=cfg, algo=algo, policy=policy, tokenizer=tokenizer, reference=reference, scorer=scorer,
                task=task, params=params, optimizer=optimizer, rows=rows, procs=procs)  # fmt: skip


def _buffer(s: dict, index: int) -> dict:
    """One buffer: rollout, build, num_iterations updates; the seconds of each phase."""
    from dmpo_fast import trainer

    algo, t = s["algo"], {}
    build = type(algo).build

    def timed_build(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = build(self, *args, **kwargs)
        t["build"] = time.perf_counter() - t0
        return out

    t0 = time.perf_counter()
    algo.build = timed_build.__get__(algo)
    try:
        buf = trainer.make_buffer(algo, s["policy"], s["reference"], s["tokenizer"], s["task"], s["cfg"],
                                  [s["task"].reward], s["rows"], index, procs=s["procs"],
                                  scorer=s["scorer"])  # fmt: skip
    finally:
        del algo.build
    t["rollout"] = time.perf_counter() - t0 - t["build"]
    t0 = time.perf_counter()
    for step in range(s["cfg"].num_iterations):
        trainer.update(algo, s["policy"], s["optimizer"], s["params"], buf, s["cfg"], step, s["procs"])
    t["update"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    return t


def run(args) -> list[dict]:
    device = torch.device(args.device)
    prompts, group, repeats = (2, 2, 1) if args.quick else (args.prompts, 8, args.repeats)
    setups = {name: _setup(name, prompts, group, device) for name in PROVIDERS}
    times = {name: [] for name in PROVIDERS}
    for i in range(repeats + 1):  # round 0 warms up
        for name in PROVIDERS:
            t = _buffer(setups[name], i)
            if i:
                times[name].append(t)
    rows = []
    for name in PROVIDERS:
        med = {k: statistics.median(t[k] for t in times[name]) * 1e3 for k in times[name][0]}
        cfg = setups[name]["cfg"]
        rows.append({
            "op": "rollout_buffer", "provider": name, "median_ms": med["total"], "rollout_ms": med["rollout"],
            "build_ms": med["build"], "update_ms": med["update"], "num_iterations": cfg.num_iterations,
            "shape": {"prompts": prompts, "group": group, "gen_length": cfg.gen_length, "steps": cfg.steps},
            "repeats": repeats, **environment(device),
        })  # fmt: skip
    for r in rows:
        r["vs_dmpo"] = r["median_ms"] / rows[0]["median_ms"]
    return rows


def targets(rows: list[dict]) -> None:
    """An MRO buffer within 1.5x a DMPO buffer's wall time (set for the CPU)."""
    mro = next(r for r in rows if r["provider"] == "mro")
    check_target("MRO buffer <= 1.5x DMPO's", f"{mro['vs_dmpo']:.2f}x", mro["vs_dmpo"] <= 1.5)


def main(argv=None):
    p = parser("mro_cost", __doc__)
    p.add_argument("--prompts", type=int, default=8, help="prompts per buffer (G = 8 rollouts each)")
    p.add_argument("--repeats", type=int, default=3, help="timed buffers per algorithm")
    args = parse(p, argv)
    if args.prompts < 1 or args.repeats < 1:
        p.error("--prompts and --repeats must be >= 1")
    rows = run(args)
    columns = ["provider", "median_ms", "rollout_ms", "build_ms", "update_ms", "num_iterations", "vs_dmpo"]
    return finish(rows, "mro_cost", args, columns, targets)


if __name__ == "__main__":
    raise SystemExit(main())
