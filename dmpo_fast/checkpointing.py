"""Checkpoint state of a run: what is saved (model, optimizer, scheduler, RNG, step, rollout buffers,
eval before, config), how it is loaded into a sharded or unsharded run, and what a resume may change."""

from __future__ import annotations

from dmpo_fast.config import SAVED_WITHOUT, TrainConfig
from dmpo_fast.run_io import ADAPTER_NAME as _ADAPTER
from dmpo_fast.run_io import MODEL_INFO, RunDir

# Fields a resumed run may change; any other difference from the saved config is refused. Not eval_size:
# "before" on 16 rows against "after" on 32 is no comparison.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "output_dir",  # a run directory that was moved, or spelled another way, is the same run
        "reward_timeout",
        "report_to",
        "log_completions_every",
        "undo_non_finite",
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
    saved = {**{k: v for k, v in SAVED_WITHOUT.items() if k not in saved}, **saved}  # what an older run did
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


def load_training_state(policy, optimizer, state: dict, *, sharded: bool, directory) -> None:
    """Load a checkpoint's model (its HF files in ``directory``, or an older release's ``state["model"]``) and
    optimizer into a sharded or an unsharded run, whichever wrote it."""
    fqn = state.get("optimizer_format") == "fqn"
    if sharded:
        from dmpo_fast import sharding

        current = sharding.full_state(policy, optimizer)[0] if "model" not in state else {}
    else:
        current = policy.state_dict() if "model" not in state else {}
    model_state = checkpoint_model_state(policy, directory, state, current)
    if not sharded and not fqn:
        policy.load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optim = state["optimizer"] if fqn else _optimizer_state_by_name(policy, state["optimizer"])
    if sharded:
        sharding.load_full_state(policy, optimizer, model_state, optim)
    else:
        policy.load_state_dict(model_state)
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


# --------------------------------------------------------------------------------------------------
# The model of a checkpoint, in Hugging Face form
# --------------------------------------------------------------------------------------------------
#
#   checkpoints/step-NNNNNN/
#     config.json, model.safetensors            the fine-tuned model (full fine-tuning), LLaDA's parameter names
#     adapter_config.json, adapter_model.safetensors   the PEFT adapter (LoRA / QLoRA); the base is cfg.model
#     tokenizer files                            the run's tokenizer
#     dmpo_fast.json                             base model, quantization, which of the two forms
#     state.pt                                   the training state: optimizer, scheduler, RNG, step, buffers,
#                                                eval before, config (older releases also kept "model" here)
#
# So a checkpoint (or a run directory: its newest checkpoint) loads with ``dmpo_fast.models.load(path)``, with
# ``PeftModel.from_pretrained`` for an adapter, and with transformers' auto classes after
# ``dmpo_fast.models.register_auto_classes()`` (LLaDA's code is ours: no trust_remote_code).



def _is_adapter(policy) -> bool:
    return hasattr(policy.model, "peft_config")


def save_model_files(policy, model_state: dict, tokenizer, cfg: TrainConfig, directory) -> None:
    """Write the model of ``model_state`` (the policy's full state dict) into ``directory`` in HF form."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    directory = Path(directory)
    if _is_adapter(policy):
        marker = f".{_ADAPTER}."
        adapter = {
            k[len("model.") :].replace(marker, ".", 1): v for k, v in model_state.items() if "lora_" in k
        }
        save_file(_own_storage(adapter), directory / "adapter_model.safetensors", metadata={"format": "pt"})
        peft_config = policy.model.peft_config[_ADAPTER]
        saved_base = peft_config.base_model_name_or_path
        peft_config.base_model_name_or_path = cfg.model  # a name or path that loads on any machine
        try:
            peft_config.save_pretrained(str(directory))
        finally:
            peft_config.base_model_name_or_path = saved_base
        form = "adapter"
    else:
        weights = {k[len("model.") :]: v for k, v in model_state.items()}
        save_file(_own_storage(weights), directory / "model.safetensors", metadata={"format": "pt"})
        config = policy.model.config.__class__.from_dict(policy.model.config.to_dict())
        if hasattr(config, "auto_map"):  # it would point transformers at modeling files this folder lacks
            del config.auto_map
        config.save_pretrained(str(directory))
        form = "full"
    if hasattr(tokenizer, "batch_encode"):
        tokenizer.save(directory)
    else:
        tokenizer.save_pretrained(str(directory))
    info = {"form": form, "base_model": cfg.model, "dtype": cfg.dtype, "load_in_4bit": cfg.load_in_4bit,
            "load_in_8bit": cfg.load_in_8bit, "trust_remote_code": cfg.trust_remote_code}  # fmt: skip
    (directory / MODEL_INFO).write_text(json.dumps(info, indent=1) + "\n")


def _own_storage(tensors: dict) -> dict:
    """safetensors refuses tensors that share storage (tied weights): give each its own, contiguous."""
    seen, out = set(), {}
    for k, v in tensors.items():
        v = v.detach()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone().contiguous() if ptr in seen or not v.is_contiguous() else v
        seen.add(ptr)
    return out


def checkpoint_model_state(policy, directory, state: dict, current: dict) -> dict:
    """The policy's full state dict of a checkpoint: ``state["model"]`` of an older release, else
    ``current`` (the policy's own full state: the base a run loads) updated with the checkpoint's files."""
    if "model" in state:
        return state["model"]
    files = RunDir.read_model_files(directory)
    if files["form"] == "adapter" and not _is_adapter(policy):
        raise ValueError(f"checkpoint {str(directory)!r} holds a LoRA adapter but the run has lora=false")
    unknown = sorted(set(files["tensors"]) - set(current))
    if unknown:
        raise ValueError(f"checkpoint {str(directory)!r} holds tensors this model has no place for: {unknown[:3]}")
    return {**current, **files["tensors"]}


def resume_point(run: RunDir, cfg: TrainConfig, *, main: bool):
    """(checkpoint directory, its training state) a resume starts from: the newest checkpoint that passes
    verification (newer damaged ones are named in a warning), checked against its own config; (None, None)
    when the run has no checkpoint yet. A run whose every checkpoint is damaged is refused."""
    import warnings

    with warnings.catch_warnings():
        if not main:
            warnings.simplefilter("ignore")
        latest = run.latest_checkpoint()
    if latest is None and run.checkpoint_dirs():
        raise ValueError(
            f"resume=true but no checkpoint in {str(run.checkpoints)!r} passes verification (see the warning "
            "above): move that directory away to start again from step 0"
        )
    state = RunDir.load_checkpoint(latest, verify=False, with_model=False) if latest else None  # just verified
    check_resume_config(run, cfg, state)
    return latest, state

