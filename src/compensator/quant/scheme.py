"""A quantization scheme: how weights are stored and whether activations are quantized."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from compensator.quant.act import ActSpec
from compensator.quant.spec import QuantSpec


class Scheme(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: QuantSpec = QuantSpec()
    activations: ActSpec | None = None  # dynamic quantization of Linear inputs (W4A8)

    def label(self) -> str:
        """E.g. ``W4A8 g128``, ``W3A16 per-channel sym``."""
        w = self.weights
        acts = "A16" if self.activations is None else self.activations.label()
        if w.kquant is not None:
            return f"{w.kquant} {acts}"
        groups = "per-channel" if w.group_size is None else f"g{w.group_size}"
        return f"W{w.bits}{acts} {groups}{' sym' if w.symmetric else ''}{' float-min' if w.float_min else ''}"
