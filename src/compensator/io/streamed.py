"""Writing a safetensors file one tensor at a time.

``safetensors.torch.save_file`` turns every tensor into bytes before writing, so the whole
model is in memory twice. A checkpoint assembled from per-block files (issue 17) must not be:
this writer lays the file out exactly as safetensors 0.8 does (tensors ordered by dtype, in
safetensors' order, descending, then by name; the JSON header padded with spaces to 8 bytes)
and asks for each tensor only when its bytes are due, so its output is byte-identical to
``save_file``'s (tested) while holding one tensor at a time.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors' Dtype enum order (Rust); files list higher ones first.
_ORDER = [
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
    "F32", "F64", "I64", "U64",
]  # fmt: skip
_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
    torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}  # fmt: skip


@dataclass(frozen=True)
class TensorRef:
    """A tensor known by dtype and shape, read only when written."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def write_streamed(path: Path, tensors: dict[str, TensorRef], metadata: dict[str, str]) -> None:
    unknown = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in _NAMES})
    if unknown:
        raise ValueError(f"safetensors cannot hold dtypes {unknown}")
    order = sorted(tensors, key=lambda n: (-_ORDER.index(_NAMES[tensors[n].dtype]), n))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        ref = tensors[name]
        header[name] = {
            "dtype": _NAMES[ref.dtype],
            "shape": list(ref.shape),
            "data_offsets": [offset, offset + ref.nbytes],
        }
        offset += ref.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            ref = tensors[name]
            t = ref.read().detach().to("cpu").contiguous()
            if t.dtype != ref.dtype or tuple(t.shape) != ref.shape:
                raise ValueError(f"{name}: read {t.dtype} {tuple(t.shape)}, announced otherwise")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def in_memory(t: torch.Tensor) -> TensorRef:
    return TensorRef(t.dtype, tuple(t.shape), lambda: t)
