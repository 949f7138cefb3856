"""Whether the Triton kernels of dmpo_fast (``dmpo_fast.kernels``) can run, and the one import of Triton.

The top-level ``kernels/`` folder is installed as ``dmpo_fast.kernels`` and has no ``__init__.py`` on
purpose: a folder without one is only a namespace portion, and Python prefers a regular package of the
same name anywhere on ``sys.path``. So with the repository root on ``sys.path`` (``python -c`` or
``python -m`` started there), ``import kernels`` still finds Hugging Face's ``kernels`` package, which
transformers imports, instead of this folder.

Triton is imported here and the kernel modules take ``triton`` and ``triton.language`` from
:func:`require`; only tooling imports more of Triton itself (``compile_check``'s compiler, the
benchmarks' ``triton.testing``). The rest of the package asks one question, :func:`available`, before
dispatching ``impl="triton"``: kernels can run when Triton imports and either a CUDA device is present or
``TRITON_INTERPRET=1`` (the CPU interpreter, used by the tests).

One op per file; each file holds the ``@triton.jit`` kernels, the launcher and the autograd
function. The eager twin of every kernel lives in ``dmpo_fast.ops`` and is the test oracle.
"""

from __future__ import annotations

import os

try:  # Triton is absent on macOS / Windows and optional everywhere.
    import triton
    import triton.language as tl

    HAS_TRITON = True
    _IMPORT_ERROR: Exception | None = None
except Exception as e:  # pragma: no cover - depends on the platform
    triton = tl = None
    HAS_TRITON = False
    _IMPORT_ERROR = e


def require(module: str, fallback: str):
    """``(triton, triton.language)`` for a kernel module, or an ImportError naming the eager ``fallback``."""
    if not HAS_TRITON:  # pragma: no cover - depends on the platform
        raise ImportError(f"{module} needs Triton (pip install triton); use {fallback} without it")
    return triton, tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device=None) -> bool:
    """Whether Triton kernels can run on ``device`` (a torch device, or any device when None)."""
    if not HAS_TRITON:
        return False
    if interpreting():
        return True
    import torch

    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def unavailable_reason(device=None) -> str:
    """A sentence saying why :func:`available` is False, for error messages."""
    if not HAS_TRITON:
        return f"Triton could not be imported ({_IMPORT_ERROR!r}); install it with `pip install triton`"
    return (
        f"Triton kernels need a CUDA device or TRITON_INTERPRET=1 (got device {device}); "
        "use impl='chunked' or impl='eager' on CPU"
    )


# --------------------------------------------------------------------------------------------------
# Launch helpers shared by the kernel modules
# --------------------------------------------------------------------------------------------------

_SM_COUNT: dict[int, int] = {}


def programs_per_wave(device, waves: int) -> int:
    """Programs that fill ``device`` ``waves`` deep: ``waves`` x its SM count on CUDA; 8 elsewhere (the
    interpreter), so that test shapes still exercise the split and merge paths."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return waves * _SM_COUNT[idx]


def alloc(shape, dtype, device):
    """An uninitialised buffer; in the interpreter and with DMPO_FAST_POISON=1 filled with NaN (floats) or
    -1 (ints), so that an element a kernel forgets to write shows up instead of passing silently."""
    import torch

    if interpreting() or os.environ.get("DMPO_FAST_POISON", "0") == "1":
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)

