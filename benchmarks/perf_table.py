"""Markdown performance tables from the committed JSON rows (``python -m benchmarks.perf_table [files]``).

For every (benchmark, device) the newest file wins (by the rows' date, then the file name); rows written with
``--quick`` are left out (they measure nothing). Each table is headed by its conditions: device, dtype,
shapes, model, torch / triton (and peer library) versions, commit, date, CPU threads and load. Providers that
were not measured (a row with ``skipped``: no CUDA, not installed, compilation failed, disagreed with the
reference) are listed under the table with their reason, and rows with a ``note`` get it there too.
Paste the output into the README.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS

# Per benchmark: a title and the columns (key, header). "median" is "median (p20–p80)" in ms.
TABLES = {
    "wdce_loss": ("`wdce_loss` forward + backward", [
        ("provider", "provider"), ("median", "ms: median (p20–p80)"),
        ("speedup_vs_reference", "vs reference"), ("tflops", "TFLOP/s"), ("pct_of_floor", "% of floor"),
        ("peak_extra_bytes", "extra peak memory"), ("err_vs_tol", "error / tolerance"),
    ]),
    "denoise_step": ("`denoise_step`, one denoising step", [
        ("case", "query rows"), ("provider", "provider"), ("median", "ms: median (p20–p80)"),
        ("speedup_vs_reference", "vs reference"), ("tflops", "TFLOP/s"), ("gbps", "GB/s"),
        ("pct_of_floor", "% of floor"), ("peak_extra_bytes", "extra peak memory"),
    ]),
    "rollout": ("Rollout throughput at equal steps", [
        ("provider", "sampler"), ("median", "ms per rollout: median (p20–p80)"), ("tokens_per_s", "tokens/s"),
        ("speedup_vs_llada", "vs llada"), ("model_tflops", "model TFLOP/s (est.)"),
        ("peak_extra_bytes", "extra peak memory"),
    ]),
    "dmpo_iteration": ("One DMPO iteration (rollout, ELBO ref + old, F loss steps)", [
        ("provider", "pipeline"), ("median", "ms: median (p20–p80)"), ("rollout_ms", "rollout ms"),
        ("elbo_ms", "ELBO ms"), ("loss_steps_ms", "loss steps ms"), ("speedup_vs_reference", "vs reference"),
        ("peak_bytes", "peak memory"), ("peak_vs_reference", "memory vs reference"),
    ]),
}  # fmt: skip
# Rows of other scripts (no "benchmark" field, or an op not above): the columns among these that they have.
GENERIC = [("provider", "provider"), ("median", "ms: median (p20–p80)"), ("speedup", "speed-up"),
           ("speedup_vs_reference", "vs reference"), ("peak_extra_bytes", "extra peak memory")]  # fmt: skip
CONDITION_KEYS = ("model", "layers", "vocab", "dtype", "params")
OWN = ("loss", "denoise", "rollout", "iteration")  # the scripts whose rows TABLES describes


def _bytes(n) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _num(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def cell(row: dict, key: str) -> str:
    if key == "median":
        return f"{_num(row['median_ms'])} ({_num(row['p20_ms'])}–{_num(row['p80_ms'])})"
    v = row.get(key)
    if v is None:
        return "–"
    if key.endswith("_bytes"):
        return _bytes(v)
    if key.startswith(("speedup", "peak_vs")):
        return f"{v:.2f}×"
    if key == "pct_of_floor":
        return f"{v:.1f}%"
    return _num(v)


def _is_result(row: dict) -> bool:
    """A measured row, or one that says why a provider was not measured."""
    return "median_ms" in row or "skipped" in row


def load(paths: list[Path]) -> dict:
    """{(benchmark, op, device): (rows, file name)} keeping the newest file per key; quick rows dropped.
    ``benchmark`` is the script that wrote the rows (the file name's stem for rows that do not say)."""
    newest = {}
    for path in paths:
        try:
            rows = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"<!-- skipped {path.name}: {err} -->")
            continue
        rows = [r for r in rows if isinstance(r, dict) and not r.get("quick") and _is_result(r)]
        for bench, op in dict.fromkeys((r.get("benchmark", path.stem), r.get("op", path.stem)) for r in rows):
            mine = [r for r in rows if (r.get("benchmark", path.stem), r.get("op", path.stem)) == (bench, op)]
            variant = tuple(mine[0].get(k) for k in ("model", "layers", "vocab"))  # e.g. two CPU vocabularies
            key = (bench, op, mine[0].get("device", "?"), variant)
            rank = (mine[0].get("date") or "", path.name)
            if key not in newest or rank > newest[key][0]:
                newest[key] = (rank, mine, path.name)

    def order(item):  # the scripts in reading order (loss, denoise, rollout, iteration), then the others
        bench, op, device, variant = item[0]
        model, layers, vocab = variant
        return (
            OWN.index(bench) if bench in OWN else len(OWN),
            bench,
            op,
            device,
            str(model),
            layers or 0,
            vocab or 0,
        )

    return {k: (rows, name) for k, (_, rows, name) in sorted(newest.items(), key=order)}


def conditions(rows: list[dict], file_name: str) -> str:
    r = rows[0]
    parts = [f"**{r.get('device', '?')}**"]
    model = ", ".join(
        f"{k} {r[k]:,}" if isinstance(r[k], int) else f"{k} {r[k]}" for k in CONDITION_KEYS if k in r
    )
    if model:
        parts.append(model)
    shapes = [x.get("shape", {}) for x in rows]
    keys = list(dict.fromkeys(k for s in shapes for k in s))
    described = []
    for k in keys:
        values = list(dict.fromkeys(json.dumps(s.get(k)) for s in shapes))
        described.append(f"{k}={'/'.join(str(json.loads(v)) for v in values)}")
    if described:
        parts.append("shape " + ", ".join(described))
    parts.append(f"torch {r.get('torch')}, triton {r.get('triton')}")
    if r.get("peers"):  # the peer libraries a benchmark compares with (the loss: Cut Cross-Entropy, Liger)
        parts.append(", ".join(f"{dist} {v or 'not installed'}" for dist, v in r["peers"].items()))
    if r.get("device_type") == "cpu":
        load = r.get("load_avg_1m")
        parts.append(
            f"{r.get('cpu_threads')} CPU threads" + ("" if load is None else f", load average {load:.1f}")
        )
    parts.append(f"commit {r.get('commit')}, {r.get('date')} (`benchmarks/results/{file_name}`)")
    return "; ".join(parts)


def footnotes(rows: list[dict]) -> list[str]:
    """Lines under a table: the providers not measured and why, then the notes of measured rows."""
    lines = [f"- not measured: `{r.get('provider')}` — {r['skipped']}" for r in rows if r.get("skipped")]
    lines += [f"- `{r.get('provider')}`: {r['note']}" for r in rows if r.get("note") and not r.get("skipped")]
    return ["", *lines] if lines else []


def table(op: str, all_rows: list[dict], file_name: str) -> str:
    rows = [r for r in all_rows if "median_ms" in r]  # measured; the others are footnotes
    if not rows:
        return "\n".join([f"#### `{op}`", "", conditions(all_rows, file_name), *footnotes(all_rows)]) + "\n"
    if rows[0].get("benchmark") in OWN and op in TABLES:
        title, columns = TABLES[op]
        if all(r.get("cpu_ms") is not None for r in rows):  # CPU rows on a shared host: min and CPU time too
            at = [k for k, _ in columns].index("median") + 1
            columns = [*columns[:at], ("min_ms", "min ms"), ("cpu_ms", "CPU-time ms"), *columns[at:]]
    else:
        title = f"`{op}` ({file_name})"
        columns = [(k, h) for k, h in GENERIC if k == "median" or any(k in r for r in rows)]
    lines = [f"#### {title}", "", conditions(rows, file_name), ""]
    lines.append("| " + " | ".join(h for _, h in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        lines.append("| " + " | ".join(cell(r, k) for k, _ in columns) + " |")
    return "\n".join(lines + footnotes(all_rows)) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf_table", description=__doc__.split("\n")[0])
    p.add_argument(
        "files", nargs="*", type=Path, help="JSON files (default: every benchmarks/results/*.json)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the markdown here as well as to stdout")
    args = p.parse_args(argv)
    paths = args.files or sorted(RESULTS.glob("*.json"))
    tables = [table(op, rows, name) for (_, op, *_), (rows, name) in load(paths).items()]
    text = "\n".join(tables) if tables else "No benchmark results yet.\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
