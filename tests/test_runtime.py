"""The packed runtime: quantized layers keep no dense copy at inference, and the int4
kernels agree with the exact reference (dequantize, then matmul)."""

from __future__ import annotations

import pytest
import torch

import compensator as cp
import compensator.nn.quant_linear as ql
from compensator.kernels import qgemv
from compensator.models.loading import LoadedModel
from compensator.nn import QuantLinear
from compensator.quant.spec import QuantSpec
from compensator.rounders.rtn import rtn
from compensator.types import LowRank
from conftest import VOCAB, require, tiny_llama


def _layer(out: int, inp: int, spec: QuantSpec, **extras: object) -> QuantLinear:
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(out + inp))
    return QuantLinear.from_quantized(rtn(w, spec), torch.randn(out), **extras)


def _reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, layer.dequantize_weight(), layer.bias)


def test_the_kernel_is_built() -> None:
    require(qgemv() is not None, "the int4 CPU kernel did not build (see the log)")


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 200])  # <= 16: GEMV kernel; more: dequantize
@pytest.mark.parametrize(
    ("out", "inp", "group"),
    # 584 = 4 x 128 + 72: a ragged last group of 9 words (odd); 38 rows: a tail of 2 rows
    [(96, 576, 128), (64, 200, 40), (48, 64, None), (40, 96, 32), (38, 584, 128)],
)
def test_packed_forward_matches_the_reference(
    rows: int, out: int, inp: int, group: int | None
) -> None:
    require(qgemv() is not None, "the int4 CPU kernel did not build")
    layer = _layer(out, inp, QuantSpec(bits=4, group_size=group))
    x = torch.randn(rows, inp)
    with torch.inference_mode():
        got, want = layer(x), _reference(layer, x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    assert layer.weight_cache is None  # nothing dense kept


def test_other_widths_and_bits_use_the_reference() -> None:
    for spec, inp in (
        (QuantSpec(bits=3, group_size=32), 64),
        (QuantSpec(bits=4, group_size=12), 60),
    ):
        layer = _layer(32, inp, spec)
        x = torch.randn(2, inp)
        with torch.inference_mode():
            assert torch.equal(layer(x), _reference(layer, x))


def test_without_the_kernel_the_reference_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ql, "qgemv", lambda: None)
    layer = _layer(32, 64, QuantSpec(bits=4, group_size=32))
    x = torch.randn(1, 64)
    with torch.inference_mode():
        assert torch.equal(layer(x), _reference(layer, x))


def test_low_rank_terms_ride_on_the_packed_path() -> None:
    g = torch.Generator().manual_seed(0)
    lowrank = LowRank(torch.randn(64, 4, generator=g), torch.randn(4, 32, generator=g))
    layer = _layer(32, 64, QuantSpec(bits=4, group_size=32), lowrank=lowrank)
    x = torch.randn(1, 64)
    a, b = lowrank.factors()
    with torch.inference_mode():
        want = _reference(layer, x) + (x @ a.half().float()) @ b.half().float()
        assert float((layer(x) - want).abs().max() / want.abs().max()) < 1e-5


def test_generate_keeps_the_weights_packed() -> None:
    fp = tiny_llama(hidden=128)
    fp_bytes = (
        sum(m.weight.numel() * 4 for m in fp.modules() if isinstance(m, torch.nn.Linear))
        - fp.lm_head.weight.numel() * 4
    )
    calib = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    qm = cp.quantize(LoadedModel(fp, None, "tiny"), "gptq", calibration=calib, progress=False)
    layers = [m for m in qm.model.modules() if isinstance(m, QuantLinear)]
    assert all(m.weight_cache is None and not m.keep_dense for m in layers)  # calibration's gone
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        qm.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert all(m.weight_cache is None for m in layers)
    resident = sum(
        b.numel() * b.element_size() for m in layers for b in m.buffers() if b is not None
    )
    assert resident <= 0.3 * fp_bytes, (resident, fp_bytes)
