"""Peak-memory measurement that works on CPU as well as CUDA.

On CUDA the caching allocator already tracks its high-water mark. On CPU torch keeps no such
statistic, so :class:`CpuPeakTracker` watches every tensor produced while it is active (a
``TorchDispatchMode``) and counts a storage as live from its first appearance until the last tensor
seen on it is garbage-collected. The result is the peak of bytes allocated *during* the call (inputs
that already existed do not count), exact for tensors created through the dispatcher, which is every
tensor an op allocates.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class CpuPeakTracker(TorchDispatchMode):
    """Context manager: ``with CpuPeakTracker() as t: ...`` then read ``t.peak_bytes``."""

    def __init__(self):
        super().__init__()
        self._refs: dict[int, int] = {}  # storage data_ptr -> number of live tensors seen on it
        self._bytes: dict[int, int] = {}
        self._preexisting: set[int] = set()
        self.current_bytes = 0
        self.peak_bytes = 0

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current_bytes -= self._bytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                key = t.untyped_storage().data_ptr()
                if key not in self._refs:
                    self._preexisting.add(key)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._preexisting:
                continue
            if key not in self._refs:
                self._refs[key] = 0
                self._bytes[key] = nbytes
                self.current_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            self._refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """Run ``fn()`` and return ``(result, peak bytes allocated during the call)`` on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    with CpuPeakTracker() as tracker:
        out = fn()
    return out, tracker.peak_bytes
