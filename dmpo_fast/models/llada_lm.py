"""``DiffusionLM`` over the built-in LLaDA implementation: hidden states, output matrix, KV cache.

Cache API (see :mod:`dmpo_fast.models.cache` for the exactness argument):

    hidden, cache = lm.prefill(ids, attention_mask)                 # [B, L, H], cache of positions 0..L-1
    lm.hidden(ids[:, s:], cache=cache.truncate(s))                  # prefix cache: queries at s..L-1
    lm.hidden(ids[:, s:e], cache=cache.exclude(s, e), positions=s)  # dual cache: queries at s..e-1

``positions`` is an int (first position of the queries), a ``[L]`` or ``[B, L]`` integer tensor, or None —
which means ``0..L-1`` without a cache and "right after the cache" with a prefix cache. The cache's key
padding mask comes from ``prefill``'s ``attention_mask``; the queries' own ``attention_mask`` (optional) masks
their own keys.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import DiffusionLM
from .cache import KVCache
from .configuration_llada import LLaDAConfig
from .llada import LLaDAModelLM, check_inputs


class LLaDADiffusionLM(DiffusionLM):
    """The LLaDA network behind the ``DiffusionLM`` interface. ``model`` is an ``LLaDAModelLM``."""

    supports_cache = True

    def __init__(self, model: LLaDAModelLM):
        if not isinstance(model, LLaDAModelLM):
            raise ValueError(f"model must be an LLaDAModelLM, got {type(model).__name__}")
        cfg = model.config
        if cfg.mask_token_id is None:
            raise ValueError("config.mask_token_id must be set for a diffusion LM, got None")
        eos = cfg.eos_token_id
        bias = not cfg.weight_tying and cfg.include_bias
        super().__init__(
            model,
            mask_id=int(cfg.mask_token_id),
            eos_id=None if eos is None else int(eos),
            vocab_size=int(cfg.vocab_size),
            hidden_size=int(cfg.d_model) + int(bias),
            logit_scale=cfg.logit_scale,
        )

    @property
    def config(self) -> LLaDAConfig:
        return self.base_model.config

    def _core(self):
        return self.base_model.model  # LLaDAModel

    def _raw_head(self):
        core = self._core()
        return core.output_weight, core.output_bias

    def _positions(self, positions, cache: KVCache | None, L: int, device) -> torch.Tensor | None:
        if positions is None:
            if cache is None:
                return None
            start = cache.next_position
            if start is None:
                raise ValueError(
                    "positions is required when cache is not a prefix "
                    f"(it holds positions {list(cache.spans)})"
                )
            positions = start
        if isinstance(positions, bool) or not isinstance(positions, (int, torch.Tensor)):
            raise ValueError(
                f"positions must be None, an int or an integer tensor, got {type(positions).__name__}"
            )
        if isinstance(positions, int):
            limit = self.config.max_sequence_length
            if positions < 0 or positions + L > limit:
                raise ValueError(f"positions {positions}..{positions + L - 1} must lie in [0, {limit})")
            if cache is not None and cache.covers(positions, positions + L):
                raise ValueError(
                    f"positions {positions}..{positions + L - 1} overlap the cached positions "
                    f"{list(cache.spans)}"
                )
            return torch.arange(positions, positions + L, device=device)
        if positions.dtype.is_floating_point or positions.dim() not in (1, 2) or positions.shape[-1] != L:
            raise ValueError(
                f"positions tensor must be integer [L] or [B, L] with L={L}, got {positions.dtype} "
                f"{list(positions.shape)}"
            )
        return positions

    def hidden(self, ids, attention_mask=None, *, cache=None, positions=None) -> torch.Tensor:
        if cache is not None and not isinstance(cache, KVCache):
            raise ValueError(f"cache must be None or a KVCache, got {type(cache).__name__}")
        check_inputs(self.config, ids, attention_mask, 0 if cache is None else cache.length)
        if cache is not None:
            if cache.batch_size != ids.shape[0]:
                raise ValueError(f"cache holds batch size {cache.batch_size}, ids has {ids.shape[0]}")
            if len(cache.keys) != self.config.n_layers:
                raise ValueError(f"cache has {len(cache.keys)} layers, the model {self.config.n_layers}")
        pos = self._positions(positions, cache, ids.shape[1], ids.device)
        h, _ = self._core()(ids, attention_mask=attention_mask, positions=pos, cache=cache)
        return self._with_bias_column(h)

    def prefill(self, ids, attention_mask=None) -> tuple[torch.Tensor, KVCache]:
        check_inputs(self.config, ids, attention_mask)
        h, cache = self._core()(ids, attention_mask=attention_mask, return_cache=True)
        return self._with_bias_column(h), dataclasses.replace(cache, spans=((0, ids.shape[1]),))

    def save_pretrained(self, path: str) -> None:
        """Write ``config.json`` + ``model.safetensors`` with LLaDA's parameter names (for ``load``)."""
        from .loading import save_llada  # noqa: PLC0415

        save_llada(self.base_model, path)
