import pytest
import torch

from compensator.quant import QuantSpec, fit_params
from compensator.quant.grid import fit_group
from compensator.quant.spec import dequantize_codes, quantize_codes
from compensator.rounders import gptq, prepare_hessian, rtn


def _problem(seed: int, rows: int = 12, cols: int = 40, tokens: int = 200):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    x[:, 3] = 0  # a dead input column
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return w, x, x.T @ x


def _obs_reference(w, h, spec, damp, order):
    """Column-by-column OBS with a dense inverse Hessian, eliminated one column at a time."""
    h, w = prepare_hessian(h, w, damp)
    w = w.clone()
    hinv = torch.linalg.inv(h)
    cols = w.shape[1]
    gs = cols if spec.group_size is None else spec.group_size
    gidx = spec.group_of_columns(cols)
    scale = torch.zeros(w.shape[0], spec.n_groups(cols), dtype=w.dtype)
    zero = torch.zeros_like(scale)
    done = set()
    codes = torch.zeros_like(w)
    for q in order:
        g = int(gidx[q])
        if g not in done:
            s, z = fit_group(w[:, g * gs : (g + 1) * gs], spec)
            scale[:, g], zero[:, g] = s.double(), z.double()
            done.add(g)
        c = quantize_codes(w[:, q], scale[:, g], zero[:, g], spec)
        codes[:, q] = c
        err = (w[:, q] - dequantize_codes(c, scale[:, g], zero[:, g]).double()) / hinv[q, q]
        w -= err[:, None] * hinv[q][None, :]
        hinv = hinv - hinv[:, q : q + 1] @ hinv[q : q + 1, :] / hinv[q, q]
    return codes


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 8, 16])
def test_gptq_equals_bruteforce_obs(act_order: bool, group_size: int | None) -> None:
    w, _, h = _problem(0)
    spec = QuantSpec(bits=3, group_size=group_size, scale_dtype="float32")
    order = (
        torch.argsort(torch.diag(h), descending=True, stable=True).tolist()
        if act_order
        else list(range(w.shape[1]))
    )
    ref = _obs_reference(w, h, spec, 0.01, order)
    # block_size 7 makes lazy block updates and groups straddle block boundaries.
    got = gptq(w, h, spec, damp=0.01, block_size=7, act_order=act_order)
    assert torch.equal(got.codes.double(), ref)


def _output_error(w, wq, x):
    return ((x @ (w - wq).T) ** 2).sum().item()


@pytest.mark.parametrize("bits,group_size", [(2, 16), (3, None), (4, 8)])
def test_gptq_output_error_not_worse_than_rtn(bits: int, group_size: int | None) -> None:
    wins = 0
    for seed in range(5):
        w, x, h = _problem(seed)
        spec = QuantSpec(bits=bits, group_size=group_size)
        e_rtn = _output_error(w, rtn(w, spec).dequantize().double(), x)
        e_gptq = _output_error(w, gptq(w, h, spec).dequantize().double(), x)
        assert e_gptq <= e_rtn
        wins += e_gptq < 0.9 * e_rtn
    assert wins >= 4


def test_gptq_dead_column_is_zero_and_static_groups_valid() -> None:
    w, _, h = _problem(1)
    spec = QuantSpec(bits=4, group_size=16)
    q = gptq(w, h, spec, group_params="static")
    assert torch.all(q.dequantize()[:, 3] == 0)
    # Static parameters are the RTN parameters of the original (dead-zeroed) weights.
    w0 = w.clone()
    w0[:, 3] = 0
    ref = fit_params(w0.float(), spec)
    assert torch.allclose(q.params.scale, ref.scale)
    assert q.codes.max() <= spec.maxq


@pytest.mark.parametrize("d", [1, 7, 200])
def test_inverse_cholesky_upper_factors_the_inverse(d: int) -> None:
    """U is upper triangular with a positive diagonal and U^T U = H^-1 (float64 reference)."""
    from compensator.rounders.gptq import inverse_cholesky_upper

    g = torch.Generator().manual_seed(d)
    x = torch.randn(4 * d + 3, d, generator=g, dtype=torch.float64)
    h = x.T @ x + 0.01 * torch.eye(d, dtype=torch.float64)
    u = inverse_cholesky_upper(h)
    assert torch.equal(u, torch.triu(u)) and bool((u.diagonal() > 0).all())
    assert torch.allclose(u.T @ u, torch.linalg.inv(h), rtol=1e-9, atol=1e-12)
    u32 = inverse_cholesky_upper(h.float())
    assert torch.allclose(u32.double(), u, rtol=1e-3, atol=1e-4 * u.abs().max().item())


def test_inverse_factor_beyond_float32_asks_for_damping(caplog: pytest.LogCaptureFixture) -> None:
    """A float32 Hessian of condition 1e8 still factors, but U^T U is then far from its
    inverse (2.0 off the identity, measured): the probe rejects it and damping is added, as the
    former double factorization did; at 1e6 nothing is added."""
    from compensator.rounders.gptq import inverse_cholesky_upper

    g = torch.Generator().manual_seed(0)
    d = 256
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    for cond, damped in ((1e6, False), (1e8, True)):
        ev = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)
        h = ((q * ev) @ q.T).float()
        caplog.clear()
        u = inverse_cholesky_upper(h).double()
        assert ("extra damping" in caplog.text) == damped, cond
        off = (u.T @ u @ h.double() - torch.eye(d, dtype=torch.float64)).abs().max().item()
        assert off < (1.0 if damped else 0.05), (cond, off)
