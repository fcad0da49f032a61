"""The block trainer: learners' parameters trained so the fake-quantized block on the
quantized stream reproduces the FP block's output, then folded into the block's weights.

Loss per step: MSE(quantized block(q input), FP output)
  + ``fp_input_weight`` * MSE(quantized block(FP input), FP output)
  + ``cross_layer`` * MSE(FP next block(quantized output), FP output two blocks ahead)
  + the learners' penalties.
Weights are fake-quantized with straight-through rounding (LWC's clipping when present,
else plain min/max) and activations too when the scheme quantizes them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compensator.learn.learners import Learner, Tensors
from compensator.learn.lwc import lwc_fake_quantize
from compensator.learn.ste import quantize_activations_ste
from compensator.nn.rotated import rotate_input
from compensator.quant.act import ActSpec
from compensator.quant.spec import QuantSpec
from compensator.types import BlockContext, NextBlock

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    epochs: int = 10
    weight_decay: float = 0.0
    cross_layer: float = 0.0
    fp_input_weight: float = 0.0
    seed: int = 0


@dataclass
class TrainResult:
    initial_loss: float = float("nan")
    final_loss: float = float("nan")  # measured after the last step, like initial_loss
    steps: int = 0
    seconds: float = 0.0


def transformed(learners: list[Learner], base: Tensors) -> Tensors:
    """The block's tensors after every learner's transform, in order (no quantization)."""
    t = base
    for lr in learners:
        t = lr.transform(t)
    return t


def effective(
    learners: list[Learner], base: Tensors, linears: list[str], spec: QuantSpec
) -> Tensors:
    """The block's tensors after every learner, with each Linear weight fake-quantized."""
    t = dict(transformed(learners, base))
    for name in linears:
        q = next((q for lr in learners if (q := lr.quantized(name)) is not None), None)
        if q is not None:
            t[f"{name}.weight"] = q
            continue
        clip = next((c for lr in learners if (c := lr.clipping(name)) is not None), None)
        gamma, beta = clip if clip is not None else (None, None)
        t[f"{name}.weight"] = lwc_fake_quantize(t[f"{name}.weight"], spec, gamma, beta)
    return t


@contextmanager
def _quantized_inputs(block: nn.Module, linears: list[str], act: ActSpec | None) -> Iterator[None]:
    """Swap each Linear's forward for one that quantizes its (rotated) input, STE gradient."""
    if act is None:
        yield
        return
    mods = [block.get_submodule(n) for n in linears]

    def forward_of(m: nn.Module) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return F.linear(quantize_activations_ste(rotate_input(m, x), act), m.weight, m.bias)

        return forward

    for m in mods:
        m.forward = forward_of(m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


@contextmanager
def _frozen(*modules: nn.Module | None) -> Iterator[None]:
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)


def train_block(
    ctx: BlockContext,
    learners: list[Learner],
    spec: QuantSpec,
    act: ActSpec | None,
    settings: TrainSettings,
    nxt: NextBlock | None = None,
) -> TrainResult:
    """Train the learners of ``ctx.block`` in place (the block's own weights are not touched);
    ``nxt`` (the next block) only for cross-layer learning."""
    block, linears = ctx.block, list(ctx.linears)
    result = TrainResult()
    t0 = time.perf_counter()
    groups = [g for lr in learners for g in lr.param_groups()]
    params = [p for g in groups for p in g["params"]]
    base = {n: p.detach() for n, p in block.named_parameters()}
    n_batches = len(ctx.hidden)
    device = ctx.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW(groups, weight_decay=settings.weight_decay) if groups else None
    cross = settings.cross_layer if nxt is not None else 0.0

    def loss_of(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = effective(learners, base, linears, spec)
        target = ctx.fp_outputs[b].to(device)
        with autocast:
            out = ctx.forward(block, ctx.hidden[b], ctx.kwargs[b], t)
            block_loss = F.mse_loss(out.float(), target.float())
            loss = block_loss
            if settings.fp_input_weight:
                out_fp = ctx.forward(block, ctx.fp_hidden[b], ctx.kwargs[b], t)
                loss = loss + settings.fp_input_weight * F.mse_loss(out_fp.float(), target.float())
            if cross and nxt is not None:
                after = ctx.forward(nxt.module, out, nxt.kwargs[b])
                target2 = nxt.targets[b].to(device).float()
                loss = loss + cross * F.mse_loss(after.float(), target2)
        for lr in learners:
            pen = lr.penalty()
            if pen is not None:
                loss = loss + pen
        return loss, block_loss.detach()

    def mean_block_loss() -> float:
        with torch.no_grad():
            local = sum(float(loss_of(b)[1]) for b in range(n_batches))
        total, count = ctx.ranks.sum_numbers([local, n_batches])
        return total / count

    frozen = (block,) if nxt is None else (block, nxt.module)
    with _frozen(*frozen), _quantized_inputs(block, linears, act):
        result.initial_loss = mean_block_loss()
        if opt is None or settings.epochs == 0:
            result.final_loss = result.initial_loss
            result.seconds = time.perf_counter() - t0
            return result
        total_steps = settings.epochs * n_batches
        with torch.enable_grad():
            for _ in range(settings.epochs):
                for b in torch.randperm(n_batches, generator=gen).tolist():
                    loss, _ = loss_of(b)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    ctx.ranks.average_gradients(params)
                    opt.step()
                    result.steps += 1
                    for lr in learners:
                        lr.after_step(result.steps, total_steps)
        result.final_loss = mean_block_loss()
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def fold(block: nn.Module, learners: list[Learner]) -> Tensors:
    """Write the learners' transforms into the block's parameters (no quantization); returns
    the folded tensors."""
    base = {n: p.detach() for n, p in block.named_parameters()}
    t = transformed(learners, base)
    params = dict(block.named_parameters())
    for name, value in t.items():
        if value is not base[name]:
            params[name].data.copy_(value.to(params[name].dtype))
    return t
