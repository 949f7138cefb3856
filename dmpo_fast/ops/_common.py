"""Argument checks and backend selection shared by every op in ``dmpo_fast.ops``.

Every public op takes ``impl="auto"|"triton"|"native"|"chunked"|"eager"``:
``eager`` is the plain reference (it may materialise full logits), ``chunked`` is memory-lean torch,
``triton`` the fused kernels in ``dmpo_fast.kernels``, ``native`` the optional C++ CPU ops.
``auto`` picks triton on CUDA, else native when built, else chunked.

The native ops are never built by ``auto`` unless ``DMPO_FAST_NATIVE=1``: ``auto`` takes them when they are
loaded or a finished build sits in the cache; ``impl="native"`` builds them at first use, and falls back to
``chunked`` with one warning when it cannot (see ``dmpo_fast.ops._native``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

Impl = Literal["auto", "triton", "native", "chunked", "eager"]
IMPLS: tuple[str, ...] = ("auto", "triton", "native", "chunked", "eager")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    shape: tuple | None = None,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``t`` is a tensor of the expected rank, dtype, shape.

    ``shape`` entries that are None are not checked.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise ValueError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def native_available() -> bool:
    """Whether the optional compiled CPU ops are loaded in this process (never builds or loads them)."""
    from dmpo_fast.ops import _native

    return _native.is_loaded()


def resolve_impl(
    impl: str, device: torch.device, *, has_triton: bool = True, has_native: bool = False
) -> str:
    """Map ``impl`` to a concrete backend for tensors on ``device``; raise if it cannot run there.

    ``has_triton`` / ``has_native`` say whether this op has that backend at all. ``native`` on CPU returns
    ``"chunked"`` (after one warning per process) when the native ops cannot be built or loaded.
    """
    check_impl(impl)
    from dmpo_fast.kernels import runtime as kernels
    from dmpo_fast.ops import _native

    if impl == "auto":
        if has_triton and device.type == "cuda" and kernels.available(device):
            return "triton"
        if has_native and device.type == "cpu" and _native.usable_for_auto():
            return "native"
        return "chunked"
    if impl == "triton":
        if not has_triton:
            raise ValueError("impl='triton' is not provided by this op; use 'chunked' or 'eager'")
        if not kernels.available(device):
            raise ValueError(f"impl='triton' cannot run here: {kernels.unavailable_reason(device)}")
    if impl == "native":
        if not has_native:
            raise ValueError("impl='native' is not provided by this op; use 'chunked' or 'eager'")
        if device.type != "cpu":
            raise ValueError(
                f"impl='native' runs the compiled CPU ops on CPU tensors only; the device is {device}"
            )
        if not _native.load(build=True):
            return "chunked"
    return impl


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 math for fp32 and lower precisions; fp64 inputs keep fp64 (gradcheck, truth references)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
