"""Round-to-nearest: every weight rounded independently with its group's min/max range."""

from __future__ import annotations

import torch

from compensator.quant.spec import (
    QuantizedWeight,
    QuantParams,
    QuantSpec,
    fit_params,
    quantize_with_params,
)


def rtn(
    w: torch.Tensor,
    spec: QuantSpec,
    *,
    clip_search: bool = False,
    params: QuantParams | None = None,
) -> QuantizedWeight:
    """Round every weight to the nearest level of its group's grid; the grid comes from the
    group's min/max (optionally clip-searched) unless fixed ``params`` are given."""
    if params is None:
        params = fit_params(w.float(), spec, clip_search=clip_search)
    return QuantizedWeight(quantize_with_params(w.float(), params, spec), params, spec)
