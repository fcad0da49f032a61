"""LQER / L2QER maths on bare matrices, activation quantizers, and low-rank layers end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compensator as cp
from compensator.correctors import LowRank, l2qer_scale, lqer, resolve_rank
from compensator.errors import CompensatorError
from compensator.io.native import read_quantization_config
from compensator.nn import QuantLinear
from compensator.nn.layers import bits_per_weight
from compensator.quant import QuantSpec
from compensator.quant.act import ActSpec, quantize_activations, quantize_mx, quantize_per_token
from compensator.recipes import Recipe, Scheme, load_recipe
from compensator.rounders import rtn
from compensator.steps.gptq import GPTQStep
from compensator.steps.lqer import LQERStep
from conftest import VOCAB, tiny_llama


def _error_case(out: int = 48, inp: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    return w, rtn(w, QuantSpec(bits=3, group_size=16)).dequantize()


def _anisotropic_scale(inp: int, seed: int = 0) -> torch.Tensor:
    # LLM activations: most features small, a few 10-100x larger (outlier channels).
    g = torch.Generator().manual_seed(seed)
    return torch.exp(2.0 * torch.randn(inp, generator=g)).abs()


@pytest.mark.parametrize("scaled", [False, True])
def test_full_rank_reproduces_the_weight(scaled: bool) -> None:
    w, wq = _error_case()
    s = l2qer_scale(_anisotropic_scale(w.shape[1])) if scaled else None
    lr = lqer(w, wq, min(w.shape), s)
    assert lr is not None and lr.rank == min(w.shape)
    torch.testing.assert_close(wq + lr.dense(), w, atol=1e-5, rtol=0)


def test_rank_k_is_the_truncated_svd_of_the_error() -> None:
    w, wq = _error_case()
    err = (w - wq).double()
    sigma = torch.linalg.svdvals(err)
    for k in (1, 5, 20):
        lr = lqer(w, wq, k)
        residual = (err - lr.dense().double()).norm()
        # Eckart-Young: the best rank-k error is the norm of the discarded singular values.
        assert residual.item() == pytest.approx(sigma[k:].norm().item(), rel=1e-5)


def _weighted_err(w: torch.Tensor, wq: torch.Tensor, lr: LowRank, s: torch.Tensor) -> float:
    return (s[:, None] * (w - wq - lr.dense()).T).norm().item()


def test_l2qer_weighted_error_never_worse_than_lqer() -> None:
    for seed in range(5):
        w, wq = _error_case(seed=seed)
        s = l2qer_scale(_anisotropic_scale(w.shape[1], seed))
        for k in (2, 8, 24):
            plain, weighted = lqer(w, wq, k), lqer(w, wq, k, s)
            errs = [_weighted_err(w, wq, lr, s) for lr in (weighted, plain)]
            assert errs[0] <= errs[1] * (1 + 1e-6)
        # On activations with those feature magnitudes the output error follows suit.
        x = torch.randn(2000, w.shape[1], generator=torch.Generator().manual_seed(seed)) * s
        out_plain = (x @ (w - wq - lqer(w, wq, 8).dense()).T).norm()
        out_l2 = (x @ (w - wq - lqer(w, wq, 8, s).dense()).T).norm()
        assert out_l2 < out_plain


def test_rank_zero_and_rank_resolution() -> None:
    w, wq = _error_case()
    assert lqer(w, wq, 0) is None
    assert resolve_rank(32, 576, 1536) == 32
    assert resolve_rank("10%", 576, 1536) == 42  # 0.1 * 576 * 1536 / 2112
    assert resolve_rank(5000, 64, 96) == 64
    assert resolve_rank("100%", 64, 96) == 38
    assert resolve_rank("12.5%", 64, 64) == 4


def test_l2qer_scale_normalisation() -> None:
    s = l2qer_scale(torch.tensor([0.0, 0.01, 1.0, 100.0]))
    assert s.min() > 0
    torch.testing.assert_close(s.min() * s.max(), torch.tensor(1.0))


def test_int8_factors_are_close_and_counted() -> None:
    w, wq = _error_case()
    lr = lqer(w, wq, 8)
    q = lr.quantized(8)
    assert q.a.dtype == torch.int8 and q.b.dtype == torch.int8
    rel = (q.dense() - lr.dense()).norm() / lr.dense().norm()
    assert rel < 0.02
    assert lr.storage_bits() == (80 * 8 + 8 * 48) * 16
    assert q.storage_bits() == (80 * 8 + 8 * 48) * 8 + 2 * 8 * 16


def test_per_token_quantizer_matches_a_loop() -> None:
    x = torch.randn(3, 5, 40) * torch.linspace(0.1, 10, 40)
    got = quantize_per_token(x, 8)
    ref = torch.empty_like(x).reshape(-1, 40)
    for i, tok in enumerate(x.reshape(-1, 40)):
        scale = tok.abs().max() / 127
        ref[i] = torch.clamp(torch.round(tok / scale), -128, 127) * scale
    torch.testing.assert_close(got.reshape(-1, 40), ref)
    assert (got - x).abs().max() <= x.abs().amax() / 127 / 2 + 1e-6


def test_mx_quantizer_shares_a_power_of_two_per_block() -> None:
    x = torch.randn(4, 40) * torch.logspace(-3, 2, 40)  # 40 = 2 full blocks of 16 + 8 ragged
    q = quantize_mx(x, 8, 16)
    for row_x, row_q in zip(x, q, strict=True):
        for start in (0, 16, 32):
            bx, bq = row_x[start : start + 16], row_q[start : start + 16]
            step = 2.0 ** (torch.floor(torch.log2(bx.abs().max())) - 6)
            codes = bq / step
            torch.testing.assert_close(codes, codes.round())  # on the block's grid
            assert codes.abs().max() <= 127
            assert (bq - bx).abs().max() <= step / 2 + 1e-12
    assert torch.equal(quantize_mx(torch.zeros(2, 16), 8, 16), torch.zeros(2, 16))
    spec = ActSpec(bits=8, granularity="mx", block_size=16)
    torch.testing.assert_close(quantize_activations(x, spec), q)


def test_quant_linear_forward_with_factors_and_activations() -> None:
    w, _ = _error_case()
    spec = QuantSpec(bits=3, group_size=16)
    qw = rtn(w, spec)
    lr = lqer(w, qw.dequantize(), 6).quantized(8)
    acts = ActSpec(bits=8)
    layer = QuantLinear.from_quantized(qw, torch.randn(48), lowrank=lr, act_spec=acts)
    x = torch.randn(7, 80)
    xq = quantize_per_token(x, 8)
    a, b = lr.factors()
    expected = xq @ qw.dequantize().T + layer.bias + (xq @ a) @ b
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # .half() keeps what is stored; only compute follows the input dtype.
    layer.half()
    assert layer.lr_a.dtype == torch.int8 and layer.lr_a_scale.dtype == torch.float16


def _recipe(rounder: str, *, rank: int | float, scale: str = "l2", **lqer_opts: object) -> Recipe:
    steps = [GPTQStep(act_order=False) if rounder == "gptq" else {"rtn": {}}]
    return Recipe(
        name=f"{rounder}-lqer",
        scheme=Scheme(weights=QuantSpec(bits=3, group_size=16)),
        steps=[*steps, LQERStep(rank=rank, scale=scale, **lqer_opts)],
    )


def _calib(n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rounder", ["rtn", "gptq"])
def test_rank_zero_is_the_plain_rounder(rounder: str) -> None:
    ids = _calib()
    plain = Recipe(
        scheme=Scheme(weights=QuantSpec(bits=3, group_size=16)),
        steps=[GPTQStep(act_order=False) if rounder == "gptq" else {"rtn": {}}],
    )
    a = cp.quantize(tiny_llama(), plain, tokenizer=object(), calibration=ids, progress=False)
    b = cp.quantize(
        tiny_llama(), _recipe(rounder, rank=0), tokenizer=object(), calibration=ids, progress=False
    )
    layers = [m for m in b.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.rank == 0 for m in layers)
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)


def test_lowrank_lowers_output_error_and_later_layers_see_it() -> None:
    ids = _calib()
    fp = tiny_llama()
    with torch.no_grad():
        ref = fp(ids).logits

    def err(recipe: Recipe) -> float:
        qm = cp.quantize(tiny_llama(), recipe, tokenizer=object(), calibration=ids, progress=False)
        with torch.no_grad():
            return (qm.model(ids).logits - ref).pow(2).mean().item()

    e0, e8, e32 = (err(_recipe("gptq", rank=k)) for k in (0, 8, 32))
    assert e32 < e8 < e0


def test_checkpoint_round_trip_with_factors_and_w4a8(tmp_path: Path) -> None:
    ids = _calib()
    recipe = _recipe("gptq", rank="25%", factor_bits=8).with_act_bits(8)
    qm = cp.quantize(tiny_llama(), recipe, tokenizer=object(), calibration=ids, progress=False)
    layers = [m for m in qm.model.modules() if isinstance(m, QuantLinear)]
    assert all(m.rank == resolve_rank("25%", m.out_features, m.in_features) for m in layers)
    assert {m.rank for m in layers} == {5, 8, 10}  # e.g. 0.25 * 64 * 96 / 160 = 9.6
    assert all(m.act_spec == ActSpec(bits=8) for m in layers)
    qm.tokenizer = None
    path = cp.save(qm, tmp_path / "ckpt")
    loaded = cp.load(path)
    with torch.no_grad():
        assert torch.equal(qm.model(ids).logits, loaded(ids).logits)
    reloaded = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert [m.rank for m in reloaded] == [m.rank for m in layers]
    assert all(m.factor_bits == 8 and m.act_spec is not None for m in reloaded)
    qc = read_quantization_config(path)["quantization_config"]
    assert qc["activations"]["bits"] == 8
    assert {r["factor_bits"] for r in qc["layers"].values()} == {8}


def test_bits_per_weight_counts_codes_scales_zeros_and_factors() -> None:
    ids = _calib()
    plain = cp.quantize(
        tiny_llama(), _recipe("rtn", rank=0), tokenizer=object(), calibration=ids, progress=False
    )
    ranked = cp.quantize(
        tiny_llama(), _recipe("rtn", rank=4), tokenizer=object(), calibration=ids, progress=False
    )
    shapes = [
        (m.out_features, m.in_features) for m in plain.model.modules() if isinstance(m, QuantLinear)
    ]
    weights = sum(o * i for o, i in shapes)
    # 3-bit codes; per (row, group of 16): an fp16 scale and a 3-bit zero point.
    expected = sum(o * i * 3 + o * -(-i // 16) * (16 + 3) for o, i in shapes) / weights
    assert bits_per_weight(plain.model) == pytest.approx(expected)
    factors = sum(4 * (o + i) * 16 for o, i in shapes) / weights
    assert ranked.quantization_config["bits_per_weight"] == pytest.approx(expected + factors)


def test_presets_and_overrides() -> None:
    for name in ("rtn-lqer", "rtn-l2qer", "gptq-l2qer"):
        rec = load_recipe(name)
        assert rec.correctors and rec.correctors[0].rank == 32
    rec = load_recipe("gptq-l2qer").with_rank(8).with_act_bits(8)
    assert rec.correctors[0].rank == 8 and rec.scheme.label() == "W4A8 g128"
    assert rec.with_act_bits(16).scheme.activations is None
    with pytest.raises(CompensatorError, match="--rank needs a recipe with a low-rank"):
        load_recipe("gptq").with_rank(8)
    with pytest.raises(CompensatorError, match="--rank"):
        load_recipe("gptq-l2qer").with_rank(1.5)
    with pytest.raises(ValueError, match="'lqer' appears more than once"):
        Recipe(steps=[{"rtn": {}}, {"lqer": {}}, {"lqer": {"rank": 4}}])
    with pytest.raises(ValueError, match="at most 1 corrector step, got lqer, lrc"):
        Recipe(steps=[{"rtn": {}}, {"lqer": {}}, {"lrc": {"rank": 4}}])
    with pytest.raises(ValueError, match=r"'rtn' \(rounder\) is listed after 'lqer'"):
        Recipe(steps=[{"lqer": {}}, {"rtn": {}}])
    assert Recipe(steps=[{"rtn": {}}, {"lqer": {"rank": "16"}}]).correctors[0].rank == 16
    for bad in (0.3, "abc", "0%", "120%", True, -1):
        with pytest.raises(ValueError, match="rank"):
            Recipe(steps=[{"rtn": {}}, {"lqer": {"rank": bad}}])
