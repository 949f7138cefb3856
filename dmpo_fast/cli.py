"""The ``dmpo-fast`` command line.

    dmpo-fast train                                       # the default: DMPO on the tiny Sudoku model
    dmpo-fast train --config configs/llada8b_gsm8k.yaml learning_rate=3e-6 max_steps=200
    dmpo-fast train --output-dir runs/x --resume          # continue a run from its newest checkpoint
    dmpo-fast eval --checkpoint runs/x --gen-lengths 24 48 --sampler llada
    dmpo-fast eval --checkpoint runs/x --tts-k 4 eval_temperature=0.7   # MRO test-time scaling
    dmpo-fast config                                      # print every field and its default, as YAML
    dmpo-fast info                                        # versions and usable kernel backends
    dmpo-fast build-native                                # compile the native CPU ops once (about a minute)

Every ``TrainConfig`` field can be set as ``key=value`` after the options (values are YAML scalars:
``lora=true``, ``ess_target=null``, ``lora_target_modules=[q_proj,v_proj]``); overrides win over
``--config``, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    import dmpo_fast

    parser = argparse.ArgumentParser(
        prog="dmpo-fast",
        description="RL fine-tuning of diffusion language models (DMPO, MRO) with fused kernels.",
        epilog="Run 'dmpo-fast COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"dmpo_fast {dmpo_fast.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train (default: DMPO on the built-in tiny model and 4x4 Sudoku, on CPU, a few minutes)",
        description="Train with DMPO, MRO, diffu-GRPO or rejection sampling (algorithm=...). "
        "Without arguments: the embedded default run (DMPO).",
    )
    _add_config_args(train)
    train.add_argument("--output-dir", help="run directory (default: the config's output_dir)")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --output-dir from its newest checkpoint"
    )

    ev = sub.add_parser("eval", help="evaluate a model or a training checkpoint on a task")
    _add_config_args(ev)
    ev.add_argument("--checkpoint", help="a run directory (its newest checkpoint) or a checkpoint directory")
    ev.add_argument("--model", help="model to evaluate: 'tiny', a local directory or a hub name")
    ev.add_argument("--task", help="task name (sudoku, countdown, gsm8k, math500) or module:Class")
    ev.add_argument("--sampler", choices=("llada", "fast_dllm", "roar"), help="decoding sampler")
    ev.add_argument(
        "--gen-lengths", type=_positive_int, nargs="+", metavar="N", help="generation lengths to evaluate"
    )
    ev.add_argument("-n", "--num-examples", type=int, help="held-out examples (default: eval_size)")
    ev.add_argument(
        "--tts-k",
        type=int,
        metavar="K",
        help="test-time scaling: K candidates per prompt ranked by the MRO step rewards (eval_tts_k; needs "
        "eval_temperature > 0; eval_tts_window=N sets the model calls between branch points)",
    )
    ev.add_argument("--json", dest="json_out", help="also write the result rows to this JSON file")

    conf = sub.add_parser("config", help="print every config field with its default value, as YAML")
    conf.add_argument(
        "--markdown", action="store_true", help="a markdown table of the fields instead (docs/config.md)"
    )
    sub.add_parser("info", help="print versions and which kernel backends can run here")
    sub.add_parser(
        "build-native",
        help="compile the native CPU ops into their cache now (about a minute), so impl='auto' uses them",
    )
    from dmpo_fast.kernels.compile_check import ARCH_LIMITS

    ck = sub.add_parser(
        "check-kernels",
        help="compile every Triton kernel for a GPU architecture (no GPU needed) and check its "
        "registers, spills and shared memory",
        description="Compile every Triton kernel specialisation the launchers use for sm_<arch> with "
        "Triton's CUDA toolchain (no GPU needed; a few minutes the first time, cached after) and check "
        "registers, spills and shared memory against the architecture's limits. Exit status 1 when a "
        "kernel does not compile or does not fit (with --strict: also when one spills registers).",
    )
    ck.add_argument(
        "--arch", type=int, nargs="+", default=[90], choices=sorted(ARCH_LIMITS),
        help="compute capabilities (default: 90, H100/H200)",
    )  # fmt: skip
    ck.add_argument("--json", dest="json_out", help="also write the reports to this JSON file")
    ck.add_argument("--strict", action="store_true", help="fail on register spills too")
    ck.add_argument("--quiet", action="store_true", help="no per-call progress lines")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML file of TrainConfig fields")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig fields to override")


def _config(args, base=None, **extra):
    """``--config`` (or ``base``, or the defaults), then the options given in ``extra`` and the overrides."""
    from dmpo_fast.config import TrainConfig

    cfg = TrainConfig.from_yaml(args.config) if args.config else base or TrainConfig()
    changes = {k: v for k, v in extra.items() if v is not None}
    # One validation for options and overrides together: a check relating two fields sees both.
    return cfg.with_overrides(args.overrides or [], **changes) if changes or args.overrides else cfg


def _train(args) -> int:
    from dmpo_fast.trainer import train

    base = None
    if args.resume and not args.config:  # the run's own config; the command line states only the changes
        from dmpo_fast.evaluation import saved_config

        run = args.output_dir or _config(args).output_dir
        try:
            base = saved_config(run)
        except ValueError:
            base = None  # a run without a config yet starts from the defaults (and warns it found no checkpoint)
    cfg = _config(args, base=base, output_dir=args.output_dir, resume=True if args.resume else None)
    main = int(os.environ.get("RANK", "0")) == 0  # one line per run, not per process
    if main:
        print(
            f"dmpo-fast train: {cfg.algorithm} on {cfg.task} with model {cfg.model!r}; output in {cfg.output_dir}"
        )
    result = train(cfg)
    if not result.main:
        return 0
    before, after = result.eval_before, result.eval_after
    print(
        f"held-out solve rate {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
        f"({100 * (after['accuracy'] - before['accuracy']):+.1f} points) in {result.wall_seconds:.0f} s; "
        f"see {result.output_dir}"
    )
    return 0


def _eval(args) -> int:
    from dmpo_fast.trainer import evaluate_model

    if args.checkpoint and args.model:
        raise ValueError("give --checkpoint or --model, not both (a checkpoint names its own model)")
    base = None
    if args.checkpoint and not args.config:  # evaluate as the run did; the command line states the changes
        from dmpo_fast.evaluation import saved_config

        base = saved_config(args.checkpoint).replace(resume=False)
    cfg = _config(args, base=base, model=args.model, task=args.task, sampler=args.sampler, eval_tts_k=args.tts_k)
    rows = evaluate_model(cfg, checkpoint=args.checkpoint, gen_lengths=args.gen_lengths, n=args.num_examples)
    if cfg.eval_tts_k:
        k, window = cfg.eval_tts_k, cfg.eval_tts_window
        print(f"test-time scaling: {k} candidates per prompt, branching every {window} model calls")
    print(f"{'gen_length':>10} {'solve rate':>10} {'reward':>8} {'n':>5} {'seconds':>8}")
    for r in rows:
        print(
            f"{r['gen_length']:>10} {r['accuracy']:>10.3f} {r['reward_mean']:>8.3f} {r['n']:>5} "
            f"{r['seconds']:>8.1f}"
        )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _print_config(markdown: bool = False) -> int:
    import yaml

    from dmpo_fast.config import default_dict, markdown_table

    if markdown:
        print(markdown_table(), end="")
        return 0
    print(yaml.safe_dump(default_dict(), sort_keys=False), end="")
    return 0


def _info() -> int:
    import torch

    import dmpo_fast
    from dmpo_fast.kernels import runtime as kernels

    print(f"dmpo_fast {dmpo_fast.__version__}")
    print(f"torch     {torch.__version__} (cuda available: {torch.cuda.is_available()})")
    if kernels.HAS_TRITON:
        import triton

        print(f"triton    {triton.__version__} (kernels can run: {kernels.available()})")
    else:
        print(f"triton    not importable: {kernels.unavailable_reason()}")
    print(f"native    {_native_status()}")
    return 0


def _native_status() -> str:
    """One line on the native CPU ops: loaded from the cache, or why not (never compiles)."""
    import os

    from dmpo_fast.ops import _native

    if os.environ.get(_native.ENV_SWITCH, "").strip() == "0":
        return f"off ({_native.ENV_SWITCH}=0)"
    src = _native.source_dir()
    if src is None:
        return "unavailable: the C++ sources (csrc/) are not installed with this copy"
    if _native.load(build=False):
        return f"built, used by impl='auto' on CPU ({_native.build_dir(src)})"
    if _native._failure:
        return f"unavailable: {_native._failure}"
    return "not built yet: run 'dmpo-fast build-native' once (about a minute) so impl='auto' uses them"


def _build_native() -> int:
    import os
    import time
    import warnings

    from dmpo_fast.ops import _native

    if os.environ.get(_native.ENV_SWITCH, "").strip() == "0":
        print(
            f"dmpo-fast build-native: {_native.ENV_SWITCH}=0 forbids building the native ops", file=sys.stderr
        )
        return 1
    if _native.load(build=False):
        print(f"native ops already built: {_native.build_dir(_native.source_dir())}")
        return 0
    print("compiling the native CPU ops (about a minute on two cores) ...", flush=True)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the failure is reported below, once
        ok = _native.load(build=True)
    if not ok:
        print(f"dmpo-fast build-native: the build failed: {_native._failure}", file=sys.stderr)
        return 1
    print(f"built in {time.perf_counter() - t:.0f} s: {_native.build_dir(_native.source_dir())}")
    return 0


def _check_kernels(args) -> int:
    import os
    import subprocess

    cmd = [sys.executable, "-m", "dmpo_fast.kernels.compile_check", "--arch", *map(str, args.arch)]
    cmd += ["--json", args.json_out] if args.json_out else []
    cmd += ["--strict"] if args.strict else []
    cmd += ["--quiet"] if args.quiet else []
    # A fresh interpreter without TRITON_INTERPRET: @triton.jit picks the interpreter at import time.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "config":
            return _print_config(args.markdown)
        if args.command == "info":
            return _info()
        if args.command == "build-native":
            return _build_native()
        if args.command == "check-kernels":
            return _check_kernels(args)
    except ValueError as e:  # a bad config field or argument: one clear line, no traceback
        import os

        if os.environ.get("DMPO_FAST_TRACEBACK"):
            raise
        print(f"dmpo-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk: the message says where and how much; the run stays resumable
        import errno
        import os

        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or os.environ.get("DMPO_FAST_TRACEBACK"):
            raise
        print(f"dmpo-fast {args.command}: error: {e}", file=sys.stderr)
        return 1
    parser.print_help(sys.stderr)
    return 2
