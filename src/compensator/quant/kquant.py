"""llama.cpp's K-quant grids (Q2_K .. Q6_K) as group parameters our rounders can aim at.

A K-quant super-block holds 256 weights of a row in sub-blocks of 16 or 32 (our groups).
Each sub-block's scale is a small integer ``sc`` times one float16 ``d`` per super-block, and
for the asymmetric types its min is another integer ``m`` times a float16 ``dmin``:

    asymmetric (Q2_K, Q4_K, Q5_K):  w = d sc q - dmin m     sc, m in 0 .. levels
    symmetric  (Q3_K, Q6_K):        w = d sc (q - 2^(b-1))   sc in -levels .. levels - 1

So the grid is fitted a super-block at a time (:func:`compensator.quant.grid.fit_superblock`):
each sub-block's range first (searched), then the super-block's float16 ``d`` from the
largest scale and every ``sc`` rounded against it (:func:`quantize_super`), as llama.cpp's
reference quantizer does. In our (scale, zero) form the
scale is d sc, exact in float32, and the zero is m dmin / (d sc), a float (the asymmetric
types dequantize as (c - z) s = c d sc - m dmin up to float32 rounding of z).

Rows that are not whole super-blocks cannot be K-quants; llama.cpp falls back to a 32-weight
block type for them, and so do we (:attr:`KType.fallback`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPER = 256


@dataclass(frozen=True)
class KType:
    bits: int
    sub: int  # weights per sub-block: our group size
    symmetric: bool
    levels: int  # sub-scale (and sub-min) integers: 0..levels, or -levels..levels-1 if symmetric
    fallback: tuple[int, bool]  # (bits, symmetric) at g32 for rows of other widths
    fallback_type: str  # the llama.cpp block type that fallback is, for messages

    @property
    def sc_range(self) -> tuple[int, int]:
        return (-self.levels, self.levels - 1) if self.symmetric else (0, self.levels)


# llama.cpp's fallbacks for rows that are not whole super-blocks (tensor_type_fallback in
# llama-quant.cpp, llama.cpp as built by benchmarks/llamacpp): Q4_K -> Q5_0, Q5_K -> Q5_1,
# Q6_K -> Q8_0, Q2_K and Q3_K -> Q4_0. It applies with --pure too.
KTYPES: dict[str, KType] = {
    "Q2_K": KType(2, 16, False, 15, (4, True), "Q4_0"),
    "Q3_K": KType(3, 16, True, 32, (4, True), "Q4_0"),
    "Q4_K": KType(4, 32, False, 63, (5, True), "Q5_0"),
    "Q5_K": KType(5, 32, False, 63, (5, False), "Q5_1"),
    "Q6_K": KType(6, 16, True, 128, (8, True), "Q8_0"),
}

# Bits per weight of each type's blocks (bytes per 256 weights x 8 / 256).
BITS_PER_WEIGHT = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}
_FP16_TINY = 2.0**-24  # float16's smallest subnormal: d for an all-zero super-block


def raw_params(
    xmin: torch.Tensor, xmax: torch.Tensor, kt: KType
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unquantized scale and min of sub-block ranges that contain 0. Symmetric: the larger
    end lands on the lowest level (signed scale, min 0); asymmetric: the min is -xmin >= 0."""
    if kt.symmetric:
        extreme = torch.where(-xmin >= xmax, xmin, xmax)
        return -extreme / 2 ** (kt.bits - 1), torch.zeros_like(xmin)
    return (xmax - xmin) / (2**kt.bits - 1), -xmin


def _super_unit(x: torch.Tensor, levels: int, symmetric: bool) -> torch.Tensor:
    """The float16 unit (as float32, [rows, 1]) that puts the largest entry of ``x`` [rows, n]
    on ``levels`` (its magnitude on -levels when symmetric); never 0."""
    if symmetric:
        ext = x.gather(1, x.abs().argmax(1, keepdim=True))
        unit = (-ext / levels).to(torch.float16).float()
    else:
        unit = (x.amax(1, keepdim=True) / levels).to(torch.float16).float()
    return torch.where(unit == 0, torch.full_like(unit, _FP16_TINY), unit)


def quantize_super(
    scale: torch.Tensor, minimum: torch.Tensor, kt: KType
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-block scales and mins ([rows, n], one super-block) on the K grid: the (scale, zero)
    pairs the rounders use, scale = d sc (float32, exact) and zero = dmin m / scale (or
    2^(bits-1) when symmetric). A sub-scale that rounds to 0 is kept at one unit, so every
    scale divides."""
    d = _super_unit(scale, kt.levels, kt.symmetric)
    lo, hi = kt.sc_range
    sc = torch.round(scale / d).clamp(lo, hi)
    one = torch.where(scale < 0, -1.0, 1.0).to(sc.dtype)
    sc = torch.where(sc == 0, one if kt.symmetric else torch.ones_like(sc), sc)
    s = d * sc
    if kt.symmetric:
        return s, torch.full_like(s, 2.0 ** (kt.bits - 1))
    dmin, m = _on_min_unit(minimum, kt.levels)
    return s, (dmin * m.clamp(0, kt.levels)) / s


def _on_min_unit(minimum: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dmin, the float16 unit ([rows, 1], float32) that puts the largest min on ``levels``,
    and every min rounded to a multiple of it (all 0 when every min is 0)."""
    dmin = (minimum.amax(1, keepdim=True) / levels).to(torch.float16).float()
    safe = torch.where(dmin == 0, torch.ones_like(dmin), dmin)
    return dmin, torch.round(minimum / safe)


def factors(
    scale: torch.Tensor, zero: torch.Tensor, kt: KType
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stored integers of super-blocks fitted by :func:`quantize_super`: from scale and
    zero [rows, n] (one super-block per row) the float16 d and dmin ([rows, 1], float32) and
    the integers sc and m ([rows, n]). Raises ValueError when the scales are not d sc."""
    d = _super_unit(scale, kt.levels, kt.symmetric)
    sc = torch.round(scale / d)
    lo, hi = kt.sc_range
    if not torch.equal(d * sc, scale) or sc.min() < lo or sc.max() > hi:
        raise ValueError("the scales are not a float16 unit times integers of the K grid")
    if kt.symmetric:
        return d, sc, torch.zeros_like(d), torch.zeros_like(sc)
    minimum = zero * scale
    dmin, m = _on_min_unit(minimum, kt.levels)
    if (
        m.min() < 0
        or m.max() > kt.levels
        or (dmin * m - minimum).abs().max() > 1e-6 * (minimum.abs().max() + 1e-30)
    ):
        raise ValueError("the mins are not a float16 unit times integers of the K grid")
    return d, sc, dmin, m
