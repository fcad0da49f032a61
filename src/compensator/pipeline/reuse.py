"""Not recomputing, in a block's later calibration passes, what its earlier rounding fixed.

True-sequential rounding runs the block once per group of Linears on the quantized stream:
for o_proj (attention with quantized q/k/v), for gate/up (attention again, now with o_proj
quantized), for down_proj (attention again, and gate/up), and a last time for the next
block's input. Once every Linear of a sublayer (a child of the block holding Linears, e.g.
``self_attn`` or ``mlp``) is rounded, and the groups before it are (they come first in
execution order), that sublayer's output for a batch can no longer change within the block:
it is kept from the first pass after that which computes it (but the block's output pass,
the last) and handed back by later passes instead of being recomputed. A declared *tail*
(:class:`compensator.models.adapter.Tail`: a Linear whose output is its parent's output, as
o_proj is attention's and down_proj an MLP's) goes one step further: its input, captured by
its own statistics pass, gives the parent's output with one product once the tail is rounded,
so attention runs once per block on the quantized stream instead of four times, and the
output pass does not recompute gate/up. While a sublayer is handed back, the child that
alone feeds it (a declared *feed*: the norm before it) is skipped too; before that, the
feed's output is kept from the first pass that computes it once its input is final, so each
norm runs once per batch. That relies on the
adapter's groups being listed in execution order (every declared family's are): when a
sublayer's Linears are rounded, so is everything upstream of it.

A statistics pass wants its group's inputs, not the group's outputs: the Linears it
captures return zeros instead of their products when the groups are declared (a declared
group never feeds itself; the generic adapter's single group does), so the pass for gate/up
does not compute gate, nor the one for q/k/v q and k.

Where the first batch shows that a group's Linears all read one tensor (q/k/v, gate/up), later
batches stop the pass at the first of them: the pass for gate/up does not run gate's
activation either.

A second statistics pass over a tail's group (LRC's split input takes one: its bases come
from the first pass's Hessians) reads the tail's input kept by the first instead of running
the block again: no second attention for o_proj, no second gate/up for down_proj.

An MLP's tail (down_proj, whose input has the intermediate width) is kept only when the
run's storage has room for it (``wide``), since for a moment it holds the intermediate
activations of every calibration token; attention's (o_proj's input, heads x head_dim) always.

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

from compensator.models.adapter import Tail
from compensator.nn.rotated import rotate_input
from compensator.pipeline.storage import Storage
from compensator.pipeline.streams import to_device


@dataclass
class _Sublayer:
    name: str
    linears: frozenset[str]
    tail: Tail | None
    feed: str | None  # the child that alone feeds it
    outputs: dict[int, Any] = field(default_factory=dict)  # batch -> output, on storage
    tail_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    feed_outputs: dict[int, Any] = field(default_factory=dict)


def _passed_through(x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


def _zeros_of(linear: nn.Module) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], linear.out_features)

    return forward


class PassReuse:
    """Per block: which sublayer outputs later passes can take instead of recomputing."""

    def __init__(
        self,
        block: nn.Module,
        linear_names: Collection[str],
        tails: Collection[Tail],
        storage: Storage,
        feeds: Collection[tuple[str, str]] = (),
        wide: bool = True,
        declared: bool = True,
    ) -> None:
        self.block = block
        self.storage = storage
        self.declared = declared
        self.shared: dict[tuple[str, ...], bool] = {}  # per group: one input tensor for all
        self.solved: set[str] = set()
        # Set before the block's output pass: nothing after it reads what is kept, so it
        # keeps nothing and frees what it hands back.
        self.last_pass = False
        self.sublayers: list[_Sublayer] = []
        fed_by = {sublayer: feeder for feeder, sublayer in feeds}
        for child, module in block.named_children():
            inside = frozenset(n for n in linear_names if n.startswith(f"{child}."))
            if not inside or isinstance(module, nn.Linear):
                continue
            tail = next((t for t in tails if t.linear in inside), None)
            if tail is not None and not wide and not tail.pair:
                tail = None
            self.sublayers.append(_Sublayer(child, inside, tail, fed_by.get(child)))

    def mark_solved(self, names: Iterable[str]) -> None:
        self.solved.update(names)

    @contextlib.contextmanager
    def batch(self, b: int, device: torch.device) -> Iterator[None]:
        """Inside: one forward of the block over batch ``b`` takes the kept outputs and keeps
        what a later pass can take."""
        swapped: list[tuple[nn.Module, Any]] = []
        handles: list[Any] = []
        try:
            upstream: set[str] = set()  # the Linears of the sublayers before this one
            for sub in self.sublayers:
                module = self.block.get_submodule(sub.name)
                solved = sub.linears <= self.solved
                replay = self._replay(sub, b, device) if solved else None
                if replay is not None:
                    swapped.append(_swap_forward(module, replay))
                    if sub.feed is not None:
                        feeder = self.block.get_submodule(sub.feed)
                        swapped.append(_swap_forward(feeder, _passed_through))
                    upstream |= sub.linears
                    continue
                tail = None if sub.tail is None else sub.tail.linear
                kept = not self.last_pass  # whether later passes will hand it back
                if solved and kept:
                    handles.append(module.register_forward_hook(self._keep_output(sub, b)))
                elif tail is not None and sub.linears - {tail} <= self.solved and kept:
                    hook = self._keep_tail_input(sub, b)
                    handles.append(self.block.get_submodule(tail).register_forward_pre_hook(hook))
                else:
                    kept = False
                if sub.feed is not None:
                    self._feed(sub, b, device, upstream <= self.solved, kept, swapped, handles)
                upstream |= sub.linears
            yield
        finally:
            _put_back(swapped)
            for handle in handles:
                handle.remove()

    def _feed(
        self, sub: _Sublayer, b: int, device: torch.device, ready: bool, last: bool,
        swapped: list[tuple[nn.Module, Any]], handles: list[Any],
    ) -> None:  # fmt: skip
        """The feed of a sublayer that runs in this pass: handed back when kept, else kept
        once what it reads is final (``ready``: the sublayers before are rounded) until the
        ``last`` pass that runs the sublayer (later ones hand the sublayer back)."""
        feeder = self.block.get_submodule(sub.feed)
        if b in sub.feed_outputs:
            out = sub.feed_outputs.pop(b) if last or self.last_pass else sub.feed_outputs[b]
            swapped.append(_swap_forward(feeder, lambda *a, **k: to_device(out, device)))
        elif ready and not last and not self.last_pass:

            def keep(module: nn.Module, args: Any, out: Any) -> None:
                sub.feed_outputs[b] = self.storage.tree(out)

            handles.append(feeder.register_forward_hook(keep))

    @contextlib.contextmanager
    def captured(self, names: Collection[str]) -> Iterator[None]:
        """Inside: the named Linears, whose inputs a statistics pass takes, return zeros
        instead of computing outputs the pass does not read (declared groups only)."""
        swapped = []
        try:
            if self.declared:
                for name in names:
                    linear = self.block.get_submodule(name)
                    swapped.append(_swap_forward(linear, _zeros_of(linear)))
            yield
        finally:
            _put_back(swapped)

    def known_inputs(
        self, names: list[str], b: int, device: torch.device
    ) -> dict[str, torch.Tensor] | None:
        """The inputs of ``names`` for batch ``b`` without a forward, where they are a tail's
        input kept by an earlier pass over the same group (a second statistics pass, as LRC's
        split input takes), else None."""
        for sub in self.sublayers:
            if sub.tail is not None and names == [sub.tail.linear] and b in sub.tail_inputs:
                linear = self.block.get_submodule(sub.tail.linear)
                return {names[0]: rotate_input(linear, sub.tail_inputs[b].to(device))}
        return None

    def one_input(self, names: list[str]) -> bool:
        """Whether an earlier batch showed the named Linears reading one tensor."""
        return self.shared.get(tuple(names), False)

    def record_inputs(self, names: list[str], seen: dict[str, torch.Tensor]) -> None:
        """Learn from the first batch whether the named Linears read one tensor (the model's
        code takes the same path for every batch)."""
        key = tuple(names)
        if key not in self.shared and len(seen) == len(names):
            self.shared[key] = len({id(x) for x in seen.values()}) == 1

    def _replay(self, sub: _Sublayer, b: int, device: torch.device) -> Callable[..., Any] | None:
        if b in sub.outputs:
            out = sub.outputs.pop(b) if self.last_pass else sub.outputs[b]
        elif sub.tail is not None and b in sub.tail_inputs:
            tail = self.block.get_submodule(sub.tail.linear)
            with torch.no_grad():
                y = self.storage.put(tail(sub.tail_inputs.pop(b).to(device)))
            # Attention modules return (output, attention weights); the blocks drop the weights.
            out = (y, None) if sub.tail.pair else y
            if not self.last_pass:
                sub.outputs[b] = out
        else:
            return None

        def forward(*args: Any, **kwargs: Any) -> Any:
            return to_device(out, device)

        return forward

    def _keep_output(self, sub: _Sublayer, b: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if sub.tail is not None and sub.tail.pair:  # the attention weights are dropped
                out = (out[0], None)
            sub.outputs[b] = self.storage.tree(out)

        return hook

    def _keep_tail_input(self, sub: _Sublayer, b: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            sub.tail_inputs[b] = self.storage.put(args[0])

        return hook


def _swap_forward(module: nn.Module, forward: Callable[..., Any]) -> tuple[nn.Module, Any]:
    """Make ``forward`` the module's (an instance attribute shadows the class's); returns
    what to put back (one already there, another library's hook, or None)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    return module, previous


def _put_back(swapped: list[tuple[nn.Module, Any]]) -> None:
    for module, previous in reversed(swapped):
        del module.forward
        if previous is not None:
            module.forward = previous
