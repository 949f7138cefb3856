"""Guards of a run: the checks before any work (``preflight``), and the undo of an optimizer step that made the
parameters non-finite (``snapshot`` before the step, ``restore`` after it), so that no checkpoint ever holds
a NaN. docs/reliability.md lists what is guaranteed and how each guarantee is tested."""

from __future__ import annotations

import torch

from dmpo_fast.config import TrainConfig


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a sharded parameter (FSDP): this process's shard


def snapshot(params, optimizer) -> tuple[list, dict]:
    """Copies of the trainable parameters and their AdamW state, on their device (with LoRA a few MB; a
    full fine-tune needs 3x the trainable parameters' memory for it, docs/reliability.md)."""
    with torch.no_grad():
        values = [_local(p.detach()).clone() for p in params]
        state = {
            i: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
            for i, p in enumerate(params)
            if p in optimizer.state
        }
    return values, state


def restore(params, optimizer, snapshot: tuple[list, dict]) -> None:
    values, state = snapshot
    with torch.no_grad():
        for i, (p, v) in enumerate(zip(params, values, strict=True)):
            _local(p.detach()).copy_(v)
            if i in state:
                optimizer.state[p] = state[i]
            else:  # the first step created it
                optimizer.state.pop(p, None)


def non_finite_count(params) -> float:
    """How many of this process's trainable parameters (or shards) hold a NaN or an infinity."""
    if not params:
        return 0.0
    return float(torch.stack([~torch.isfinite(_local(p.detach())).all() for p in params]).sum())


def non_finite_names(state: dict) -> list[str]:
    return [
        k
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all())
    ]


def preflight(cfg: TrainConfig, device: torch.device):
    """The checks that need neither the model nor the data, run before anything is written or computed:
    float16 on the CPU, Triton without a GPU, a model path that does not exist, the task and its options,
    the extra rewards' import paths. Returns (task, reward functions)."""
    from dmpo_fast.config import FLOAT16_ON_CPU
    from dmpo_fast.tasks import get_task, resolve_reward

    if cfg.dtype == "float16" and device.type == "cpu":
        raise ValueError(f"{FLOAT16_ON_CPU} (device={cfg.device!r} runs on the CPU here)")
    if cfg.impl == "triton":
        from dmpo_fast.kernels import runtime

        if not runtime.available(device):
            raise ValueError(f"impl='triton' cannot run here: {runtime.unavailable_reason(device)}")
    _check_model_name("model", cfg.model)
    _check_model_name("mro_ppl_model", cfg.ppl_model)
    try:
        task = get_task(cfg.task, **cfg.task_options())
    except TypeError as e:  # a task class that is not a dataclass, given options it does not take
        raise ValueError(f"task_kwargs {cfg.task_kwargs!r} do not fit task {cfg.task!r}: {e}") from e
    return task, [task.reward, *(resolve_reward(s) for s in cfg.reward_funcs)]


def _check_model_name(field: str, name: str | None) -> None:
    """A built-in name, an existing directory or a hub id (owner/name); a path that does not exist is refused
    here rather than after the run directory was made."""
    import os
    import re

    from dmpo_fast.assets import TINY_AR_SCORERS, TINY_MODELS

    if name is None or name in TINY_MODELS or name in TINY_AR_SCORERS or os.path.isdir(os.path.expanduser(name)):
        return
    looks_local = name.startswith(("/", "./", "../", "~")) or os.path.exists(name)
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None
    if looks_local or not hub_id:
        raise ValueError(
            f"{field} {name!r} is not a directory that exists, a hub id (owner/name) or a built-in model "
            f"({', '.join(sorted(TINY_MODELS))})"
        )
