"""Our integer codes as llama.cpp's quant blocks (32 weights each), exactly where the block
format allows.

A uniform weight dequantizes as (c - z) s with one (s, z) per group. When every group is a
whole number of 32-column blocks, each block has one (s, z), and:
- Q8_0 (d, int8 q[32]; x = q d) holds any code with d = s, q = c - z, whenever c - z fits
  int8 (up to 7 bits asymmetric, 8 bits symmetric): exact, 8.5 bits per weight;
- Q4_1 (d, m, 4-bit q[32]; x = q d + m) holds codes of up to 4 bits with d = s, q = c and
  m = -z s rounded to fp16: exact up to that rounding (within 1/2 fp16 ulp of z s);
- Q4_0 (d, 4-bit q[32]; x = (q - 8) d) holds symmetric 4-bit codes exactly (z = 8).
- Q5_0 (d, 5-bit q; x = (q - 16) d) and Q5_1 (d, m, 5-bit q; x = q d + m) hold symmetric
  and asymmetric 5-bit codes as Q4_0 and Q4_1 do (the K-quants' fallbacks);
- the K-quants (256-weight super-blocks, :mod:`compensator.quant.kquant`) hold codes fitted
  on their own grid: d and the sub-scales are recovered from our d sc scales exactly, the
  sub-mins from the float zero points (exact up to its float32 rounding).
Scales must be fp16 values (the spec's float16 scales are; bfloat16 ones are too, within
fp16's range).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from compensator.quant.kquant import KTYPES, SUPER, factors
from compensator.quant.spec import QuantSpec

BLOCK = 32
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
TYPES = {name: GGMLQuantizationType[name] for name in (*BLOCK_TYPES, *KTYPES)}


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
    z = _per_block(zero_cols)[..., None]
    integer = np.array_equal(z, np.round(z))
    if qtype in ("Q4_0", "Q5_0", "Q8_0") and not integer:
        raise ValueError(f"{qtype} holds integer zero points only")
    z = z.astype(np.int32) if integer else z.astype(np.float32)
    top = 15 if qtype in ("Q4_0", "Q4_1") else 31
    if qtype != "Q8_0" and c.max() > top:
        raise ValueError(f"{qtype} holds codes of at most {top.bit_length()} bits")
    if qtype == "Q8_0":
        q = c - z
        if q.min() < -128 or q.max() > 127:
            raise ValueError("codes minus zero points do not fit int8")
        parts = [d, q.astype(np.int8).view(np.uint8)]
    elif qtype in ("Q4_1", "Q5_1"):
        s = _per_block(scale_cols).astype(np.float32)
        m = _fp16(-z[..., 0] * s)[..., None].view(np.uint8)
        parts = [d, m, *_high_bits(c, qtype), _nibbles(c & 15)]
    elif qtype in ("Q4_0", "Q5_0"):
        if not (z == top // 2 + 1).all():
            raise ValueError(f"{qtype} holds symmetric codes (zero point {top // 2 + 1}) only")
        parts = [d, *_high_bits(c, qtype), _nibbles(c & 15)]
    else:
        raise ValueError(f"unknown block type {qtype}")
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _high_bits(c: np.ndarray, qtype: str) -> list[np.ndarray]:
    """Q5_0/Q5_1's qh: bit i of a little-endian uint32 is element i's fifth bit."""
    if not qtype.startswith("Q5"):
        return []
    bits = ((c >> 4) & 1).astype(np.uint8)  # [rows, nb, 32]
    return [np.packbits(bits, axis=-1, bitorder="little")]


def _or_shifted(parts: np.ndarray, width: int) -> np.ndarray:
    """[..., k, n] values of ``width`` bits -> [..., n] bytes: part i at bit i * width."""
    out = np.zeros(parts.shape[:-2] + parts.shape[-1:], dtype=np.uint8)
    for i in range(parts.shape[-2]):
        out |= (parts[..., i, :].astype(np.uint8) << (i * width)).astype(np.uint8)
    return out


def _scales_6bit(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins (gguf's ``get_scale_min``)."""
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


def _scales_q3(v: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes of sixteen 6-bit scales (stored as sc + 32)."""
    low = (v[:, :8] & 15) | ((v[:, 8:] & 15) << 4)
    high = _or_shifted(((v >> 4) & 3).reshape(-1, 4, 4), 2)
    return np.concatenate([low, high], axis=1).astype(np.uint8)


def _f16(x: torch.Tensor) -> np.ndarray:
    return x.numpy().astype(np.float16).view(np.uint8).reshape(-1, 2)


def encode_k(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, qtype: str) -> np.ndarray:
    """Rows of K-quant super-blocks, uint8 [rows, in/256 * block bytes], for codes [rows, in]
    fitted on ``qtype``'s grid, with their per-group scale and zero [rows, groups]."""
    kt = KTYPES[qtype]
    rows, n = codes.shape
    if n % SUPER:
        raise ValueError(f"rows of {n} columns are not whole {SUPER}-weight super-blocks")
    blocks = rows * (n // SUPER)
    per = SUPER // kt.sub
    s = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).reshape(blocks, per)
    z = torch.from_numpy(np.ascontiguousarray(zero, dtype=np.float32)).reshape(blocks, per)
    d, sc, dmin, m = factors(s, z, kt)
    c = codes.astype(np.uint8).reshape(blocks, SUPER)
    if c.max() >= 2**kt.bits:
        raise ValueError(f"{qtype} holds codes of at most {kt.bits} bits")
    sc_u = sc.numpy().astype(np.int16)
    m_u = m.numpy().astype(np.uint8)
    if qtype == "Q2_K":
        scales = (sc_u.astype(np.uint8) | (m_u << 4)).astype(np.uint8)
        qs = _or_shifted(c.reshape(blocks, 2, 4, 32), 2).reshape(blocks, 64)
        parts = [scales, qs, _f16(d), _f16(dmin)]
    elif qtype == "Q3_K":
        hmask = _or_shifted((c >> 2).reshape(blocks, 8, 32), 1)
        qs = _or_shifted((c & 3).reshape(blocks, 2, 4, 32), 2).reshape(blocks, 64)
        parts = [hmask, qs, _scales_q3((sc_u + 32).astype(np.uint8)), _f16(d)]
    elif qtype in ("Q4_K", "Q5_K"):
        low = c & 15
        qs = _or_shifted(low.reshape(blocks, 4, 2, 32), 4).reshape(blocks, 128)
        scales = _scales_6bit(sc_u.astype(np.uint8), m_u)
        qh = [_or_shifted((c >> 4).reshape(blocks, 8, 32), 1)] if qtype == "Q5_K" else []
        parts = [_f16(d), _f16(dmin), scales, *qh, qs]
    else:  # Q6_K
        ci = c.reshape(blocks, 2, 128)
        ql = _or_shifted((ci & 15).reshape(blocks, 2, 2, 64), 4).reshape(blocks, 128)
        qh = _or_shifted((ci >> 4).reshape(blocks, 2, 4, 32), 2).reshape(blocks, 64)
        parts = [ql, qh, sc_u.astype(np.int8).view(np.uint8), _f16(d)]
    return np.concatenate(parts, axis=1).reshape(rows, -1)


def holds(spec: QuantSpec, qtype: str) -> bool:
    """Whether ``qtype`` holds codes of this spec (up to Q4_1/Q5_1's fp16 rounding of m)."""
    bits, symmetric = spec.bits, spec.symmetric
    if qtype in KTYPES or spec.kquant is not None:
        return qtype == spec.kquant
    if spec.float_min:  # a min and no integer zero point: Q4_1 / Q5_1's form
        return qtype in ("Q4_1", "Q5_1") and bits <= int(qtype[1])
    if qtype in ("Q4_0", "Q5_0"):
        return bits == int(qtype[1]) and symmetric
    if qtype in ("Q4_1", "Q5_1"):
        return bits <= int(qtype[1])
    return bits <= 7 or symmetric  # Q8_0: c - z within int8


def auto_type(spec: QuantSpec) -> str:
    bits, symmetric = spec.bits, spec.symmetric
    if spec.kquant is not None:
        return spec.kquant
    if bits in (4, 5) and symmetric:
        return f"Q{bits}_0"
    if bits <= 5:
        return "Q4_1" if bits <= 4 else "Q5_1"
    return "Q8_0"
