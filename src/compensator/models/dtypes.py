"""The dtype a model is loaded in and calibrated in (``quantize --dtype``).

Block forwards and the calibration streams run in it; statistics, rounding maths and the
quantized layers' scales stay float32 whatever it is (docs/big-models.md, "Work dtype").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compensator.errors import CompensatorError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_CHOICES = [*DTYPES, "auto"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """A supported dtype from its name or itself; None for "auto"."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        dtype = dtype_name(dtype)
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise CompensatorError(f"dtype '{dtype}' is not supported: use {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def config_dtype(config: dict[str, object]) -> torch.dtype:
    """The dtype a config says its weights are in (``dtype`` or the older ``torch_dtype``);
    float32 when it names none we support."""
    name = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def load_dtype(dtype: str | torch.dtype | None, model: str | Path) -> torch.dtype:
    """The dtype to load the model files ``model`` in: float32 unless asked (None), the
    config's own for "auto" (a GGUF is dequantized: float32)."""
    parsed = torch.float32 if dtype is None else parse_dtype(dtype)
    if parsed is not None:
        return parsed
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        try:
            return config_dtype(json.loads(config.read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise CompensatorError(f"cannot read '{config}': {err}") from None
    if Path(model).expanduser().exists() or "/" not in str(model):
        return torch.float32  # a GGUF file or a built-in model (dequantized)
    from transformers import AutoConfig  # a hub id: its config, as loading it would read

    return config_dtype(AutoConfig.from_pretrained(str(model)).to_dict())
