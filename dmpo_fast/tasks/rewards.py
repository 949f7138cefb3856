"""Reward functions: resolve them by name or import path, and call them so that no reward stops a run.

A reward function has TRL's signature ``fn(prompts, completions, **columns) -> list[float | None]``.
``score_rewards`` calls each function on the whole batch; if the call raises (``SystemExit`` included), it
calls it again one sample at a time so only the failing samples are lost. A sample fails when its reward
raised, was None (a whole batch of None: every sample), was not a number, or was not finite or beyond
``MAX_ABS_REWARD`` in size; it gets NaN in the summed reward, ``importance_weights`` turns NaN into weight 0,
and the caller logs the count as ``reward_failures``. So a flaky reward costs samples, never the run.

``timeout`` (the trainer's ``reward_timeout``) bounds each function's call on a batch, retries included:
the call runs in a daemon thread, and one that has not returned in time fails all its samples. Python
cannot stop a thread, so a call that never returns is abandoned, still running (and using a core) until the
process exits; being a daemon thread, it never keeps the process alive. Ctrl-C still stops the run.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]
RewardSpec = RewardFn | str

# A reward beyond this size counts as failed. exp(r/α) is computed in float32 after subtracting the group's
# maximum, which is exact enough for |r| up to ~1e6 (float32 spacing there is 0.06; α = 0.04 makes that a
# factor e^1.5 in the weights); 1e38 itself overflows r/α to inf and would make the loss NaN.
MAX_ABS_REWARD = 1e6


# --------------------------------------------------------------------------- names and import paths
def _import(module_name: str):
    """``importlib.import_module``, also looking in the current directory (as ``python script.py`` and TRL
    scripts do) when the module is not found elsewhere. The directory is on ``sys.path`` only for this import:
    a module it imports later, inside a reward call, must be importable without it."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != module_name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(cwd)


def resolve_reward(spec: RewardSpec) -> RewardFn:
    """A reward function from a callable, a built-in task name ("sudoku", "countdown", ... : that task's
    reward with its default settings), or an import path "package.module:function" /
    "package.module.function" (attributes may be nested: "pkg.mod:Class.method"), looked up on ``sys.path``
    and then in the current directory."""
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
        obj: Any = _import(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({e})") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward {spec!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward {spec!r} resolves to a {type(obj).__name__}, which is not callable")
    return obj


def reward_path(fn: Callable) -> str | None:
    """The import path "module:qualname" that resolves back to ``fn``, or None when there is none (a lambda,
    a closure, a ``functools.partial``, an instance). A function of the script being run gets
    "__main__:name", which resolves only inside that script."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return f"{module}:{qualname}" if obj is not None and (obj is fn or obj == fn) else None


def reward_name(fn: Callable) -> str:
    """The name of a reward in the metrics (``rewards/<name>/mean``): the function's ``__name__`` (as TRL
    logs it), the task's name for a task's reward, else the class name."""
    owner = getattr(fn, "__self__", None)
    from dmpo_fast.tasks.base import Task  # noqa: PLC0415

    if isinstance(owner, Task):
        return owner.name
    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


def _parts(fn: RewardFn) -> dict[str, RewardFn]:
    """A task's reward as the named functions whose sum it is; any other function as itself."""
    owner = getattr(fn, "__self__", None)
    from dmpo_fast.tasks.base import Task  # noqa: PLC0415

    if isinstance(owner, Task) and getattr(fn, "__name__", None) == "reward":
        return owner.reward_functions()
    return {reward_name(fn): fn}


# --------------------------------------------------------------------------- calling one reward safely
def _as_float(value: Any) -> float:
    """A reward value as a float; NaN for None, non-numbers, non-finite values, |value| > MAX_ABS_REWARD."""
    if value is None or isinstance(value, (str, bytes)):
        return math.nan
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) and abs(x) <= MAX_ABS_REWARD else math.nan


def _values(name: str, values: Any, n: int) -> list[float]:
    """A batch call's return value as n floats; ValueError for a caller bug (wrong type or length)."""
    if values is None:
        logger.warning("reward %s returned None for a batch of %d: every sample counts as failed", name, n)
        return [math.nan] * n
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ValueError(f"reward {name} must return a list of {n} values, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"reward {name} returned {len(values)} values for {n} completions")
    out = [_as_float(v) for v in values]
    bad = sum(v is not None and math.isnan(x) for v, x in zip(values, out, strict=True))
    if bad:
        logger.warning(
            "reward %s gave %d of %d values that are not finite numbers of size <= %g: counted as failures",
            name, bad, n, MAX_ABS_REWARD,
        )  # fmt: skip
    return out


def _call(
    name: str, fn: RewardFn, prompts: Sequence, completions: Sequence, columns: Mapping[str, Sequence]
) -> list[float]:
    """``fn`` on the batch, or sample by sample when the batch call raises; NaN for each failed sample."""
    n = len(completions)
    try:
        values = fn(prompts=prompts, completions=completions, **columns)
    except (Exception, SystemExit) as e:  # any failure of user code (sys.exit too): retry per sample below
        logger.warning(
            "reward %s raised on a batch of %d (%s: %s); scoring samples one by one",
            name,
            n,
            type(e).__name__,
            e,
        )
    else:
        return _values(name, values, n)
    out = []
    first_error: BaseException | None = None
    for i in range(n):
        try:
            one = fn(
                prompts=[prompts[i]], completions=[completions[i]], **{k: [v[i]] for k, v in columns.items()}
            )
            out.append(_as_float(one[0]) if one is not None and len(one) == 1 else math.nan)
        except (Exception, SystemExit) as e:
            first_error = first_error or e
            out.append(math.nan)
    if first_error is not None:
        logger.warning(
            "reward %s failed on %d of %d samples (first: %s: %s)",
            name, sum(math.isnan(x) for x in out), n, type(first_error).__name__, first_error,
        )  # fmt: skip
    return out


def _call_with_timeout(
    name: str, fn: RewardFn, prompts: Sequence, completions: Sequence, columns: Mapping, timeout: float | None
) -> list[float]:
    """``_call`` in a daemon thread, abandoned (its samples failed) after ``timeout`` seconds; in this thread
    when ``timeout`` is None or 0."""
    if not timeout:
        return _call(name, fn, prompts, completions, columns)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["values"] = _call(name, fn, prompts, completions, columns)
        except BaseException as e:  # noqa: BLE001  (a caller bug or Ctrl-C-like exception: re-raised below)
            result["error"] = e

    worker = threading.Thread(target=work, name=f"reward {name}", daemon=True)
    worker.start()
    worker.join(timeout)  # interruptible: Ctrl-C reaches the main thread here
    if worker.is_alive():
        logger.warning(
            "reward %s did not return within reward_timeout=%gs: its %d samples count as failed; the call is "
            "abandoned in a daemon thread (Python cannot stop it)", name, timeout, len(completions),
        )  # fmt: skip
        return [math.nan] * len(completions)
    if "error" in result:
        raise result["error"]
    return result["values"]


# --------------------------------------------------------------------------- the summed reward
@dataclass
class RewardScores:
    """Rewards of one batch. ``total``: float32 ``[N]``, the weighted sum, NaN where any function with a
    non-zero weight failed; ``n_failed``: the number of those NaN; ``per_function``: each called function's
    own (unweighted) float32 ``[N]`` values, NaN where it failed, by its metrics name (``reward_name``; a
    task's reward appears as its parts, ``Task.reward_functions``)."""

    total: torch.Tensor
    n_failed: int
    per_function: dict[str, torch.Tensor]


def score_rewards(
    fns: RewardSpec | Sequence[RewardSpec],
    prompts: Sequence,
    completions: Sequence,
    columns: Mapping[str, Sequence] | None = None,
    *,
    weights: Sequence[float] | None = None,
    timeout: float | None = None,
) -> RewardScores:
    """The rewards of ``fns`` per completion, never raising on a reward's failure (module docstring).

    ``timeout``: seconds each function may take on the batch (None or 0: no limit, called in this thread).
    Raises ``ValueError`` only for caller bugs: misaligned inputs, a function returning the wrong number of
    values or a non-list, or ``weights`` of the wrong length.
    """
    fn_list = [fns] if callable(fns) or isinstance(fns, str) else list(fns)
    if not fn_list:
        raise ValueError("fns must name at least one reward function")
    fn_list = [resolve_reward(f) for f in fn_list]
    weights = [1.0] * len(fn_list) if weights is None else [float(w) for w in weights]
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
    per_function: dict[str, torch.Tensor] = {}
    for fn, w in zip(fn_list, weights, strict=True):
        if w == 0.0:
            continue
        for name, part in _parts(fn).items():
            values = torch.tensor(
                _call_with_timeout(name, part, prompts, completions, columns, timeout), dtype=torch.float64
            )
            total += w * values
            key, k = name, 1
            while key in per_function:  # two functions of one name: name, name_2, ...
                k += 1
                key = f"{name}_{k}"
            per_function[key] = values.to(torch.float32)
    rewards = total.to(torch.float32)
    return RewardScores(rewards, int(torch.isnan(rewards).sum()), per_function)


def safe_rewards(
    fns: RewardSpec | Sequence[RewardSpec],
    prompts: Sequence,
    completions: Sequence,
    columns: Mapping[str, Sequence] | None = None,
    *,
    weights: Sequence[float] | None = None,
    timeout: float | None = None,
) -> tuple[torch.Tensor, int]:
    """``(rewards, n_failed)`` of ``score_rewards``: the weighted sum per completion (float32 ``[N]``, NaN
    where a reward failed) and the number of failed samples."""
    scores = score_rewards(fns, prompts, completions, columns, weights=weights, timeout=timeout)
    return scores.total, scores.n_failed
