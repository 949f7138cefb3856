"""PNG plots from benchmark JSON rows (``python -m benchmarks.plot [files] [--out-dir DIR]``).

One figure per JSON file: a horizontal bar per provider (one panel per case when the rows have several) of
the median, with the p20–p80 range as an error bar (a log axis when the values span more than 20×) —
milliseconds, or tokens per second for rollouts. The title states the benchmark, device and date; providers
that were not measured (rows with ``skipped``) are named under the bars with their reason.
Needs matplotlib (not a dependency of the package).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from benchmarks.common import RESULTS


def _metric(op: str):
    """(label, value(row), (low, high)(row)) of what a bar shows for ``op``."""
    if op == "rollout":
        # tokens/s is inversely proportional to the time: the p80 time gives the low end.
        def tps(r, key):
            return r["tokens_per_s"] * r["median_ms"] / r[key]

        return "completion tokens / s (higher is better)", lambda r: r["tokens_per_s"], lambda r: (
            tps(r, "p80_ms"), tps(r, "p20_ms"))  # fmt: skip
    return (
        "ms, median with p20–p80 (lower is better)",
        lambda r: r["median_ms"],
        lambda r: (r["p20_ms"], r["p80_ms"]),
    )


def plot_file(path: Path, out_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = [r for r in json.loads(path.read_text()) if isinstance(r, dict)]
    rows = [r for r in every if "median_ms" in r]
    skipped = [f"{r.get('provider')}: {r['skipped']}" for r in every if r.get("skipped")]
    if not rows:
        return None
    op = rows[0].get("op", path.stem)
    label, value, spread = _metric(op)
    cases = list(dict.fromkeys(r.get("case") for r in rows))
    height = 0.45 * len(rows) + 1.6 * len(cases) + 0.2 * len(skipped)
    fig, axes = plt.subplots(len(cases), 1, figsize=(8, height), squeeze=False)
    for ax, case in zip(axes[:, 0], cases, strict=True):
        mine = [r for r in rows if r.get("case") == case]
        names = [r["provider"] for r in mine]
        values = [value(r) for r in mine]
        lows, highs = zip(*(spread(r) for r in mine), strict=True)
        err = [
            [max(v - lo, 0) for v, lo in zip(values, lows, strict=True)],
            [max(hi - v, 0) for v, hi in zip(values, highs, strict=True)],
        ]
        ax.barh(names, values, xerr=err, color="tab:blue", capsize=3)
        ax.invert_yaxis()
        if max(values) > 20 * min(values):  # a log axis only where the spread needs one
            ax.set_xscale("log")
        for y, (v, hi) in enumerate(zip(values, highs, strict=True)):
            text = f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
            ax.annotate(
                text, (max(v, hi), y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8
            )
        ax.margins(x=0.15)
        if case is not None:
            ax.set_title(f"{case}", fontsize=9)
    axes[-1, 0].set_xlabel(label)
    r = rows[0]
    quick = " (--quick: not a measurement)" if r.get("quick") else ""
    fig.suptitle(f"{op} on {r.get('device', '?')}, {r.get('date', '')}{quick}", fontsize=10)
    if skipped:  # wrapped to the figure's width, so a long reason cannot widen the saved image
        text = "\n".join(textwrap.shorten("not measured: " + s, 140) for s in skipped)
        fig.text(0.01, 0.01, text, fontsize=7, va="bottom", color="dimgray")
        fig.tight_layout(rect=(0, 0.03 + 0.12 * len(skipped) / height, 1, 1))
    else:
        fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{path.stem}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n")[0])
    p.add_argument(
        "files", nargs="*", type=Path, help="JSON files (default: every benchmarks/results/*.json)"
    )
    p.add_argument("--out-dir", type=Path, default=RESULTS / "plots", help="where the PNGs go")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks.plot needs matplotlib: pip install matplotlib") from None
    for path in args.files or sorted(RESULTS.glob("*.json")):
        out = plot_file(path, args.out_dir)
        print(f"{path} -> {out}" if out else f"{path}: no rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
