"""The registry of output formats, and the one way to write any of them.

A format declares, per quantized layer (from the layer's checkpoint record), whether it
holds it exactly; anything it cannot hold is refused with one line naming the layer and
what would be lost, never dropped. Outputs are written into a temporary directory that is
renamed into place when complete.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from compensator.errors import CompensatorError
from compensator.io.atomic import atomic_dir, atomic_file, dir_size
from compensator.io.manifest import MANIFEST, write_manifest

log = logging.getLogger(__name__)


@dataclass
class ExportSource:
    """A quantized model as an exporter sees it: the model (its quantized Linears are
    runtime layers), its ``quantization_config`` (with per-layer records) and tokenizer."""

    model: nn.Module
    quantization_config: dict[str, Any]
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)  # what the exporter changed, said once

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        return self.quantization_config["layers"]


class Format:
    """Subclasses set ``name``/``summary`` and implement ``refusal`` and ``write``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    path_is_file: ClassVar[bool] = False  # the output is one file, not a directory
    # Whether it holds per-expert Linears split from fused experts (compensator.nn.experts).
    holds_split_experts: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise CompensatorError(
                f"format {self.name} takes no options {sorted(options)}; see compensator export -h"
            )

    def refusal(self, name: str, record: dict[str, Any]) -> str | None:
        """Why layer ``name`` cannot be held exactly (what would be lost), or None."""
        raise NotImplementedError

    def write(self, source: ExportSource, target: Path) -> None:
        """Write to ``target``: a temporary directory (renamed into place when complete), or
        for one-file formats a temporary file path."""
        raise NotImplementedError

    def check(self, source: ExportSource) -> None:
        if source.quantization_config.get("experts") and not self.holds_split_experts:
            raise CompensatorError(
                f"{self.name} cannot hold this mixture-of-experts checkpoint: its experts are "
                "split into per-expert layers, which its loaders do not read back into "
                "transformers' fused experts yet; keep the native format"
            )
        for name, record in source.records.items():
            why = self.refusal(name, record)
            if why is not None:
                raise CompensatorError(f"{self.name} cannot hold {name}: {why}")


FORMATS: dict[str, type[Format]] = {}
# Where each built-in format registers itself; imported when first asked for, since some
# pull in their own libraries (compressed-tensors, gguf).
BUILTIN = {
    "native": "compensator.io.native",
    "compressed-tensors": "compensator.io.compressed_tensors",
    "gguf": "compensator.io.gguf_format",
}


def register_format(cls: type[Format]) -> type[Format]:
    if cls.name in FORMATS:
        raise ValueError(f"format {cls.name!r} registered twice")
    FORMATS[cls.name] = cls
    return cls


def get_format(name: str, **options: Any) -> Format:
    if name not in FORMATS and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in FORMATS:
        raise CompensatorError(f"unknown format {name!r}; formats: {', '.join(sorted(FORMATS))}")
    return FORMATS[name](**options)


def export(
    source: ExportSource,
    out: str | Path,
    fmt: Format,
    *,
    force: bool = False,
    protect: tuple[str | Path, ...] = (),
) -> Path:
    """Write ``source`` to ``out`` in format ``fmt`` (refusing first what it cannot hold),
    never over, inside or around the base model or the ``protect``-ed paths (the
    checkpoint read)."""
    fmt.check(source)
    t0 = time.perf_counter()
    base = source.quantization_config.get("base_model")
    protect = (*protect, *((base,) if base else ()))
    out = Path(out).resolve()
    if fmt.path_is_file:
        with atomic_file(out, force=force, protect=protect) as tmp:
            fmt.write(source, tmp / out.name)
    else:
        with atomic_dir(out, force=force, protect=protect) as tmp:
            fmt.write(source, tmp)
            if not (tmp / MANIFEST).exists():  # what lets a later --force replace it
                write_manifest(tmp)
    for note in source.notes:
        log.info("%s: %s", fmt.name, note)
    size = dir_size(out) if out.is_dir() else out.stat().st_size
    log.info(
        "exported %s to %s (%.1f MB) in %.1fs", fmt.name, out, size / 1e6, time.perf_counter() - t0
    )
    return out
