"""``DiffusionLM``: the one interface the samplers, the ELBO and the losses use to talk to a model.

A masked-diffusion LM predicts, at every position, a distribution over the token that belongs there. The
losses in ``dmpo_fast.ops`` never want the full ``[B, L, V]`` logits — they project only the masked rows
through the output matrix — so the interface hands out the two factors instead:

    h = lm.hidden(ids, attention_mask)          # [B, L, H]  final hidden states (after the last norm)
    W = lm.head_weight                          # [V, H]     output projection
    lm.logits(ids, attention_mask)              # [B, L, V] == (h @ W.T) * lm.logit_scale

``logit_scale`` is 1.0 except for architectures that scale their logits (LLaDA with ``scale_logits``: ``1 /
sqrt(d_model)``); a consumer that projects ``h`` itself multiplies by it. When the model's output layer has a
bias ``b``, ``hidden`` carries a trailing constant 1 and ``head_weight`` carries ``b`` as its last column, so
the identity stays exact; ``hidden_size`` counts that column.

Position i of ``hidden`` always predicts token i (models that predict token i from position i-1, like Dream,
are shifted by their adapter). Token ids never exceed ``vocab_size``; ``mask_id`` is the absorbing [MASK]
token, ``eos_id`` the end-of-sequence token (or None).

A ``DiffusionLM`` is an ``nn.Module`` whose ``forward`` is ``hidden``, so DDP/FSDP wrappers and ``accelerate``
can wrap it as a whole; ``lm.model`` is the underlying Hugging Face module (what PEFT wraps: ``lm.model =
get_peft_model(lm.model, cfg)`` keeps working, the adapters look through the PEFT wrapper). ``.to()``,
``.train()``, ``.eval()`` and ``.parameters()`` are ``nn.Module``'s.

Key/value caching (``prefill`` and the ``cache=``/``positions=`` arguments of ``hidden``) is available where
``supports_cache`` is True — the LLaDA implementation; see :mod:`dmpo_fast.models.cache`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache
from .peft_support import adapted_head_weight


class DiffusionLM(nn.Module):
    """Base class; subclasses implement ``hidden`` and ``_raw_head`` (and ``prefill`` when they cache)."""

    supports_cache: bool = False

    def __init__(
        self,
        model: nn.Module,
        *,
        mask_id: int,
        eos_id: int | None,
        vocab_size: int,
        hidden_size: int,
        logit_scale: float = 1.0,
    ):
        super().__init__()
        if not isinstance(mask_id, int) or not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id must be an int in [0, vocab_size={vocab_size}), got {mask_id!r}")
        if eos_id is not None and (not isinstance(eos_id, int) or not 0 <= eos_id < vocab_size):
            raise ValueError(f"eos_id must be None or an int in [0, vocab_size={vocab_size}), got {eos_id!r}")
        self.model = model
        self.mask_id = mask_id
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.logit_scale = logit_scale

    # ---- what subclasses provide ---------------------------------------------------------------------------
    def hidden(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        positions: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[B, L, hidden_size]`` for ``ids [B, L]``; position i predicts token i."""
        raise NotImplementedError

    def _raw_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight ``[>= vocab_size, H]``, bias or None) of the output layer."""
        raise NotImplementedError

    def prefill(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """Full forward over ``ids [B, L]``: ``(hidden [B, L, H], KVCache of positions 0..L-1)``."""
        raise ValueError(f"{type(self).__name__} does not support a KV cache (supports_cache is False)")

    # ---- shared --------------------------------------------------------------------------------------------
    @property
    def base_model(self) -> nn.Module:
        """``model`` with any PEFT wrapper looked through (LoRA layers stay injected in it)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def head_weight(self) -> torch.Tensor:
        """Output projection ``[vocab_size, hidden_size]``: a differentiable view of the parameters.

        A LoRA adapter on the output layer is included (``W + B@A·scale``, see :mod:`.peft_support`)."""
        weight, bias = self._raw_head()
        weight = adapted_head_weight(self.base_model, weight)[: self.vocab_size]
        if bias is None:
            return weight
        return torch.cat((weight, bias[: self.vocab_size, None].to(weight.dtype)), dim=1)

    def _with_bias_column(self, h: torch.Tensor) -> torch.Tensor:
        # Pairs with head_weight's bias column: [h, 1] @ [W, b].T = h @ W.T + b.
        if self._raw_head()[1] is None:
            return h
        return torch.cat((h, h.new_ones(*h.shape[:-1], 1)), dim=-1)

    def logits(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        positions: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(hidden @ head_weight.T) * logit_scale``: ``[B, L, vocab_size]``. Materialises every logit."""
        h = self.hidden(ids, attention_mask, cache=cache, positions=positions)
        out = F.linear(h, self.head_weight)
        return out * self.logit_scale if self.logit_scale != 1.0 else out

    def forward(self, ids, attention_mask=None, *, cache=None, positions=None) -> torch.Tensor:
        return self.hidden(ids, attention_mask, cache=cache, positions=positions)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Turn on HF gradient checkpointing in the underlying model (recompute each block in backward)."""
        base = self.base_model
        # transformers >= 5.x renamed it (the old name still works, with a FutureWarning).
        enable = getattr(base, "activation_checkpointing_enable", None) or getattr(
            base, "gradient_checkpointing_enable", None
        )
        if enable is None:
            raise ValueError(f"model ({type(base).__name__}) has no gradient_checkpointing_enable()")
        enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        base = self.base_model
        disable = (
            getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        )
        disable()


def check_ids(ids, name: str = "ids") -> None:
    """``ValueError`` naming ``name`` unless ``ids`` is a non-empty integer tensor of shape [B, L]."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids [B, L], got {type(ids).__name__}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have 2 dimensions [B, L], got shape {list(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype (int64 or int32), got {ids.dtype}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {list(ids.shape)}")


def check_attention_mask(attention_mask, ids: torch.Tensor, name: str = "attention_mask") -> None:
    """``ValueError`` naming ``name`` unless it is None or a tensor of ids' shape [B, L] (1 = real token)."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"{name} must be None or a torch.Tensor [B, L], got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"{name} must have the shape of ids {list(ids.shape)} (1 = real token, 0 = padding), "
            f"got {list(attention_mask.shape)}"
        )
