"""Singular-value parametrizations of a weight: W = U M V^T with a learnable M.

LSI learns an increment of the singular values, M = diag(s + ds). SDE (CQE+) generalizes it
to M = diag(s + ds) + K, K a dense k x k block over the k largest singular values and/or a
band of off-diagonals; k = 0 and no band is LSI. The weight is always formed as
W + U (M - diag(s)) V^T, so an untrained parametrization folds back to W bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SVDFactors:
    u: torch.Tensor  # [out, r]
    s: torch.Tensor  # [r], descending
    vh: torch.Tensor  # [r, in]


def svd_factors(w: torch.Tensor) -> SVDFactors:
    """Thin SVD, computed in float64 so the factors are accurate to float32 rounding."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return SVDFactors(u.to(w.dtype), s.to(w.dtype), vh.to(w.dtype))


def delta_matrix(
    ds: torch.Tensor, block: torch.Tensor | None, bands: list[torch.Tensor]
) -> torch.Tensor:
    """M - diag(s) as a dense [r, r] matrix: diag(ds), plus the top-left ``block``, plus
    ``bands`` = [upper_1, lower_1, upper_2, lower_2, ...] off-diagonals."""
    m = torch.diag(ds)
    if block is not None and block.numel():
        k = block.shape[0]
        m = m + torch.nn.functional.pad(block, (0, m.shape[1] - k, 0, m.shape[0] - k))
    for i, v in enumerate(bands):
        offset = i // 2 + 1
        m = m + torch.diag(v, offset if i % 2 == 0 else -offset)
    return m


def svd_weight(
    w: torch.Tensor,
    f: SVDFactors,
    ds: torch.Tensor,
    block: torch.Tensor | None = None,
    bands: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """W + U (M - diag(s)) V^T, without forming the dense delta when it is diagonal."""
    out = w + (f.u * ds) @ f.vh
    if block is not None and block.numel():
        k = block.shape[0]
        out = out + f.u[:, :k] @ block @ f.vh[:k]
    if bands:
        zero = torch.zeros_like(ds)
        out = out + f.u @ delta_matrix(zero, None, bands) @ f.vh
    return out
