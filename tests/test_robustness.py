"""Regressions found in review: per-block kwargs, tiny scales, dtype changes of QuantLinear."""

from __future__ import annotations

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from compensator.models.adapter import get_adapter
from compensator.nn import QuantLinear
from compensator.pipeline.storage import Storage
from compensator.pipeline.streams import (
    Stream,
    capture_block_inputs,
    capture_linear_inputs,
    run_block,
)
from compensator.quant import QuantSpec
from compensator.quant.grid import fit_group
from compensator.rounders import gptq, rtn


def _gemma3() -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    return Gemma3ForCausalLM(cfg).eval()


def test_each_block_gets_its_own_mask_and_rotary() -> None:
    """Sliding and full attention layers: replaying captured inputs reproduces the model."""
    model = _gemma3()
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    blocks = get_adapter(model).blocks(model)
    cpu = torch.device("cpu")
    hidden, kwargs = capture_block_inputs(
        model, blocks, ids, batch_size=2, device=cpu, storage=Storage(cpu)
    )
    seen: list[torch.Tensor] = []
    hook = blocks[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    after_0 = run_block(blocks[0], Stream(hidden, kwargs[0]), cpu, Storage(cpu))
    got = capture_linear_inputs(blocks[1], ["self_attn.o_proj"], after_0[0], kwargs[1][0], cpu)
    torch.testing.assert_close(got["self_attn.o_proj"], seen[0])


def test_tiny_ranges_do_not_underflow_to_nan() -> None:
    spec = QuantSpec(bits=4, group_size=8)
    w = torch.randn(3, 16) * 1e-7
    scale, _ = fit_group(w[:, :8], spec)
    assert (scale > 0).all()
    h = torch.eye(16)
    h[2, 2] = 0  # a dead input inside the tiny group
    q = gptq(w, h, spec)
    assert torch.isfinite(q.dequantize()).all()
    assert torch.isfinite(rtn(w, spec).dequantize()).all()


def test_dtype_change_keeps_scales_exact() -> None:
    spec = QuantSpec(bits=3, group_size=8)
    layer = QuantLinear.from_quantized(rtn(torch.randn(4, 16), spec))
    before = layer.dequantize_weight()
    layer(torch.randn(2, 16))  # fills the cache
    layer = layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.weight_cache is None
    torch.testing.assert_close(layer.dequantize_weight(), before, atol=0, rtol=0)
    assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
