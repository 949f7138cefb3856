"""Custom reward functions: resolve them by name or import path, and call them without crashing.

A reward function has TRL's signature ``fn(prompts, completions, **columns) -> list[float | None]``.
``safe_rewards`` calls each function on the whole batch; if the call raises, it calls it again one sample
at a time so only the failing samples are lost. A sample whose reward raised, was None or was not a
finite number gets NaN in the summed reward, and ``importance_weights`` turns NaN into weight 0, so a
flaky reward costs samples, never a training step. The caller logs ``n_failed``.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]
RewardSpec = RewardFn | str


def resolve_reward(spec: RewardSpec) -> RewardFn:
    """A reward function from a callable, a built-in task name ("sudoku", "countdown", ... : that task's
    reward with its default settings), or an import path "package.module:function" /
    "package.module.function" (attributes may be nested: "pkg.mod:Class.method")."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward must be a callable or a non-empty string, got {spec!r}")
    spec = spec.strip()
    from dmpo_fast.tasks import get_task, task_names  # noqa: PLC0415  (the registry imports this module)

    if spec in task_names():
        return get_task(spec).reward
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
    elif "." in spec:
        module_name, _, attr_path = spec.rpartition(".")
    else:
        raise ValueError(
            f"reward {spec!r} is neither a built-in task ({', '.join(task_names())}) nor an import path "
            "like 'package.module:function'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({e})") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {spec!r} resolves to a {type(obj).__name__}, which is not callable")
    return obj


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _as_float(value: Any) -> float:
    """A reward value as a float, NaN for None / non-numbers / inf."""
    if value is None or isinstance(value, (str, bytes)):
        return math.nan
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def _call(
    fn: RewardFn, prompts: Sequence, completions: Sequence, columns: Mapping[str, Sequence]
) -> list[float]:
    n = len(completions)
    try:
        values = fn(prompts=prompts, completions=completions, **columns)
    except Exception as e:  # noqa: BLE001  (any failure of user code: retry per sample below)
        logger.warning(
            "reward %s raised on a batch of %d (%s: %s); scoring samples one by one",
            _name(fn),
            n,
            type(e).__name__,
            e,
        )
    else:
        if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise ValueError(
                f"reward {_name(fn)} must return a list of {n} values, got {type(values).__name__}"
            )
        if len(values) != n:
            raise ValueError(f"reward {_name(fn)} returned {len(values)} values for {n} completions")
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        return [_as_float(v) for v in values]
    out = []
    first_error = None
    for i in range(n):
        try:
            one = fn(
                prompts=[prompts[i]], completions=[completions[i]], **{k: [v[i]] for k, v in columns.items()}
            )
            out.append(_as_float(one[0]) if one is not None and len(one) == 1 else math.nan)
        except Exception as e:  # noqa: BLE001
            first_error = first_error or e
            out.append(math.nan)
    if first_error is not None:
        logger.warning(
            "reward %s failed on %d of %d samples (first: %s: %s)",
            _name(fn),
            sum(math.isnan(x) for x in out),
            n,
            type(first_error).__name__,
            first_error,
        )
    return out


def safe_rewards(
    fns: RewardSpec | Sequence[RewardSpec],
    prompts: Sequence,
    completions: Sequence,
    columns: Mapping[str, Sequence] | None = None,
    *,
    weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, int]:
    """Weighted sum of the rewards of ``fns`` per completion, never raising on a reward's failure.

    Returns ``(rewards, n_failed)``: ``rewards`` is float32 ``[N]`` with NaN for every sample where some
    function with a non-zero weight raised or gave None / a non-finite value; ``n_failed`` counts them.
    Raises ``ValueError`` only for caller bugs: misaligned inputs, a function returning the wrong
    number of values, or ``weights`` of the wrong length.
    """
    fn_list = [fns] if callable(fns) or isinstance(fns, str) else list(fns)
    if not fn_list:
        raise ValueError("fns must name at least one reward function")
    fn_list = [resolve_reward(f) for f in fn_list]
    if weights is None:
        weights = [1.0] * len(fn_list)
    weights = [float(w) for w in weights]
    if len(weights) != len(fn_list):
        raise ValueError(f"weights has {len(weights)} entries for {len(fn_list)} reward functions")
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"prompts has {len(prompts)} entries for {n} completions")
    columns = dict(columns or {})
    for key, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
    total = torch.zeros(n, dtype=torch.float64)
    for fn, w in zip(fn_list, weights, strict=True):
        if w == 0.0:
            continue
        total += w * torch.tensor(_call(fn, prompts, completions, columns), dtype=torch.float64)
    rewards = total.to(torch.float32)
    return rewards, int(torch.isnan(rewards).sum())
