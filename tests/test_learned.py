"""Block-wise learned quantization: LWC, LET, LSI/SDE, the trainer, and their recipes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import compensator as cp
from compensator.errors import CompensatorError
from compensator.learn.learners import LET, LWC, SingularValues
from compensator.learn.lwc import lwc_fake_quantize, lwc_params
from compensator.learn.svd import delta_matrix, svd_factors, svd_weight
from compensator.learn.trainer import TrainSettings, effective, fold, train_block
from compensator.models.loading import LoadedModel
from compensator.nn import QuantLinear
from compensator.pipeline.streams import block_output
from compensator.quant.grid import fake_quantize, fit_params
from compensator.quant.spec import QuantSpec
from compensator.recipes import load_recipe
from compensator.recipes.recipe import Recipe
from conftest import VOCAB, first_block, tiny_llama, tiny_qwen2

SPECS = [
    QuantSpec(bits=2, group_size=16),
    QuantSpec(bits=3, group_size=24),  # ragged last group on 40 columns
    QuantSpec(bits=4, group_size=None, symmetric=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_lwc_without_clipping_is_rtn(spec: QuantSpec) -> None:
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lwc_fake_quantize(w, spec, None, None), fake_quantize(w, spec))
    # sigmoid(30) rounds to exactly 1 in float32: full range kept, the RTN parameters.
    full = torch.full((12, spec.n_groups(40)), 30.0)
    ref = fit_params(w, spec)
    got = lwc_params(w, spec, full, full)
    assert torch.equal(got.scale, ref.scale) and torch.equal(got.zero, ref.zero)


def test_lwc_clipping_shrinks_the_range_and_has_gradients() -> None:
    spec = QuantSpec(bits=2, group_size=16)
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    gamma = torch.full((6, 2), 0.0, requires_grad=True)  # sigmoid(0) = half the range
    beta = torch.full((6, 2), 0.0, requires_grad=True)
    q = lwc_fake_quantize(w, spec, gamma, beta)
    assert q.abs().max() < w.abs().max()
    (q - w).pow(2).sum().backward()
    assert gamma.grad is not None and gamma.grad.abs().sum() > 0
    assert beta.grad is not None and beta.grad.abs().sum() > 0


def test_svd_fold_round_trip() -> None:
    w = torch.randn(20, 30, generator=torch.Generator().manual_seed(2))
    f = svd_factors(w)
    torch.testing.assert_close(f.u @ torch.diag(f.s) @ f.vh, w, atol=1e-5, rtol=1e-5)
    # Untrained: the weight itself, bit for bit.
    assert torch.equal(svd_weight(w, f, torch.zeros_like(f.s)), w)
    ds = torch.randn(20, generator=torch.Generator().manual_seed(3)) * 0.1
    k = torch.randn(4, 4, generator=torch.Generator().manual_seed(4)) * 0.1
    bands = [torch.randn(19, generator=torch.Generator().manual_seed(5 + i)) for i in range(2)]
    m = torch.diag(f.s + ds)
    m[:4, :4] += k
    m += torch.diag(bands[0], 1) + torch.diag(bands[1], -1)
    torch.testing.assert_close(svd_weight(w, f, ds, k, bands), f.u @ m @ f.vh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta_matrix(ds, k, bands), m - torch.diag(f.s))


def _block_setup(model: torch.nn.Module, spec: QuantSpec):
    return first_block(model, spec)


def _tiny_qwen2() -> torch.nn.Module:
    model = tiny_qwen2(hidden=64)
    for name, p in model.named_parameters():  # biases and norms away from their defaults
        if "bias" in name or "norm" in name:
            p.data = torch.rand(p.shape, generator=torch.Generator().manual_seed(9)) + 0.5
    return model


@pytest.mark.parametrize("make", [tiny_llama, _tiny_qwen2], ids=["llama-gqa", "qwen2-bias"])
def test_let_fold_leaves_fp_outputs_unchanged(make) -> None:
    model = make()
    block, _, ctx, data = _block_setup(model, QuantSpec(bits=4, group_size=16))
    let = LET(ctx, lr=1e-3, alpha=0.5)
    with torch.no_grad():  # trained-looking scales, not just the init
        for p in let.scales.values():
            p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    ref = copy.deepcopy(block)
    fold(block, [let])
    assert not torch.equal(block.input_layernorm.weight, ref.input_layernorm.weight)
    for h, kw in zip(data.hidden, data.kwargs, strict=True):
        with torch.no_grad():
            got, want = block_output(block(h, **kw)), block_output(ref(h, **kw))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _train(learners, block, linears, data, spec, epochs=3, act=None):
    return train_block(data, learners, spec, act, TrainSettings(epochs=epochs))


def test_a_few_steps_lower_the_block_loss() -> None:
    spec = QuantSpec(bits=3, group_size=16)
    block, linears, ctx, data = _block_setup(tiny_llama(), spec)
    learners = [
        SingularValues(ctx, 1e-3, k=4, band=1, penalty=0.0),
        LET(ctx, 5e-3, 0.5),
        LWC(ctx, 1e-2, 4.0),
    ]
    before = {n: p.clone() for n, p in block.named_parameters()}
    result = _train(learners, block, linears, data, spec, epochs=5)
    assert result.final_loss < result.initial_loss * 0.99
    # Training leaves the block's own weights alone; only fold writes them.
    assert all(torch.equal(p, before[n]) for n, p in block.named_parameters())


def test_training_with_quantized_activations_lowers_the_loss() -> None:
    from compensator.quant.act import ActSpec

    spec = QuantSpec(bits=4, group_size=16)
    block, linears, ctx, data = _block_setup(tiny_llama(), spec)
    result = _train(
        [LET(ctx, 5e-3, 0.5), LWC(ctx, 1e-2, 4.0)], block, linears, data, spec, act=ActSpec(bits=4)
    )
    assert result.final_loss < result.initial_loss


def test_sde_with_k_zero_equals_lsi() -> None:
    spec = QuantSpec(bits=2, group_size=16)
    outs = []
    for k in (None, 0):
        block, linears, ctx, data = _block_setup(tiny_llama(), spec)
        torch.manual_seed(0)
        if k is None:
            learner = load_recipe_step("lsi").build(ctx)
        else:
            learner = load_recipe_step("sde", k=0).build(ctx)
        _train([learner], block, linears, data, spec, epochs=2)
        outs.append(fold(block, [learner]))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][n], outs[1][n]) for n in outs[0])
    assert not torch.equal(
        outs[0]["mlp.up_proj.weight"], tiny_llama().model.layers[0].mlp.up_proj.weight
    )


def load_recipe_step(name: str, **options):
    from compensator.steps import STEPS

    return STEPS[name].model_validate(options)


def _calib(n: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, 32), generator=torch.Generator().manual_seed(2))


def _quantize(recipe, **kw):
    return cp.quantize(
        LoadedModel(tiny_llama(), None, "tiny"),
        recipe,
        calibration=_calib(),
        group_size=16,
        progress=False,
        **kw,
    )


def _codes(qm) -> dict[str, torch.Tensor]:
    return {n: m.qweight.clone() for n, m in qm.model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("rounder", ["rtn", "gptq", "gptaq"])
@pytest.mark.parametrize("learner", ["lsi", "sde"])
def test_zero_epochs_reproduces_the_base_rounder(rounder: str, learner: str) -> None:
    step = {"gptq": {"asymmetric": True}} if rounder == "gptaq" else {rounder: {}}
    base = Recipe(steps=[step], scheme={"weights": {"bits": 3}})
    learned = Recipe(
        steps=[{learner: {}}, {"train": {"epochs": 0}}, step],
        scheme={"weights": {"bits": 3}},
    )
    # Learned recipes store calibration batches of train.batch_size windows (one optimizer
    # step each); the base run gets the same batching, so its sums add up in the same order.
    a = _codes(_quantize(base, batch_size=learned.trainer.batch_size))
    b = _codes(_quantize(learned))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_lwc_keeping_the_full_range_at_zero_epochs_is_rtn() -> None:
    base = Recipe(steps=[{"rtn": {}}], scheme={"weights": {"bits": 2}})
    learned = Recipe(
        steps=[{"lwc": {"init": 30.0}}, {"train": {"epochs": 0}}, {"rtn": {}}],
        scheme={"weights": {"bits": 2}},
    )
    a, b = _codes(_quantize(base)), _codes(_quantize(learned))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_learned_quantization_is_what_was_trained() -> None:
    """The folded + rounded block's dequantized weights equal the trainer's fake-quantized
    ones: training and the checkpoint see the same model."""
    spec = QuantSpec(bits=2, group_size=16)
    block, linears, ctx, data = _block_setup(tiny_llama(), spec)
    learners = [
        SingularValues(ctx, 1e-3, k=2, band=0, penalty=0.0),
        LET(ctx, 5e-3, 0.5),
        LWC(ctx, 1e-2, 4.0),
    ]
    _train(learners, block, linears, data, spec, epochs=2)
    with torch.no_grad():
        trained = effective(
            learners, {n: p.detach() for n, p in block.named_parameters()}, linears, spec
        )
    from compensator.learn.learners import final_params
    from compensator.rounders.rtn import rtn

    folded = fold(block, learners)
    params = final_params(learners, folded, linears, spec)
    for name in linears:
        q = rtn(block.get_submodule(name).weight.data, spec, params=params[name])
        torch.testing.assert_close(q.dequantize(), trained[f"{name}.weight"], atol=0, rtol=0)


@pytest.mark.parametrize("preset", ["omniquant", "sde-cll"])
def test_learned_checkpoint_round_trip(preset: str, tmp_path: Path) -> None:
    qm = _quantize(preset, epochs=1)
    assert len(qm.report["train"]) == 2
    out = cp.save(qm, tmp_path / preset)
    loaded = cp.load(out)
    ids = _calib(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, qm.model(ids).logits, atol=0, rtol=0)


def test_cross_layer_changes_what_is_learned() -> None:
    a = _codes(_quantize("sde", epochs=2))
    b = _codes(_quantize("sde-cll", epochs=2))
    assert any(not torch.equal(a[n], b[n]) for n in a)
    # The last block has no next block: its cross-layer term is off, so it learns the same
    # only if block 0 quantized identically; at least block 0 must differ.
    assert any(not torch.equal(a[n], b[n]) for n in a if ".layers.0." in n)


def test_learned_recipe_validation() -> None:
    with pytest.raises(ValueError, match="let and gptq do not compose: let rescales what"):
        Recipe(steps=[{"let": {}}, {"lwc": {}}, {"gptq": {"asymmetric": True}}])
    Recipe(steps=[{"sde": {}}, {"lwc": {}}, {"gptq": {"asymmetric": True}}])  # inputs unmoved
    with pytest.raises(ValueError, match="lsi and sde are both the weights learner"):
        Recipe(steps=[{"lsi": {}}, {"sde": {}}, {"rtn": {}}])
    with pytest.raises(ValueError, match="train needs a learned step"):
        Recipe(steps=[{"train": {}}, {"rtn": {}}])
    with pytest.raises(ValueError, match=r"'sde' \(learner\) is listed after 'lwc'"):
        Recipe(steps=[{"lwc": {}}, {"sde": {}}, {"rtn": {}}])
    with pytest.raises(CompensatorError, match="--epochs needs a recipe with a learned step"):
        load_recipe("gptq").with_epochs(3)
    r = load_recipe("sde").with_epochs(3)
    assert r.trainer.epochs == 3 and r.trainer.batch_size == 1
    assert Recipe(steps=[{"lwc": {}}, {"rtn": {}}]).with_epochs(1).trainer.epochs == 1


def test_let_refuses_models_without_a_layout() -> None:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    model = OPTForCausalLM(cfg).eval()
    with pytest.raises(CompensatorError, match="let needs a declared block layout"):
        cp.quantize(
            LoadedModel(model, None, "opt"),
            "omniquant",
            calibration=_calib(),
            progress=False,
            epochs=0,
        )


def test_clip_search_init_beats_or_matches_every_uniform_shrink() -> None:
    from compensator.learn.lwc import search_clip_logits

    spec = QuantSpec(bits=2, group_size=16)
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(3))
    logits = search_clip_logits(w, spec)
    err = (lwc_fake_quantize(w, spec, logits, logits) - w).abs().pow(2.4).sum()
    for p in (0.999, 0.9, 0.7, 0.5):
        z = torch.full_like(logits, torch.logit(torch.tensor(p)).item())
        assert err <= (lwc_fake_quantize(w, spec, z, z) - w).abs().pow(2.4).sum() + 1e-6
    assert (torch.sigmoid(logits) < 0.99).any()  # 2 bits: clipping pays


def test_sde_penalty_matches_its_formula() -> None:
    spec = QuantSpec(bits=2, group_size=16)
    _, _, ctx, _ = _block_setup(tiny_llama(), spec)
    sde = SingularValues(ctx, 1e-3, k=2, band=1, penalty=0.5)
    with torch.no_grad():
        for p in sde.parameters():
            p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    want = 0.0
    for name, f in sde.factors.items():  # brute force: the dense M - M0
        key = name.replace(".", "__")
        dm = delta_matrix(sde.ds[key], sde.block[key], sde._bands(key))
        want += float(dm.detach().pow(2).sum() / f.s.pow(2).sum())
    assert float(sde.penalty().detach()) == pytest.approx(0.5 * want, rel=1e-5)


def test_learned_training_is_deterministic_for_a_seed() -> None:
    # Same seed, threads and machine: the same bits (every draw has its own generator; the
    # global RNG is touched neither by us nor needed). Another training seed: other codes.
    a = _quantize("sde-cll", epochs=2)
    b = _quantize("sde-cll", epochs=2)
    for name, t in a.model.state_dict().items():
        assert torch.equal(t, b.model.state_dict()[name]), name
    torch.manual_seed(1234)  # the global RNG plays no part
    c = _quantize("sde-cll", epochs=2)
    assert all(torch.equal(x, c.model.state_dict()[n]) for n, x in a.model.state_dict().items())
    reseeded = load_recipe("sde-cll")
    steps = [s.model_copy(update={"seed": 1}) if s.name == "train" else s for s in reseeded.steps]
    d = _quantize(reseeded.with_steps(steps), epochs=2)
    assert any(not torch.equal(x, d.model.state_dict()[n]) for n, x in a.model.state_dict().items())
