"""Runtime modules of quantized models."""

from compensator.nn.quant_linear import QuantLinear, replace_module

__all__ = ["QuantLinear", "replace_module"]
