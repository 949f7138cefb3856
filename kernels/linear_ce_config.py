"""Options, tile sizes and buffer helpers of the fused linear cross-entropy (``linear_ce.py``).

Tile sizes are heuristics chosen for Hopper (H100 / H200) and tiny ones in Triton's interpreter (so
the CPU tests span several tiles and masked edges); ``DMPO_FAST_AUTOTUNE=1`` times a few candidates
once per shape instead. None of the GPU numbers here has been measured yet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from dmpo_fast.kernels.linear_ce_kernels import triton
from dmpo_fast.kernels.runtime import interpreting, programs_per_wave


@dataclass(frozen=True)
class LinearCEOptions:
    """Non-tensor knobs of the Triton path; the defaults suit LLaDA-8B shapes on an H100.

    chunk_bytes: bound of the [C, V] logits/gradient buffer (C = chunk_bytes / (V · itemsize)).
    chunk_rows: overrides chunk_bytes with an explicit row count (tests force several chunks).
    dw_accumulate: "fp32" accumulates dW across chunks in fp32 (4·V·H bytes); "weight" in the
        weight's dtype through cuBLAS (the gradient's own size; one rounding per chunk).
    dw_split: split the dW row sum over this many programs (None: only when the tile grid is small).
    """

    chunk_bytes: int = 256 << 20
    chunk_rows: int | None = None
    dw_accumulate: Literal["fp32", "weight"] = "fp32"
    dw_split: int | None = None

    def __post_init__(self):
        if not isinstance(self.chunk_bytes, int) or self.chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive int, got {self.chunk_bytes!r}")
        if self.chunk_rows is not None and (not isinstance(self.chunk_rows, int) or self.chunk_rows <= 0):
            raise ValueError(f"chunk_rows must be None or a positive int, got {self.chunk_rows!r}")
        if self.dw_accumulate not in ("fp32", "weight"):
            raise ValueError(f"dw_accumulate must be 'fp32' or 'weight', got {self.dw_accumulate!r}")
        if self.dw_split is not None and (not isinstance(self.dw_split, int) or self.dw_split <= 0):
            raise ValueError(f"dw_split must be None or a positive int, got {self.dw_split!r}")


# --------------------------------------------------------------------------------------------------
# Tile sizes: heuristics by default, timed candidates with DMPO_FAST_AUTOTUNE=1
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tiles:
    rows: int  # BLOCK_N (logits) / BLOCK_K (dW: rows are its reduction dimension)
    cols: int  # BLOCK_V
    inner: int  # BLOCK_K (logits: hidden dimension) / BLOCK_H (dW)
    num_warps: int
    num_stages: int


# Interpreter: tiny tiles so the small test shapes span several tiles and masked edges.
_INTERP_LOGITS = _Tiles(16, 32, 16, 4, 1)
_INTERP_DW = _Tiles(16, 32, 16, 4, 1)
# Hopper, 16-bit: a 128x256 fp32 accumulator on 2 warpgroups; 3 stages of (128+256)x64 bf16 operands
# take 144 KB of the 227 KB of shared memory.
_GPU_LOGITS = _Tiles(128, 256, 64, 8, 3)
# dW: 64 rows x (128 vocabulary x 128 hidden) tiles on 8 warps: the fp32 accumulator (64 registers
# per thread) and the tile read back for the cross-chunk read-modify-write (64 more) fit without
# spilling; 4 stages of 2 x 64x128 bf16 operands take 128 KB of shared memory.
_GPU_DW = _Tiles(64, 128, 128, 8, 4)
# fp32 dots in full precision run on the CUDA cores: smaller tiles. dW on 8 warps: on 4, ptxas
# spills up to 800 B per thread on sm_80 (``dmpo-fast check-kernels``).
_GPU_FP32 = _Tiles(64, 64, 32, 4, 2)
_GPU_FP32_DW = _Tiles(64, 64, 32, 8, 2)
# A hidden size that is not a multiple of 16 (tiny models) leaves the rows of hidden and weight
# unaligned for asynchronous copies, so the pipelined operand tiles sit in registers: the tiles above
# spill up to 1.2 KB per thread on sm_90 and 12 KB on sm_80; these are the largest that do not.
_GPU_LOGITS_UNALIGNED = _Tiles(64, 128, 32, 4, 3)
_GPU_DW_UNALIGNED = _Tiles(64, 128, 64, 8, 3)
_LOGITS_CANDIDATES = (
    _Tiles(128, 256, 64, 8, 3),
    _Tiles(128, 256, 64, 8, 4),
    _Tiles(128, 128, 64, 4, 4),
    _Tiles(128, 128, 64, 8, 3),
    _Tiles(64, 256, 64, 4, 4),
)
# Timed with the overwrite epilogue (idempotent), so only tiles whose read-modify-write epilogue
# also fits in registers (BLOCK_V·BLOCK_H / threads ≤ 64) are candidates.
_DW_CANDIDATES = (
    _Tiles(64, 128, 128, 8, 4),
    _Tiles(64, 128, 128, 8, 3),
    _Tiles(128, 128, 128, 8, 3),
    _Tiles(32, 128, 128, 8, 5),
    _Tiles(64, 128, 64, 4, 4),
)
_CONVERT_ROWS = 16  # rows per program of the elementwise e -> G pass (16 x 256 values, 4 warps)
_STATS_BYTES = 64 << 20  # bound of the per-tile (max, Σexp) statistics of a no-grad pass
_TUNED: dict[tuple, _Tiles] = {}  # key -> the tiles _pick chose


def _autotune_enabled(dtype: torch.dtype) -> bool:
    """DMPO_FAST_AUTOTUNE=1 on a GPU, for 16-bit inputs: the candidates are 16-bit tiles (in fp32 their
    operands would need up to twice the shared memory; fp32 keeps its fixed tiles)."""
    return (
        os.environ.get("DMPO_FAST_AUTOTUNE", "0") == "1"
        and not interpreting()
        and dtype in (torch.float16, torch.bfloat16)
    )


def _pick(key: tuple, candidates: tuple[_Tiles, ...], run, default: _Tiles) -> _Tiles:
    """Time ``run(tiles)`` for each candidate once per key (median of do_bench) and keep the fastest;
    ``default`` when none fits this GPU.

    ``run`` must be idempotent (it writes outputs, never accumulates into them).
    """
    if key not in _TUNED:
        from triton.testing import do_bench

        best = None
        for tiles in candidates:
            try:
                t = do_bench(lambda tiles=tiles: run(tiles), warmup=5, rep=25, return_mode="median")
            except triton.runtime.errors.OutOfResources:  # too much shared memory on this GPU
                continue
            if best is None or t < best[0]:
                best = (t, tiles)
        _TUNED[key] = best[1] if best is not None else default
    return _TUNED[key]


def _logits_tiles(dtype: torch.dtype, hidden_size: int) -> _Tiles:
    if interpreting():
        return _INTERP_LOGITS
    if dtype == torch.float32:
        return _GPU_FP32
    return _GPU_LOGITS if hidden_size % 16 == 0 else _GPU_LOGITS_UNALIGNED


def _dw_tiles(dtype: torch.dtype, hidden_size: int) -> _Tiles:
    if interpreting():
        return _INTERP_DW
    if dtype == torch.float32:
        return _GPU_FP32_DW
    return _GPU_DW if hidden_size % 16 == 0 else _GPU_DW_UNALIGNED


def _dot_flags(dtype: torch.dtype) -> dict:
    """DOT_FP32 (upcast dot operands: the interpreter mis-computes 16-bit dots) and the fp32 precision."""
    dot_fp32 = interpreting()
    precision = "ieee" if (dot_fp32 or dtype == torch.float32) else "tf32"  # tf32: unused for 16-bit
    return {"DOT_FP32": dot_fp32, "PRECISION": precision}


def _parallel_target(device: torch.device) -> int:
    """Programs that keep the GPU busy: 2 per SM (8 in the interpreter, to exercise the split path)."""
    return programs_per_wave(device, 2)


def _chunk_rows(V: int, dtype: torch.dtype, tiles: _Tiles, opts: LinearCEOptions) -> int:
    if opts.chunk_rows is not None:
        return opts.chunk_rows
    rows = opts.chunk_bytes // (V * torch.empty((), dtype=dtype).element_size())
    return max(tiles.rows, rows // tiles.rows * tiles.rows)
