"""A quantized base model for QLoRA: 4-bit NF4 or 8-bit weights (bitsandbytes), LoRA on top.

The DMPO reference recipe for LLaDA-8B-Instruct (and d1's) loads the base in 4-bit NF4 with double
quantization and trains a LoRA adapter over it, as QLoRA does; the 8B base then takes 5.3 GiB instead of
14.9 (``docs/memory.md``). Quantization happens at load time through transformers' ``BitsAndBytesConfig``
(``from_pretrained(quantization_config=...)``): each ``nn.Linear`` of the network becomes a bitsandbytes
``Linear4bit`` / ``Linear8bitLt`` whose weight is quantized as it reaches the device, and PEFT wraps those
layers with its bitsandbytes LoRA layers. ``load(..., load_in_4bit=True)`` does this for the built-in LLaDA
(a ``PreTrainedModel``) and for Dream / other models through the adapter.

    4-bit: NF4, double quantization (the block scales quantized again), compute in the model's dtype
           (bfloat16 in the recipes); about 0.516 bytes per weight;
    8-bit: LLM.int8 (row-wise int8, outlier columns in 16-bit); 1 byte per weight plus a scale per row.

What stays in 16-bit (never quantized):

- the output layer: its full name goes into ``llm_int8_skip_modules`` (``skip_modules``), so
  ``DiffusionLM.head_weight`` is the stored ``[V, H]`` matrix, and the fused losses (``wdce_loss``,
  ``linear_logprob``) and ``denoise_step`` read it exactly as for an unquantized model; ``check_head``
  refuses a model whose head was quantized anyway. In LLaDA the head is ``model.transformer.ff_out`` while
  every block has an ``ff_out`` too (its MLP down projection, which is quantized): the full name tells them
  apart, a bare ``ff_out`` would match both (transformers matches skip names as suffixes);
- the input embedding (``nn.Embedding``: bitsandbytes quantizes linear layers only) and the norms.

Departures from PEFT's QLoRA recipe: ``peft.prepare_model_for_kbit_training`` is not called. Its work here is
(1) freeze the base, which ``get_peft_model`` does, (2) enable gradients into the inputs for gradient
checkpointing, which transformers' ``gradient_checkpointing_enable`` does (non-reentrant), and (3) cast every
16-bit parameter that is not quantized to float32. For LLaDA-8B (3) turns the embedding and the output head
(2 × 126464 × 4096) into 4.1 GB of float32 instead of 2.1 GB, and gives the fused loss a head in another dtype
than the hidden states it multiplies; the 16-bit LoRA path keeps them in 16-bit, and so does this one.

Checkpoints: the trainer saves the whole model's ``state_dict``, in which bitsandbytes stores each 4-bit
weight as packed bytes plus its quantization state (``weight.absmax``, ``weight.quant_map``, ...). PyTorch
cannot load those extra keys back into a model that was quantized at load time; ``load`` registers a hook on
each 4-bit layer (``_check_quant_state``) that checks the saved state equals the layer's own (same base
checkpoint, same settings) and then consumes it, so resuming a QLoRA run is ``load_state_dict`` as for any
other run.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn as nn

INSTALL = "pip install 'dmpo-fast[quant]'"


def require_bitsandbytes(what: str) -> None:
    """``ValueError`` naming ``what`` and the install command unless bitsandbytes can be imported."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{what} needs the bitsandbytes package: {INSTALL}")


def check_flags(load_in_4bit: bool, load_in_8bit: bool) -> None:
    """``ValueError`` for non-bool flags or both set; then, if either is set, for a missing bitsandbytes."""
    for name, value in (("load_in_4bit", load_in_4bit), ("load_in_8bit", load_in_8bit)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are exclusive: set at most one of them to true")
    if load_in_4bit or load_in_8bit:
        require_bitsandbytes("load_in_4bit=true" if load_in_4bit else "load_in_8bit=true")


def skip_modules(model: nn.Module) -> list[str]:
    """Full names of the modules that stay unquantized: the output layer (``get_output_embeddings``).

    ``model`` may live on the meta device (only the module tree is read)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(
            f"model ({type(model).__name__}) has no output layer (get_output_embeddings() is None); a "
            "diffusion LM needs one"
        )
    names = [name for name, module in model.named_modules() if module is head]
    if not names or not names[0]:
        raise ValueError(f"model ({type(model).__name__}): its output layer is not a named submodule")
    return names


def bnb_config(*, load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype | None, skip: list[str]):
    """transformers' ``BitsAndBytesConfig``: NF4 + double quantization, or LLM.int8; ``skip`` stays 16-bit.

    compute_dtype: the dtype the 4-bit matmuls run in (the model's dtype; None: float32,
    bitsandbytes' default).
    """
    check_flags(load_in_4bit, load_in_8bit)
    if not (load_in_4bit or load_in_8bit):
        raise ValueError("bnb_config needs load_in_4bit=True or load_in_8bit=True")
    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        llm_int8_skip_modules=list(skip),
    )


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """``{module name: "4bit" | "8bit"}`` for every bitsandbytes layer in ``model`` (empty without any)."""
    import sys  # noqa: PLC0415

    if "bitsandbytes" not in sys.modules:  # nothing can have been quantized
        return {}
    import bitsandbytes as bnb  # noqa: PLC0415

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            out[name] = "4bit"
        elif isinstance(module, bnb.nn.Linear8bitLt):
            out[name] = "8bit"
    return out


def check_head(model: nn.Module) -> None:
    """``ValueError`` if the output layer of ``model`` was quantized (the fused losses read a matrix)."""
    names = skip_modules(model)
    quantized = quantized_modules(model)
    bad = [n for n in names if n in quantized]
    if bad:
        raise ValueError(
            f"the output layer {bad[0]!r} was quantized ({quantized[bad[0]]}); the fused losses read it as a "
            "16-bit matrix. Keep it in llm_int8_skip_modules"
        )


def prepare(model: nn.Module) -> nn.Module:
    """After a quantized load: check the head is 16-bit, make 4-bit checkpoints reloadable;
    returns ``model``."""
    check_head(model)
    import bitsandbytes as bnb  # noqa: PLC0415

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.register_load_state_dict_pre_hook(_check_quant_state)
            # bitsandbytes' CPU inference path (CPUs with AVX512-BF16) re-packs the weight in place the first
            # time an eval-mode layer runs without grad, and asserts out_features % 32 == 0 (the tiny
            # model's MLP has 344). Off: rollouts and training take the same dequantize-and-matmul path.
            # GPUs never take it.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def _check_quant_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Load-time hook of a 4-bit layer: the saved quantization state must be this layer's own; consume it.

    The base is frozen and quantized deterministically from the same checkpoint, so a saved 4-bit weight is
    either bit-identical to the loaded one or comes from another base (refused: the adapter was trained on
    that one). The packed bytes are then copied onto themselves by the default loader."""
    weight = prefix + "weight"
    saved = {k: state_dict[k] for k in state_dict if k.startswith(weight + ".")}
    if not saved:
        return
    own = {}
    # bitsandbytes' own serialisation (it also undoes the CPU kernels' packed layout, as saving does).
    module._save_to_state_dict(own, prefix, keep_vars=False)
    for key in [weight, *saved]:
        mine, theirs = own.get(key), state_dict.get(key)
        same = (
            mine is not None
            and theirs is not None
            and mine.shape == theirs.shape
            and mine.dtype == theirs.dtype
            and torch.equal(mine.cpu(), theirs.cpu())
        )
        if not same:
            raise ValueError(
                f"{key}: the checkpoint's 4-bit base weight differs from the loaded model's (another base "
                "model or other quantization settings); load the checkpoint into the model it was trained on"
            )
    for key in saved:
        del state_dict[key]
