"""Hadamard constructions, the QuaRot rotation of whole models, and 4-bit activations."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import compensator as cp
from compensator.errors import CompensatorError
from compensator.linalg import kron_apply
from compensator.models.adapter import get_adapter
from compensator.models.loading import LoadedModel
from compensator.nn import QuantLinear
from compensator.nn.rotated import RotatedLinear
from compensator.quant.act import ActSpec, quantize_activations, quantize_per_token
from compensator.recipes import load_recipe
from compensator.steps.rotate import RotateStep
from compensator.transforms.hadamard import hadamard_factors, random_orthogonal, random_rotation
from compensator.transforms.rotation import rotate_model
from conftest import VOCAB, tiny_llama, tiny_qwen2


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 44, 64, 96, 144, 576, 1536, 768])
def test_hadamard_factors_are_orthonormal_hadamard(n: int) -> None:
    factors = hadamard_factors(n)
    assert factors is not None
    h = torch.kron(factors[0].double(), factors[1].double())
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)
    # A Hadamard matrix: every entry is +-1/sqrt(n).
    torch.testing.assert_close(h.abs(), torch.full_like(h, n**-0.5), atol=1e-6, rtol=0)


def test_no_hadamard_falls_back_to_random_orthogonal() -> None:
    assert hadamard_factors(100) is None  # 100 = 4 * 25: none of our constructions
    q = random_rotation(100, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(q @ q.T, torch.eye(100, dtype=torch.float64), atol=1e-5, rtol=0)
    r = random_orthogonal(30, torch.Generator().manual_seed(1)).double()
    torch.testing.assert_close(r.T @ r, torch.eye(30, dtype=torch.float64), atol=1e-5, rtol=0)


def test_kron_apply_equals_dense_product() -> None:
    left, right = hadamard_factors(576)
    x = torch.randn(3, 5, 576, dtype=torch.float64)
    dense = torch.kron(left.double(), right.double())
    torch.testing.assert_close(kron_apply(x, left.double(), right.double()), x @ dense)


def _randomize_norms(model: torch.nn.Module) -> None:
    # Fresh models have unit norm scales, which would not test the folding.
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = torch.rand(p.shape, generator=g) + 0.5


def _llama_without_hadamards() -> torch.nn.Module:
    # Widths 100, 50 (head) and 150 (MLP) have no Hadamard construction: random orthogonal
    # residual and head rotations, and a dense online rotation before down_proj.
    return tiny_llama(
        hidden=100, intermediate_size=150, num_attention_heads=2, num_key_value_heads=1
    )


@pytest.mark.parametrize(
    "make,heads,online",
    [
        (lambda: tiny_llama(hidden=96), True, True),
        (lambda: tiny_llama(hidden=96), False, False),
        (_llama_without_hadamards, True, True),
        (tiny_qwen2, True, True),  # q/k/v biases
    ],
)
def test_rotation_leaves_fp_logits_unchanged(make, heads: bool, online: bool) -> None:
    model = make()
    _randomize_norms(model)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        rotated = copy.deepcopy(model)
        adapter = get_adapter(rotated)
        rotate_model(
            rotated, adapter.blocks(rotated), adapter.arch.rotation,
            heads=heads, online_down=online, online_o=online,
        )  # fmt: skip
        out = rotated(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    # The residual stream really is rotated, and the shared embedding/head were untied.
    assert not torch.allclose(
        rotated.get_input_embeddings().weight, model.get_input_embeddings().weight
    )
    assert rotated.lm_head.weight is not rotated.get_input_embeddings().weight
    assert rotated.config.tie_word_embeddings is False
    down = rotated.model.layers[0].mlp.down_proj
    assert isinstance(down, RotatedLinear) == online
    assert isinstance(rotated.model.layers[0].self_attn.o_proj, RotatedLinear) == online


def test_rotation_spreads_outlier_features() -> None:
    model = tiny_llama(hidden=96)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 7] *= 50  # one outlier feature in the stream
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))

    def max_over_rms(m: torch.nn.Module) -> float:
        h = m.get_input_embeddings()(ids)
        return (h.abs().amax(-1) / h.pow(2).mean(-1).sqrt()).mean().item()

    before = max_over_rms(model)
    RotateStep().transform_model(model, get_adapter(model))
    assert max_over_rms(model) < 0.5 * before


def test_rotation_refuses_unsupported_and_twice() -> None:
    model = tiny_llama(hidden=96)
    RotateStep().transform_model(model, get_adapter(model))
    with pytest.raises(CompensatorError, match=r"not a plain nn\.Linear"):
        RotateStep().transform_model(model, get_adapter(model))
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            word_embed_proj_dim=32,
        )
    )
    with pytest.raises(CompensatorError, match="no layout for 'opt'"):
        RotateStep().transform_model(opt, get_adapter(opt))


def test_asymmetric_per_token_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 33, generator=g) * 3 + 1
    out = quantize_per_token(x, 4, symmetric=False, clip_ratio=0.9)
    for row, q in zip(x, out, strict=True):
        hi, lo = max(row.max().item(), 0) * 0.9, min(row.min().item(), 0) * 0.9
        scale = (hi - lo) / 15
        zero = round(-lo / scale)
        want = [(min(max(round(v / scale) + zero, 0), 15) - zero) * scale for v in row.tolist()]
        torch.testing.assert_close(q, torch.tensor(want), atol=1e-5, rtol=0)
        assert len(set(q.tolist())) <= 16


def test_symmetric_clip_ratio_clips_the_extremes() -> None:
    x = torch.tensor([[-10.0, -1.0, 0.5, 3.0, 10.0]])
    full = quantize_per_token(x, 4)
    clipped = quantize_activations(x, ActSpec(bits=4, clip_ratio=0.5))
    assert full[0, -1].item() == pytest.approx(10.0)
    assert clipped[0, -1].item() == pytest.approx(5.0)  # 7 steps of 5/7
    assert ActSpec(bits=4, clip_ratio=0.9).label() == "A4-clip0.9"
    assert ActSpec(bits=4, symmetric=False).label() == "A4-asym"


def _calib(n: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, 32), generator=torch.Generator().manual_seed(2))


LRC_VARIANTS = {"asym-lrc": {"asymmetric": True}, "split-lrc": {"split": True}}


@pytest.mark.parametrize(
    "preset", ["quarot-rtn", "quarot-gptq", "quarot-gptq-lrc", "asym-lrc", "split-lrc"]
)
def test_quarot_checkpoint_round_trip(preset: str, tmp_path: Path) -> None:
    model = tiny_llama(hidden=96)
    _randomize_norms(model)
    recipe = load_recipe("quarot-gptq-lrc" if preset in LRC_VARIANTS else preset)
    if preset in LRC_VARIANTS:  # asym: aimed at the FP output (keeps an FP stream); split input
        update = LRC_VARIANTS[preset]
        steps = [*recipe.steps[:-1], recipe.steps[-1].model_copy(update=update)]
        recipe = recipe.model_copy(update={"steps": steps})
    qm = cp.quantize(
        LoadedModel(model, None, "tiny"),
        recipe,
        calibration=_calib(),
        group_size=32,
        progress=False,
    )
    down = qm.model.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantLinear) and hasattr(down, "rot_left")
    assert down.act_spec is not None and down.act_spec.bits == 4
    assert (down.rank > 0) == preset.endswith("lrc")
    out = cp.save(qm, tmp_path / preset)
    loaded = cp.load(out)
    ids = _calib(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, qm.model(ids).logits, atol=0, rtol=0)
    assert loaded.lm_head.weight is not loaded.get_input_embeddings().weight
    if preset.endswith("lrc"):
        q_proj = loaded.model.layers[0].self_attn.q_proj
        assert q_proj.lowrank_raw and q_proj.lowrank_split == (preset == "split-lrc")
        record = qm.quantization_config["layers"]["model.layers.0.self_attn.q_proj"]
        assert record["lowrank_input"] == ("split" if q_proj.lowrank_split else "raw")
        assert record["rank"] == q_proj.rank and record["rotation"] is None
        assert qm.quantization_config["format_version"] == 3
        # A checkpoint of the format before per-layer records (one spec and one lowrank_input
        # for the model, rank read off the factors) still loads to the same model.
        config = json.loads((out / "config.json").read_text())
        qc = config["quantization_config"]
        qc["lowrank_input"] = record["lowrank_input"]
        qc["format_version"] = 2
        del qc["layers"]
        (out / "config.json").write_text(json.dumps(config))
        (out / "manifest.json").unlink()  # format 2 wrote none
        with torch.no_grad():
            legacy = cp.load(out)(ids).logits
        torch.testing.assert_close(legacy, qm.model(ids).logits, atol=0, rtol=0)


def test_rotation_barely_changes_a_fine_quantization() -> None:
    # W8A8 with and without rotation are both near FP: the transform itself is harmless.
    model = tiny_llama(hidden=96)
    _randomize_norms(model)
    ids = _calib(4)
    with torch.no_grad():
        fp = model(ids).logits.log_softmax(-1)
    recipe = load_recipe("quarot-rtn").with_weights(bits=8, group_size=32).with_act_bits(8)
    qm = cp.quantize(LoadedModel(model, None, "tiny"), recipe, progress=False)
    with torch.no_grad():
        q = qm.model(ids).logits.log_softmax(-1)
    kl = torch.nn.functional.kl_div(q, fp, log_target=True, reduction="batchmean").item()
    assert kl < 1e-2


def test_lrc_needs_a_plain_rounder() -> None:
    from compensator.recipes import Recipe

    with pytest.raises(
        ValueError,
        match=r"lrc needs a uniform-grid rounder that needs only a Hessian.*gptq, hqq, rtn\)",
    ):
        Recipe.model_validate({"steps": [{"gptq": {"asymmetric": True}}, {"lrc": {}}]})
    with pytest.raises(ValueError, match="lwc and lrc do not compose"):
        Recipe.model_validate({"steps": [{"lwc": {}}, {"gptq": {}}, {"lrc": {}}]})
