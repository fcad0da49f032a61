"""Not recomputing, in a block's later calibration passes, what its earlier rounding fixed.

True-sequential rounding runs the block once per group of Linears on the quantized stream:
for o_proj (attention with quantized q/k/v), for gate/up (attention again, now with o_proj
quantized), for down_proj (attention again, and gate/up), and a last time for the next
block's input. Once every Linear of a sublayer (a child of the block holding Linears, e.g.
``self_attn`` or ``mlp``) is rounded, and the groups before it are (they come first in
execution order), that sublayer's output for a batch can no longer change within the block:
it is kept from the first pass after that which computes it (but the block's output pass,
the last) and handed back by later passes instead of being recomputed. A declared *tail* (a Linear whose output is its parent's first output, as
o_proj is attention's) goes one step further: its input, captured by its own statistics pass,
gives the parent's output with one small product once the tail is rounded, so attention runs
once per block on the quantized stream instead of four times. That relies on the adapter's
groups being listed in execution order (every declared family's are): when a sublayer's
Linears are rounded, so is everything upstream of it.

Everything handed back is the very tensor an uncached pass would have computed (the same
operations on the same inputs), so results are bit-identical with or without reuse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compensator.pipeline.storage import Storage
from compensator.pipeline.streams import to_device


@dataclass
class _Sublayer:
    name: str
    linears: frozenset[str]
    tail: str | None
    outputs: dict[int, Any] = field(default_factory=dict)  # batch -> output, on storage
    tail_inputs: dict[int, torch.Tensor] = field(default_factory=dict)


class PassReuse:
    """Per block: which sublayer outputs later passes can take instead of recomputing."""

    def __init__(
        self,
        block: nn.Module,
        linear_names: Collection[str],
        tails: Collection[str],
        storage: Storage,
    ) -> None:
        self.block = block
        self.storage = storage
        self.solved: set[str] = set()
        # Set before the block's output pass: nothing after it reads what is kept, so it
        # keeps nothing and frees what it hands back.
        self.last_pass = False
        self.sublayers: list[_Sublayer] = []
        for child, module in block.named_children():
            inside = frozenset(n for n in linear_names if n.startswith(f"{child}."))
            if not inside or isinstance(module, nn.Linear):
                continue
            tail = next((t for t in tails if t in inside), None)
            self.sublayers.append(_Sublayer(child, inside, tail))

    def mark_solved(self, names: Iterable[str]) -> None:
        self.solved.update(names)

    @contextlib.contextmanager
    def batch(self, b: int, device: torch.device) -> Iterator[None]:
        """Inside: one forward of the block over batch ``b`` takes the kept outputs and keeps
        what a later pass can take."""
        swapped: list[tuple[nn.Module, Any]] = []
        handles: list[Any] = []
        try:
            for sub in self.sublayers:
                module = self.block.get_submodule(sub.name)
                rest_solved = sub.linears - {sub.tail} <= self.solved
                if sub.linears <= self.solved:
                    replay = self._replay(sub, b, device)
                    if replay is not None:
                        # An instance attribute shadows the class's forward; one already
                        # there (another library's hook) is put back after.
                        swapped.append((module, module.__dict__.get("forward")))
                        module.forward = replay
                    elif not self.last_pass:
                        handles.append(module.register_forward_hook(self._keep_output(sub, b)))
                elif sub.tail is not None and rest_solved and not self.last_pass:
                    tail = self.block.get_submodule(sub.tail)
                    handles.append(tail.register_forward_pre_hook(self._keep_tail_input(sub, b)))
            yield
        finally:
            for module, previous in swapped:
                del module.forward
                if previous is not None:
                    module.forward = previous
            for handle in handles:
                handle.remove()

    def _replay(self, sub: _Sublayer, b: int, device: torch.device) -> Callable[..., Any] | None:
        if b in sub.outputs:
            out = sub.outputs.pop(b) if self.last_pass else sub.outputs[b]
        elif sub.tail is not None and b in sub.tail_inputs:
            tail = self.block.get_submodule(sub.tail)
            with torch.no_grad():
                y = tail(sub.tail_inputs.pop(b).to(device))
            # Attention modules return (output, attention weights); the blocks drop the weights.
            out = (self.storage.put(y), None)
            if not self.last_pass:
                sub.outputs[b] = out
        else:
            return None

        def forward(*args: Any, **kwargs: Any) -> Any:
            return to_device(out, device)

        return forward

    def _keep_output(self, sub: _Sublayer, b: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if sub.tail is not None:  # (output, attention weights): the weights are dropped
                out = (out[0], None)
            sub.outputs[b] = self.storage.tree(out)

        return hook

    def _keep_tail_input(self, sub: _Sublayer, b: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            sub.tail_inputs[b] = self.storage.put(args[0])

        return hook
