"""What a model is, as bytes: the sizes and sha256 of its weight files (or of its tensors).

Checkpoints record the fingerprint of their base model so that eval never measures KL
against a different model that happens to sit at the recorded path, and interrupted runs
record it so that they resume only on the very same weights.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compensator.errors import CompensatorError
from compensator.models.loading import gguf_source

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def weight_files(source: str | Path) -> list[Path] | None:
    """The files holding a local model's weights (a .gguf, or a directory's safetensors and
    config.json), or None for a source that is not a local path (a hub id)."""
    try:
        gguf = gguf_source(str(source))  # built-in names too
    except CompensatorError:
        return None
    if gguf is not None:
        return [gguf.resolve()]
    path = Path(source).expanduser()
    if path.is_file():
        return [path.resolve()]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        return [p.resolve() for p in [*files, path / "config.json"] if p.is_file()]
    return None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def files_fingerprint(files: list[Path]) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    total = sum(e["bytes"] for e in out.values())
    log.info("fingerprinted %d model files (%.0f MB) in %.1fs", len(out), total / 1e6,
             time.perf_counter() - t0)  # fmt: skip
    return {"files": out}


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (the calibration windows in a run's fingerprint)."""
    return hashlib.sha256(_tensor_bytes(t)).hexdigest()


def tensors_fingerprint(model: nn.Module) -> dict[str, Any]:
    """For a model that exists only in memory: one sha256 over its named tensors."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(_tensor_bytes(t))
    return {"tensors": h.hexdigest()}


def source_fingerprint(source: str) -> dict[str, Any] | None:
    files = weight_files(source)
    return None if files is None else files_fingerprint(files)


def check_fingerprint(source: str, recorded: dict[str, Any], model: nn.Module | None) -> None:
    """Refuse a model at ``source`` whose bytes are not those ``recorded``: its files when the
    record has files (checked before loading), else its tensors (``model``, once loaded)."""
    if "files" in recorded:
        files = weight_files(source)
        if files is None:
            raise CompensatorError(
                f"the base model {source} recorded by the checkpoint is gone; pass the FP "
                "model with --fp (or fp=...) to compute KL against it"
            )
        now = {p.name: p for p in files}
        for name, entry in recorded["files"].items():
            p = now.get(name)
            if p is None or p.stat().st_size != entry["bytes"] or file_sha256(p) != entry["sha256"]:
                raise CompensatorError(
                    f"{Path(source) / name if Path(source).is_dir() else source} is not the "
                    "base model this checkpoint was made from (its bytes differ); pass the "
                    "original model with --fp"
                )
    elif (
        "tensors" in recorded
        and model is not None
        and tensors_fingerprint(model)["tensors"] != recorded["tensors"]
    ):
        raise CompensatorError(
            f"the model at {source} is not the base model this checkpoint was made from "
            "(its tensors differ); pass the original model with --fp"
        )
