"""Round-to-nearest: every weight rounded independently with its group's min/max range."""

from __future__ import annotations

import torch

from compensator.quant.grid import fit_params, round_to_nearest
from compensator.quant.spec import QuantizedWeight, QuantParams, QuantSpec


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
    return round_to_nearest(w, params, spec)
