"""Key/value cache for blockwise (Fast-dLLM style) decoding with the LLaDA implementation.

A diffusion LM attends bidirectionally, so a cache is an approximation during decoding: the keys and values of
the cached positions are frozen while tokens elsewhere change. It is exact at the moment it is made — a block
run against a cache taken from a full forward over the same tokens gives the full forward's hidden states —
and it drifts only as the block's tokens are committed. Fast-dLLM refreshes it once per block.

A :class:`KVCache` holds, per layer, the keys (RoPE already applied at their own positions) and values of a
set of sequence positions, plus which of them are real tokens (padding is never attended). Because the keys
carry their rotation, cached positions need not be contiguous: the dual cache is "everything except the
current block".

    hidden, cache = lm.prefill(ids, attention_mask)  # full forward over [B, L]; cache of positions 0..L-1
    prefix = cache.truncate(start)                   # prefix cache: positions [0, start)
    h = lm.hidden(ids[:, start:], cache=prefix)      # queries at start..L-1       -> [B, L - start, H]
    dual = cache.exclude(start, end)                 # dual cache: all positions but [start, end)
    h = lm.hidden(ids[:, start:end], cache=dual, positions=start)  # start..end-1 -> [B, end - start, H]

Positions are tracked as Python ints (``spans``), so checks and defaults never synchronise with the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCache:
    """Per-layer keys/values of the positions in ``spans``.

    keys[i], values[i]: ``[B, n_kv_heads, S, head_dim]`` for layer i (keys rotated at their positions).
    key_mask: ``[B, S]`` bool, True where the cached position is a real token; None means all are real.
    spans: the sequence positions held, as half-open ``(start, end)`` ranges in the order they sit along S.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    key_mask: torch.Tensor | None
    spans: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        """Number of cached positions S."""
        return sum(end - start for start, end in self.spans)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def next_position(self) -> int | None:
        """First position after the cache if it holds a prefix ``[0, S)``, else None (give positions)."""
        if len(self.spans) == 1 and self.spans[0][0] == 0:
            return self.spans[0][1]
        if not self.spans:
            return 0
        return None

    def covers(self, start: int, end: int) -> bool:
        """Whether any cached position lies in ``[start, end)``."""
        return any(s < end and start < e for s, e in self.spans)

    def _keep(self, keep: list[tuple[int, int]]) -> KVCache:
        # keep: position ranges to retain; map them to index ranges along S, in cache order.
        index_ranges, spans, offset = [], [], 0
        for s, e in self.spans:
            for ks, ke in keep:
                lo, hi = max(s, ks), min(e, ke)
                if lo < hi:
                    index_ranges.append((offset + lo - s, offset + hi - s))
                    spans.append((lo, hi))
            offset += e - s

        def take(t: torch.Tensor, dim: int) -> torch.Tensor:
            parts = [t.narrow(dim, a, b - a) for a, b in index_ranges]
            if len(parts) == 1:
                return parts[0]
            if not parts:
                return t.narrow(dim, 0, 0)
            return torch.cat(parts, dim=dim)

        return KVCache(
            keys=tuple(take(k, 2) for k in self.keys),
            values=tuple(take(v, 2) for v in self.values),
            key_mask=None if self.key_mask is None else take(self.key_mask, 1),
            spans=tuple(_merge(spans)),
        )

    def truncate(self, end: int) -> KVCache:
        """The cache of positions ``< end`` (a prefix cache). Views, no copy, when the cache is contiguous."""
        if not isinstance(end, int) or end < 0:
            raise ValueError(f"end must be a non-negative int, got {end!r}")
        return self._keep([(0, end)])

    def exclude(self, start: int, end: int) -> KVCache:
        """The cache without positions ``[start, end)``: a dual cache around the current block (one copy)."""
        if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start <= end:
            raise ValueError(
                f"start and end must be ints with 0 <= start <= end, got start={start!r}, end={end!r}"
            )
        big = max(e for _, e in self.spans) if self.spans else 0
        return self._keep([(0, start), (end, max(big, end))])


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join adjacent ranges ((0, 4), (4, 8) -> (0, 8)) so a re-assembled prefix is recognised as one."""
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if merged and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged
