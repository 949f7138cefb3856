"""``python -m benchmarks <name> [--device cpu|cuda] [--quick]``: one script per op, JSON rows out;
``python -m benchmarks compare`` runs the method comparison (``benchmarks/compare.py``)."""

import sys

SCRIPTS = {
    "loss": "benchmarks.loss",
    "denoise": "benchmarks.denoise",
    "rollout": "benchmarks.rollout",
    "iteration": "benchmarks.iteration",
    "native": "benchmarks.native",
    "mro_cost": "benchmarks.mro_cost",  # an MRO rollout buffer against a DMPO one
    "compare": "benchmarks.compare",  # the method comparison (training runs, not a timing)
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SCRIPTS:
        names = ", ".join(sorted(SCRIPTS))
        print(f"usage: python -m benchmarks <name> [options]; names: {names}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(SCRIPTS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
