"""The pieces of a LLaDA block: RMS norm, rotary embedding, bidirectional SDPA attention, SwiGLU MLP.

LLaDA is a Llama-shaped encoder: pre-norm blocks ``x + Attn(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))`` with
``MLP(h) = ff_out(act(ff_proj(h)) * up_proj(h))``, rotary positions, and attention without a causal mask. The
numerics follow LLaDA's own modeling code step for step so that logits agree to float32 rounding:

- the norm statistic is taken in float32 and cast back *before* the weight multiplies (``weight *
  x.to(dtype)``);
- the rotary tables are ``cos/sin(position * inv_freq)`` in float32, and with ``rope_full_precision`` the
  rotation itself runs in float32 too, so bf16 models rotate exactly like LLaDA does;
- attention is ``F.scaled_dot_product_attention(is_causal=False)``, with grouped key/value heads repeated to
  the query heads (as LLaDA does) and no mask at all when nothing is padded, so the flash kernel stays
  eligible.

Parameter names are LLaDA's (``attn_norm``, ``q_proj``, ``k_proj``, ``v_proj``, ``attn_out``, ``ff_norm``,
``ff_proj``, ``up_proj``, ``ff_out``) so official ``state_dict`` keys load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configuration_llada import LLaDAConfig


class RMSNorm(nn.Module):
    """``weight * (x / rms(x))`` (or ``(1 + weight) * ...`` for ``gemma_rms``), statistic in float32."""

    def __init__(self, size: int, eps: float, *, affine: bool, bias: bool, gemma: bool):
        super().__init__()
        self.eps = eps
        self.gemma = gemma
        self.weight = nn.Parameter(torch.ones(size)) if affine else None
        self.bias = nn.Parameter(torch.zeros(size)) if affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        # Cast back before the affine part: that is where LLaDA rounds, and bf16 logits depend on it.
        xn = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        if self.weight is None:
            return xn
        out = xn * (1 + self.weight) if self.gemma else self.weight * xn
        return out if self.bias is None else out + self.bias

    def reset_parameters(self) -> None:
        # Ones for gemma_rms too (an initial scale of 2), as LLaDA's own initialisation does.
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def build_norm(config: LLaDAConfig) -> RMSNorm:
    bias = config.bias_for_layer_norm if config.bias_for_layer_norm is not None else config.include_bias
    return RMSNorm(
        config.d_model,
        config.rms_norm_eps,
        affine=config.layer_norm_with_affine,
        bias=bool(bias),
        gemma=config.layer_norm_type == "gemma_rms",
    )


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``position * inv_freq`` in float32, duplicated over the two halves of a head.

    positions: ``[L]`` (shared by the batch) or ``[B, L]`` integer tensor.
    Returns two float32 tensors of shape ``[1, 1, L, head_dim]`` or ``[B, 1, L, head_dim]``.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    # [..., L, head_dim / 2]: one product per entry, the same numbers as LLaDA's outer product.
    freqs = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    emb = emb[None, None] if positions.dim() == 1 else emb[:, None]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool) -> torch.Tensor:
    """Rotate ``t [B, heads, L, head_dim]``; in float32 when ``full_precision``, else in t's dtype."""
    if full_precision:
        tt = t.float()
    else:
        tt, cos, sin = t, cos.to(t.dtype), sin.to(t.dtype)
    return (tt * cos + _rotate_half(tt) * sin).to(t.dtype)


_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class LLaDABlock(nn.Module):
    """One pre-norm transformer block with bidirectional attention.

    forward(x [B, T, d], cos, sin, attn_mask, past_k, past_v, return_kv) -> (x [B, T, d], k, v)
      attn_mask: None or bool ``[B, 1, 1, S]`` over all keys (cached + own), True = attend.
      past_k/past_v: ``[B, n_kv, S - T, head_dim]`` cached keys (already rotated) / values, or None.
      k, v: this call's own keys (rotated) and values ``[B, n_kv, T, head_dim]`` when return_kv, else None.
    """

    def __init__(self, layer_id: int, config: LLaDAConfig):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = config.n_heads
        self.n_kv_heads = config.effective_n_kv_heads
        self.head_dim = config.head_dim
        self.rope_full_precision = config.rope_full_precision
        self.attention_dropout = config.attention_dropout
        self.residual_dropout = config.residual_dropout
        self.act = _ACTIVATIONS[config.activation_type]
        d, hidden = config.d_model, config.effective_mlp_hidden_size
        qkv_bias = bool(config.include_bias or config.include_qkv_bias)
        bias = bool(config.include_bias)
        self.attn_norm = build_norm(config)
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_norm = build_norm(config)
        self.ff_proj = nn.Linear(d, hidden, bias=bias)
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.ff_out = nn.Linear(hidden, d, bias=bias)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual_dropout == 0.0 or not self.training:
            return x
        return F.dropout(x, self.residual_dropout, training=True)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        past_k: torch.Tensor | None = None,
        past_v: torch.Tensor | None = None,
        return_kv: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        B, T, d = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, nh, T, hd]
        k = self.k_proj(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin, self.rope_full_precision)
        k = apply_rope(k, cos, sin, self.rope_full_precision)
        k_all = k if past_k is None else torch.cat((past_k, k), dim=2)  # [B, nkv, S, hd]
        v_all = v if past_v is None else torch.cat((past_v, v), dim=2)
        if self.n_kv_heads != self.n_heads:
            # LLaDA repeats the grouped heads explicitly (no enable_gqa) — same numbers, and works on torch
            # 2.4.
            rep = self.n_heads // self.n_kv_heads
            k_all = k_all.repeat_interleave(rep, dim=1, output_size=self.n_heads)
            v_all = v_all.repeat_interleave(rep, dim=1, output_size=self.n_heads)
        att = F.scaled_dot_product_attention(
            q,
            k_all,
            v_all,
            attn_mask=attn_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=False,
        )
        att = att.transpose(1, 2).contiguous().view(B, T, d)
        x = x + self._drop(self.attn_out(att))

        h = self.ff_norm(x)
        x = x + self._drop(self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h)))
        if return_kv:
            return x, k, v
        return x, None, None
