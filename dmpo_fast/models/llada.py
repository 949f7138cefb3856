"""The LLaDA network as a Hugging Face ``PreTrainedModel``; loads official checkpoints without remote code.

``LLaDAModelLM`` (HF wrapper, what PEFT wraps) -> ``.model``: ``LLaDAModel`` -> ``.transformer``: ``wte``,
``blocks.{i}``, ``ln_f`` and, without ``weight_tying``, ``ff_out``. Those are the attribute paths of LLaDA's
own code, so ``state_dict`` keys (``model.transformer.blocks.3.q_proj.weight`` ...) match the official
safetensors.

``LLaDAModel.forward`` returns the final hidden states (after ``ln_f``) and optionally a :class:`KVCache`; it
never builds logits, so a loss can project only the rows it needs. ``LLaDAModelLM.forward`` adds the output
projection (``F.linear`` with the tied or separate matrix, then ``* 1/sqrt(d_model)`` with ``scale_logits``),
i.e. exactly LLaDA's logits, over all ``embedding_size`` rows.

Departures from LLaDA's code, none of which changes the logits of an unpadded forward without a cache:
padding masks are honoured (LLaDA's published HF code passes no mask to attention, so padded keys leak into
real positions there), a key/value cache is supported (LLaDA asserts it off), positions may be given
explicitly (the default, ``0..L-1``, is LLaDA's; RoPE makes attention depend only on differences, so a
left-padded row gives its unpadded hidden states up to float rounding), and HF gradient checkpointing replaces
LLaDA's own strategies.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .base import check_attention_mask, check_ids
from .cache import KVCache
from .configuration_llada import LLaDAConfig
from .llada_layers import LLaDABlock, RMSNorm, build_norm, rope_tables


def _tag_init(module: nn.Module, std: float, cutoff: float | None) -> None:
    # The std of LLaDA's "mitchell" init depends on the layer index, which HF's per-module _init_weights hook
    # cannot see; record it on the module when the module is built.
    module._llada_init = (std, cutoff)


class LLaDAModel(nn.Module):
    """Embedding, blocks and final norm; forward returns hidden states ``[B, L, d_model]`` after ``ln_f``."""

    gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable()

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.output_size, config.d_model),
                blocks=nn.ModuleList(LLaDABlock(i, config) for i in range(config.n_layers)),
                ln_f=build_norm(config),
            )
        )
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(
                config.d_model, config.output_size, bias=bool(config.include_bias)
            )
        self._tag_inits()

    def _tag_inits(self) -> None:
        cfg, d = self.config, self.config.d_model
        mitchell = cfg.init_fn == "mitchell"
        emb_factor = 0.5 * math.sqrt(d) if cfg.scale_logits else 1.0

        def tag(
            module: nn.Module, fan_in: int, factor: float = 1.0, layer: int | None = None, residual=False
        ):
            # mitchell: std = factor / sqrt(fan_in), / sqrt(2 (layer + 1)) for block outputs, cut at 3 std.
            if mitchell:
                std = factor / math.sqrt(fan_in)
                if layer is not None:
                    std /= math.sqrt(2 * (layer + 1))
                _tag_init(module, std, 3 * std)
            else:  # "normal": init_std, residual outputs scaled by 1 / sqrt(2 n_layers), optional cut-off
                std = cfg.init_std * factor / (math.sqrt(2 * cfg.n_layers) if residual else 1.0)
                cut = (
                    cfg.init_cutoff_factor * cfg.init_std * factor
                    if cfg.init_cutoff_factor is not None
                    else None
                )
                _tag_init(module, std, cut)

        tag(self.transformer.wte, d, emb_factor)
        if "ff_out" in self.transformer:
            tag(self.transformer.ff_out, d)
        for i, block in enumerate(self.transformer.blocks):
            for name in ("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj"):
                tag(getattr(block, name), d)
            tag(block.attn_out, d, layer=i)
            tag(block.ff_out, block.ff_out.in_features, layer=i, residual=True)

    @property
    def output_weight(self) -> torch.Tensor:
        """Output projection ``[embedding_size, d_model]``: ``ff_out.weight``, or ``wte.weight`` when tied."""
        if self.config.weight_tying:
            return self.transformer.wte.weight
        return self.transformer.ff_out.weight

    @property
    def output_bias(self) -> torch.Tensor | None:
        return None if self.config.weight_tying else self.transformer.ff_out.bias

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_cache: bool = False,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """Hidden states after ``ln_f`` for ``input_ids [B, L]``, attending over ``cache`` + these tokens.

        attention_mask: ``[B, L]`` 1/True = real token, 0/False = padding (padded keys are never attended).
        positions: ``[L]`` or ``[B, L]`` RoPE positions of these tokens (default ``0..L-1``).
        Returns ``(hidden [B, L, d_model], KVCache of these tokens if return_cache else None)``. Arguments are
        validated by the callers (``LLaDAModelLM``, ``LLaDADiffusionLM``).
        """
        cfg = self.config
        B, L = input_ids.shape
        x = self.transformer.wte(input_ids)  # [B, L, d]
        if cfg.input_emb_norm:
            x = x * (cfg.d_model**0.5)
        if cfg.embedding_dropout > 0.0 and self.training:
            x = F.dropout(x, cfg.embedding_dropout, training=True)
        if positions is None:
            positions = torch.arange(L, device=x.device)
        cos, sin = rope_tables(positions.to(x.device), cfg.head_dim, cfg.rope_theta)
        attn_mask = _key_mask(attention_mask, cache, B, L, x.device)

        keys, values = [], []
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.blocks):
            past_k = None if cache is None else cache.keys[i]
            past_v = None if cache is None else cache.values[i]
            if checkpoint:
                x, k, v = self._gradient_checkpointing_func(
                    block.__call__, x, cos, sin, attn_mask, past_k, past_v, return_cache
                )
            else:
                x, k, v = block(x, cos, sin, attn_mask, past_k, past_v, return_cache)
            if return_cache:
                keys.append(k)
                values.append(v)
        x = self.transformer.ln_f(x)
        if not return_cache:
            return x, None
        key_mask = None if attention_mask is None else attention_mask.to(device=x.device, dtype=torch.bool)
        return x, KVCache(tuple(keys), tuple(values), key_mask, spans=())


def _key_mask(
    attention_mask: torch.Tensor | None, cache: KVCache | None, B: int, L: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean SDPA mask ``[B, 1, 1, S]`` over cached + own keys, or None when every key is a real token."""
    cached = None if cache is None else cache.key_mask
    if attention_mask is None and cached is None:
        return None
    own = (
        torch.ones(B, L, dtype=torch.bool, device=device)
        if attention_mask is None
        else attention_mask.to(device=device, dtype=torch.bool)
    )
    if cache is not None:
        prev = cached if cached is not None else torch.ones(B, cache.length, dtype=torch.bool, device=device)
        own = torch.cat((prev.to(device), own), dim=1)
    # One host sync: with no padding, pass no mask (LLaDA's path, and the only one flash attention takes).
    if bool(own.all()):
        return None
    # A row with no real key at all would softmax over nothing (NaN); let it attend everywhere instead. Its
    # hidden states are padding and meaningless either way, but finite, so a masked-out loss stays finite.
    own = own | ~own.any(dim=1, keepdim=True)
    return own[:, None, None, :]


def check_inputs(config: LLaDAConfig, ids, attention_mask, cache_length: int = 0) -> None:
    """Rank/dtype/shape checks plus the length limit ``cache_length + L <= max_sequence_length``."""
    check_ids(ids)
    check_attention_mask(attention_mask, ids)
    if cache_length + ids.shape[1] > config.max_sequence_length:
        what = f"ids length {ids.shape[1]}" + (f" + cache length {cache_length}" if cache_length else "")
        raise ValueError(f"{what} exceeds max_sequence_length={config.max_sequence_length}")


class LLaDAModelLM(PreTrainedModel):
    """LLaDA plus its output projection: ``forward`` -> ``MaskedLMOutput(logits [B, L, embedding_size])``."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)) and hasattr(module, "_llada_init"):
            std, cutoff = module._llada_init
            if cutoff is None:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            else:
                nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-cutoff, b=cutoff)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            module.reset_parameters()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module:
        if self.config.weight_tying:
            return self.model.transformer.wte
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Module) -> None:
        if self.config.weight_tying:
            self.model.transformer.wte = value
        else:
            self.model.transformer.ff_out = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        """Logits of LLaDA for ``input_ids [B, L]`` (``attention_mask`` 1 = real token, 0 = padding).

        ``labels`` is refused: a masked-diffusion loss needs the noising and weighting in ``dmpo_fast``.
        ``output_hidden_states`` returns only the final (post-``ln_f``) hidden states.
        """
        if labels is not None:
            raise ValueError("labels is not supported: compute masked-diffusion losses with dmpo_fast's ops")
        check_inputs(self.config, input_ids, attention_mask)
        hidden, _ = self.model(input_ids, attention_mask=attention_mask, positions=position_ids)
        if self.config.weight_tying:
            logits = F.linear(hidden, self.model.output_weight, self.model.output_bias)
        else:  # through the module, so an adapter put on it (LoRA) takes part, as in head_weight
            logits = self.model.transformer.ff_out(hidden)
        if self.config.scale_logits:
            logits = logits * (1 / math.sqrt(self.config.d_model))
        hidden_states = (hidden,) if output_hidden_states else None
        return_dict = True if return_dict is None else return_dict
        if not return_dict:
            return (logits,) if hidden_states is None else (logits, hidden_states)
        return MaskedLMOutput(logits=logits, hidden_states=hidden_states)
