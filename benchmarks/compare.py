"""The method comparison: base vs DMPO vs diffu-GRPO vs MRO (RL and rejection sampling) vs wd1 on the tiny models, equal rollout budget, seeds.

    python -m benchmarks compare                          # 2 tasks x 5 methods x 3 seeds (hours on a CPU)
    python -m benchmarks compare --tasks sudoku --methods base,dmpo --seeds 0 --quick    # the plumbing

For every task x method x seed it trains the task's tiny model (``TASKS``) with the method's settings
(``METHODS``) on the same rollout budget (``BUDGET``: prompts per buffer x rollouts per prompt x buffers,
so every method sees the same number of rollouts; optimizer steps = buffers x the method's
``num_iterations``), logging the held-out accuracy every few buffers (``eval_every``). The final model is
then decoded three ways at the run's 12 denoising steps (greedy; sampled at T = 0.7; test-time scaling
with k = 4 candidates at T = 0.7, ranked by MRO's token verification and perplexity and the majority vote of their answers,
never by the truth) and greedily
at 4, 8, 12 and 24 steps. "base" is the untrained model through the same evaluations. The held-out rows
depend on the seed (``task.test(eval_size, seed)``), so methods are compared seed by seed.

Output: one JSON file of rows per task, ``<out>/compare-<task>-<device>-<date>.json`` (``quick`` instead of
the device for --quick rows, which measure nothing; the rows of methods the sweep did not run are carried
over from the task's newest earlier file, so sweeping one method keeps the others'), PNG plots next to it, and the markdown report
(``write_report``, default ``docs/comparison.md``; --quick writes ``<out>/comparison-quick.md``).

Resumable: each run lives in ``<runs>/<task>/<method>/seed<k>`` (default ``runs/compare``). A run whose
``summary.json`` exists is not trained again, an interrupted one resumes from its newest checkpoint, and the
evaluations of a finished run are kept in its ``compare_rows.json``; a finished run with other settings is
refused (choose another --runs). A missing tiny Countdown model is built first
(``scripts/pretrain_tiny.py --task countdown``), except with --quick, which stops with the command instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, environment
from benchmarks.compare_report import plot_task, write_report
from dmpo_fast.assets import TINY_TASK_KWARGS
from dmpo_fast.config import SAVED_WITHOUT, TrainConfig
from dmpo_fast.run_io import RunDir, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "comparison.md"

# Each method's settings on top of TrainConfig's defaults (the embedded DMPO run's). The learning rate is
# the same for all: Adam's update size is set by the learning rate, not by the scale of the loss.
METHODS: dict[str, dict] = {
    # The untrained model: evaluations only.
    "base": {},
    # DMPO: TrainConfig's defaults (WDCE, alpha 0.04, baseline none with tied groups dropped, F = 2
    # optimizer steps per buffer).
    "dmpo": {"algorithm": "dmpo"},
    # d1's diffu-GRPO: mu = 2 updates per buffer (DMPO's F, so both take the same optimizer steps), the
    # GRPO paper's clip 0.2, d1's KL coefficient 0.04 to the frozen starting model. Its rate per task is in
    # RATES (Sudoku seed-0 sweep: 0.500 / 0.485 / 0.460 at 3e-5 / 1e-4 / 3e-4, and 0.305 at 1e-3).
    "diffu_grpo": {"algorithm": "diffu_grpo", "num_iterations": 2, "grpo_epsilon": 0.2, "grpo_beta": 0.04},
    # MRO-RL at its defaults (docs/mro.md): SGRO over windows of 8 steps with the group baseline, one state
    # of each window per optimizer step, token verification of one drawn token per step (leave-one-out
    # context) and the perplexity reward of the task's built-in scorer, plus the masked-diffusion anchor on
    # each group's best rollout (mro_anchor=best); F = 2 (its default is 1) so it takes DMPO's optimizer steps. The earlier row
    # (num_iterations 1, windows of 4, verification "final", rate 3e-5, no anchor) stayed at the untrained
    # model's 0.478 on Sudoku: at 3e-4 the bare REINFORCE loss wore the denoiser down (0.435 -> 0.000 by
    # buffer 15), and at 3e-5 it barely moved.
    "mro": {"algorithm": "mro", "num_iterations": 2},
    # MRO's rejection sampling: each prompt's 8 rollouts decoded as one step-wise group (branching every 4
    # model calls on the step rewards), the best by token verification + perplexity + task reward kept when
    # it is solved (rs_keep's mro_rs default), masked-diffusion SFT on it (F = 2 steps per buffer, as DMPO).
    "mro_rs": {"algorithm": "mro_rs"},
    # wd1 (arXiv 2507.08838): its code's settings (psi = lambda = 1, prompt masking 0.15, a fresh prompt mask
    # per update) with mu = 2 updates per buffer, so it takes DMPO's optimizer steps. Learning rate 3e-5: in
    # Sudoku seed-0 probes with this budget the shared 3e-4 collapsed (0.435 -> 0.000 held-out by buffer 15),
    # 1e-4 drifted down (0.095 at the end) and 3e-5 held (0.425). Its loss sums the one-step log-probs of
    # every completion token, so, like MRO's REINFORCE, it moves this small denoiser far per step.
    "wd1": {"algorithm": "wd1", "num_iterations": 2, "learning_rate": 3e-5},
}
# The comparison's learning rate of a method on a task: the best of that task's seed-0 sweep
# (--learning-rates; the sweep tables at the end of docs/comparison.md). A method not listed runs at its
# METHODS / TrainConfig rate.
# A run at this rate lives in <runs>/<task>/<method>/seed<k> and is shared by the sweep and the comparison.
RATES: dict[str, dict[str, float]] = {
    # Held-out accuracy after 60 buffers at 3e-5 / 1e-4 / 3e-4, from 0.435 untrained: DMPO 0.545 / 0.635 /
    # 0.740, diffu-GRPO 0.500 / 0.485 / 0.460, wd1 0.425 / 0.095 / 0.000, mro_rs 0.520 / 0.645 / 0.710
    # (keeping every group's best before rs_keep: 0.400 / 0.360 / 0.000), MRO-RL 0.425 / 0.275 / 0.000.
    "sudoku": {"dmpo": 3e-4, "diffu_grpo": 3e-5, "wd1": 3e-5, "mro_rs": 3e-4, "mro": 3e-5},
    # From 0.045 untrained: DMPO 0.040 / 0.110 / 0.165, diffu-GRPO 0.060 / 0.055 / 0.100, wd1 0.065 / 0.075 /
    # 0.070, mro_rs 0.030 / 0.090 / 0.140, MRO-RL 0.025 / 0.025 / 0.010 (a tie: its default, 3e-5).
    "countdown": {"dmpo": 3e-4, "diffu_grpo": 3e-4, "wd1": 1e-4, "mro_rs": 3e-4, "mro": 3e-5},
}
# The tiny model and task options of each task. Sudoku rewards a solved grid, as the embedded run does.
TASKS: dict[str, dict] = {
    "sudoku": {"model": "tiny", "task": "sudoku", "task_kwargs": {"reward_type": "solved"}},
    # The problem set the tiny Countdown model was pretrained on (three single-digit numbers).
    "countdown": {
        "model": "tiny_countdown",
        "task": "countdown",
        "task_kwargs": TINY_TASK_KWARGS["tiny_countdown"],
    },
}
# The rollout budget of every method: the embedded run's 32 prompts x 8 rollouts, 60 buffers (DMPO's 120
# steps), an evaluation on 200 held-out problems every 15 buffers.
BUDGET = {
    "prompts_per_step": 32,
    "num_generations": 8,
    "buffers": 60,
    "eval_every_buffers": 15,
    "eval_size": 200,
}
QUICK_BUDGET = {
    "prompts_per_step": 2,
    "num_generations": 2,
    "buffers": 2,
    "eval_every_buffers": 1,
    "eval_size": 4,
}
STEPS_SWEEP = (4, 8, 12, 24)  # denoising steps of the greedy decodes of the final model (24 tokens)
# Test-time scaling against plain decoding, both at the run's denoising steps (TrainConfig.steps).
# The candidates are ranked by MRO's step rewards of the last window (token verification, and the perplexity
# of the task's built-in scorer) and the paper's quality reward
# by majority vote of the candidates' answers (never the truth).
TTS = {"k": 4, "temperature": 0.7, "window": 4, "verification": "final", "vote": True}
SEEDS = (0, 1, 2)
# The learning-rate sweep (--learning-rates): every method at each rate on seed 0, before the best rate per
# method runs on every seed.
LEARNING_RATES = (3e-5, 1e-4, 3e-4)
# Config fields that may differ between a saved run and the one asked for.
VOLATILE = ("resume", "progress", "output_dir")


class CompareError(ValueError):
    """The sweep cannot go on as asked: a run directory holds other settings, or a model is missing."""


def _split(value: str, name: str, allowed) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"{name} must list at least one of {', '.join(map(str, allowed))}")
    bad = [v for v in items if v not in allowed]
    if bad:
        raise ValueError(f"{name}: unknown {', '.join(bad)}; allowed: {', '.join(map(str, allowed))}")
    return items


def _parse_list(value: str, cast, ok, message: str) -> list:
    try:
        items = [cast(v) for v in value.split(",") if v.strip()]
    except ValueError:
        items = []
    if not items or not all(ok(v) for v in items):
        raise ValueError(f"{message}, got {value!r}")
    return items


def parse_seeds(value: str) -> list[int]:
    return _parse_list(value, int, lambda s: s >= 0, "--seeds must be comma-separated ints >= 0 (e.g. 0,1,2)")


def parse_rates(value: str) -> list[float]:
    message = "--learning-rates must be comma-separated numbers > 0 (e.g. 3e-5,1e-4,3e-4)"
    return _parse_list(value, float, lambda r: math.isfinite(r) and r > 0, message)


def run_config(task: str, method: str, seed: int, *, runs: Path, quick: bool, device: str,
               learning_rate: float | None = None) -> TrainConfig:  # fmt: skip
    """The TrainConfig of one run: the task's model, the method's settings at its rate on the task
    (``RATES``, else its own default), the shared budget. ``learning_rate`` (the sweep) replaces that rate;
    a run at another rate lives in ``<method>/lr<rate>/seed<k>``, one at the comparison's rate is the
    comparison's run."""
    budget = QUICK_BUDGET if quick else BUDGET
    settings = dict(METHODS[method])
    own_keys = ("algorithm", "num_iterations", "learning_rate")
    own = TrainConfig(**{k: v for k, v in settings.items() if k in own_keys})
    F = own.num_iterations
    every = budget["eval_every_buffers"] * F
    path = runs / task / method
    if method != "base":
        settings["learning_rate"] = RATES.get(task, {}).get(method, own.learning_rate)
    if learning_rate is not None and learning_rate != settings.get("learning_rate"):
        settings["learning_rate"] = learning_rate
        path = path / f"lr{learning_rate:g}"
    return TrainConfig(
        **TASKS[task], **settings, prompts_per_step=budget["prompts_per_step"],
        num_generations=budget["num_generations"], max_steps=budget["buffers"] * F, eval_every=every,
        save_every=every, keep_checkpoints=1, eval_size=budget["eval_size"], seed=seed, device=device,
        output_dir=str(path / f"seed{seed}"), progress=False, tensorboard=False, plot=False,
    )  # fmt: skip


def _comparable(config: dict) -> dict:
    """A config as saved in JSON (tuples become lists), without the fields a rerun may change."""
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in VOLATILE}


def _changed(saved: dict, cfg: TrainConfig) -> list[str]:
    """Fields whose value differs; a field added to TrainConfig after the run was saved counts only when it
    is set away from what the saved run did (``config.SAVED_WITHOUT``, else the field's default)."""
    now, saved = _comparable(cfg.to_dict()), _comparable(saved)
    defaults = {**_comparable(TrainConfig().to_dict()), **SAVED_WITHOUT}  # what a run without the field did
    return sorted(
        k for k in now.keys() | saved.keys()
        if now.get(k) != saved.get(k) and not (k not in saved and now.get(k) == defaults.get(k))
    )  # fmt: skip


def ensure_model(task: str, *, quick: bool) -> None:
    """Load the task's tiny model once; build it first if it is missing (not with ``quick``)."""
    from dmpo_fast.assets import TINY_MODELS, build_command, load_tiny

    name = TINY_MODELS[TASKS[task]["model"]]
    try:
        load_tiny(name=name)
        return
    except FileNotFoundError as e:
        if quick:
            raise CompareError(str(e)) from e
    command = build_command(name)
    print(f"{name} is missing: building it with `{command}`", flush=True)
    subprocess.run([sys.executable, *command.split()[1:]], cwd=ROOT, check=True)
    load_tiny(name=name)


def train_run(cfg: TrainConfig) -> str | None:
    """Train unless the run directory holds a finished run (None); resume an interrupted one ("resumed")."""
    from dmpo_fast.trainer import train

    path = Path(cfg.output_dir)
    summary = path / "summary.json"
    if summary.is_file():
        changed = _changed(json.loads(summary.read_text())["config"], cfg)
        if changed:
            raise CompareError(
                f"{path} holds a finished run with other settings ({', '.join(changed)}); pass another "
                "--runs or remove that directory"
            )
        return None
    resume = path.is_dir() and RunDir(path, resume=True, main=False).latest_checkpoint() is not None
    if path.is_dir() and not resume:  # killed before its first checkpoint: nothing to resume from
        if any(path.iterdir()) and not (path / "config.yaml").is_file():
            raise CompareError(f"{path} is not empty and not a run directory; pass another --runs")
        shutil.rmtree(path)
    train(cfg.replace(resume=resume))
    return "resumed" if resume else "trained"


def _curve_rows(cfg: TrainConfig) -> list[dict]:
    """Held-out accuracy after 0, every eval_every, ... max_steps optimizer steps of a finished run."""
    run = RunDir(cfg.output_dir, resume=True, main=False)
    summary = json.loads((run.path / "summary.json").read_text())
    seconds = [m["seconds"] for m in run.read_metrics()]
    points = [(0, summary["eval_before"])]
    points += [(e["step"], e) for e in run.read_evals()]
    points.append((summary["steps"], summary["eval_after"]))
    rows = []
    for step, ev in points:
        buffers = math.ceil(step / cfg.num_iterations)
        rows.append({
            "kind": "curve", "step": step, "buffers": buffers, "rollouts": buffers * cfg.rollouts_per_step,
            "accuracy": ev["accuracy"], "reward": ev["reward_mean"], "n": ev["n"],
            "wall_seconds": round(sum(seconds[:step]), 2),
            "run_wall_seconds": round(summary["wall_seconds"], 2),
        })  # fmt: skip
    return rows


def _eval_rows(cfg: TrainConfig, checkpoint: str | None) -> list[dict]:
    """The final model (or the base model) decoded greedily at STEPS_SWEEP steps, and greedy / sampled /
    test-time scaling at the run's steps."""
    from dmpo_fast.trainer import evaluate_model

    def one(kind: str, c: TrainConfig, **labels) -> dict:
        ev = evaluate_model(c, checkpoint=checkpoint)[0]
        return {"kind": kind, **labels, "denoising_steps": c.steps, "temperature": c.eval_temperature,
                "tts_k": c.eval_tts_k, "accuracy": ev["accuracy"], "reward": ev["reward_mean"], "n": ev["n"],
                "wall_seconds": ev["seconds"]}  # fmt: skip

    greedy = cfg.replace(eval_temperature=0.0, eval_tts_k=0)
    rows = [one("steps", greedy.replace(steps=s)) for s in STEPS_SWEEP]
    if checkpoint is None:  # the base model has no run: its curve is one point
        rows.insert(0, {**one("curve", greedy), "step": 0, "buffers": 0, "rollouts": 0})
    sampled = greedy.replace(eval_temperature=TTS["temperature"], mro_verification=TTS["verification"],
                             mro_tts_vote=TTS["vote"])
    rows += [
        one("tts", greedy, decode="greedy"),
        one("tts", sampled, decode="sampled"),
        one(
            "tts",
            sampled.replace(eval_tts_k=TTS["k"], eval_tts_window=TTS["window"]),
            decode=f"tts k={TTS['k']}",
        ),
    ]
    return rows


def run_rows(task: str, method: str, cfg: TrainConfig) -> tuple[list[dict], str]:
    """Every row of one run (training first when needed), cached in the run's compare_rows.json."""
    path = Path(cfg.output_dir)
    trained = None if method == "base" else train_run(cfg)
    cache = path / "compare_rows.json"
    key = {"config": _comparable(cfg.to_dict()), "steps_sweep": list(STEPS_SWEEP), "tts": TTS}
    if trained is None and cache.is_file():
        saved = json.loads(cache.read_text())
        same = {**saved["key"], "config": None} == {**key, "config": None}
        if same and not _changed(saved["key"]["config"], cfg):  # a field added since at its old behaviour
            return saved["rows"], ("evaluated" if method == "base" else "finished") + " before, skipped"
    rows = [] if method == "base" else _curve_rows(cfg)
    rows += _eval_rows(cfg, None if method == "base" else cfg.output_dir)
    base = {"benchmark": "compare", "task": task, "method": method, "seed": cfg.seed,
            "settings": METHODS[method], "learning_rate": None if method == "base" else cfg.learning_rate,
            "config": _nondefault(cfg)}  # fmt: skip
    env = environment(torch.device(cfg.device))
    rows = [{**base, **r, **env} for r in rows]
    atomic_write_text(cache, json.dumps({"key": key, "rows": rows}, indent=1) + "\n")
    return rows, "evaluated" if method == "base" else f"{trained or 'finished before'}, evaluated"


def _nondefault(cfg: TrainConfig) -> dict:
    """The fields of cfg that differ from TrainConfig's defaults (with the commit, the whole config)."""
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    now = json.loads(json.dumps(cfg.to_dict()))
    return {k: v for k, v in now.items() if v != defaults[k] and k not in VOLATILE}


def _other_methods(task: str, methods: list[str], out, device: str) -> list[dict]:
    """The rows of the methods this sweep did not run, from the newest earlier JSON of the task: sweeping
    one method replaces its rows and keeps the others' (each row names the commit that measured it)."""
    earlier = sorted(Path(out).glob(f"compare-{task}-{device}-*.json"))
    if not earlier:
        return []
    return [r for r in json.loads(earlier[-1].read_text()) if r["method"] not in methods]


def report_inputs(paths, out, device: str, *, kind: str = "compare") -> list[Path]:
    """The JSON files of the report, one per task in TASKS order: this sweep's own, and for every task it did
    not run the newest ``<kind>-<task>-<device>-<date>.json`` already in ``out``, so sweeping one task
    rewrites its section of the report and keeps the others'. ``kind``: "compare", or "compare-sweep" for
    the learning-rate sweeps."""
    paths = [Path(p) for p in paths]
    chosen = []
    for task in TASKS:
        mine = [p for p in paths if p.name.startswith(f"{kind}-{task}-")]
        earlier = sorted(Path(out).glob(f"{kind}-{task}-{device}-*.json"))  # ISO dates: newest last
        chosen += mine or earlier[-1:]
    return chosen


def compare(tasks, methods, seeds, *, out: Path = RESULTS, runs: Path | None = None, quick: bool = False,
            device: str = "cpu", report: Path | None = None) -> list[Path]:  # fmt: skip
    """Run (or resume) the sweep, write the JSON rows and plots per task and the report. The JSON paths."""
    tasks = _split(",".join(tasks), "tasks", TASKS)
    methods = _split(",".join(methods), "methods", METHODS)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be ints >= 0, got {seeds!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    runs = Path(runs) if runs is not None else ROOT / "runs" / ("compare-quick" if quick else "compare")
    for task in tasks:
        ensure_model(task, quick=quick)
    date = datetime.date.today().isoformat()
    jobs = [(t, m, s) for t in tasks for m in methods for s in seeds]
    paths, by_task = [], {t: [] for t in tasks}
    for i, (task, method, seed) in enumerate(jobs, 1):
        cfg = run_config(task, method, seed, runs=runs, quick=quick, device=device)
        head = f"[{i}/{len(jobs)}] {task} {method} seed {seed}"
        print(f"{head}: {cfg.max_steps} steps of {cfg.rollouts_per_step} rollouts" if method != "base"
              else f"{head}: evaluations of the untrained model", flush=True)  # fmt: skip
        t = time.time()
        rows, done = run_rows(task, method, cfg)
        curve = [f"{r['accuracy']:.3f}" for r in rows if r["kind"] == "curve"]
        print(
            f"{head}: {done} in {time.time() - t:.0f} s; held-out accuracy {' -> '.join(curve)}", flush=True
        )
        by_task[task] += [{**r, "quick": quick} for r in rows]
    for task in tasks:
        path = Path(out) / f"compare-{task}-{'quick' if quick else device}-{date}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [] if quick else _other_methods(task, methods, out, device)
        path.write_text(json.dumps(kept + by_task[task], indent=1) + "\n")
        pngs = plot_task(path)
        print(f"wrote {path}" + "".join(f"\nwrote {p}" for p in pngs))
        paths.append(path)
    report = Path(report) if report is not None else (Path(out) / "comparison-quick.md" if quick else REPORT)
    write_report(paths if quick else report_inputs(paths, out, device), report,
                 sweep_paths=[] if quick else report_inputs([], out, device, kind="compare-sweep"),
                 sweep_rates=LEARNING_RATES)  # fmt: skip
    print(f"wrote {report}")
    return paths


def sweep(tasks, methods, rates, *, seed: int = 0, out: Path = RESULTS, runs: Path | None = None,
          quick: bool = False, device: str = "cpu", report: Path | None = None) -> list[Path]:  # fmt: skip
    """The learning-rate sweep: every method at every rate on one seed, trained (or resumed) with the
    comparison's budget; its held-out curves go to ``compare-sweep-<task>-<device>-<date>.json`` (rows of
    (method, rate) pairs this sweep did not run are carried over from the newest earlier file) and the
    report's sweep table. The JSON paths."""
    tasks = _split(",".join(tasks), "tasks", TASKS)
    methods = _split(",".join(methods), "methods", [m for m in METHODS if m != "base"])
    if not rates or any(not isinstance(r, float) or not r > 0 for r in rates):
        raise ValueError(f"learning rates must be numbers > 0, got {rates!r}")
    runs = Path(runs) if runs is not None else ROOT / "runs" / ("compare-quick" if quick else "compare")
    for task in tasks:
        ensure_model(task, quick=quick)
    date = datetime.date.today().isoformat()
    jobs = [(t, m, r) for t in tasks for m in methods for r in rates]
    by_task = {t: [] for t in tasks}
    for i, (task, method, rate) in enumerate(jobs, 1):
        cfg = run_config(task, method, seed, runs=runs, quick=quick, device=device, learning_rate=rate)
        head = f"[{i}/{len(jobs)}] sweep {task} {method} lr {rate:g} seed {seed}"
        print(f"{head}: {cfg.max_steps} steps of {cfg.rollouts_per_step} rollouts", flush=True)
        t = time.time()
        done = train_run(cfg) or "finished before"
        rows = [{"benchmark": "compare-sweep", "task": task, "method": method, "seed": seed,
                 "learning_rate": rate, "settings": METHODS[method], "config": _nondefault(cfg), **r,
                 **environment(torch.device(cfg.device)), "quick": quick} for r in _curve_rows(cfg)]  # fmt: skip
        curve = [f"{r['accuracy']:.3f}" for r in rows]
        print(f"{head}: {done} in {time.time() - t:.0f} s; held-out accuracy {' -> '.join(curve)}",
              flush=True)  # fmt: skip
        by_task[task] += rows
        _write_sweep(task, by_task[task], out=out, device=device, quick=quick, date=date)  # after every run
    paths = [_write_sweep(t, by_task[t], out=out, device=device, quick=quick, date=date) for t in tasks]
    print("".join(f"wrote {p}\n" for p in paths), end="")
    report = Path(report) if report is not None else (Path(out) / "comparison-quick.md" if quick else REPORT)
    main_inputs = [] if quick else report_inputs([], out, device)
    sweeps = paths if quick else report_inputs(paths, out, device, kind="compare-sweep")
    write_report(main_inputs, report, sweep_paths=sweeps, sweep_rates=rates)
    print(f"wrote {report}")
    return paths


def _write_sweep(task: str, rows: list[dict], *, out, device: str, quick: bool, date: str) -> Path:
    """``compare-sweep-<task>-<device>-<date>.json``: ``rows``, and the rows of the (method, rate) pairs they
    do not cover from the task's newest sweep file (this one, when a run of the same day wrote it)."""
    path = Path(out) / f"compare-sweep-{task}-{'quick' if quick else device}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    ran = {(r["method"], r["learning_rate"]) for r in rows}
    earlier = [] if quick else sorted(Path(out).glob(f"compare-sweep-{task}-{device}-*.json"))
    kept = []
    if earlier:
        kept = json.loads(earlier[-1].read_text())
        kept = [r for r in kept if (r["method"], r["learning_rate"]) not in ran]
    atomic_write_text(path, json.dumps(kept + rows, indent=1) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks compare", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated ints")
    p.add_argument("--quick", action="store_true", help="tiny budget: checks the plumbing, measures nothing")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON rows and plots")
    p.add_argument("--runs", type=Path, default=None, help="run directories (default runs/compare)")
    p.add_argument("--report", type=Path, default=None, help="markdown report (default docs/comparison.md)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--learning-rates", default=None, metavar="RATES",
        help=f"the learning-rate sweep instead: every method at each rate (comma-separated, e.g. "
        f"{','.join(f'{r:g}' for r in LEARNING_RATES)}) on the first of --seeds",
    )  # fmt: skip
    args = p.parse_args(argv)
    try:
        tasks = _split(args.tasks, "--tasks", TASKS)
        methods = _split(args.methods, "--methods", METHODS)
        seeds = parse_seeds(args.seeds)
        rates = parse_rates(args.learning_rates) if args.learning_rates is not None else None
        if rates is not None and "base" in methods:
            methods = [m for m in methods if m != "base"]  # the untrained model has no rate
            if not methods:
                raise ValueError("--learning-rates needs a trained method in --methods, not only base")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
    except ValueError as e:
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if rates is not None:
            sweep(tasks, methods, rates, seed=seeds[0], out=args.out, runs=args.runs, quick=args.quick,
                  device=args.device, report=args.report)  # fmt: skip
        else:
            compare(tasks, methods, seeds, out=args.out, runs=args.runs, quick=args.quick, device=args.device,
                    report=args.report)  # fmt: skip
    except CompareError as e:  # a missing model (with --quick), a finished run with other settings
        print(f"python -m benchmarks compare: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
