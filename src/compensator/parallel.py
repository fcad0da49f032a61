"""Data-parallel runs on torch.distributed: the ranks of one run and what they exchange.

One process per device, started by ``torchrun``; every rank runs the same pipeline on its
share of the calibration windows. Everything the ranks exchange goes through :class:`Ranks`:
sums and maxima of statistics (all-reduce), results one owner rank computed (broadcast) and
gradients (averaged). :data:`SOLO`, the one-process run, turns every exchange into nothing,
so the code paths with and without torchrun are the same ones.

Leaf module (torch only): the engine, the learners and the face all use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from compensator.errors import CompensatorError

# A rank may wait this long for another (the owner of a large matrix rounding it). A rank that
# fails is not waited for: torchrun stops every rank once one exits.
TIMEOUT = timedelta(hours=2)
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Ranks:
    """The ranks of a run, seen from one of them (``rank`` of ``world``)."""

    rank: int = 0
    world: int = 1
    # Where the tensors of a collective must be: the rank's GPU under nccl, else the CPU.
    device: torch.device = CPU

    @property
    def main(self) -> bool:
        """Whether this rank logs, shows progress and writes the output."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    # -- collectives (no-ops in one process) -----------------------------------------------

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor by its sum over the ranks, in place."""
        self._reduce(tensors, dist.ReduceOp.SUM)

    def max_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor by its elementwise maximum over the ranks, in place."""
        self._reduce(tensors, dist.ReduceOp.MAX)

    def _reduce(self, tensors: Sequence[torch.Tensor], op: Any) -> None:
        if not self.parallel:
            return
        for t in tensors:
            if t.device == self.device and t.is_contiguous():
                dist.all_reduce(t, op)
            else:
                moved = t.to(self.device).contiguous()
                dist.all_reduce(moved, op)
                t.copy_(moved)

    def sum_numbers(self, values: Sequence[float]) -> list[float]:
        """Sums over the ranks of a few numbers (float64, exact for counts below 2^53)."""
        return self._numbers(values, dist.ReduceOp.SUM)

    def max_numbers(self, values: Sequence[float]) -> list[float]:
        return self._numbers(values, dist.ReduceOp.MAX)

    def _numbers(self, values: Sequence[float], op: Any) -> list[float]:
        if not self.parallel:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        self._reduce([t], op)
        return t.tolist()

    def same_(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Overwrite each tensor with rank ``src``'s, in place (every rank holds one of the same
        shape and dtype)."""
        if not self.parallel:
            return
        for t in tensors:
            moved = t.to(self.device).contiguous()
            dist.broadcast(moved, src)
            if moved is not t:
                t.copy_(moved)

    def share(self, value: Any, src: int, kinds: Sequence[type], device: torch.device) -> Any:
        """Rank ``src``'s ``value`` on every rank, its tensors on ``device``. ``value`` is
        built of None, numbers, strings, lists, tuples, tensors, and dataclasses or pydantic
        models of the given ``kinds`` (nothing else is decoded: no pickle)."""
        if not self.parallel:
            return value
        tensors: list[torch.Tensor] = []
        header = _encode(value, tensors) if self.rank == src else None
        raw = json.dumps(header).encode() if self.rank == src else b""
        size = torch.tensor([len(raw)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
        if self.rank == src:
            buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        dist.broadcast(buf, src)
        header = json.loads(buf.cpu().numpy().tobytes().decode())
        received = [_transfer(header, tensors, i, src, self) for i in range(len(header["t"]))]
        if self.rank == src:
            return value
        by_name = {k.__name__: k for k in kinds}
        return _decode(header["v"], [t.to(device) for t in received], by_name)

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """DDP semantics: every parameter's gradient becomes its mean over the ranks (each
        rank's loss is the mean over an equal share of the batch)."""
        if not self.parallel:
            return
        for p in params:
            if p.grad is None:  # every rank must send the same tensors
                p.grad = torch.zeros_like(p)
        self.sum_([p.grad for p in params])
        for p in params:
            p.grad /= self.world

    # -- splitting the work ----------------------------------------------------------------

    def shard(
        self, ids: torch.Tensor, batch_size: int, batch_from: str = "--batch-size"
    ) -> tuple[torch.Tensor, int]:
        """This rank's calibration windows and batch size: every batch of ``batch_size``
        windows is split in ``world`` equal slices, slice ``rank`` here, so that a batch's
        statistics and gradients summed over the ranks are those of one process.
        ``batch_from`` names where the batch size was set (for the error)."""
        if not self.parallel:
            return ids, batch_size
        n = ids.shape[0]
        if batch_size % self.world:
            raise CompensatorError(
                f"batches of {batch_size} calibration windows ({batch_from} {batch_size}) do "
                f"not split evenly over {self.world} ranks; set it to a multiple of {self.world}"
            )
        if n % self.world:
            raise CompensatorError(
                f"{n} calibration windows do not split evenly over {self.world} ranks; use "
                f"--calib-windows a multiple of {self.world}"
            )
        local = batch_size // self.world
        starts = range(0, n, batch_size)
        parts = []
        for s in starts:
            width = min(batch_size, n - s) // self.world
            parts.append(ids[s + self.rank * width : s + (self.rank + 1) * width])
        return torch.cat(parts), local


SOLO = Ranks()


def owners(costs: Sequence[float], world: int) -> list[int]:
    """The rank that computes each of the work items of the given costs: the longest first,
    each to the least loaded rank (ties to the lower rank), the same on every rank."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def current() -> Ranks:
    """The ranks of the torch.distributed process group this process is in, or :data:`SOLO`."""
    if not (dist.is_available() and dist.is_initialized()):
        return SOLO
    device = CPU
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_device(device: torch.device) -> torch.device:
    """Under a launcher, a GPU given without an index means this rank's own GPU."""
    if launched() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def rank_label() -> str:
    """ "rank R of W" under a launcher (from its environment), else ""."""
    if not launched():
        return ""
    return f"rank {os.environ.get('RANK', '0')} of {os.environ['WORLD_SIZE']}"


@contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Join the run's process group for as long as it is entered (nccl for GPUs, gloo for the
    CPU), when this process is one of several; :data:`SOLO` otherwise."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=TIMEOUT)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def _transfer(
    header: dict[str, Any], tensors: list[torch.Tensor], i: int, src: int, ranks: Ranks
) -> torch.Tensor:
    shape, dtype = header["t"][i]
    wire = torch.uint8 if dtype == "bool" else getattr(torch, dtype)
    if ranks.rank == src:
        buf = tensors[i].to(ranks.device, wire).contiguous()
    else:
        buf = torch.empty(shape, dtype=wire, device=ranks.device)
    dist.broadcast(buf, src)
    return buf.bool() if dtype == "bool" else buf


def _encode(value: Any, tensors: list[torch.Tensor]) -> dict[str, Any]:
    return {"v": _enc(value, tensors), "t": [[list(t.shape), _dtype(t)] for t in tensors]}


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _enc(value: Any, tensors: list[torch.Tensor]) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach())
        return {"tensor": len(tensors) - 1}
    if isinstance(value, list | tuple):
        return {"seq": [_enc(v, tensors) for v in value], "tuple": isinstance(value, tuple)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _enc(getattr(value, f.name), tensors) for f in dataclasses.fields(value)}
        return {"dataclass": type(value).__name__, "fields": fields}
    if hasattr(value, "model_dump"):
        return {"model": type(value).__name__, "fields": value.model_dump(mode="json")}
    raise TypeError(f"cannot send a {type(value).__name__} between ranks")


def _decode(value: Any, tensors: list[torch.Tensor], kinds: dict[str, type]) -> Any:
    if not isinstance(value, dict):
        return value
    if "tensor" in value:
        return tensors[value["tensor"]]
    if "seq" in value:
        items = [_decode(v, tensors, kinds) for v in value["seq"]]
        return tuple(items) if value["tuple"] else items
    name = value.get("dataclass", value.get("model"))
    if name not in kinds:
        raise TypeError(f"a rank sent a {name}, which is not among the kinds expected")
    if "model" in value:
        return kinds[name](**value["fields"])
    return kinds[name](**{k: _decode(v, tensors, kinds) for k, v in value["fields"].items()})
