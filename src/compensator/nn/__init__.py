"""Runtime modules of quantized models (no calibration algorithm in here)."""

from compensator.nn.layers import bits_per_weight, build_layer, replace_module
from compensator.nn.quant_linear import QuantLinear
from compensator.nn.vq_linear import VQLinear

__all__ = ["QuantLinear", "VQLinear", "bits_per_weight", "build_layer", "replace_module"]
