"""LQER / L2QER: a rank-k reconstruction of the weight error E = W - Wq.

The layer computes y = x Wq^T + (x A) B with A [in, k] and B [k, out], so A B approximates
E^T. LQER takes the truncated SVD of E^T itself. L2QER weights the input features by
s_j, the calibration mean |x_j|, and takes the SVD of S E^T (S = diag(s)):
S E^T ~ U_k Sigma_k V_k^T gives A = S^-1 U_k, B = Sigma_k V_k^T, the best rank-k fit of
E^T in the S-weighted norm (Eckart-Young), which tracks the output error x E^T for
activations whose feature magnitudes differ, as LLM activations' do.
"""

from __future__ import annotations

import re

import torch

from compensator.types import LowRank

Rank = int | str  # components ("rank: 16") or a share of the layer's parameters ("30%")

RANK_HELP = (
    "an integer number of components (16), or a share of each layer's parameters (30%): "
    "k = share * in * out / (in + out), the factors then holding that share of the layer"
)

_SHARE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_rank(value: object) -> Rank:
    """A validated rank: a non-negative int, or a string "N%" with 0 < N <= 100."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and re.fullmatch(r"[-+]?\d+", text):
        text = int(text)
    elif isinstance(text, str) and re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+)", text):
        text = float(text)
    if isinstance(text, bool):
        raise ValueError(f"rank {value!r} is not valid: use {RANK_HELP}")
    if isinstance(text, float):
        raise ValueError(
            f"rank {value!r} is ambiguous: write an integer number of components (16) or a "
            "share of the layer's parameters (30%)"
        )
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"rank must be >= 0 components, got {text}")
        return text
    m = _SHARE.match(text) if isinstance(text, str) else None
    if m and 0 < float(m.group(1)) <= 100:
        return f"{m.group(1)}%"
    raise ValueError(f"rank {value!r} is not valid: use {RANK_HELP}")


def resolve_rank(rank: Rank, out_features: int, in_features: int) -> int:
    """The number of components for a layer: an integer rank as is; a share of the layer's
    parameters such that k (in + out) = share * in * out (LRC's convention). Never above
    min(out, in)."""
    full = min(out_features, in_features)
    if isinstance(rank, str):
        share = float(rank.rstrip("%")) / 100
        rank = round(share * in_features * out_features / (in_features + out_features))
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
