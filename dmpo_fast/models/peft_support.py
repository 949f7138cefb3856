"""LoRA on the output layer: the head matrix the fused losses see must include the adapter.

The fused losses read ``head_weight`` ``[V, H]`` and never call the output module, so a PEFT adapter injected
into that module would be skipped: the loss would train against the base head, and the adapter would get no
gradient. ``adapted_head_weight`` returns what the adapted module computes, as one matrix:

    W_eff = W + Σ_{active adapters a} scale_a · B_a @ A_a          (transposed for fan_in_fan_out layers)

differentiable in ``A`` and ``B`` (the fused kernels return dL/dW_eff, autograd carries it into both). This is
exactly PEFT's LoRA forward ``base(x) + B(A(x))·scale`` without dropout, so:

- adapters disabled (``with peft_model.disable_adapter():``, the usual reference model) or merged into the
  base weight (``merge_adapter()``): ``W`` as stored, as PEFT's forward does;
- LoRA dropout on the head while training cannot be written as one matrix (the mask is per token): a
  ``ValueError`` says so, instead of silently training without it (``lora_dropout=0`` for the head, or a
  config that leaves the head out, or eval mode);
- LoRA variants that are not linear in ``B @ A`` (DoRA, ...), ``lora_bias``, and other adapter types (IA3,
  LoHa, ...) on the head: ``ValueError``;
- an output matrix tied to an adapted *embedding* (LLaDA with ``weight_tying``): PEFT's embedding adapter
  changes the lookup only, while the model's own head reads the stored matrix, so the two disagree about what
  the adapted model is; ``ValueError`` rather than pick one.

``modules_to_save`` copies of the head need nothing here: the wrapper's ``weight`` is the active copy.
Nothing here imports ``peft`` unless it is loaded already; without it no adapter can exist.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn


def adapted_head_weight(model: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (the output layer's stored ``[V, H]`` matrix) plus the active LoRA deltas of that layer.

    ``model`` is the Hugging Face model (PEFT wrapper looked through) whose ``get_output_embeddings()`` is the
    output layer; ``weight`` is returned unchanged when that layer carries no adapter.
    """
    if "peft" not in sys.modules:  # no PEFT imported: nothing can have been injected
        return weight
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return weight
    from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: PLC0415

    if not isinstance(head, BaseTunerLayer):
        return weight
    name = type(head).__name__
    base = head.get_base_layer()
    if getattr(base, "weight", None) is not weight:
        raise ValueError(
            f"the output layer carries a PEFT adapter ({name}) whose base weight is not the head matrix the "
            "model reads; cannot tell what the adapted head is"
        )
    from peft.tuners.lora import Embedding as LoraEmbedding  # noqa: PLC0415
    from peft.tuners.lora import Linear as LoraLinear  # noqa: PLC0415

    if isinstance(head, LoraEmbedding):
        raise ValueError(
            "the output matrix is tied to an embedding that carries a LoRA adapter: PEFT adapts the lookup "
            "only, the model's own head reads the stored matrix. Leave the embedding out of target_modules, "
            "or untie the output layer"
        )
    if not isinstance(head, LoraLinear):
        raise ValueError(
            f"the output layer carries a {name} adapter; the fused losses support plain LoRA on the head "
            "(W + B@A·scale) only. Leave the head out of target_modules"
        )
    # PEFT's forward: base layer alone when disabled or when adapters are merged into it.
    if head.disable_adapters or head.merged:
        return weight
    variants = getattr(head, "lora_variant", {}) or {}
    dora = getattr(head, "use_dora", {}) or {}
    for adapter in head.active_adapters:
        if adapter not in head.lora_A:
            continue
        if adapter in variants or dora.get(adapter, False):
            raise ValueError(
                f"the output layer's adapter {adapter!r} is a LoRA variant (DoRA or similar) that is not "
                "W + B@A·scale; the fused losses cannot use it. Leave the head out of target_modules"
            )
        if getattr(head.lora_B[adapter], "bias", None) is not None:
            raise ValueError(
                f"the output layer's adapter {adapter!r} has lora_bias=True, which the fused losses do not "
                "support on the head"
            )
        dropout = head.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training:
            raise ValueError(
                f"the output layer's adapter {adapter!r} has lora_dropout={dropout.p} in training mode: a "
                "per-token dropout mask cannot be folded into one head matrix. Set lora_dropout=0, leave the "
                "head out of target_modules, or train it with modules_to_save"
            )
        # get_delta_weight = scale · B @ A (transposed for fan_in_fan_out), differentiable in A and B.
        weight = weight + head.get_delta_weight(adapter).to(weight.dtype)
    return weight


def add_lora(lm, *, r: int, alpha: int, dropout: float, target_modules: list[str]):
    """Inject a LoRA adapter (PEFT) into ``lm.model`` in place and freeze everything else; returns ``lm``.

    ``target_modules`` are module names of the network (LLaDA: ``q_proj k_proj v_proj attn_out ff_proj
    up_proj ff_out``; the output layer is ``ff_out`` under ``model.transformer`` and is found by exact name).
    """
    try:
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    except ImportError as e:
        raise ValueError(f"lora=true needs the peft package: pip install 'dmpo-fast[lora]' ({e})") from e
    if not target_modules:
        raise ValueError("lora_target_modules must name at least one module, got []")
    names = {n.rsplit(".", 1)[-1] for n, _ in lm.model.named_modules()}
    missing = sorted(set(target_modules) - names)
    if missing:
        raise ValueError(
            f"lora_target_modules {missing} are not modules of this model; allowed names include "
            f"{sorted(n for n in names if n and not n.isdigit())[:20]}"
        )
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none"
    )
    lm.model = get_peft_model(lm.model, config)
    return lm


def adapter_disabled(lm):
    """Context manager giving ``lm`` with its LoRA adapter switched off: the base model, the DMPO reference."""
    disable = getattr(lm.model, "disable_adapter", None)
    if disable is None:
        raise ValueError("reference='adapter_disabled' needs a PEFT adapter on the policy (lora=true)")
    import contextlib  # noqa: PLC0415

    @contextlib.contextmanager
    def ctx():
        with disable():
            yield lm

    return ctx()
