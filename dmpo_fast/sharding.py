"""Fully sharded data parallel training (PyTorch FSDP2, ``fully_shard``): ZeRO-3 and ZeRO-2 in the trainer.

``fsdp=true`` in the config, or ``accelerate launch`` with an FSDP config (``configs/accelerate/fsdp.yaml``,
``fsdp_zero2.yaml``), shards every transformer block and the rest of the model (embedding, final norm, output
layer) over the processes: each holds 1/world of the parameters, gradients and AdamW state. The loop is the
same as with replicated models; three things differ, all here:

- **Training forwards go through the root module.** ``lm(ids, attention_mask)`` (``DiffusionLM.forward``)
  gathers the root's parameters; ``lm.head_weight`` read after it is the gathered output matrix, whose
  gradient FSDP reduce-scatters like any other. ``dmpo._hidden_and_head`` calls the model that way.
- **Rollouts, rewards, the ELBO and evaluation run gathered** (``gathered``): the whole model is all-gathered
  once, and the many no-grad forwards of decoding then need no collective. That is also what makes them safe:
  a sampler's number of model calls depends on the data (early stops, confidence thresholds), and sharded
  forwards that differ in number between processes would wait on each other forever. During these phases a
  process holds the full policy (and the full frozen reference, when there is one), as RL systems that hand
  weights to a rollout engine do.
- **Gradients are summed, not averaged.** The losses are already normalised by the whole batch's totals
  (rollouts, tokens) across processes, so the reduce-scatter divides by 1: the update equals the one-process
  update on the same rollouts.

Checkpoints hold the full (unsharded) state dict under the same names as an unsharded run, so ``dmpo-fast
eval``, a single-process resume and ``DiffusionLM.save_pretrained`` read them unchanged; the optimizer state
is stored by parameter name (``optimizer_format: "fqn"``).

ZeRO stages map to FSDP2 as: ZeRO-3 = ``reshard_after_forward=True`` (parameters re-sharded after each block's
forward and gathered again for backward), ZeRO-2 = ``False`` (kept gathered between forward and backward;
gradients and optimizer state still sharded). DeepSpeed's engine is not used: its ZeRO-3 partitions parameters
behind hooks that the fused losses (which read the output matrix directly) and the decoding loop would have to
special-case, and FSDP2 gives the same memory split inside the plain loop.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.nn as nn

_TRUE = ("1", "true", "yes")


def requested(cfg) -> bool:
    """Whether this run shards: ``cfg.fsdp`` or an ``accelerate launch`` with an FSDP config."""
    return bool(cfg.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in _TRUE


def reshard_after_forward(cfg) -> bool:
    """ZeRO-3 (True, the default) or ZeRO-2 (False): ``cfg.fsdp_reshard_after_forward``, which an accelerate
    FSDP config's ``fsdp_reshard_after_forward`` (or FSDP1's ``fsdp_sharding_strategy``) overrides."""
    env = os.environ.get("FSDP_RESHARD_AFTER_FORWARD")
    if env is None:
        strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "").strip().upper()
        if strategy in ("SHARD_GRAD_OP", "2"):
            return False
        if strategy in ("FULL_SHARD", "1", ""):
            return bool(cfg.fsdp_reshard_after_forward)
        raise ValueError(
            f"FSDP_SHARDING_STRATEGY must be FULL_SHARD (ZeRO-3) or SHARD_GRAD_OP (ZeRO-2) for the trainer, "
            f"got {strategy!r}"
        )
    value = env.strip().lower()
    if value in _TRUE or value == "full_shard":
        return True
    if value in ("0", "false", "no", "shard_grad_op"):
        return False
    raise ValueError(f"FSDP_RESHARD_AFTER_FORWARD must be true or false, got {env!r}")


def check_launch(world: int) -> None:
    """Refuse FSDP options the trainer does not honour rather than ignore them."""
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "").strip().lower() in _TRUE:
        raise ValueError(
            "fsdp_offload_params: true is not supported by the trainer (parameters stay on the accelerator); "
            "set it to false, or use lora=true and gradient_checkpointing=true to save memory"
        )
    if os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").strip().lower() in _TRUE:
        raise ValueError(
            "fsdp_activation_checkpointing: true is not read by the trainer; set it to false and use the "
            "trainer's gradient_checkpointing=true (the same recomputation)"
        )
    version = os.environ.get("FSDP_VERSION", "2").strip()
    if version not in ("2", ""):
        raise ValueError(f"the trainer shards with FSDP2 (fully_shard): set fsdp_version: 2, got {version!r}")
    if world < 2:
        import warnings

        warnings.warn(
            "fsdp=true in a single process: nothing to shard over, the run is unsharded", stacklevel=3
        )


def _blocks(lm: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a model: the longest ``nn.ModuleList`` inside it (LLaDA's ``blocks``, a
    Hugging Face model's ``layers``/``h``)."""
    lists = [m for m in lm.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"fsdp: found no nn.ModuleList of transformer blocks in {type(lm).__name__}")
    return list(max(lists, key=len))


def shard(lm: nn.Module, *, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``lm`` in place over the default process group: each block (``reshard_after_forward``: ZeRO-3
    or ZeRO-2), then the root, which stays gathered from its forward to its backward as FSDP2's root does,
    so ``lm.head_weight`` read after ``lm(...)`` is the gathered matrix. Gradients are summed across
    processes (divide factor 1). FSDP2 needs its first forward to go through the root: it runs here on a
    one-token input, so later calls may start anywhere."""
    from torch.distributed.fsdp import fully_shard

    blocks = _blocks(lm)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(lm, reshard_after_forward=False)
    # Backward prefetching named explicitly, along the chain of blocks (root -> last block -> ... -> block 0
    # -> root, a no-op: the root is gathered). FSDP2's implicit prefetch follows the order of the forwards
    # since the last backward, which includes the gathered no-grad forwards of decoding: their number differs
    # between processes, so implicit targets would too, and the collectives would no longer pair up.
    lm.set_modules_to_backward_prefetch([blocks[-1]])
    for i, block in enumerate(blocks):
        block.set_modules_to_backward_prefetch([blocks[i - 1] if i else lm])
    for module in (*blocks, lm):  # per module: neither setting reaches the blocks from the root
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-scaled sum)
    lm._blocks_reshard_after_forward = reshard_after_forward
    device = next(lm.parameters()).device
    ids = torch.full((1, 1), int(getattr(lm, "mask_id", 0)), dtype=torch.long, device=device)
    with torch.no_grad():
        lm(ids)
    for module in (*blocks, lm):  # gathered modules stay so after a forward: parameters() must be the shards
        module.reshard()
    return lm


def is_sharded(module) -> bool:
    """Whether ``module`` is an FSDP2 module (without importing FSDP when nothing has sharded a model)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


@contextlib.contextmanager
def gathered(*models):
    """All-gather every sharded model of ``models`` (None and unsharded ones are skipped) for the block;
    forwards inside need no collective. Re-shards on exit. Every process must enter together."""
    from torch.distributed.fsdp import FSDPModule

    roots = [m for m in models if m is not None and is_sharded(m)]
    mods = [(m, root) for root in roots for m in root.modules() if isinstance(m, FSDPModule)]
    for m, _ in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m, root in mods:
            m.set_reshard_after_forward(m is not root and root._blocks_reshard_after_forward, recurse=False)
            m.reshard()


def full_state(lm: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on CPU, parameter names as unsharded; a collective: every process
    calls it, every process gets the result."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(lm, options=opts), get_optimizer_state_dict(lm, optimizer, options=opts)


def load_full_state(lm: nn.Module, optimizer, model_state: dict, optimizer_state: dict | None) -> None:
    """Load full state dicts (``full_state``'s, or an unsharded run's model) into a sharded model and its
    optimizer; every process passes the same dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(lm, model_state, options=opts)
    if optimizer_state is not None:
        set_optimizer_state_dict(lm, optimizer, optimizer_state, options=opts)
