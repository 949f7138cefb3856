"""Counter-based random numbers: Philox4x32-10 in plain torch.

Every random draw in dmpo_fast (noising masks, sampling noise) is a pure function of
``(seed, counter)``, so a result never depends on batch layout, thread scheduling or backend: the
eager reference here, the Triton kernels (``tl.philox``, the same algorithm and constants) and the
native CPU ops produce the same bits for the same seed and counters.

uint32 arithmetic is emulated in int64: a 32x32-bit product is split into 16-bit halves so nothing
overflows int64 (torch has no full uint64 arithmetic on every device).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
N_ROUNDS = 10


def _mulhilo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``const * x`` for uint32 ``const`` and int64 tensor ``x`` in [0, 2^32)."""
    xh, xl = x >> 16, x & 0xFFFF
    lo_part = const * xl  # < 2^48
    t = const * xh + (lo_part >> 16)  # < 2^49, product = (t << 16) + (lo_part & 0xFFFF)
    hi = t >> 16
    lo = ((t & 0xFFFF) << 16) | (lo_part & 0xFFFF)
    return hi & _MASK32, lo & _MASK32


def philox4x32(
    seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, n_rounds: int = N_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with key (seed low 32 bits, seed high 32 bits); counters are int64 tensors in [0, 2^32).

    Bit-compatible with ``triton.language.philox(seed, c0, c1, c2, c3)`` for uint32 counters.
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    shape = torch.broadcast_shapes(c0.shape, c1.shape, c2.shape, c3.shape)
    c0, c1, c2, c3 = (c.to(torch.int64).expand(shape) & _MASK32 for c in (c0, c1, c2, c3))
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """uint32 bits (int64 holding [0, 2^32)) -> float32 in [0, 1) using the top 24 bits.

    24 bits are exactly representable in fp32, so every backend converts identically.
    """
    return (x >> 8).to(torch.float32) * (1.0 / 16777216.0)


def philox_uniform(seed: int, c0, c1, c2, c3) -> torch.Tensor:
    """U[0, 1) float32 for each counter tuple (broadcast); the first Philox output word."""
    return uniform_from_bits(philox4x32(seed, c0, c1, c2, c3)[0])


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 62-bit seed drawn from ``generator`` (or torch's global CPU generator).

    Drawn on the generator's device; pass a CPU generator to avoid a device sync.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**62, (), generator=generator, device=device))
