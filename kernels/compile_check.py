"""Compile every Triton kernel of dmpo_fast for a GPU architecture, on any machine (no GPU needed).

    python -m dmpo_fast.kernels.compile_check --arch 90 80 [--json report.json]
    dmpo-fast check-kernels --arch 90

Triton's interpreter (the CPU tests) proves the arithmetic of a kernel, not that it compiles for a GPU:
the 16-bit ``tl.dot`` path, the tile sizes and pipelining stages chosen for Hopper and the register and
shared-memory budget of each kernel never meet a compiler there. This tool closes that gap without a GPU.
It runs each launcher (``linear_logprob``, ``weighted_linear_ce`` with every dW mode, ``denoise_step`` from
logits and from hidden states, ``forward_mask``, ``importance_weights``, and every autotuning candidate)
with the tile choices of a GPU run, under a stand-in Triton driver that compiles instead of launching.
Each distinct kernel specialisation goes through Triton's whole CUDA pipeline (Triton IR, LLVM, PTX,
``ptxas``, all shipped in the Triton wheel) for the target, and its resources are read from the result:
registers per thread, bytes spilled to local memory, shared memory, against the architecture's limits.

The shapes are small (the launchers do host work on CPU tensors) but chosen to hit the kernels that the
LLaDA-8B and Dream-7B shapes hit: the same dtypes, tile sizes and ``EVEN_K``, and the same divisibility by
16 of every size and stride Triton specialises on (hidden 256 for 4096, vocabulary 1264 for 126464),
plus an awkward case (hidden 200, vocabulary 1009). Outputs are never computed, so nothing here checks a
value: the interpreter tests do that. What a clean report proves: every kernel compiles for the target
with the configuration it launches with and fits its shared memory and registers. What it does not
prove: that the kernels run correctly or fast on that GPU.

Run it in a process where ``TRITON_INTERPRET`` is unset (``@triton.jit`` picks the interpreter at import
time); ``dmpo-fast check-kernels`` takes care of that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Per-block limits by compute capability: opt-in dynamic shared memory (bytes) and registers.
ARCH_LIMITS = {
    80: {"name": "A100", "shared": 166912},
    86: {"name": "RTX 30xx / A10 / A40", "shared": 101376},
    89: {"name": "L4 / L40 / RTX 40xx", "shared": 101376},
    90: {"name": "H100 / H200", "shared": 232448},
    100: {"name": "B200 / GB200", "shared": 232448},
}
REGS_PER_SM = 65536


@dataclass
class KernelReport:
    """One compiled kernel specialisation and the resources it needs on the target."""

    kernel: str
    case: str  # the launcher call that first produced it
    config: dict  # constexpr arguments, num_warps, num_stages
    dtypes: list[str]  # dtypes of the tensor arguments, in order
    not_16: list[str]  # integer arguments (sizes, strides) that are not multiples of 16
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared: int  # dynamic shared memory, bytes
    tensor_cores: str  # matrix instruction in the PTX: tcgen05 (Blackwell), wgmma (Hopper), mma or "-"
    ptxas_warnings: list[str]
    compile_s: float
    problems: list[str] = field(default_factory=list)  # over a hard limit: the launch would fail
    warnings: list[str] = field(default_factory=list)  # spills: it runs, slower


@dataclass
class ArchReport:
    arch: int
    target: str  # e.g. sm_90a
    triton: str
    ptxas: str
    kernels: list[KernelReport]
    failures: list[dict]  # {"case", "error"} of launcher calls that did not compile

    @property
    def ok(self) -> bool:
        """Every launcher call compiled and every kernel fits the architecture's hard limits."""
        return not self.failures and not any(k.problems for k in self.kernels)

    @property
    def spill_free(self) -> bool:
        return not any(k.warnings for k in self.kernels)


# --------------------------------------------------------------------------------------------------
# A Triton driver that compiles for a chosen target and never launches
# --------------------------------------------------------------------------------------------------


class _CompileOnlyDriver:
    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        # Triton keeps compiled kernels per device: one stand-in device per architecture.
        return 1000 + self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@contextlib.contextmanager
def _compile_only(arch: int, sink: list):
    """Within the block every ``kernel[grid](...)`` compiles for ``sm_<arch>`` and appends
    (kernel name, CompiledKernel, args, kwargs, names of its unaligned int arguments, seconds) to
    ``sink`` instead of launching."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        t0 = time.perf_counter()
        compiled = original(self, *args, grid=grid, warmup=True, **kwargs)
        # Sizes and strides Triton cannot prove divisible by 16 (it specialises on that): they cost
        # vectorised, asynchronous loads, so the report names them.
        odd = [
            p.name
            for p, a in zip(self.params, args, strict=False)  # constexprs come as keywords
            if isinstance(a, int) and not isinstance(a, bool) and a % 16 != 0 and a != 1
        ]
        sink.append((self.fn.__name__, compiled, args, kwargs, odd, time.perf_counter() - t0))
        return compiled

    previous = getattr(driver, "_active", None)  # not .active: that would look for a real GPU
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run = run
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice
            yield
    finally:
        JITFunction.run = original
        driver._active = previous


# --------------------------------------------------------------------------------------------------
# The launcher calls
# --------------------------------------------------------------------------------------------------


def _cases():
    """(name, thunk) pairs; each thunk calls one launcher the way a GPU run would."""
    import torch

    from dmpo_fast.kernels import linear_ce as lce
    from dmpo_fast.kernels import linear_ce_config as cfg
    from dmpo_fast.kernels.denoise_step import denoise_rows_triton
    from dmpo_fast.kernels.forward_mask import forward_mask_triton
    from dmpo_fast.kernels.importance_weights import importance_weights_triton

    g = torch.Generator().manual_seed(0)
    cases = []
    # (H, V): every size and stride a multiple of 16 like LLaDA-8B (4096, 126464) and Dream-7B (3584,
    # 152064); a vocabulary that is not, like GPT-2's 50257; and a hidden size that is not (tiny models).
    shapes = {"aligned": (256, 1264), "odd vocabulary": (256, 1009), "odd hidden": (200, 1009)}
    n = 100  # rows: not a multiple of 16, so the row masks are live

    def lce_inputs(dtype, H, V):
        h = (torch.randn(n, H, generator=g) * 0.1).to(dtype).requires_grad_()
        w = (torch.randn(V, H, generator=g) * 0.1).to(dtype).requires_grad_()
        y = torch.randint(0, V, (n,), generator=g)
        tw = torch.randn(n, generator=g)
        tw[::7] = 0.0  # rows that are dropped before any GEMM
        return h, w, y, tw

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        dn = str(dtype).removeprefix("torch.")
        for H, V in shapes.values():
            tag = f"{dn}, H={H}, V={V}"

            def logprob(dtype=dtype, H=H, V=V):
                h, w, y, _ = lce_inputs(dtype, H, V)
                lce.linear_logprob_triton(h, w, y).sum().backward()  # forward + recomputing backward

            cases.append((f"linear_logprob fwd+bwd ({tag})", logprob))

            for det in (False, True):
                for split in (None, 2):  # one dW owner per tile / split row sums (atomics or workspace)

                    def wce(dtype=dtype, H=H, V=V, det=det, split=split):
                        h, w, y, tw = lce_inputs(dtype, H, V)
                        opts = lce.LinearCEOptions(chunk_rows=32, dw_split=split)  # several chunks
                        lce.weighted_linear_ce_triton(h, w, y, tw, deterministic=det, options=opts).backward()

                    cases.append(
                        (f"weighted_linear_ce fwd+bwd ({tag}, deterministic={det}, dw_split={split})", wce)
                    )

            def wce_nograd(dtype=dtype, H=H, V=V):
                h, w, y, tw = lce_inputs(dtype, H, V)
                with torch.no_grad():
                    lce.weighted_linear_ce_triton(h, w, y, tw)

            cases.append((f"weighted_linear_ce no-grad ({tag})", wce_nograd))

        if dtype != torch.float32:  # the autotuning candidates are 16-bit tiles
            H, V = shapes["aligned"]
            for t in cfg._LOGITS_CANDIDATES:

                def lse_candidate(dtype=dtype, t=t, H=H, V=V):
                    h, w, y, _ = lce_inputs(dtype, H, V)
                    e = torch.empty(n, V, dtype=dtype)
                    lce._lse_pass(h.detach(), w.detach(), y, t, e_buf=e)

                cases.append((f"autotune logits candidate {t} ({dn})", lse_candidate))
            for t in cfg._DW_CANDIDATES:

                def dw_candidate(dtype=dtype, t=t, H=H, V=V):
                    h, w, _, _ = lce_inputs(dtype, H, V)
                    gbuf = torch.empty(n, V, dtype=dtype)
                    lce._launch_dw(torch.empty(V, H), gbuf, h.detach(), n, 1, 0, t)

                cases.append((f"autotune dW candidate {t} ({dn})", dw_candidate))

    # denoise_step: from logits (fp32 and 16-bit) and from hidden states + head (every dtype), at 8
    # active rows (one row block) and 256 (B = 8 x 32: the 128-row GEMM tile), greedy and sampled.
    for src in ("logits", "hidden"):
        dtypes = (
            (torch.float32, torch.bfloat16)
            if src == "logits"
            else (torch.bfloat16, torch.float16, torch.float32)
        )
        for dtype in dtypes:
            dn = str(dtype).removeprefix("torch.")
            for shape_name, (H, V) in shapes.items():
                if src == "logits" and shape_name == "odd hidden":
                    continue
                for rows in (8, 256) if src == "logits" else (8, 32, 256):
                    for inv_t in (None, 1 / 0.7):

                        def denoise(src=src, dtype=dtype, H=H, V=V, rows=rows, inv_t=inv_t):
                            B, L = 8, 64
                            b_idx = torch.arange(rows) % B
                            l_idx = (torch.arange(rows) // B) % L
                            counters = [
                                torch.arange(rows, dtype=torch.int64) for _ in range(3)
                            ]  # pos, row, step
                            if src == "logits":
                                logits, hidden, head = torch.randn(B, L, V, generator=g).to(dtype), None, None
                            else:
                                logits = None
                                hidden = torch.randn(B, L, H, generator=g).to(dtype)
                                head = torch.randn(V, H, generator=g).to(dtype)
                            denoise_rows_triton(
                                logits, hidden, head, b_idx, l_idx, *counters,
                                seed=1, inv_t=inv_t, logit_scale=1.0, mask_id=V - 1,
                            )  # fmt: skip

                        t_name = "greedy" if inv_t is None else "T=0.7"
                        size = f"V={V}" if src == "logits" else f"H={H}, V={V}"
                        cases.append(
                            (f"denoise_step from {src} ({dn}, {size}, {rows} rows, {t_name})", denoise)
                        )

    for antithetic in (False, True):

        def mask(antithetic=antithetic):
            ids = torch.randint(0, 100, (8, 456), generator=g)
            maskable = torch.zeros(8, 456, dtype=torch.bool)
            maskable[:, 200:] = True
            forward_mask_triton(
                ids, maskable, mask_id=126336, replicates=4, antithetic=antithetic,
                rate_min=0.0, rate_max=1.0, seed=1,
            )  # fmt: skip

        cases.append((f"forward_mask (antithetic={antithetic})", mask))

    for dtype in (torch.float32, torch.float64):
        for baseline in ("none", "group", "individual"):
            for alpha, ess_target in ((0.0, None), (0.5, None), (0.5, 0.5)):

                def iw(dtype=dtype, baseline=baseline, alpha=alpha, ess_target=ess_target):
                    r = torch.randn(32, generator=g).to(dtype)
                    lr = torch.randn(32, generator=g).to(dtype)
                    importance_weights_triton(
                        r, lr, group_size=8, alpha=alpha, coeff=1.0, baseline=baseline,
                        centering_strength=1.0, ess_target=ess_target,
                    )  # fmt: skip

                dn = str(dtype).removeprefix("torch.")
                cases.append(
                    (
                        f"importance_weights ({dn}, baseline={baseline}, alpha={alpha}, "
                        f"ess_target={ess_target})",
                        iw,
                    )
                )
    return cases


# --------------------------------------------------------------------------------------------------
# Resources of a compiled kernel
# --------------------------------------------------------------------------------------------------


def _ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (its wheel ships one per CUDA generation)."""
    import triton

    with contextlib.suppress(Exception):
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    with contextlib.suppress(Exception):
        from triton import knobs

        return knobs.nvidia.ptxas.path
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def _ptxas_usage(ptx: str, ptxas: str) -> dict:
    """Registers and spills that ``ptxas -v`` reports for the kernel's PTX."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name={target}", str(src), "-o", str(Path(d) / "k.cubin")],
            capture_output=True, text=True,
        )  # fmt: skip
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed on the kernel's PTX ({target}):\n{log[-2000:]}")

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "target": target,
        # e.g. "wgmma.mma_async instructions are serialized ...": a silent loss of most of the GEMM rate
        "ptxas_warnings": sorted({ln.strip() for ln in log.splitlines() if "warning" in ln.lower()}),
        "registers": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
    }


def _tensor_cores(ptx: str) -> str:
    if "tcgen05.mma" in ptx:
        return "tcgen05"  # Blackwell
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if re.search(r"\bmma\.sync", ptx) else "-"


def _config_of(kwargs: dict, compiled) -> dict:
    conf = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
    conf.setdefault("num_warps", compiled.metadata.num_warps)
    conf.setdefault("num_stages", compiled.metadata.num_stages)
    return {k: (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in conf.items()}


def check(arch: int = 90, *, progress: bool = True) -> ArchReport:
    """Compile every kernel specialisation for ``sm_<arch>`` and check its resources."""
    if arch not in ARCH_LIMITS:
        raise ValueError(f"arch must be one of {sorted(ARCH_LIMITS)}, got {arch!r}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            "compile_check must run with TRITON_INTERPRET unset: @triton.jit chose the interpreter "
            "when the kernels were imported. Run `dmpo-fast check-kernels`, which starts a clean process."
        )
    import torch
    import triton

    limit = ARCH_LIMITS[arch]["shared"]
    ptxas = _ptxas_path(arch)
    ptxas_version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip()
    ptxas_version = ptxas_version.splitlines()[-1] if ptxas_version else "?"
    reports: dict[str, KernelReport] = {}
    failures = []
    target = f"sm_{arch}"
    cases = _cases()
    for i, (name, thunk) in enumerate(cases):
        sink: list = []
        try:
            with _compile_only(arch, sink), torch.random.fork_rng():
                thunk()
        except Exception as e:  # a kernel that does not compile: keep going, report it
            failures.append({"case": name, "error": f"{type(e).__name__}: {str(e)[-2000:]}"})
        for kname, compiled, args, kwargs, odd, seconds in sink:
            key = compiled.hash if hasattr(compiled, "hash") else compiled.metadata.hash
            if key in reports:
                continue
            usage = _ptxas_usage(compiled.asm["ptx"], ptxas)
            target = usage["target"]
            conf = _config_of(kwargs, compiled)
            threads = 32 * compiled.metadata.num_warps
            rep = KernelReport(
                kernel=kname,
                case=name,
                config=conf,
                dtypes=[str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)],
                not_16=odd,
                registers=usage["registers"],
                spill_stores=usage["spill_stores"],
                spill_loads=usage["spill_loads"],
                shared=int(compiled.metadata.shared),
                tensor_cores=_tensor_cores(compiled.asm["ptx"]),
                ptxas_warnings=usage["ptxas_warnings"],
                compile_s=round(seconds, 2),
            )
            if rep.shared > limit:
                rep.problems.append(f"shared memory {rep.shared} B > {limit} B of sm_{arch}")
            if rep.registers * threads > REGS_PER_SM:
                rep.problems.append(f"{rep.registers} registers x {threads} threads > {REGS_PER_SM}")
            rep.warnings += [f"ptxas: {w}" for w in rep.ptxas_warnings]
            if rep.spill_stores or rep.spill_loads:
                rep.warnings.append(f"spills {rep.spill_stores} B stored / {rep.spill_loads} B loaded")
            reports[key] = rep
        if progress:
            status = "FAILED" if failures and failures[-1]["case"] == name else "ok"
            print(f"[sm_{arch} {i + 1}/{len(cases)}] {status:6s} {name}", file=sys.stderr, flush=True)
    return ArchReport(
        arch=arch,
        target=target,
        triton=triton.__version__,
        ptxas=ptxas_version,
        kernels=list(reports.values()),
        failures=failures,
    )


def format_report(rep: ArchReport) -> str:
    lim = ARCH_LIMITS[rep.arch]
    lines = [
        f"sm_{rep.arch} ({lim['name']}; target {rep.target}, triton {rep.triton}, {rep.ptxas}): "
        f"{len(rep.kernels)} kernel specialisations, {len(rep.failures)} failed launcher calls",
        f"{'kernel':28s} {'regs':>4s} {'spill':>6s} {'shared KiB':>10s} {'mma':>5s}  config",
    ]
    for k in sorted(rep.kernels, key=lambda k: (k.kernel, -k.shared)):
        conf = ", ".join(f"{a}={b}" for a, b in k.config.items() if a not in ("DOT_FP32",))
        flag = "  <-- " + "; ".join(k.problems + k.warnings) if k.problems or k.warnings else ""
        lines.append(
            f"{k.kernel:28s} {k.registers:4d} {k.spill_stores:6d} {k.shared / 1024:10.1f} "
            f"{k.tensor_cores:>5s}  "
            f"[{'/'.join(sorted(set(k.dtypes)))}] {conf}"
            + (f", not a multiple of 16: {'/'.join(k.not_16)}" if k.not_16 else "")
            + flag
        )
    for f in rep.failures:
        lines.append(f"FAILED {f['case']}: {f['error'].splitlines()[-1] if f['error'] else ''}")
    return "\n".join(lines)


_SHAPE_ARGS = {"V", "H", "stride_hn", "stride_wv", "stride_gn", "stride_en", "stride_dv"}


def _mma_summary(ks: list[KernelReport]) -> str:
    """Which matrix instructions the 16-bit and the fp32 specialisations of a kernel use."""
    parts = []
    for label, sel in (("16-bit", lambda k: {"bfloat16", "float16"} & set(k.dtypes)), ("fp32", None)):
        group = [k for k in ks if (sel(k) if sel else not {"bfloat16", "float16"} & set(k.dtypes))]
        kinds = sorted({k.tensor_cores for k in group})
        if group and kinds != ["-"]:
            parts.append(f"{label}: {'/'.join(kinds)}")
    return ", ".join(parts) or "-"


def format_markdown(reports: list[ArchReport]) -> str:
    """Per kernel and architecture: specialisations, peak registers and shared memory, and the worst
    spill, split by whether the model's hidden and vocabulary sizes are multiples of 16."""
    lines = [
        "| kernel | arch | specialisations | matrix instructions | max registers | max shared KiB "
        "| worst spill, H and V multiples of 16 (B) | worst spill, otherwise (B) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted({k.kernel for r in reports for k in r.kernels}):
        for r in reports:
            ks = [k for k in r.kernels if k.kernel == name]
            if not ks:
                continue
            aligned = [k.spill_stores for k in ks if not _SHAPE_ARGS & set(k.not_16)]
            odd = [k.spill_stores for k in ks if _SHAPE_ARGS & set(k.not_16)]
            lines.append(
                f"| `{name}` | sm_{r.arch} | {len(ks)} | {_mma_summary(ks)} "
                f"| {max(k.registers for k in ks)} | {max(k.shared for k in ks) / 1024:.0f} "
                f"| {max(aligned, default=0)} | {max(odd, default=0)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dmpo_fast.kernels.compile_check",
        description="Compile every Triton kernel for a GPU architecture (no GPU needed) and check "
        "its registers, spills and shared memory against the architecture's limits.",
    )
    p.add_argument(
        "--arch", type=int, nargs="+", default=[90], choices=sorted(ARCH_LIMITS),
        help="compute capabilities to compile for (default: 90, H100/H200)",
    )  # fmt: skip
    p.add_argument("--json", default=None, help="also write the reports to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no per-call progress lines")
    p.add_argument("--markdown", action="store_true", help="also print a markdown summary per kernel")
    p.add_argument(
        "--strict", action="store_true", help="fail on register spills too (default: only on hard limits)"
    )
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("unset TRITON_INTERPRET: the check compiles for a GPU, not for the interpreter")
    from dmpo_fast.kernels.runtime import HAS_TRITON, unavailable_reason

    if not HAS_TRITON:
        print(unavailable_reason(), file=sys.stderr)
        return 2
    reports = [check(a, progress=not args.quiet) for a in args.arch]
    for rep in reports:
        print(format_report(rep))
        print()
    if args.markdown:
        print(format_markdown(reports))
        print()
    if args.json:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
        meta = {"commit": commit or None, "date": time.strftime("%Y-%m-%d")}
        data = [{**asdict(r), "ok": r.ok, "spill_free": r.spill_free, **meta} for r in reports]
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    bad = [r for r in reports if not r.ok or (args.strict and not r.spill_free)]
    if bad:
        print(f"problems on: {', '.join(f'sm_{r.arch}' for r in bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
