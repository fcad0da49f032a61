"""A GGUF model opened without dequantizing it: its tensors are dequantized one module at a
time, as :class:`compensator.models.lazy.LazyWeights` reads safetensors.

transformers' own GGUF load dequantizes every tensor before building the model, which peaks
at 1.21 GB for SmolLM2-135M (538 MB of fp32 weights). Here the names are mapped and each
tensor processed (llama.cpp's q/k row permutation undone) with transformers' GGUF helpers
(``transformers.modeling_gguf_pytorch_utils``, 5.24), so the values are exactly those of a
whole load; only architectures whose tensors map one to one are read this way (MoE GGUFs
stack their experts and load whole).
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compensator.models.lazy import LazyWeights

# GGUF architectures whose transformers processor maps each tensor to one HF tensor.
ONE_TO_ONE = ("TensorProcessor", "LlamaTensorProcessor")


class GGUFWeights(LazyWeights):
    """Which GGUF tensor holds each HF tensor of ``model`` (built on the meta device)."""

    def __init__(self, path: Path, dtype: torch.dtype, model: nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        self.directory = path.parent
        self.dtype = dtype
        self.path = path
        # One reader for the run (parsing the header takes seconds): its memory map is of
        # the quantized file, and the pages read are clean, so the OS can drop them.
        self.reader = GGUFReader(path)
        self.processor = _processor(self.reader, model.config.to_dict())
        to_hf = get_gguf_hf_weights_map(model, self.processor)
        self.gguf_names = {hf: g for g, hf in to_hf.items()}
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.files = {hf: path for hf, g in self.gguf_names.items() if g in self.tensors}
        # GGUF stores shapes innermost first; dequantized tensors come out row-major.
        self.shapes = {
            hf: tuple(int(x) for x in reversed(self.tensors[self.gguf_names[hf]].shape))
            for hf in self.files
        }
        self.dtypes = dict.fromkeys(self.files, "F32")  # dequantized: floats whatever the type

    def one_to_one(self) -> bool:
        return type(self.processor).__name__ in ONE_TO_ONE

    def read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        from gguf import dequantize

        try:
            for name in names:
                t = self.tensors[self.gguf_names[name]]
                values = self.processor.process(
                    weights=dequantize(t.data, t.tensor_type), name=t.name
                ).weights
                yield name, torch.from_numpy(np.array(values, dtype=np.float32))  # a copy
        finally:
            self._drop_pages()

    def _drop_pages(self) -> None:
        """Let go of the file pages this read touched: they would otherwise stay in the
        process's RSS until the OS needed them (+98 MB over a SmolLM2 run)."""
        mapped = getattr(getattr(self.reader, "data", None), "_mmap", None)
        if mapped is not None and hasattr(mapped, "madvise"):
            with contextlib.suppress(OSError, ValueError):
                mapped.madvise(mmap.MADV_DONTNEED)


def _processor(reader: Any, config: dict[str, Any]) -> Any:
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        read_field,
    )

    arch = (read_field(reader, "general.architecture") or [""])[0]
    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
