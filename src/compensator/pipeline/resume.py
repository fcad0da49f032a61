"""Run state that survives a crash: every finished block, written as soon as it is done.

A run keeps its state in a directory of its own (the CLI uses ``<out>.partial`` beside the
output), never at the output itself::

    lock                    held (flock) while a run uses the directory: a second run refuses
    run.json                the fingerprint of the run (model files, recipe, calibration, ...)
    block-00007.safetensors the block's tensors after quantization (codes, scales, factors,
                            and anything a learned step folded into its norms)
    block-00007.json        its layers' records, what the block reported, the tensors' sha256;
                            written last, so it marks the block as finished

Only blocks are stored, not the activation streams: the streams at block k are recomputed by
running the captured block-0 inputs through the finished blocks (one forward of the FP and
one of the quantized block each, a few percent of what quantizing a block costs), with the
very operations of the first run, so a resumed run is bit-identical to an uninterrupted one.
Storing the streams instead would cost ``windows x seqlen x hidden`` floats per stream per
block on disk (1 GiB per stream for an 8B model at 128 x 512).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compensator.errors import CompensatorError, write_failure
from compensator.models.fingerprint import file_sha256, tensor_sha256
from compensator.nn.layers import layer_from_record, replace_module

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Parts of the fingerprint that change the last bits of the numbers but not what the run is:
# resuming across them is allowed, with a warning.
SOFT_KEYS = ("threads", "ranks")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


@dataclass
class RestoredBlock:
    report: dict[str, Any]
    layers: list[str]


@dataclass
class RunState:
    """The crash-safe state of one quantization run (see the module docstring)."""

    # The files whose presence makes the directory worth keeping after an interrupt.
    KEEP: ClassVar[tuple[str, ...]] = ("block-*.json",)
    # What starting over leaves in place (the lock, and whatever validates itself).
    PRESERVE: ClassVar[tuple[str, ...]] = ("lock",)

    directory: Path
    restart: bool = False
    _lock: Any = field(default=None, repr=False)
    _finished: int = 0
    # A data-parallel run's other ranks read the main rank's state and write nothing.
    follower: bool = False

    @classmethod
    def follow(cls, directory: str | Path) -> RunState:
        """The state another rank of this run holds (locked and written by that rank)."""
        return cls(Path(directory).resolve(), follower=True)

    def followed(self, finished: int) -> None:
        """A follower's :meth:`begin`: the main rank found ``finished`` blocks reusable."""
        self._finished = finished

    @classmethod
    @contextmanager
    def open(cls, directory: str | Path, *, restart: bool = False) -> Iterator[RunState]:
        """Lock ``directory`` (created if needed) for this process; a second run on the same
        directory is refused while the first is alive (the lock dies with its process)."""
        path = Path(directory).resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock = (path / "lock").open("a+")
        except OSError as err:
            raise CompensatorError(
                f"cannot create the run state {path} ({err.strerror}); choose an --out whose "
                "parent is writable"
            ) from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise CompensatorError(
                f"another run is writing to {path} right now; wait for it to finish or choose "
                "another --out"
            ) from None
        state = cls(path, restart, lock)
        try:
            yield state
        finally:
            if not cls.has_kept(path):  # nothing worth resuming: leave no trace
                shutil.rmtree(path, ignore_errors=True)
            lock.close()

    @classmethod
    def has_kept(cls, path: Path) -> bool:
        return any(any(path.glob(pattern)) for pattern in cls.KEEP)

    # -- the run's identity -------------------------------------------------------------

    def begin(self, fingerprint: dict[str, Any], blocks: int) -> None:
        """Compare ``fingerprint`` with the stored one and set :attr:`finished` to the number
        of blocks that can be reused (0 when starting over, which clears the old state)."""
        run = self.directory / "run.json"
        old = _read_json(run)
        reason = None
        if self.restart:
            reason = "--restart was given"
        elif old is not None:
            reason = _difference(old.get("fingerprint") or {}, fingerprint)
            if reason is None:
                _warn_soft(old["fingerprint"], fingerprint)
        if old is None or reason is not None:
            if old is not None and self.has_kept(self.directory):
                log.warning(
                    "starting over, discarding what is kept in %s: %s", self.directory, reason
                )
            self._clear()
            _write_atomic(run, json.dumps({"version": STATE_VERSION, "fingerprint": fingerprint}))
            self._finished = 0
            return
        self._finished = self._count_finished(blocks)

    def _count_finished(self, blocks: int) -> int:
        done = 0
        while done < blocks and _read_json(self._meta(done)) is not None:
            done += 1
        return done

    def _clear(self) -> None:
        for p in self.directory.iterdir():
            if p.name not in self.PRESERVE:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    # -- blocks --------------------------------------------------------------------------

    def block_file(self, index: int) -> Path:
        """Where block ``index``'s tensors are (once it is finished)."""
        return self.directory / f"block-{index:05d}.safetensors"

    def _meta(self, index: int) -> Path:
        return self.directory / f"block-{index:05d}.json"

    def save_block(
        self, index: int, block: nn.Module, report: dict[str, Any], names: list[str]
    ) -> None:
        """Write block ``index`` (already quantized, on CPU) and mark it finished; ``names``
        are its quantized layers in the order they were quantized (the checkpoint's order)."""
        try:
            self._save_block(index, block, report, names)
        except (OSError, SafetensorError) as err:
            where = f"block {index} to the run state {self.directory}"
            raise write_failure(err, where) from None

    def _save_block(
        self, index: int, block: nn.Module, report: dict[str, Any], names: list[str]
    ) -> None:
        tensors = self.block_file(index)
        tmp = tensors.with_name(f".{tensors.name}.tmp")
        state = {k: v.detach().contiguous() for k, v in block.state_dict().items()}
        save_file(state, str(tmp))
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.replace(tensors)
        meta = {
            "index": index,
            "layers": [[name, block.get_submodule(name).record()] for name in names],
            "report": report,
            "sha256": file_sha256(tensors),
        }
        _write_atomic(self._meta(index), json.dumps(meta, default=str))

    def load_block(self, index: int, block: nn.Module) -> RestoredBlock:
        """Turn the FP ``block`` into the saved quantized one, in place."""
        meta = self._intact(index)
        tensors = self.block_file(index)
        if meta is None:
            raise CompensatorError(
                f"the saved block {index} in {self.directory} is damaged; run again with "
                "--restart to start over"
            )
        for name, record in meta["layers"]:
            linear = block.get_submodule(name)
            layer = layer_from_record(record, linear.in_features, linear.out_features)
            replace_module(block, name, layer.to(linear.weight.device))
        try:
            block.load_state_dict(load_file(str(tensors)), strict=True)
        except RuntimeError:
            raise CompensatorError(
                f"the saved block {index} in {self.directory} does not fit the model; run "
                "again with --restart to start over"
            ) from None
        return RestoredBlock(meta["report"], [name for name, _ in meta["layers"]])

    def _intact(self, index: int) -> dict[str, Any] | None:
        """Block ``index``'s record if its tensors are there as written, else None."""
        meta = _read_json(self._meta(index))
        tensors = self.block_file(index)
        if meta is None or not tensors.is_file() or file_sha256(tensors) != meta.get("sha256"):
            return None
        return meta

    def check_blocks(self, count: int) -> None:
        """Refuse to assemble a checkpoint from blocks 0..count-1 unless every one is there
        and unchanged (sha256 as recorded when it was written)."""
        for i in range(count):
            if self._intact(i) is None:
                raise CompensatorError(
                    f"block {i} in {self.directory} is missing or changed since it was "
                    "quantized (another run used the directory?); quantize again"
                )

    def discard(self) -> None:
        """Remove the state once its result is saved."""
        if self.follower:
            return
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def finished(self) -> int:
        return self._finished

    def interrupted_message(self) -> str:
        done = len(list(self.directory.glob("block-*.json")))
        if not done:
            return "interrupted; no output was written"
        return (
            f"interrupted; {done} finished blocks are kept in {self.directory}: run the same "
            "command again to resume, or add --restart to start over"
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why a stored fingerprint is not this run's, or None when it is."""
    changed = [
        k for k in sorted(set(old) | set(new)) if k not in SOFT_KEYS and old.get(k) != new.get(k)
    ]
    if not changed:
        return None
    return f"the {', '.join(changed)} differ from the interrupted run's"


def _warn_soft(old: dict[str, Any], new: dict[str, Any]) -> None:
    for key in SOFT_KEYS:
        if old.get(key) != new.get(key):
            log.warning(
                "resuming with %s %s where the finished blocks used %s: the result may differ "
                "in the last bits from an uninterrupted run",
                key,
                new.get(key),
                old.get(key),
            )


def run_fingerprint(
    model: dict[str, Any],
    recipe: dict[str, Any],
    input_ids: torch.Tensor | None,
    calib_info: dict[str, Any] | None,
    device: torch.device,
    batch_size: int,
    version: str,
) -> dict[str, Any]:
    """What makes two runs the same run (``threads`` only changes the last bits)."""
    calibration = None
    if input_ids is not None:
        calibration = {**(calib_info or {}), "sha256": tensor_sha256(input_ids)}
    return {
        "model": model,
        "recipe": recipe,
        "calibration": calibration,
        "batch_size": batch_size,
        "device": device.type,
        "compensator": version,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
