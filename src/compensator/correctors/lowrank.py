"""LQER / L2QER: a rank-k reconstruction of the weight error E = W - Wq.

The layer computes y = x Wq^T + (x A) B with A [in, k] and B [k, out], so A B approximates
E^T. LQER takes the truncated SVD of E^T itself. L2QER weights the input features by
s_j, the calibration mean |x_j|, and takes the SVD of S E^T (S = diag(s)):
S E^T ~ U_k Sigma_k V_k^T gives A = S^-1 U_k, B = Sigma_k V_k^T, the best rank-k fit of
E^T in the S-weighted norm (Eckart-Young), which tracks the output error x E^T for
activations whose feature magnitudes differ, as LLM activations' do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    """Factors a [in, k], b [k, out]. With ``bits`` set they hold int8 codes and ``a_scale``
    [k] (per column of a) and ``b_scale`` [k] (per row of b) recover the values."""

    a: torch.Tensor
    b: torch.Tensor
    bits: int | None = None
    a_scale: torch.Tensor | None = None
    b_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float a, b (dequantized when stored as codes)."""
        if self.bits is None:
            return self.a.float(), self.b.float()
        assert self.a_scale is not None and self.b_scale is not None
        return self.a.float() * self.a_scale.float(), self.b.float() * self.b_scale.float()[:, None]

    def dense(self) -> torch.Tensor:
        """The correction as a weight-shaped matrix [out, in]: (A B)^T."""
        a, b = self.factors()
        return (a @ b).T

    def quantized(self, bits: int) -> LowRank:
        """Symmetric ``bits``-bit codes, one scale per rank component (column of a, row of b)."""
        a, b = self.factors()
        qmax = 2 ** (bits - 1) - 1
        a_scale = (a.abs().amax(dim=0) / qmax).clamp(min=1e-12).half().float()
        b_scale = (b.abs().amax(dim=1) / qmax).clamp(min=1e-12).half().float()
        a_codes = (a / a_scale).round().clamp(-qmax, qmax).to(torch.int8)
        b_codes = (b / b_scale[:, None]).round().clamp(-qmax, qmax).to(torch.int8)
        return LowRank(a_codes, b_codes, bits, a_scale.half(), b_scale.half())

    def storage_bits(self) -> int:
        if self.bits is None:
            return (self.a.numel() + self.b.numel()) * 16
        return (self.a.numel() + self.b.numel()) * self.bits + 2 * self.rank * 16


def resolve_rank(rank: int | float, out_features: int, in_features: int) -> int:
    """An integer rank as is; a fraction rho in (0, 1] of the layer's size, meaning factors
    that hold rho of its parameters: k (in + out) = rho in out (LRC's convention). Never
    above min(out, in)."""
    full = min(out_features, in_features)
    if isinstance(rank, float):
        rank = round(rank * in_features * out_features / (in_features + out_features))
    return max(0, min(int(rank), full))


def l2qer_scale(abs_mean: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """s from the per-feature calibration mean |x|: clamped away from 0, then divided by
    sqrt(min * max) so that it is centred on 1 in log scale (the SVD is scale-free, but the
    factors' range is not, which matters once they are stored in fp16 or int8)."""
    s = abs_mean.float().clamp(min=eps)
    return s / torch.sqrt(s.min() * s.max())


def lqer(
    w: torch.Tensor, wq: torch.Tensor, rank: int, scale: torch.Tensor | None = None
) -> LowRank | None:
    """Rank-``rank`` factors of (w - wq)^T, weighted by ``scale`` (L2QER) or not (LQER).

    Returns None for rank 0. The SVD runs in float64 so that full rank reproduces w exactly
    up to float32 rounding.
    """
    if rank <= 0:
        return None
    err_t = (w.double() - wq.double()).T  # [in, out]
    s = None if scale is None else scale.double().to(err_t.device)
    target = err_t if s is None else s[:, None] * err_t
    u, sigma, vh = torch.linalg.svd(target, full_matrices=False)
    k = min(rank, sigma.numel())
    a = u[:, :k] if s is None else u[:, :k] / s[:, None]
    b = sigma[:k, None] * vh[:k]
    return LowRank(a.float(), b.float())
