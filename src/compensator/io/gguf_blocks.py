"""Our integer codes as llama.cpp's quant blocks (32 weights each), exactly where the block
format allows.

A uniform weight dequantizes as (c - z) s with one (s, z) per group. When every group is a
whole number of 32-column blocks, each block has one (s, z), and:
- Q8_0 (d, int8 q[32]; x = q d) holds any code with d = s, q = c - z, whenever c - z fits
  int8 (up to 7 bits asymmetric, 8 bits symmetric): exact, 8.5 bits per weight;
- Q4_1 (d, m, 4-bit q[32]; x = q d + m) holds codes of up to 4 bits with d = s, q = c and
  m = -z s rounded to fp16: exact up to that rounding (within 1/2 fp16 ulp of z s);
- Q4_0 (d, 4-bit q[32]; x = (q - 8) d) holds symmetric 4-bit codes exactly (z = 8).
Scales must be fp16 values (the spec's float16 scales are; bfloat16 ones are too, within
fp16's range).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

BLOCK = 32
TYPES = {
    "Q4_0": GGMLQuantizationType.Q4_0,
    "Q4_1": GGMLQuantizationType.Q4_1,
    "Q8_0": GGMLQuantizationType.Q8_0,
}


def _per_block(cols: np.ndarray) -> np.ndarray:
    """[rows, in] per-column values -> [rows, in/32], checking they are constant per block."""
    rows, n = cols.shape
    blocks = cols.reshape(rows, n // BLOCK, BLOCK)
    if not (blocks == blocks[..., :1]).all():
        raise ValueError("a group boundary falls inside a 32-column block")
    return blocks[..., 0]


def _fp16(x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError("a scale is outside float16's range")
    return h


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[rows, nb, 32] values < 16 -> [rows, nb, 16] bytes: q[j] low, q[j + 16] high."""
    q = q.astype(np.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def encode(
    codes: np.ndarray, scale_cols: np.ndarray, zero_cols: np.ndarray, qtype: str
) -> np.ndarray:
    """Rows of blocks, uint8 [rows, in/32 * block bytes], for codes [rows, in] (in a multiple
    of 32) with their scale and zero expanded per column."""
    rows, n = codes.shape
    if n % BLOCK:
        raise ValueError(f"rows of {n} columns are not whole {BLOCK}-column blocks")
    c = codes.astype(np.int32).reshape(rows, n // BLOCK, BLOCK)
    d = _fp16(_per_block(scale_cols))[..., None].view(np.uint8)  # [rows, nb, 2]
    z = _per_block(zero_cols).astype(np.int32)[..., None]
    if qtype == "Q8_0":
        q = c - z
        if q.min() < -128 or q.max() > 127:
            raise ValueError("codes minus zero points do not fit int8")
        parts = [d, q.astype(np.int8).view(np.uint8)]
    elif qtype == "Q4_1":
        if c.max() > 15:
            raise ValueError("Q4_1 holds codes of at most 4 bits")
        s = _per_block(scale_cols).astype(np.float32)
        m = _fp16(-z[..., 0] * s)[..., None].view(np.uint8)
        parts = [d, m, _nibbles(c)]
    elif qtype == "Q4_0":
        if c.max() > 15 or not (z == 8).all():
            raise ValueError("Q4_0 holds symmetric 4-bit codes (zero point 8) only")
        parts = [d, _nibbles(c)]
    else:
        raise ValueError(f"unknown block type {qtype}")
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def holds(bits: int, symmetric: bool, qtype: str) -> bool:
    """Whether ``qtype`` holds codes of this spec (up to Q4_1's fp16 rounding of m)."""
    if qtype == "Q4_0":
        return bits == 4 and symmetric
    if qtype == "Q4_1":
        return bits <= 4
    return bits <= 7 or symmetric  # Q8_0: c - z within int8


def auto_type(bits: int, symmetric: bool) -> str:
    if bits == 4 and symmetric:
        return "Q4_0"
    return "Q4_1" if bits <= 4 else "Q8_0"
