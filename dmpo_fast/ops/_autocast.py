"""``torch.autocast`` for the fused linear ops: the projection runs in the autocast dtype, as ``F.linear``
would."""

from __future__ import annotations

import contextlib

import torch


def autocast_operands(hidden: torch.Tensor, weight: torch.Tensor):
    """``(hidden, weight, context)`` for a projection under ``torch.autocast``.

    Inside an autocast region ``F.linear`` would multiply in the autocast dtype; the fused ops do the same:
    fp32 / fp16 / bf16 operands are cast to that dtype (fp64 is left alone, as autocast leaves it), and the op
    then runs inside ``context``, which switches autocast off so the op's own fp32 accumulation and custom
    backward see the dtypes they were given. Outside autocast: the operands unchanged and a no-op context.
    The casts are differentiable, so fp32 master weights still receive fp32 gradients.
    """
    if not isinstance(weight, torch.Tensor):
        return hidden, weight, contextlib.nullcontext()  # the caller's checks name the bad argument
    dt = autocast_dtype(hidden)
    if dt is None:
        return hidden, weight, contextlib.nullcontext()
    castable = (torch.float32, torch.float16, torch.bfloat16)
    hidden = hidden.to(dt) if hidden.dtype in castable else hidden
    weight = weight.to(dt) if weight.dtype in castable else weight
    return hidden, weight, _autocast_off(hidden.device.type)


def autocast_dtype(t) -> torch.dtype | None:
    """The dtype autocast computes in on ``t``'s device, or None when autocast is off there."""
    if not isinstance(t, torch.Tensor):
        return None
    device_type = t.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
