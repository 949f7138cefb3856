"""Checkpoint state of a run: what is saved (model, optimizer, scheduler, RNG, step, rollout buffers,
eval before, config), how it is loaded into a sharded or unsharded run, and what a resume may change."""

from __future__ import annotations

from dmpo_fast.config import TrainConfig
from dmpo_fast.run_io import RunDir

# Fields a resumed run may change; any other difference from the saved config is refused. Not eval_size:
# "before" on 16 rows against "after" on 32 is no comparison.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "output_dir",  # a run directory that was moved, or spelled another way, is the same run
        "max_steps",  # never below the checkpoint's step (check_resume_config)
        "progress",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "plot",
        "tensorboard",
        "device",
        "impl",
        "fsdp",  # checkpoints hold the full state either way
        "fsdp_reshard_after_forward",
    }  # fmt: skip
)


def check_resume_config(run: RunDir, cfg: TrainConfig, state: dict | None = None) -> None:
    """Refuse a resume that would be another run under the same name: a config that differs from the run's
    in a field outside ``RESUMABLE_CHANGES``, or ``max_steps`` below the checkpoint's step. ``state`` is the
    checkpoint the run resumes from: its own config is the reference (config.yaml can be edited or deleted);
    without one (killed before the first checkpoint), config.yaml is."""
    if state is not None and state["step"] > cfg.max_steps:
        raise ValueError(
            f"max_steps={cfg.max_steps} but the run in {str(run.path)!r} is at step {state['step']} (its newest "
            f"checkpoint): a resume continues a run, it cannot shorten it. Set max_steps >= {state['step']}, or "
            "evaluate that checkpoint with dmpo-fast eval --checkpoint"
        )
    if state is not None and isinstance(state.get("config"), dict):
        saved, source = state["config"], f"its checkpoint step-{state['step']:06d}"
    else:
        saved_file = run.path / "config.yaml"
        if not saved_file.is_file():
            return
        import yaml

        try:
            saved = yaml.safe_load(saved_file.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ValueError(
                f"resume=true but the saved config {str(saved_file)!r} cannot be read: {e}"
            ) from e
        if not isinstance(saved, dict):
            raise ValueError(f"resume=true but the saved config {str(saved_file)!r} is not a mapping")
        source = repr(str(saved_file))
    now = cfg.to_dict()
    changed = sorted(k for k in now if k in saved and saved[k] != now[k] and k not in RESUMABLE_CHANGES)
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"resume=true but the config differs from the saved run in {str(run.path)!r} ({diffs}; saved in "
            f"{source}); only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume. Start a new "
            "output_dir instead."
        )


def training_state(policy, optimizer, *, sharded: bool) -> tuple[dict, dict, str]:
    """(model state, optimizer state, optimizer format) to checkpoint. The model state is always the full,
    unsharded one; the optimizer's is keyed by parameter index ("index", ``optimizer.state_dict()``) or, for a
    sharded model, by parameter name ("fqn", gathered in full). A collective when sharded."""
    if sharded:
        from dmpo_fast import sharding

        model_state, optimizer_state = sharding.full_state(policy, optimizer)
        return model_state, optimizer_state, "fqn"
    return policy.state_dict(), optimizer.state_dict(), "index"


def load_training_state(policy, optimizer, state: dict, *, sharded: bool) -> None:
    """Load a checkpoint's model and optimizer into a sharded or an unsharded run, whichever wrote it."""
    fqn = state.get("optimizer_format") == "fqn"
    if not sharded and not fqn:
        policy.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optim = state["optimizer"] if fqn else _optimizer_state_by_name(policy, state["optimizer"])
    if sharded:
        from dmpo_fast import sharding

        sharding.load_full_state(policy, optimizer, state["model"], optim)
    else:
        policy.load_state_dict(state["model"])
        set_optimizer_state_dict(policy, optimizer, optim, options=StateDictOptions(full_state_dict=True))


def _optimizer_state_by_name(policy, index_state: dict) -> dict:
    """An ``optimizer.state_dict()`` of this trainer (one group over the trainable parameters in order) keyed
    by parameter name, as ``set_optimizer_state_dict`` reads it."""
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    groups = index_state["param_groups"]
    return {
        "state": {names[i]: v for i, v in index_state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups],
    }
