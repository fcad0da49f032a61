"""The :class:`compensator.types.BlockContext` the engine hands to per-block steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from compensator.parallel import SOLO, Ranks
from compensator.pipeline.storage import Storage
from compensator.pipeline.streams import PARK, Stream, block_output, run_block, to_device
from compensator.types import BlockContext, NextBlock, RotationLayout


def block_context(
    index: int,
    blocks: nn.ModuleList,
    block: nn.Module,
    linears: dict[str, nn.Linear],
    layout: RotationLayout | None,
    q_stream: Stream,
    fp_stream: Stream,
    fp_out: list[torch.Tensor],
    fp_inputs: list[dict[str, torch.Tensor]],
    next_kwargs: list[dict[str, Any]] | None,
    device: torch.device,
    storage: Storage,
    open_block: Callable[[int], AbstractContextManager[None]] = lambda i: nullcontext(),
    ranks: Ranks = SOLO,
) -> BlockContext:
    """``open_block(j)`` holds block ``j``'s weights in memory while it is entered (they may
    be read lazily, :mod:`compensator.models.lazy`)."""

    def forward(
        module: nn.Module,
        hidden: torch.Tensor,
        kwargs: dict[str, Any],
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        h, kw = hidden.to(device), to_device(kwargs, device)
        out = module(h, **kw) if params is None else functional_call(module, params, (h,), kw)
        return block_output(out)

    @contextmanager
    def next_block() -> Iterator[NextBlock | None]:
        if index + 1 >= len(blocks) or next_kwargs is None:
            yield None
            return
        with open_block(index + 1):
            nxt = blocks[index + 1].to(device)
            try:
                targets = run_block(nxt, Stream(fp_out, next_kwargs), device, storage)
                yield NextBlock(nxt, next_kwargs, targets)
            finally:
                blocks[index + 1] = nxt.to(PARK)

    return BlockContext(
        index=index,
        block=block,
        linears=linears,
        layout=layout,
        hidden=q_stream.hidden,
        kwargs=q_stream.kwargs,
        fp_hidden=fp_stream.hidden,
        fp_outputs=fp_out,
        fp_linear_inputs=fp_inputs,
        device=device,
        forward=forward,
        next_block=next_block,
        ranks=ranks,
    )
