"""A tiny deterministic denoiser for testing the DMPO functions without a transformer."""

import copy
import functools

import torch
from torch import nn


class ToyDenoiser(nn.Module):
    """hidden = tanh(emb(ids) + mean of the sequence's embeddings · U), head = its own matrix."""

    def __init__(self, vocab: int = 13, hidden: int = 8, mask_id: int = 12, seed: int = 0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab, hidden, generator=g, dtype=dtype))
        self.mix = nn.Parameter(torch.randn(hidden, hidden, generator=g, dtype=dtype) / hidden**0.5)
        self.head = nn.Parameter(torch.randn(vocab, hidden, generator=g, dtype=dtype))
        self.mask_id = mask_id

    @property
    def head_weight(self):
        return self.head

    def hidden(self, ids, attention_mask=None):
        e = self.emb[ids]  # [B, L, H]
        if attention_mask is not None:
            m = attention_mask.to(e.dtype)[..., None]
            ctx = (e * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
        else:
            ctx = e.mean(1, keepdim=True)
        return torch.tanh(e + ctx @ self.mix)

    def logits(self, ids, attention_mask=None):
        return self.hidden(ids, attention_mask) @ self.head.T


@functools.cache
def _built_tiny(vocab_size: int, mask_id: int, eos_id: int, seed: int, weight_tying: bool) -> nn.Module:
    from dmpo_fast.models import build_tiny

    return build_tiny(vocab_size, mask_id, eos_id, seed=seed, weight_tying=weight_tying)


def tiny_policy(vocab_size: int, mask_id: int, eos_id: int, *, seed: int = 0, weight_tying: bool = False):
    """A fresh copy of ``build_tiny(...)`` (its init takes about a second; copying the cached one is instant)."""
    return copy.deepcopy(_built_tiny(vocab_size, mask_id, eos_id, seed, weight_tying))
