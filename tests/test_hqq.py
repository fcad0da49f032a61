"""The HQQ-style rounder: grids fitted under an l_p loss, integer zero points, never worse
than RTN in weight error; and as a recipe step through the whole pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compensator as cp
from compensator.models.loading import LoadedModel
from compensator.quant.grid import fit_params
from compensator.quant.spec import QuantSpec
from compensator.rounders.hqq import hqq, shrink_lp
from compensator.rounders.rtn import rtn
from conftest import VOCAB, tiny_llama


def _heavy_tailed(rows: int = 32, cols: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dist = torch.distributions.StudentT(torch.tensor(2.5))
    torch.manual_seed(seed)  # StudentT samples from the global generator
    return dist.sample((rows, cols)) * 0.02 + 0.001 * torch.randn(rows, cols, generator=g)


def _group_errors(w: torch.Tensor, deq: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    gs = spec.group_width(w.shape[1])
    return torch.stack(
        [(deq - w)[:, g : g + gs].pow(2).sum(1) for g in range(0, w.shape[1], gs)], dim=1
    )


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, None])
def test_never_worse_than_rtn_and_better_on_heavy_tails(bits: int, group_size: int | None) -> None:
    w = _heavy_tailed()
    spec = QuantSpec(bits=bits, group_size=group_size)  # 200 = 6 x 32 + 8: a ragged group
    ours = _group_errors(w, hqq(w, spec).dequantize(), spec)
    base = _group_errors(w, rtn(w, spec).dequantize(), spec)
    assert (ours <= base).all()
    assert ours.sum() < 0.97 * base.sum()


def test_grid_is_what_layers_store() -> None:
    w = _heavy_tailed(seed=1)
    spec = QuantSpec(bits=3, group_size=64)
    q = hqq(w, spec)
    zero, scale = q.params.zero, q.params.scale
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= spec.maxq
    assert torch.equal(scale, scale.half().float()) and (scale > 0).all()
    assert q.codes.min() >= 0 and q.codes.max() <= spec.maxq
    # Zero iterations is RTN's min/max grid exactly.
    rtn_params = fit_params(w, spec)
    none = hqq(w, spec, iterations=0)
    assert torch.equal(none.params.scale, rtn_params.scale)
    assert torch.equal(none.codes, rtn(w, spec).codes)


def test_symmetric_keeps_the_midpoint_zero() -> None:
    spec = QuantSpec(bits=4, group_size=32, symmetric=True)
    q = hqq(_heavy_tailed(seed=2), spec)
    assert torch.equal(q.params.zero, torch.full_like(q.params.zero, 8.0))


def test_shrink_lets_large_residuals_go_and_zeroes_small_ones() -> None:
    x = torch.tensor([-3.0, -0.01, 0.0, 0.02, 5.0])
    out = shrink_lp(x, beta=10.0, p=0.7)
    assert out[1] == 0 and out[2] == 0 and out[3] == 0
    assert 0 < out[4] < 5 and -3 < out[0] < 0
    # It lowers the split objective |e|^p + beta/2 (e - x)^2 against keeping e = x.
    obj = out.abs().pow(0.7) + 5.0 * (out - x).pow(2)
    assert (obj <= x.abs().pow(0.7) + 1e-6).all()


def test_hqq_recipe_round_trip(tmp_path: Path) -> None:
    calib = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    qm = cp.quantize(LoadedModel(tiny_llama(), None, "tiny"), "hqq", progress=False, bits=3)
    assert qm.quantization_config["calibration"] is None  # no data needed
    assert {r["format"] for r in qm.quantization_config["layers"].values()} == {"uniform"}
    loaded = cp.load(cp.save(qm, tmp_path / "hqq"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib).logits, qm.model(calib).logits, atol=0, rtol=0)
