"""SSVQ (sign-splitting vector quantization, ICCV 2025) as a block learner.

Per Linear: the codebook clusters the magnitudes |W| (k-means, weighted by diag X^T X), and
each weight keeps a sign from a latent L (init alpha * W / row scale). Forward:
Wq = row_scale * C[A] * sign(L), straight-through for the sign, so dWq/dL = row_scale * C[A]:
the latent's gradient is scaled by its codeword's magnitude. Codebook and latents train
jointly against the block output; assignments stay fixed.

Progressive freezing: each sign's flip frequency is tracked as an EMA over optimizer steps;
a sign whose frequency exceeds a threshold that decays along a cosine from ``threshold_start``
to ``threshold_end`` is frozen for good, to the majority of its history (the sign of an EMA
of its past signs). Oscillating signs stop wasting updates and stop shaking the block.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compensator.errors import CompensatorError
from compensator.learn.learners import Fixed, LearnContext, Learner, _pname
from compensator.learn.ste import cast_ste
from compensator.quant.spec import QuantSpec
from compensator.quant.vq import VQWeight, vq_quantize


def sign_ste(latent: torch.Tensor) -> torch.Tensor:
    """+1 / -1 (0 counts as +1) forward, identity gradient."""
    hard = torch.where(latent < 0, -1.0, 1.0).to(latent.dtype)
    return hard + (latent - latent.detach())


def cosine_threshold(step: int, total: int, start: float, end: float) -> float:
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


class SSVQ(Learner):
    order = 2

    def __init__(
        self,
        ctx: LearnContext,
        lr: float,
        sign_lr: float,
        alpha: float,
        ema: float,
        threshold_start: float,
        threshold_end: float,
    ) -> None:
        super().__init__(lr)
        if ctx.vq is None or not ctx.vq.signs:
            raise CompensatorError(
                "ssvq needs a vq rounder with signs: true in the same recipe (it sets the "
                "sub-vector dim and codebook size), e.g. - vq: {dim: 8, bits: 8, signs: true}"
            )
        self.vq = ctx.vq
        self.sign_lr, self.ema = sign_lr, ema
        self.threshold = (threshold_start, threshold_end)
        self.codebook = nn.ParameterDict()
        self.latent = nn.ParameterDict()
        self.init: dict[str, VQWeight] = {}
        for name, lin in ctx.linears.items():
            key = _pname(name)
            w = lin.weight.data.float()
            vw = vq_quantize(w, self.vq, ctx.act_sq.get(name))
            self.init[name] = vw
            self.codebook[key] = nn.Parameter(vw.codebook.clone())
            self.latent[key] = nn.Parameter(alpha * w / vw.row_scale[:, None])
            self.register_buffer(f"frozen_{key}", torch.zeros_like(w, dtype=torch.bool))
            self.register_buffer(f"frozen_sign_{key}", torch.ones_like(w))
            self.register_buffer(f"flips_{key}", torch.zeros_like(w))
            self.register_buffer(f"history_{key}", torch.sign(self.latent[key].detach()))
            self.register_buffer(f"last_{key}", torch.where(w < 0, -1.0, 1.0))

    def param_groups(self) -> list[dict]:
        return [
            {"params": list(self.codebook.values()), "lr": self.lr},
            {"params": list(self.latent.values()), "lr": self.sign_lr},
        ]

    def _buf(self, kind: str, key: str) -> torch.Tensor:
        return getattr(self, f"{kind}_{key}")

    def signs(self, name: str) -> torch.Tensor:
        """Current +1/-1 signs (frozen ones at their frozen value), STE gradient elsewhere."""
        key = _pname(name)
        frozen = self._buf("frozen", key)
        return torch.where(frozen, self._buf("frozen_sign", key), sign_ste(self.latent[key]))

    def magnitudes(self, name: str) -> torch.Tensor:
        vw = self.init[name]
        cb = cast_ste(self.codebook[_pname(name)], torch.float16)  # what is stored
        out, n_sub = vw.indices.shape
        mag = cb[vw.codebook_of_rows()[:, None], vw.indices].reshape(out, n_sub * self.vq.dim)
        return mag * vw.row_scale[:, None]

    def quantized(self, name: str) -> torch.Tensor | None:
        if name not in self.init:
            return None
        return self.magnitudes(name) * self.signs(name)

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        tau = cosine_threshold(step, total, *self.threshold)
        for key, latent in self.latent.items():
            now = torch.where(latent < 0, -1.0, 1.0)
            last = self._buf("last", key)
            flips = self._buf("flips", key)
            flips.mul_(self.ema).add_((now != last).float(), alpha=1 - self.ema)
            history = self._buf("history", key)
            history.mul_(self.ema).add_(now, alpha=1 - self.ema)
            last.copy_(now)
            frozen = self._buf("frozen", key)
            new = (flips > tau) & ~frozen
            if new.any():
                majority = torch.where(history < 0, -1.0, 1.0)
                self._buf("frozen_sign", key)[new] = majority[new]
                frozen |= new

    def freeze_all(self, signs: dict[str, torch.Tensor]) -> None:
        """Freeze every sign of the given Linears to the given +1/-1 values."""
        for name, s in signs.items():
            key = _pname(name)
            self._buf("frozen", key).fill_(True)
            self._buf("frozen_sign", key).copy_(s)

    def frozen_fraction(self) -> float:
        n = sum(int(self._buf("frozen", k).sum()) for k in self.latent)
        return n / max(1, sum(v.numel() for v in self.latent.values()))

    @torch.no_grad()
    def fixed(self, name: str, weight: torch.Tensor, spec: QuantSpec) -> Fixed | None:
        if name not in self.init:
            return None
        vw = self.init[name]
        return VQWeight(
            vw.indices,
            self.codebook[_pname(name)].detach().half().float(),
            vw.row_scale,
            self.signs(name).detach() < 0,
            self.vq,
        )
