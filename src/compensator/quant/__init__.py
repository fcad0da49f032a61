"""Quantization primitives: specs, the integer grid, packing, activation quantizers, VQ.

Knows no algorithm and no engine; imports nothing heavier than torch and pydantic.
"""

from compensator.quant.grid import dequantize, fake_quantize, fit_params, quantize_with_params
from compensator.quant.pack import pack_int32, unpack_int32
from compensator.quant.spec import QuantizedWeight, QuantParams, QuantSpec

__all__ = [
    "QuantParams",
    "QuantSpec",
    "QuantizedWeight",
    "dequantize",
    "fake_quantize",
    "fit_params",
    "pack_int32",
    "quantize_with_params",
    "unpack_int32",
]
