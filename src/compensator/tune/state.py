"""Fine-tuning's resumable state: the quantize run's state directory, holding a step instead
of blocks (``<out>.partial``: ``lock``, ``run.json``, ``teacher/`` (the teacher's cached targets), and
the latest step).

A step is saved as ``step-NNNNNN.safetensors`` (the trained tensors and the optimizer's state)
and then ``step.json`` naming it with its sha256, written last and atomically: a kill at any
moment leaves either the previous step or the new one, whole. The rerun restores it and goes
on with the same data order and arithmetic, so it ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from compensator.errors import write_failure
from compensator.models.fingerprint import file_sha256
from compensator.pipeline.resume import RunState, _read_json, _write_atomic

STEP = "step.json"


@dataclass
class SavedStep:
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


TEACHER = "teacher"


@dataclass
class TuneState(RunState):
    # A saved step, or the teacher's finished targets (the costly part of a start).
    KEEP: ClassVar[tuple[str, ...]] = (STEP, "teacher/teacher.json")

    # The teacher's targets outlive a start-over: their own key says whether they serve.
    PRESERVE: ClassVar[tuple[str, ...]] = ("lock", TEACHER)

    @property
    def teacher_dir(self) -> Path:
        """Where the teacher's targets are cached."""
        path = self.directory / TEACHER
        path.mkdir(exist_ok=True)
        return path

    def save_step(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        path = self.directory / f"step-{step:06d}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            tmp.replace(path)
            record = {"step": step, "file": path.name, "sha256": file_sha256(path), **meta}
            _write_atomic(self.directory / STEP, json.dumps(record))
        except (OSError, SafetensorError) as err:
            raise write_failure(err, f"step {step} to the run state {self.directory}") from None
        for old in self.directory.glob("step-*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)

    def load_step(self) -> SavedStep | None:
        """The last saved step, when it is whole (its tensors as recorded)."""
        meta = _read_json(self.directory / STEP)
        if meta is None:
            return None
        path = self.directory / str(meta.get("file"))
        if not path.is_file() or file_sha256(path) != meta.get("sha256"):
            return None
        return SavedStep(int(meta["step"]), load_file(str(path)), meta)

    def interrupted_message(self) -> str:
        meta = _read_json(self.directory / STEP)
        if meta is None:
            return "interrupted; no output was written"
        return (
            f"interrupted; step {meta['step']} is kept in {self.directory}: run the same "
            "command again to resume, or add --restart to start over"
        )
