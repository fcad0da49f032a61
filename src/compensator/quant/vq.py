"""Vector quantization of a weight matrix: sub-vectors of ``dim`` consecutive input columns
replaced by the nearest of 2^bits codewords, one codebook per layer (or per group of rows).

Optionally sign-split (SSVQ): the codebook holds magnitudes, clustered on |W|, and every
weight keeps its own sign bit. Rows are first divided by a per-row scale (their RMS) so one
codebook fits rows of different magnitude. Storage per weight: bits/dim (+ 1 sign bit), plus
the fp16 codebook and row scales spread over the layer (see :func:`vq_storage_bits`).
The k-means objective is weighted per column by the diagonal of X^T X when given, the part
of the layer's output error that a single column's error contributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from compensator.errors import CompensatorError


class VQSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(4, ge=1, le=16, description="sub-vector length along the input dimension")
    bits: int = Field(8, ge=1, le=14, description="index bits: 2^bits codewords per codebook")
    signs: bool = Field(
        False, description="sign-split: magnitudes in the codebook, 1 sign bit per weight"
    )
    rows_per_codebook: int | None = Field(None, ge=1, description="None: one codebook per layer")
    iterations: int = Field(20, ge=0, description="k-means iterations (at most)")
    fit_vectors: int = Field(
        65536, ge=1, description="sub-vectors the codebook is fitted on (a row subsample)"
    )
    seed: int = 0

    @property
    def codewords(self) -> int:
        return 2**self.bits

    def label(self) -> str:
        signs = "+sign" if self.signs else ""
        return f"VQ d{self.dim} b{self.bits}{signs}"

    def check(self, in_features: int) -> None:
        if in_features % self.dim:
            raise CompensatorError(
                f"VQ sub-vector dim {self.dim} does not divide the input width {in_features}; "
                "pick a dim that divides every Linear's input width (e.g. 2, 3, 4 or 8 for 576)"
            )


@dataclass
class VQWeight:
    """A vector-quantized matrix: ``indices`` [out, in/dim] into ``codebook`` [n_cb, K, dim]
    (row r uses codebook r // rows_per_codebook), ``row_scale`` [out] (fp16 values),
    ``signs`` [out, in] bool (True = negative) when sign-split."""

    format: ClassVar[str] = "vq"  # the runtime layer format it becomes (nn.layers)

    indices: torch.Tensor
    codebook: torch.Tensor
    row_scale: torch.Tensor
    signs: torch.Tensor | None
    spec: VQSpec

    def codebook_of_rows(self) -> torch.Tensor:
        out = self.indices.shape[0]
        per = self.spec.rows_per_codebook or out
        return torch.arange(out, device=self.indices.device) // per

    def dequantize(self) -> torch.Tensor:
        return vq_decode(
            self.indices, self.codebook, self.row_scale, self.signs, self.codebook_of_rows()
        )


def vq_decode(
    indices: torch.Tensor,
    codebook: torch.Tensor,
    row_scale: torch.Tensor,
    signs: torch.Tensor | None,
    cb_of_row: torch.Tensor,
) -> torch.Tensor:
    out, n_sub = indices.shape
    dim = codebook.shape[-1]
    w = codebook[cb_of_row[:, None], indices.long()].reshape(out, n_sub * dim)
    if signs is not None:
        w = torch.where(signs, -w, w)
    return w * row_scale.float()[:, None]


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-row RMS, rounded to fp16 (what is stored); 1 for an all-zero row."""
    rms = w.float().pow(2).mean(1).sqrt()
    rms = torch.where(rms > 0, rms, torch.ones_like(rms))
    return rms.clamp_min(torch.finfo(torch.float16).tiny).half().float()


def _nearest(x: torch.Tensor, wts: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Nearest codeword of every sub-vector: ``x`` [P, R, d] (P column positions sharing the
    per-coordinate weights ``wts`` [P, d]), ``cb`` [k, d]; returns [P, R] indices.

    ||x - c||_w^2 = sum w x^2 - 2 (w x) . c + w . c^2; the first term does not change the
    argmin, the rest is one batched matmul with a bias. Chunked so the score block stays
    small (the scores, not the flops, are the cost).
    """
    p, r, _ = x.shape
    k = cb.shape[0]
    out = torch.empty(p, r, dtype=torch.long, device=x.device)
    step = max(1, (1 << 21) // max(1, r * k))
    for a in range(0, p, step):
        w = wts[a : a + step]
        bias = -(w @ (cb * cb).T)[:, None, :]  # [p', 1, k]
        mat = 2 * w[:, :, None] * cb.T[None]  # [p', d, k]
        out[a : a + step] = torch.baddbmm(bias, x[a : a + step], mat).argmax(-1)
    return out


def _objective(x: torch.Tensor, wts: torch.Tensor, cb: torch.Tensor, assign: torch.Tensor) -> float:
    return float(((x - cb[assign]) ** 2 * wts[:, None, :]).sum())


def weighted_kmeans(
    x: torch.Tensor,
    wts: torch.Tensor,
    k: int,
    iterations: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Lloyd's algorithm minimizing sum_{p,r,j} wts[p, j] (x[p, r, j] - c[a_pr, j])^2.

    ``x`` [P, R, d]: sub-vectors grouped by column position p, whose coordinates share the
    weights ``wts[p]``. Seeding: k-means++ on a subsample. Returns (codebook [k, d],
    assignment [P, R], objective after seeding and after each iteration). Empty clusters
    keep their codeword, so the objective never rises.
    """
    p, r, d = x.shape
    flat, flat_w = x.reshape(-1, d), wts[:, None, :].expand(p, r, d).reshape(-1, d)
    n = flat.shape[0]
    k = min(k, n)
    sub = torch.randperm(n, generator=generator)[: max(16 * k, 4096)]
    xs, ws = flat[sub], flat_w[sub]
    chosen = [int(torch.randint(len(sub), (1,), generator=generator))]
    dist = ((xs - xs[chosen[0]]) ** 2 * ws).sum(1)
    for _ in range(k - 1):
        nxt = int(torch.multinomial(dist.clamp_min(0) + 1e-20, 1, generator=generator))
        chosen.append(nxt)
        dist = torch.minimum(dist, ((xs - xs[nxt]) ** 2 * ws).sum(1))
    cb = xs[chosen].clone()
    assign = _nearest(x, wts, cb)
    history = [_objective(x, wts, cb, assign)]
    for _ in range(iterations):
        idx = assign.reshape(-1)
        num = torch.zeros_like(cb).index_add_(0, idx, flat * flat_w)
        den = torch.zeros_like(cb).index_add_(0, idx, flat_w)
        cb = torch.where(den > 0, num / den.clamp_min(1e-30), cb)
        assign = _nearest(x, wts, cb)
        history.append(_objective(x, wts, cb, assign))
        if history[-1] >= history[-2] * (1 - 1e-4):  # converged: < 0.01% per iteration
            break
    return cb, assign, history


def vq_quantize(w: torch.Tensor, spec: VQSpec, hdiag: torch.Tensor | None = None) -> VQWeight:
    """Plain VQ (sign-split when ``spec.signs``): row scales, then weighted k-means per codebook."""
    out, cols = w.shape
    spec.check(cols)
    w = w.float()
    scale = row_scales(w)
    target = (w / scale[:, None]).abs() if spec.signs else w / scale[:, None]
    n_sub = cols // spec.dim
    wts = column_weights(hdiag, cols, w.device).reshape(n_sub, spec.dim)
    per = spec.rows_per_codebook or out
    gen = torch.Generator().manual_seed(spec.seed)
    indices = torch.empty(out, n_sub, dtype=torch.long, device=w.device)
    books = []
    for start in range(0, out, per):
        rows = target[start : start + per]
        x = rows.reshape(rows.shape[0], n_sub, spec.dim).transpose(0, 1).contiguous()
        # Fit on a subsample of rows (every column position kept): Lloyd's cost is the
        # n x 2^bits score matrix, and 64k sub-vectors pin 2^8..2^9 codewords down well.
        keep = max(1, -(-spec.fit_vectors // n_sub))
        fit = x if keep >= x.shape[1] else x[:, torch.randperm(x.shape[1], generator=gen)[:keep]]
        cb, _, _ = weighted_kmeans(fit, wts, spec.codewords, spec.iterations, gen)
        cb = cb.half().float()  # stored in fp16: assign against what is stored
        if cb.shape[0] < spec.codewords:  # fewer sub-vectors than codewords: pad
            cb = torch.cat([cb, cb[:1].expand(spec.codewords - cb.shape[0], -1)])
        books.append(cb)
        indices[start : start + per] = _nearest(x, wts, cb).T
    signs = (w < 0) if spec.signs else None
    return VQWeight(indices, torch.stack(books), scale, signs, spec)


def column_weights(hdiag: torch.Tensor | None, cols: int, device: torch.device) -> torch.Tensor:
    """k-means weight of each input column: diag(X^T X) normalized to mean 1 (ones without
    statistics), floored so a dead column still gets a sensible assignment."""
    if hdiag is None:
        return torch.ones(cols, device=device)
    w = hdiag.float().clamp_min(0)
    return (w / w.mean().clamp_min(1e-30)).clamp_min(1e-6)


def vq_storage_bits(out: int, cols: int, spec: VQSpec) -> int:
    n_cb = -(-out // (spec.rows_per_codebook or out))
    index_bits = out * (cols // spec.dim) * spec.bits
    sign_bits = out * cols if spec.signs else 0
    return index_bits + sign_bits + n_cb * spec.codewords * spec.dim * 16 + out * 16
