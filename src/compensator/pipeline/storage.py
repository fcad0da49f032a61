"""Where calibration activations rest between passes: on the work device, in CPU memory, or
in memory-mapped files on disk (``--offload-dir``), which the OS pages in as a pass reads
them and can drop again under memory pressure, so streams larger than RAM still run."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from compensator.errors import CompensatorError
from compensator.pipeline.footprint import ModelShape, stream_bytes

log = logging.getLogger(__name__)

StreamsAt = Literal["auto", "device", "cpu", "disk"]
STREAMS_AT: tuple[str, ...] = ("auto", "device", "cpu", "disk")
# Streams may take this share of the free memory where auto puts them: the rest is for the
# block, its statistics and the solver's workspace.
FREE_SHARE = 0.5


class Storage:
    """Puts activation tensors where they rest. ``device`` is where they are (CPU for disk);
    keyword arguments of the blocks (masks, rotary tables: small) always stay in memory."""

    def __init__(self, device: torch.device, directory: Path | None = None) -> None:
        self.device = device
        self.directory = directory
        self._names = itertools.count()
        self.bytes_on_disk = 0

    @property
    def kind(self) -> str:
        return "disk" if self.directory is not None else self.device.type

    def put(self, t: torch.Tensor) -> torch.Tensor:
        if self.directory is None or t.numel() == 0:
            return t.to(self.device)
        return self._mapped(t)

    def tree(self, value: Any) -> Any:
        """``value`` (a tensor, or tuples/lists/dicts of them) with its tensors put here."""
        if isinstance(value, torch.Tensor):
            return self.put(value)
        if isinstance(value, dict):
            return {k: self.tree(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            moved = [self.tree(v) for v in value]
            return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)
        return value

    def close(self) -> None:
        """Remove the (by now empty) directory of a disk storage."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _mapped(self, t: torch.Tensor) -> torch.Tensor:
        assert self.directory is not None
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        path = self.directory / f"{next(self._names)}.bin"
        with open(path, "wb") as f:
            f.write(memoryview(flat.view(torch.uint8).numpy()))
        mapped = torch.from_file(str(path), shared=False, size=flat.numel(), dtype=flat.dtype)
        # The mapping keeps the bytes readable; the space is freed with the last reference,
        # and a crash leaves no file behind.
        path.unlink()
        self.bytes_on_disk += flat.numel() * flat.element_size()
        return mapped.view(t.shape)


def free_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device`` (CUDA: the driver's count; CPU: the kernel's
    MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def choose_storage(
    where: StreamsAt,
    device: torch.device,
    need: int,
    offload_dir: str | Path | None,
    free: dict[str, int] | None = None,
) -> Storage:
    """The storage for streams of about ``need`` bytes: the one asked for, or (``auto``)
    the work device, else CPU memory, else disk, whichever first has the room. ``free``
    (bytes per kind) overrides the measured free memory, for tests."""
    free = free if free is not None else {}
    if where == "auto":
        where = _auto(device, need, offload_dir, free)
    if where == "disk":
        if offload_dir is None:
            raise CompensatorError(
                f"calibration streams of ~{need / 1e9:.1f} GB do not fit in free memory; "
                "pass --offload-dir DIR (a disk with room) or fewer --calib-windows"
            )
        directory = Path(offload_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            directory = Path(tempfile.mkdtemp(prefix="streams-", dir=directory))
        except OSError as e:
            raise CompensatorError(f"cannot use --offload-dir {offload_dir}: {e}") from None
        return Storage(torch.device("cpu"), directory)
    return Storage(device if where == "device" else torch.device("cpu"))


def _auto(
    device: torch.device, need: int, offload_dir: str | Path | None, free: dict[str, int]
) -> StreamsAt:
    kinds: list[tuple[StreamsAt, torch.device]] = [("cpu", torch.device("cpu"))]
    if device.type != "cpu":
        kinds.insert(0, ("device", device))
    for kind, dev in kinds:
        room = free.get(dev.type)
        room = free_memory(dev) if room is None else room
        if need <= FREE_SHARE * room:
            log.info(
                "calibration streams (~%.2f GB) kept on %s (%.1f GB free)",
                need / 1e9, dev.type, room / 1e9,
            )  # fmt: skip
            return kind
    log.info(
        "calibration streams (~%.2f GB) exceed half the free memory: memory-mapped under %s",
        need / 1e9, offload_dir,
    )  # fmt: skip
    return "disk"


def storage_for(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    keep_fp: bool,
    reuse: bool,
    device: torch.device,
    where: StreamsAt,
    offload_dir: str | Path | None,
) -> tuple[Storage, bool]:
    """The storage for a run's streams, sized from the model's config
    (:func:`compensator.pipeline.footprint.stream_bytes`), and whether it also has room for
    pass reuse's wide tail inputs (a dense MLP's intermediate activations). Where the streams
    rest comes first: the wide inputs are kept only where the streams fit with them too."""
    config = getattr(model, "config", None)
    if input_ids is None or config is None:
        return Storage(torch.device("cpu") if where in ("auto", "cpu") else device), reuse
    floats = [p for p in model.parameters() if p.is_floating_point()]
    itemsize = floats[0].element_size() if floats else 4
    shape = ModelShape.from_config(config.to_dict())
    need = stream_bytes(shape, input_ids.numel(), keep_fp, reuse, itemsize, wide=False)
    storage = choose_storage(where, device, need, offload_dir)
    if not reuse:
        return storage, False
    wide = stream_bytes(shape, input_ids.numel(), keep_fp, reuse, itemsize, wide=True)
    room = wide <= FREE_SHARE * free_memory(storage.device) or storage.kind == "disk"
    if not room:
        log.info(
            "pass reuse recomputes the MLP's input to down_proj: keeping it (~%.2f GB more) "
            "does not fit beside the streams on %s",
            (wide - need) / 1e9, storage.kind,
        )  # fmt: skip
    return storage, room
