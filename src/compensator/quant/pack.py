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
    pack = _pack_aligned if 32 % bits == 0 else _pack_stream
    return pack(c.reshape(-1, n), bits).reshape(*lead, packed_words(n, bits))


def _pack_stream(c: torch.Tensor, bits: int) -> torch.Tensor:
    n = c.shape[1]
    offset = torch.arange(n, device=c.device) * bits
    word, shift = offset // 32, offset % 32
    n_words = packed_words(n, bits)
    # Work in int64 so a code that straddles a word boundary keeps its high bits.
    wide = c << shift
    out = torch.zeros(c.shape[0], n_words + 1, dtype=torch.int64, device=c.device)
    out.scatter_add_(1, word.expand_as(c), wide & 0xFFFFFFFF)
    out.scatter_add_(1, (word + 1).expand_as(c), wide >> 32)
    return _as_int32(out[:, :n_words])


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit patterns held in int64, reinterpreted as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words -> int64 codes [..., n]."""
    *lead, n_words = packed.shape
    if n_words != packed_words(n, bits):
        raise ValueError(f"{n_words} words cannot hold {n} codes of {bits} bits")
    unpack = _unpack_aligned if 32 % bits == 0 else _unpack_stream
    return unpack(packed.reshape(-1, n_words), bits, n).reshape(*lead, n)


def _unpack_stream(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p, torch.zeros_like(p[:, :1])], dim=1)
    offset = torch.arange(n, device=p.device) * bits
    word, shift = offset // 32, offset % 32
    lo = p[:, word]
    hi = p[:, word + 1]
    return ((lo | (hi << 32)) >> shift) & (2**bits - 1)


# Widths that divide 32 (2, 4, 8, 16 bits): no code straddles a word, so a word's codes are
# one shift each, broadcast over the codes of a word: the same words as the bit stream's
# scatter/gather above, in a few passes (4-bit SmolLM2 layers: ~4x faster).
def _pack_aligned(c: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    rows, n = c.shape
    n_words = packed_words(n, bits)
    if n_words * per != n:
        c = torch.cat([c, c.new_zeros(rows, n_words * per - n)], dim=1)
    shifts = torch.arange(per, device=c.device, dtype=torch.int64) * bits
    return _as_int32((c.reshape(rows, n_words, per) << shifts).sum(dim=-1))


def _unpack_aligned(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 32 // bits
    rows, n_words = p.shape
    shifts = torch.arange(per, device=p.device, dtype=torch.int32) * bits
    # An arithmetic shift of a negative word brings in ones at the top: the mask drops them.
    codes = (p.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(rows, n_words * per)[:, :n].to(torch.int64)
