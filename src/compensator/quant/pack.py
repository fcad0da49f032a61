"""Pack b-bit codes (2 <= b <= 8) along the last dimension into int32 words.

Codes form one little-endian bit stream per row: code j occupies bits [j*b, (j+1)*b). For
b in {2, 4, 8} no code straddles a word; for 3, 5, 6, 7 some do, and carry into the next word.
"""

from __future__ import annotations

import math

import torch


def packed_words(n: int, bits: int) -> int:
    return math.ceil(n * bits / 32)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [..., n] with values in [0, 2^bits) -> int32 words [..., ceil(n*bits/32)]."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    *lead, n = c.shape
    c = c.reshape(-1, n)
    offset = torch.arange(n, device=c.device) * bits
    word, shift = offset // 32, offset % 32
    n_words = packed_words(n, bits)
    # Work in int64 so a code that straddles a word boundary keeps its high bits.
    wide = c << shift
    out = torch.zeros(c.shape[0], n_words + 1, dtype=torch.int64, device=c.device)
    out.scatter_add_(1, word.expand_as(c), wide & 0xFFFFFFFF)
    out.scatter_add_(1, (word + 1).expand_as(c), wide >> 32)
    out = out[:, :n_words]
    # Reinterpret the unsigned 32-bit pattern as int32.
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.reshape(*lead, n_words)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words -> int64 codes [..., n]."""
    *lead, n_words = packed.shape
    if n_words != packed_words(n, bits):
        raise ValueError(f"{n_words} words cannot hold {n} codes of {bits} bits")
    p = packed.reshape(-1, n_words).to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p, torch.zeros_like(p[:, :1])], dim=1)
    offset = torch.arange(n, device=p.device) * bits
    word, shift = offset // 32, offset % 32
    lo = p[:, word]
    hi = p[:, word + 1]
    codes = ((lo | (hi << 32)) >> shift) & (2**bits - 1)
    return codes.reshape(*lead, n)
