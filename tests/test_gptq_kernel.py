"""The compiled GPTQ column loop (compensator/kernels/gptq.cpp) against the Python loop it
replaces: the same codes and scales, bit for bit, across the options that change the loop
(groups fitted mid-block, act-order, static groups, float zero points, K-quant super-blocks,
GPTAQ's folded terms)."""

from __future__ import annotations

import importlib

import pytest
import torch

from compensator.kernels import gptq_columns
from compensator.quant import QuantSpec
from compensator.rounders import gptq
from compensator.rounders.gptaq import gptaq
from conftest import require

# The module (``compensator.rounders.gptq`` the attribute is the function of that name).
gptq_module = importlib.import_module("compensator.rounders.gptq")


def _problem(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    x[:, 5] = 0  # a dead input
    w = torch.randn(rows, cols, generator=g)
    x_fp = x + 0.1 * torch.randn(x.shape, generator=g)
    return w, x.T @ x, (x_fp - x).T @ x


def _both(monkeypatch: pytest.MonkeyPatch, run):  # type: ignore[no-untyped-def]
    """``run()`` through the compiled loop, then through the Python loop."""
    require(gptq_columns() is not None, "the GPTQ column kernel did not build (see the log)")
    compiled = run()
    with monkeypatch.context() as m:
        m.setattr(gptq_module, "_column_kernel", lambda *a: None)
        python = run()
    return compiled, python


def _same(a, b) -> None:  # type: ignore[no-untyped-def]
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.params.scale, b.params.scale)
    assert torch.equal(a.params.zero, b.params.zero)


SPECS = {
    "W3 g16 asym": QuantSpec(bits=3, group_size=16, scale_dtype="float32"),
    "W4 g32 sym": QuantSpec(bits=4, group_size=32, symmetric=True),
    "W4 per-channel": QuantSpec(bits=4, group_size=None),
    "W4 g32 float min": QuantSpec(bits=4, group_size=32, float_min=True),
    "Q4_K": QuantSpec(kquant="Q4_K"),
    "Q3_K": QuantSpec(kquant="Q3_K"),
}


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", list(SPECS))
# Rows are taken 32 at a time: fewer than one tile, and two full tiles plus a partial one.
@pytest.mark.parametrize("rows", [24, 70])
def test_compiled_loop_equals_python_loop(
    monkeypatch: pytest.MonkeyPatch, name: str, act_order: bool, rows: int
) -> None:
    w, h, _ = _problem(rows, 256, seed=len(name))
    spec = SPECS[name]
    # block_size 48: groups straddle blocks, and act-order fits them mid-run.
    got, ref = _both(
        monkeypatch, lambda: gptq(w, h, spec, block_size=48, act_order=act_order)
    )  # fmt: skip
    _same(got, ref)


def test_static_groups_and_gptaq_folded_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    w, h, cross = _problem(20, 96, seed=3)
    spec = QuantSpec(bits=3, group_size=16)
    got, ref = _both(monkeypatch, lambda: gptq(w, h, spec, block_size=40, group_params="static"))
    _same(got, ref)
    for compensation_aware in (False, True):  # GPTAQ's P, with ResComp's R too

        def run(ca: bool = compensation_aware):  # type: ignore[no-untyped-def]
            return gptaq(w, h, spec, fp_cross=cross, compensation_aware=ca, block_size=40)

        got, ref = _both(monkeypatch, run)
        _same(got, ref)
