"""The ``dmpo-fast`` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    import dmpo_fast

    parser = argparse.ArgumentParser(
        prog="dmpo-fast",
        description="RL fine-tuning of diffusion language models (DMPO, MRO) with fused kernels.",
    )
    parser.add_argument("--version", action="version", version=f"dmpo_fast {dmpo_fast.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="print versions and which kernel backends can run here")
    return parser


def _info() -> int:
    import torch

    import dmpo_fast
    from dmpo_fast import kernels

    print(f"dmpo_fast {dmpo_fast.__version__}")
    print(f"torch     {torch.__version__} (cuda available: {torch.cuda.is_available()})")
    if kernels.HAS_TRITON:
        import triton

        print(f"triton    {triton.__version__} (kernels can run: {kernels.available()})")
    else:
        print(f"triton    not importable: {kernels.unavailable_reason()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    parser.print_help(sys.stderr)
    return 2
