"""``quantize --dtype``: blocks and streams in bfloat16/float16, statistics and rounding in
float32 (issue 17, item 5: the pipeline's half-precision streams, run here on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import compensator as cp
from compensator import api
from compensator.cli import main
from compensator.errors import CompensatorError
from compensator.models.dtypes import load_dtype, parse_dtype
from compensator.nn.quant_linear import QuantLinear
from compensator.pipeline.stats import StatsAccumulator
from conftest import VOCAB, model_dir_like

CALIB = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(3))
EVAL = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def bf16_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved in bfloat16 (its config says so), 64 wide, 2 blocks."""
    where = model_dir_like(tiny_dir, tmp_path_factory.mktemp("bf16") / "model", seed=11)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(where, dtype=torch.bfloat16).save_pretrained(where)
    return where


def test_dtype_names_and_auto(bf16_dir: Path, tmp_path: Path) -> None:
    assert parse_dtype("bfloat16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    assert parse_dtype("auto") is None
    with pytest.raises(CompensatorError, match="'float64' is not supported: use float32, "):
        parse_dtype(torch.float64)
    assert json.loads((bf16_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_dtype("auto", bf16_dir) is torch.bfloat16
    assert load_dtype(None, bf16_dir) is torch.float32  # files load in float32 unless asked
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))  # older key
    assert load_dtype("auto", tmp_path) is torch.float16
    assert load_dtype("auto", "smollm2-135m") is torch.float32  # a GGUF is dequantized


def test_statistics_of_a_bfloat16_stream_are_float32() -> None:
    x = torch.randn(2, 40, 24).bfloat16()
    acc = StatsAccumulator({"hessian"}, 24, torch.device("cpu"))
    acc.update(x, None)
    h = acc.finalize().hessian
    assert h is not None and h.dtype == torch.float32
    ref = x.reshape(-1, 24).double()
    torch.testing.assert_close(h.double(), ref.T @ ref / 80, rtol=1e-6, atol=1e-7)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=EVAL).logits.float()


def _kl(fp: torch.Tensor, q: torch.Tensor) -> float:
    p = torch.log_softmax(fp, -1)
    return float((p.exp() * (p - torch.log_softmax(q, -1))).sum(-1).mean())


def test_gptq_in_bfloat16(bf16_dir: Path, tmp_path: Path) -> None:
    calib = str(bf16_dir / "calib.txt")  # word text: structured inputs, unlike random ids
    common = dict(bits=2, group_size=16, calibration=calib, calib_windows=16, seqlen=32,
                  progress=False, batch_size=4)  # fmt: skip
    half = api.quantize(str(bf16_dir), "gptq", dtype="auto", lazy=False, **common)
    full = api.quantize(str(bf16_dir), "gptq", **common)
    rtn = api.quantize(str(bf16_dir), "rtn", dtype="bfloat16", **common)
    assert half.model.model.embed_tokens.weight.dtype == torch.bfloat16
    layers = {n: m for n, m in half.model.named_modules() if isinstance(m, QuantLinear)}
    other = dict(full.model.named_modules())
    assert len(layers) == 14  # scales are stored as the scheme says, not in the model's dtype
    assert all(m.scales.dtype == other[n].scales.dtype == torch.float16 for n, m in layers.items())
    # Same rounding maths on statistics of bfloat16 activations: q/k/v of the first block,
    # which read the same embeddings in both runs, get nearly the same codes.
    for n in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{n}"
        agree = layers[name].quantized_weight().codes == other[name].quantized_weight().codes
        assert float(agree.float().mean()) > 0.97, name
    # Against the model as saved (bfloat16): GPTQ in bfloat16 as close as in float32, and
    # closer than RTN.
    from transformers import AutoModelForCausalLM

    fp = _logits(AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32))
    kl_half, kl_rtn = _kl(fp, _logits(half.model)), _kl(fp, _logits(rtn.model))
    kl_full = _kl(fp, _logits(full.model))  # measured: 0.00158 / 0.00166 / RTN 0.00204
    assert kl_half < 0.85 * kl_rtn and kl_half < 1.2 * kl_full, (kl_half, kl_full, kl_rtn)
    # Read block by block (a resumable run) in bfloat16: the same model, saved and loaded.
    lazy = api.quantize(str(bf16_dir), "gptq", dtype="bfloat16", resume=tmp_path / "p", **common)
    run = json.loads((tmp_path / "p" / "run.json").read_text())
    assert run["fingerprint"]["dtype"] == "bfloat16"  # a float32 run is another run
    cp.save(lazy, tmp_path / "q")
    back = cp.load(tmp_path / "q")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(_logits(back), _logits(half.model))


def test_an_in_memory_model_is_cast_only_when_asked(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    kw = dict(tokenizer=tok, bits=4, group_size=16, calibration=CALIB, progress=False)
    assert api.quantize(model, "rtn", **kw).model.lm_head.weight.dtype == torch.float32
    cast = api.quantize(model, "rtn", dtype=torch.float16, **kw)
    assert cast.model.lm_head.weight.dtype == torch.float16
    assert model.lm_head.weight.dtype == torch.float32  # the caller's model is a copy's source


def test_learned_recipes_are_refused_in_half_precision(bf16_dir: Path) -> None:
    with pytest.raises(CompensatorError, match=r"trains \(.*float32 only.*--dtype float32"):
        api.quantize(str(bf16_dir), "omniquant", dtype="auto", calibration=CALIB, progress=False)


def test_cli_dtype(bf16_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "q"
    args = ["quantize", str(bf16_dir), "--recipe", "rtn", "--group-size", "16", "--out", str(out)]
    done = runner.invoke(main, [*args, "--dtype", "bfloat16", "--no-progress"])
    assert done.exit_code == 0, done.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["dtype"] == (
        "bfloat16"
    )
    bad = runner.invoke(main, [*args, "--dtype", "float64"])
    assert bad.exit_code == 2 and "float64" in bad.output
    half = runner.invoke(main, ["plan", str(bf16_dir), "--dtype", "auto", "--json"])
    full = runner.invoke(main, ["plan", str(bf16_dir), "--json"])
    assert half.exit_code == 0 and full.exit_code == 0, half.output + full.output
    ph, pf = json.loads(half.output), json.loads(full.output)
    assert ph["dtype"] == "bfloat16" and pf["dtype"] == "float32"
    streams = "calibration streams"
    assert ph["cpu"]["parts"][streams] * 2 == pf["cpu"]["parts"][streams]
