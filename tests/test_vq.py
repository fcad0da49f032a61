"""Vector quantization: k-means, the VQ rounder, SSVQ's signs and freezing, VQLinear."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import compensator as cp
from compensator.errors import CompensatorError
from compensator.learn.ssvq import SSVQ, cosine_threshold, sign_ste
from compensator.learn.trainer import TrainSettings, train_block
from compensator.models.loading import LoadedModel
from compensator.nn.vq_linear import VQLinear
from compensator.quant.spec import QuantSpec
from compensator.quant.vq import VQSpec, vq_quantize, vq_storage_bits, weighted_kmeans
from compensator.recipes.recipe import Recipe, load_recipe
from conftest import VOCAB, first_block, tiny_llama

CPU = torch.device("cpu")


def test_kmeans_objective_never_rises() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 200, 3, generator=g) * torch.tensor([1.0, 3.0, 0.5])
    wts = torch.rand(6, 3, generator=g) + 0.1
    _, assign, history = weighted_kmeans(x, wts, 16, 30, torch.Generator().manual_seed(1))
    assert len(history) > 2
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(history))
    # The returned assignment is each sub-vector's nearest codeword (brute force).
    cb, assign, _ = weighted_kmeans(x, wts, 16, 5, torch.Generator().manual_seed(1))
    d = ((x[:, :, None, :] - cb[None, None]) ** 2 * wts[:, None, None, :]).sum(-1)
    torch.testing.assert_close(d.gather(-1, assign[..., None]), d.min(-1, keepdim=True).values)


def test_weighted_kmeans_favours_heavy_columns() -> None:
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    spec = VQSpec(dim=4, bits=4)
    heavy = torch.ones(32)
    heavy[:4] = 100.0
    err_plain = (vq_quantize(w, spec).dequantize() - w)[:, :4].pow(2).mean()
    err_weighted = (vq_quantize(w, spec, heavy).dequantize() - w)[:, :4].pow(2).mean()
    assert err_weighted < err_plain


def test_vq_with_as_many_codewords_as_vectors_is_exact_up_to_fp16() -> None:
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    q = vq_quantize(w, VQSpec(dim=2, bits=4)).dequantize()  # 16 sub-vectors, 16 codewords
    torch.testing.assert_close(q, w, atol=2e-3, rtol=2e-3)


def test_sign_split_vq_keeps_every_sign() -> None:
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    vw = vq_quantize(w, VQSpec(dim=4, bits=3, signs=True))
    q = vw.dequantize()
    assert vw.codebook.min() >= 0
    assert torch.equal(q < 0, (w < 0) & (q != 0))


def test_storage_bits() -> None:
    spec = VQSpec(dim=8, bits=8, signs=True)
    bits = vq_storage_bits(576, 576, spec)
    assert bits == 576 * 72 * 8 + 576 * 576 + 256 * 8 * 16 + 576 * 16
    assert 2.0 < bits / 576**2 < 2.15


def _ctx(spec: VQSpec):
    return first_block(tiny_llama(), QuantSpec(), spec)


def _train(block, learner, linears, data, epochs: int):
    settings = TrainSettings(epochs=epochs)
    return train_block(data, [learner], QuantSpec(), None, settings)


def _ssvq(ctx, **kw) -> SSVQ:
    opts = {
        "lr": 1e-3,
        "sign_lr": 1e-2,
        "alpha": 1.0,
        "ema": 0.9,
        "threshold_start": 1.0,
        "threshold_end": 0.05,
        **kw,
    }
    return SSVQ(ctx, **opts)


def test_ssvq_with_all_signs_frozen_and_no_steps_is_sign_split_vq() -> None:
    spec = VQSpec(dim=4, bits=4, signs=True)
    block, linears, ctx, data = _ctx(spec)
    learner = _ssvq(ctx)
    weights = {n: block.get_submodule(n).weight.data for n in linears}
    learner.freeze_all({n: torch.where(w < 0, -1.0, 1.0) for n, w in weights.items()})
    for n, w in weights.items():
        ref = vq_quantize(w, spec, ctx.act_sq[n])
        got = learner.fixed(n, w, QuantSpec())
        assert torch.equal(got.indices, ref.indices) and torch.equal(got.signs, ref.signs)
        torch.testing.assert_close(got.dequantize(), ref.dequantize(), atol=0, rtol=0)
        torch.testing.assert_close(learner.quantized(n), ref.dequantize(), atol=0, rtol=0)
    # Frozen signs never move, whatever the training does.
    _train(block, learner, linears, data, 2)
    for n, w in weights.items():
        assert torch.equal(learner.fixed(n, w, QuantSpec()).signs, w < 0)


def test_sign_ste_gradient_is_scaled_by_the_magnitude() -> None:
    latent = torch.tensor([0.3, -0.2, 0.0], requires_grad=True)
    mag = torch.tensor([2.0, 3.0, 4.0])
    (mag * sign_ste(latent)).sum().backward()
    assert torch.equal(sign_ste(latent.detach()), torch.tensor([1.0, -1.0, 1.0]))
    assert torch.equal(latent.grad, mag)


def test_freezing_is_monotone_and_threshold_decays() -> None:
    taus = [cosine_threshold(t, 100, 1.0, 0.1) for t in range(101)]
    assert taus[0] == 1.0 and abs(taus[-1] - 0.1) < 1e-12
    assert all(b <= a for a, b in itertools.pairwise(taus))
    spec = VQSpec(dim=4, bits=4, signs=True)
    block, linears, ctx, data = _ctx(spec)
    learner = _ssvq(ctx, sign_lr=5e-2, threshold_end=0.0)
    seen = []
    frozen_before = {k: learner._buf("frozen", k).clone() for k in learner.latent}

    def after(step: int, total: int, orig=learner.after_step) -> None:
        orig(step, total)
        seen.append(learner.frozen_fraction())
        for k in learner.latent:
            assert (learner._buf("frozen", k) >= frozen_before[k]).all()
            frozen_before[k] = learner._buf("frozen", k).clone()

    learner.after_step = after
    _train(block, learner, linears, data, 6)
    assert seen == sorted(seen) and seen[-1] > 0


def test_ssvq_training_lowers_the_block_loss() -> None:
    spec = VQSpec(dim=4, bits=4, signs=True)
    block, linears, ctx, data = _ctx(spec)
    res = _train(block, _ssvq(ctx), linears, data, 4)
    assert res.final_loss < res.initial_loss


def _calib(n: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, 32), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("preset", ["vq-2bit", "ssvq-2bit"])
def test_vq_checkpoint_round_trip(preset: str, tmp_path: Path) -> None:
    qm = cp.quantize(
        LoadedModel(tiny_llama(), None, "tiny"),
        preset,
        calibration=_calib(),
        progress=False,
        **({"epochs": 1} if preset.startswith("ss") else {}),
    )
    layers = [m for m in qm.model.modules() if isinstance(m, VQLinear)]
    assert len(layers) == 14
    spec = layers[0].spec
    expected = sum(vq_storage_bits(m.out_features, m.in_features, spec) for m in layers)
    weights = sum(m.out_features * m.in_features for m in layers)
    assert qm.quantization_config["bits_per_weight"] == pytest.approx(expected / weights)
    records = qm.quantization_config["layers"]
    assert {r["format"] for r in records.values()} == {"vq"}
    assert qm.quantization_config["weights"] is None  # the uniform scheme is not used
    out = cp.save(qm, tmp_path / preset)
    loaded = cp.load(out)
    assert sum(isinstance(m, VQLinear) for m in loaded.modules()) == 14
    ids = _calib(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, qm.model(ids).logits, atol=0, rtol=0)


def test_vq_recipe_validation() -> None:
    with pytest.raises(ValueError, match="ssvq needs a rounder whose layers are vector-quantized"):
        Recipe(steps=[{"ssvq": {}}, {"rtn": {}}])
    with pytest.raises(ValueError, match="ssvq needs a vq rounder with signs: true"):
        Recipe(steps=[{"ssvq": {}}, {"vq": {}}])
    with pytest.raises(ValueError, match="let needs a rounder whose layers are uniform"):
        Recipe(steps=[{"let": {}}, {"vq": {}}])
    with pytest.raises(ValueError, match=r"lqer needs a rounder whose layers are uniform.*gptq"):
        Recipe(steps=[{"vq": {}}, {"lqer": {}}])
    with pytest.raises(CompensatorError, match="--bits mean nothing for vq-2bit"):
        load_recipe("vq-2bit").with_weights(bits=3)
    with pytest.raises(CompensatorError, match="does not divide the input width"):
        cp.quantize(
            LoadedModel(tiny_llama(), None, "tiny"),
            Recipe(steps=[{"vq": {"dim": 5}}]),
            calibration=_calib(),
            progress=False,
        )
