"""What is learned inside one block: each learner owns a few parameters and rewrites the
block's effective tensors, keyed by parameter path (``self_attn.q_proj.weight``,
``input_layernorm.weight``, ...). Applied in ``order``: weight sources (LSI/SDE), then
equivalent transforms (LET), while LWC supplies the clipping the quantizer uses last.

The same ``transform`` serves training (differentiable) and folding (no grad, written into
the block), so a folded block computes exactly what was trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from compensator.errors import CompensatorError
from compensator.learn.lwc import lwc_params, search_clip_logits
from compensator.learn.svd import delta_matrix, svd_factors, svd_weight
from compensator.quant.spec import QuantParams, QuantSpec
from compensator.quant.vq import VQSpec, VQWeight
from compensator.types import RotationLayout

Tensors = dict[str, torch.Tensor]
Fixed = QuantParams | VQWeight


@dataclass
class LearnContext:
    """What a learner may look at when it is built for one block."""

    block: nn.Module
    linears: dict[str, nn.Linear]
    spec: QuantSpec
    layout: RotationLayout | None
    act_absmax: dict[str, torch.Tensor] = field(default_factory=dict)  # per Linear input
    act_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # mean x^2 = diag(X^T X)/n
    vq: VQSpec | None = None  # the recipe's vector quantizer, when it has one


class Learner(nn.Module):
    order: ClassVar[int] = 0

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr

    def transform(self, t: Tensors) -> Tensors:
        return t

    def clipping(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """LWC's (gamma, beta) logits for Linear ``name``, or None."""
        return None

    def quantized(self, name: str) -> torch.Tensor | None:
        """The fake-quantized weight of Linear ``name`` when this learner owns its format
        (vector quantization), else None (uniform grid, with LWC's clipping if any)."""
        return None

    def fixed(self, name: str, weight: torch.Tensor, spec: QuantSpec) -> Fixed | None:
        """What the rounder must use for Linear ``name`` after folding, or None."""
        return None

    def after_step(self, step: int, total: int) -> None:
        """Called after every optimizer step (progressive freezing)."""

    def penalty(self) -> torch.Tensor | None:
        return None

    def param_groups(self) -> list[dict[str, Any]]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.lr}] if params else []


def _pname(name: str) -> str:
    return name.replace(".", "__")


class LWC(Learner):
    """Per (row, group) clipping logits on max and min, sigmoid(init) at the start."""

    order = 2

    def __init__(self, ctx: LearnContext, lr: float, init: float | str) -> None:
        super().__init__(lr)
        self.gamma = nn.ParameterDict()
        self.beta = nn.ParameterDict()
        for name, lin in ctx.linears.items():
            shape = (lin.out_features, ctx.spec.n_groups(lin.in_features))
            dev = lin.weight.device
            if init == "search":
                start = search_clip_logits(lin.weight.data, ctx.spec).to(dev)
            else:
                start = torch.full(shape, float(init), device=dev)
            self.gamma[_pname(name)] = nn.Parameter(start.clone())
            self.beta[_pname(name)] = nn.Parameter(start.clone())

    def clipping(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = _pname(name)
        return (self.gamma[key], self.beta[key]) if key in self.gamma else None

    def fixed(self, name: str, weight: torch.Tensor, spec: QuantSpec) -> Fixed | None:
        clip = self.clipping(name)
        return None if clip is None else lwc_params(weight, spec, *clip)


class SingularValues(Learner):
    """LSI (k = 0, no band) and SDE: W = U M V^T with M = diag(s + ds) + K (+ bands)."""

    order = 0

    def __init__(self, ctx: LearnContext, lr: float, k: int, band: int, penalty: float) -> None:
        super().__init__(lr)
        self.factors = {
            name: svd_factors(lin.weight.data.float()) for name, lin in ctx.linears.items()
        }
        self.ds = nn.ParameterDict()
        self.block = nn.ParameterDict()
        self.bands = nn.ParameterDict()
        self.weight_penalty = penalty
        for name, f in self.factors.items():
            r = f.s.numel()
            key = _pname(name)
            self.ds[key] = nn.Parameter(torch.zeros(r, device=f.s.device))
            kk = min(k, r)
            if kk:
                self.block[key] = nn.Parameter(torch.zeros(kk, kk, device=f.s.device))
            for b in range(1, min(band, r - 1) + 1):
                for side in ("up", "lo"):
                    self.bands[f"{key}__{side}{b}"] = nn.Parameter(
                        torch.zeros(r - b, device=f.s.device)
                    )
        self.n_bands = band

    def _bands(self, key: str) -> list[torch.Tensor]:
        out = []
        for b in range(1, self.n_bands + 1):
            for side in ("up", "lo"):
                k = f"{key}__{side}{b}"
                if k in self.bands:
                    out.append(self.bands[k])
        return out

    def transform(self, t: Tensors) -> Tensors:
        t = dict(t)
        for name, f in self.factors.items():
            key = _pname(name)
            block = self.block.get(key)
            t[f"{name}.weight"] = svd_weight(
                t[f"{name}.weight"], f, self.ds[key], block, self._bands(key)
            )
        return t

    def penalty(self) -> torch.Tensor | None:
        """lambda * sum over layers of ||M - M0||_F^2 / ||s||^2 (scale-free drift control)."""
        if not self.weight_penalty:
            return None
        total = 0.0
        for name, f in self.factors.items():
            key = _pname(name)
            # Dense: K's diagonal overlaps ds, so summing parameter squares would not be it.
            delta = delta_matrix(self.ds[key], self.block.get(key), self._bands(key))
            total = total + delta.pow(2).sum() / f.s.pow(2).sum()
        return self.weight_penalty * total


@dataclass(frozen=True)
class ScalePair:
    """One LET site: the tensor producing a channel (a norm's weight or v_proj's rows) is
    divided by s, the Linears reading it multiply their columns by s."""

    key: str
    producer: str  # parameter path of a norm weight or a Linear (rows scaled)
    producer_is_linear: bool
    readers: tuple[str, ...]
    repeat: int = 1  # GQA: each value channel is read by this many o_proj column blocks
    head_dim: int = 0


def let_pairs(block: nn.Module, layout: RotationLayout) -> list[ScalePair]:
    attn = block.get_submodule(layout.attn_output.rsplit(".", 1)[0])
    value = block.get_submodule(layout.value)
    out = block.get_submodule(layout.attn_output)
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None:
        raise CompensatorError(f"{type(attn).__name__} has no head_dim; LET cannot scale v -> o")
    repeat = out.in_features // value.out_features
    return [
        ScalePair("attn_norm", f"{layout.attn_norm}.weight", False, layout.attn_inputs),
        ScalePair("mlp_norm", f"{layout.mlp_norm}.weight", False, layout.mlp_inputs),
        ScalePair("value", layout.value, True, (layout.attn_output,), repeat, int(head_dim)),
    ]


def _expand_kv(s: torch.Tensor, repeat: int, head_dim: int) -> torch.Tensor:
    """A per value-channel vector as o_proj's input sees it (query heads grouped per kv head)."""
    if repeat == 1:
        return s
    return s.reshape(-1, 1, head_dim).expand(-1, repeat, head_dim).reshape(-1)


def _reduce_kv(v: torch.Tensor, repeat: int, head_dim: int) -> torch.Tensor:
    if repeat == 1:
        return v
    return v.reshape(-1, repeat, head_dim).amax(1).reshape(-1)


class LET(Learner):
    """OmniQuant's learnable equivalent transformation, scales only: RMSNorm has no bias
    to absorb a shift, so the families with a declared layout get none."""

    order = 1

    def __init__(self, ctx: LearnContext, lr: float, alpha: float) -> None:
        super().__init__(lr)
        if ctx.layout is None:
            raise CompensatorError(
                "let needs a declared block layout (llama, mistral, qwen2, qwen3); this "
                "model family has none: drop the let step"
            )
        self.pairs = let_pairs(ctx.block, ctx.layout)
        self.scales = nn.ParameterDict()
        for p in self.pairs:
            first = p.readers[0]
            act = ctx.act_absmax[first]
            w = torch.stack([ctx.linears[r].weight.abs().amax(0) for r in p.readers]).amax(0)
            act = _reduce_kv(act, p.repeat, p.head_dim)
            w = _reduce_kv(w.float(), p.repeat, p.head_dim)
            s = (act.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)).clamp(min=1e-5)
            self.scales[p.key] = nn.Parameter(s.to(ctx.linears[first].weight.device))

    def transform(self, t: Tensors) -> Tensors:
        t = dict(t)
        for p in self.pairs:
            s = self.scales[p.key]
            if p.producer_is_linear:
                t[f"{p.producer}.weight"] = t[f"{p.producer}.weight"] / s[:, None]
                if f"{p.producer}.bias" in t:
                    t[f"{p.producer}.bias"] = t[f"{p.producer}.bias"] / s
            else:
                t[p.producer] = t[p.producer] / s
            cols = _expand_kv(s, p.repeat, p.head_dim)
            for r in p.readers:
                t[f"{r}.weight"] = t[f"{r}.weight"] * cols[None, :]
        return t


def final_params(
    learners: list[Learner], weights: Tensors, linears: list[str], spec: QuantSpec
) -> dict[str, Fixed | None]:
    """What the rounder must use for each Linear (None: it fits its own): LWC's group
    parameters, or SSVQ's complete vector-quantized weight."""
    out: dict[str, Fixed | None] = {}
    for name in linears:
        w = weights[f"{name}.weight"]
        out[name] = next((f for lr in learners if (f := lr.fixed(name, w, spec)) is not None), None)
    return out
