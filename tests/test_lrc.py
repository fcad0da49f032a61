"""LRC maths on bare matrices: the low-rank step's optimality, the W* target, iterations."""

from __future__ import annotations

import pytest
import torch

from compensator.correctors import resolve_rank
from compensator.correctors.lrc import (
    lowrank_step,
    lrc_objective,
    lrc_target,
    principal_basis,
    relaxed_lowrank,
)
from compensator.nn.quant_linear import QuantLinear
from compensator.pipeline.stats import StatsAccumulator
from compensator.quant import QuantSpec
from compensator.quant.act import ActSpec, quantize_activations
from compensator.rounders import rtn
from compensator.steps.gptq import GPTQStep
from compensator.steps.lrc import LRCStep
from compensator.steps.rtn import RTNStep
from compensator.types import LinearStats

ACT = ActSpec(bits=4, clip_ratio=0.9)


def _case(out: int = 24, inp: int = 40, tokens: int = 600, seed: int = 0, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    # Correlated features of unequal scale, like a Linear's inputs.
    mix = torch.randn(inp, inp, generator=g, dtype=torch.float64) / inp**0.5
    x = (torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ mix) * torch.exp(
        spread * torch.randn(inp, generator=g, dtype=torch.float64)
    )
    a = quantize_activations(x, ACT)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    n = tokens
    return w, x, a, x.T @ x / n, x.T @ a / n, a.T @ a / n


def _perturbed(lr, scales: tuple[float, ...], count: int, seed: int):
    """Dense rank-k matrices from the factors of ``lr`` plus Gaussian noise of each scale."""
    g = torch.Generator().manual_seed(seed)
    out, inp, rank = lr.b.shape[1], lr.a.shape[0], lr.rank
    for scale in scales:
        for _ in range(count):
            u = lr.b.double().T + scale * torch.randn(out, rank, generator=g, dtype=torch.float64)
            v = lr.a.double() + scale * torch.randn(inp, rank, generator=g, dtype=torch.float64)
            yield u @ v.T


def _brute_objective(w, wq, low, x, a) -> float:
    y = x @ w.T - a @ wq.T - (0 if low is None else x @ low.T)
    return float((y * y).sum() / x.shape[0])


def test_objective_from_grams_matches_the_data() -> None:
    w, x, a, sxx, sxa, saa = _case()
    wq = rtn(w.float(), QuantSpec(bits=3, group_size=8)).dequantize().double()
    low = torch.randn(w.shape, dtype=torch.float64) * 0.01
    got = lrc_objective(w, wq, low, sxx, sxa, saa)
    assert got == pytest.approx(_brute_objective(w, wq, low, x, a), rel=1e-9)


@pytest.mark.parametrize("rank", [1, 4, 12])
def test_lowrank_step_is_optimal(rank: int) -> None:
    w, _x, _a, sxx, sxa, saa = _case()
    wq = rtn(w.float(), QuantSpec(bits=3, group_size=8)).dequantize().double()
    lr = lowrank_step(w, wq, sxx, sxa, rank)
    assert lr is not None and lr.rank == rank
    low = lr.dense().double()
    assert torch.linalg.matrix_rank(lr.dense()) == rank
    best = lrc_objective(w, wq, low, sxx, sxa, saa)
    assert best < lrc_objective(w, wq, None, sxx, sxa, saa)
    # Any rank-k matrix near the optimum (or far from it) is no better.
    for low in _perturbed(lr, (1e-3, 1e-2, 1e-1), 20, seed=3):
        assert lrc_objective(w, wq, low, sxx, sxa, saa) >= best * (1 - 1e-7)


def test_full_rank_step_is_the_least_squares_fit() -> None:
    w, x, a, sxx, sxa, _saa = _case()
    wq = rtn(w.float(), QuantSpec(bits=3, group_size=8)).dequantize().double()
    low = lowrank_step(w, wq, sxx, sxa, min(w.shape)).dense().double()
    # Unconstrained: L = argmin ||Y - L X|| by lstsq on the raw data.
    y = x @ w.T - a @ wq.T
    want = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(low, want.float().double(), atol=1e-4, rtol=1e-4)


def test_target_minimizes_the_objective_for_fixed_lowrank() -> None:
    w, _x, _a, sxx, sxa, saa = _case()
    low = (
        torch.randn(w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 0.1
    )
    target = lrc_target(w, low, sxa, saa)
    best = lrc_objective(w, target, low, sxx, sxa, saa)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        other = target + 0.01 * torch.randn(w.shape, generator=g, dtype=torch.float64)
        assert lrc_objective(w, other, low, sxx, sxa, saa) >= best


def _stats(sxx, sxa, saa, tokens: int = 600) -> LinearStats:
    return LinearStats(
        {"hessian": sxx.float(), "act_cross": sxa.float(), "act_hessian": saa.float()}, tokens
    )


def _relaxed_objective(w, low, sxx, sxa, saa, stx=None, sta=None, stt=None) -> float:
    """min over real-valued Wq of f(Wq, L), reached at W* (tested above)."""
    target = lrc_target(w, low, sxa, saa, sta=sta)
    return lrc_objective(w, target, low, sxx, sxa, saa, stx, sta, stt)


@pytest.mark.parametrize("target", ["x", "t"])
def test_relaxed_lowrank_is_reduced_rank_regression_on_the_data(target: str) -> None:
    # Reference on the raw data: take out of W t and of x what a predicts (least squares),
    # regress one residual on the other, keep the top-k principal directions of the fit.
    # (Features of similar scale: no feature always rounds to 0, so Saa is invertible.)
    w, x, a, sxx, sxa, saa = _case(spread=0.3)
    assert torch.linalg.cond(a) < 1e3
    g = torch.Generator().manual_seed(8)
    t = x if target == "x" else x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    n, rank = x.shape[0], 6
    stx, sta = (None, None) if target == "x" else (t.T @ x / n, t.T @ a / n)
    low = relaxed_lowrank(w, sxx, sxa, saa, rank, stx=stx, sta=sta).dense().double()
    y = t @ w.T
    y_res = y - a @ torch.linalg.lstsq(a, y).solution
    x_res = x - a @ torch.linalg.lstsq(a, x).solution
    full = torch.linalg.lstsq(x_res, y_res).solution.T
    top = torch.linalg.svd(x_res @ full.T, full_matrices=False).Vh[:rank]
    want = top.T @ top @ full

    def data_objective(low: torch.Tensor) -> float:
        r = y_res - x_res @ low.T
        return float((r * r).sum() / n)

    # The argmin is weakly determined along near-tied singular values: compare the optimum.
    assert data_objective(low) == pytest.approx(data_objective(want), rel=1e-6)
    assert data_objective(low) <= data_objective(want) * (1 + 1e-7)  # float32 factors
    stt = None if target == "x" else t.T @ t / n
    relaxed = _relaxed_objective(w, low, sxx, sxa, saa, stx, sta, stt)
    assert relaxed == pytest.approx(data_objective(low), rel=1e-6)


@pytest.mark.parametrize("rank", [1, 4, 12])
def test_relaxed_lowrank_is_optimal_at_its_rank(rank: int) -> None:
    w, _x, _a, sxx, sxa, saa = _case()
    lr = relaxed_lowrank(w, sxx, sxa, saa, rank)
    assert lr is not None and lr.rank == rank
    best = _relaxed_objective(w, lr.dense().double(), sxx, sxa, saa)
    assert best < _relaxed_objective(w, None, sxx, sxa, saa)
    for low in _perturbed(lr, (1e-3, 1e-2, 1e-1), 10, seed=9):
        assert _relaxed_objective(w, low, sxx, sxa, saa) >= best * (1 - 1e-7)
    # Where plain alternation from L = 0 lands after its first step is no better.
    plain = rtn(lrc_target(w, None, sxa, saa).float(), QuantSpec(bits=3, group_size=8))
    first = lowrank_step(w, plain.dequantize().double(), sxx, sxa, rank).dense().double()
    assert best <= _relaxed_objective(w, first, sxx, sxa, saa)


def test_relaxed_start_beats_zero_start() -> None:
    w, _x, _a, sxx, sxa, saa = _case()
    spec = QuantSpec(bits=3, group_size=8)
    stats = _stats(sxx, sxa, saa)
    for iterations in (1, 3):
        relaxed = LRCStep(rank=6, iterations=iterations).solve_with_history(
            w.float(), stats, spec, GPTQStep()
        )
        zero = LRCStep(rank=6, iterations=iterations, init="zero").solve_with_history(
            w.float(), stats, spec, GPTQStep()
        )
        assert min(relaxed[2]) < min(zero[2])


@pytest.mark.parametrize("init", ["relaxed", "zero"])
@pytest.mark.parametrize("rounder", [GPTQStep(), RTNStep()])
def test_lrc_iterations_never_raise_the_objective(rounder, init: str) -> None:
    w, _x, _a, sxx, sxa, saa = _case()
    spec = QuantSpec(bits=3, group_size=8)
    stats = _stats(sxx, sxa, saa)
    previous = None
    for iterations in (1, 2, 3, 4):
        step = LRCStep(rank=4, iterations=iterations, init=init)
        qw, lr, history = step.solve_with_history(w.float(), stats, spec, rounder)
        got = lrc_objective(w, qw.dequantize().double(), lr.dense().double(), sxx, sxa, saa)
        assert got == pytest.approx(min(history), rel=1e-5)
        if previous is not None:
            assert got <= previous * (1 + 1e-9)
        previous = got
    # And the joint fit beats rounding W alone with the rounder (no low rank, raw Hessian).
    plain = rounder.round(w.float(), LinearStats({"hessian": sxx.float()}, 600), spec)
    assert previous < lrc_objective(w, plain.dequantize().double(), None, sxx, sxa, saa)


def test_lrc_rank_zero_is_activation_aware_rounding() -> None:
    w, _x, _a, sxx, sxa, saa = _case()
    spec = QuantSpec(bits=4, group_size=8)
    step = LRCStep(rank=0)
    qw, lr = step.solve(w.float(), _stats(sxx, sxa, saa), spec, GPTQStep())
    assert lr is None
    target = lrc_target(w.float(), None, sxa.float(), saa.float(), step.damp).float()
    want = GPTQStep().round(target, LinearStats({"hessian": saa.float()}, 600), spec)
    torch.testing.assert_close(qw.dequantize(), want.dequantize())


def test_rank_fraction_is_a_share_of_parameters() -> None:
    assert resolve_rank("30%", 576, 1536) == 126  # 0.3 * 576 * 1536 / 2112 = 125.7
    assert resolve_rank("30%", 64, 64) == 10


def test_activation_statistics_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 7, 12, generator=g) for _ in range(3)]
    acc = StatsAccumulator({"hessian", "act_hessian", "act_cross"}, 12, torch.device("cpu"), ACT)
    for b in batches:
        acc.update(b, None)
    stats = acc.finalize()
    x = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    a = quantize_activations(x.float(), ACT).double()
    n = x.shape[0]
    torch.testing.assert_close(stats.act_hessian.double(), a.T @ a / n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.act_cross.double(), x.T @ a / n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.hessian.double(), x.T @ x / n, atol=1e-5, rtol=1e-5)


def test_asymmetric_target_maths_match_the_data() -> None:
    # Aim at W t, t = x + alpha (x_fp - x): the objective from Gram matrices equals the data's,
    # and the low-rank step and W* are still the minimizers.
    w, x, a, sxx, sxa, saa = _case()
    g = torch.Generator().manual_seed(7)
    x_fp = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64) * x.std(0)
    t = x + 0.5 * (x_fp - x)
    n = x.shape[0]
    stx, sta, stt = t.T @ x / n, t.T @ a / n, t.T @ t / n
    wq = rtn(w.float(), QuantSpec(bits=3, group_size=8)).dequantize().double()
    lr = lowrank_step(w, wq, sxx, sxa, 6, stx=stx)
    low = lr.dense().double()
    y = t @ w.T - a @ wq.T - x @ low.T
    got = lrc_objective(w, wq, low, sxx, sxa, saa, stx, sta, stt)
    assert got == pytest.approx(float((y * y).sum() / n), rel=1e-6)
    for other in _perturbed(lr, (0.01,), 10, seed=7):  # rank-6 perturbations are no better
        assert lrc_objective(w, wq, other, sxx, sxa, saa, stx, sta, stt) >= got * (1 - 1e-7)
    target = lrc_target(w, low, sxa, saa, sta=sta)
    best = lrc_objective(w, target, low, sxx, sxa, saa, stx, sta, stt)
    for _ in range(10):
        other = target + 0.01 * torch.randn(w.shape, generator=g, dtype=torch.float64)
        assert lrc_objective(w, other, low, sxx, sxa, saa, stx, sta, stt) >= best


def test_asymmetric_lrc_with_alpha_zero_is_plain_lrc() -> None:
    w, _x, _a, sxx, sxa, saa = _case()
    spec = QuantSpec(bits=3, group_size=8)
    d = torch.randn(sxx.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    stats = LinearStats(
        {**_stats(sxx, sxa, saa).values, "fp_cross": d.float(), "fp_act_cross": d.float()}, 600
    )
    plain = LRCStep(rank=4).solve(w.float(), stats, spec, GPTQStep())
    zero = LRCStep(rank=4, asymmetric=True, alpha=0.0).solve(w.float(), stats, spec, GPTQStep())
    moved = LRCStep(rank=4, asymmetric=True, alpha=0.5).solve(w.float(), stats, spec, GPTQStep())
    torch.testing.assert_close(zero[0].dequantize(), plain[0].dequantize())
    torch.testing.assert_close(zero[1].dense(), plain[1].dense())
    assert not torch.equal(moved[1].dense(), plain[1].dense())


def _split_case(rank: int = 6, spread: float = 1.5):
    """Inputs with most energy in few directions; a = Q(x - x B B^T) for their top-k basis B."""
    w, x, _a, sxx, _sxa, _saa = _case(spread=spread)
    basis = principal_basis(sxx, rank)
    a = quantize_activations(x - x @ basis @ basis.T, ACT)
    n = x.shape[0]
    return w, x, a, basis, sxx, x.T @ a / n, a.T @ a / n


def test_principal_basis_holds_the_most_input_energy() -> None:
    _w, x, _a, sxx, _sxa, _saa = _case(spread=1.5)
    basis = principal_basis(sxx, 5)
    torch.testing.assert_close(basis.T @ basis, torch.eye(5, dtype=torch.float64))
    # Same energy as the top-5 right singular directions of the data; a random basis has less.
    top = torch.linalg.svd(x, full_matrices=False).Vh[:5].T
    energy = float(((x @ basis) ** 2).sum())
    assert energy == pytest.approx(float(((x @ top) ** 2).sum()), rel=1e-9)
    other = torch.linalg.qr(torch.randn(x.shape[1], 5, dtype=torch.float64)).Q
    assert energy > float(((x @ other) ** 2).sum())


def test_split_lowrank_step_is_the_regression_on_its_basis() -> None:
    w, x, a, basis, sxx, sxa, saa = _split_case()
    wq = rtn(w.float(), QuantSpec(bits=3, group_size=8)).dequantize().double()
    lr = lowrank_step(w, wq, sxx, sxa, basis.shape[1], basis=basis)
    torch.testing.assert_close(lr.a.double(), basis.float().double())
    z = x @ basis
    want = torch.linalg.lstsq(z, x @ w.T - a @ wq.T).solution.T  # U = argmin ||Y - U z||
    torch.testing.assert_close(lr.b.double().T, want, atol=1e-4, rtol=1e-4)
    got = lrc_objective(w, wq, lr.dense().double(), sxx, sxa, saa)
    assert got == pytest.approx(_brute_objective(w, wq, lr.dense().double(), x, a), rel=1e-6)


def test_split_relaxed_start_is_the_joint_regression_on_the_data() -> None:
    # min over real Wq and U of ||W x - Wq a - U B^T x||: least squares on [a, z] jointly.
    w, x, a, basis, sxx, sxa, saa = _split_case(spread=0.5)
    assert torch.linalg.cond(torch.cat([a, x @ basis], 1)) < 1e3
    lr = relaxed_lowrank(w, sxx, sxa, saa, basis.shape[1], basis=basis)
    k = basis.shape[1]
    coef = torch.linalg.lstsq(torch.cat([a, x @ basis], 1), x @ w.T).solution.T
    torch.testing.assert_close(lr.b.double().T, coef[:, -k:], atol=1e-4, rtol=1e-4)
    wq = lrc_target(w, lr.dense().double(), sxa, saa)
    torch.testing.assert_close(wq, coef[:, :-k], atol=1e-4, rtol=1e-4)


def test_split_input_beats_plain_lrc_when_energy_is_concentrated() -> None:
    # The whole chain: statistics taken with the basis, the step's solve, the layer objective.
    w, x, _a, _basis, sxx, _sxa, _saa = _split_case(rank=6)
    spec = QuantSpec(bits=3, group_size=8)
    results = {}
    for split in (False, True):
        step = LRCStep(rank=6, split=split)
        b = step.input_basis(tuple(w.shape), sxx.float())
        assert (b is None) != split
        acc = StatsAccumulator({"hessian", "act_hessian", "act_cross"}, 40, x.device, ACT, b)
        acc.update(x.float(), None)
        stats = acc.finalize()
        qw, lr = step.solve(w.float(), stats, spec, GPTQStep())
        xf = x.float()
        xa = xf if b is None else xf - xf @ b @ b.T
        y = quantize_activations(xa, ACT) @ qw.dequantize().T + (xf @ lr.a) @ lr.b
        results[split] = float(((x @ w.T - y.double()) ** 2).sum() / x.shape[0])
    assert results[True] < 0.7 * results[False], results


def test_quant_linear_split_forward() -> None:
    # y = Q(x - x A A^T) Wq^T + (x A) B with the stored (fp16) factors; raw LRC differs.
    w, x, _a, basis, sxx, sxa, _saa = _split_case()
    spec = QuantSpec(bits=4, group_size=8)
    qw = rtn(w.float(), spec)
    lr = lowrank_step(w, qw.dequantize().double(), sxx, sxa, 6, basis=basis.half().double())
    kw = {"lowrank": lr, "act_spec": ACT}
    split = QuantLinear.from_quantized(qw, torch.randn(24), lowrank_input="split", **kw)
    raw = QuantLinear.from_quantized(qw, split.bias.data, lowrank_input="raw", **kw)
    xf = x.float()
    a, b = split.lowrank().factors()
    xq = quantize_activations(xf - (xf @ a) @ a.T, ACT)
    expected = xq @ qw.dequantize().T + split.bias + (xf @ a) @ b
    torch.testing.assert_close(split(xf), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(raw(xf), expected, atol=1e-3)
    assert "split" in repr(split)
    # A bfloat16 model still splits in float32 with the stored A: only bf16 rounding remains.
    low = split.to(torch.bfloat16)(xf.bfloat16()).float()
    assert ((low - expected).norm() / expected.norm()).item() < 2e-2
