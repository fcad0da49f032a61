"""Mixture-of-experts on tiny random Qwen3-MoE and Mixtral models (issue 17)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerFast

import compensator as cp
from compensator.errors import CompensatorError
from compensator.evaluate import evaluate
from compensator.models.adapter import get_adapter
from compensator.nn.experts import ExpertLinears, unfuse_experts
from compensator.nn.layers import quantized_layers
from compensator.pipeline.coverage import check_block_quantized
from compensator.pipeline.passes import collect_stats, group_stats
from compensator.pipeline.storage import Storage
from compensator.pipeline.streams import Stream, capture_block_inputs

_COMMON = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "num_experts_per_tok": 2,
}
EXPERTS = 4


def qwen3_moe(top_k: int = 2) -> PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        **{**_COMMON, "num_experts_per_tok": top_k},
        intermediate_size=64,
        moe_intermediate_size=32,
        num_experts=EXPERTS,
        norm_topk_prob=True,
    )
    return transformers.Qwen3MoeForCausalLM(config).eval()


def mixtral(top_k: int = 2) -> PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        **{**_COMMON, "num_experts_per_tok": top_k},
        intermediate_size=32,
        num_local_experts=EXPERTS,
    )
    return transformers.MixtralForCausalLM(config).eval()


def deepseek_v3(top_k: int = 2) -> PreTrainedModel:
    """Latent attention, a dense first block, then routed and shared experts."""
    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        **{**_COMMON, "num_experts_per_tok": top_k, "num_hidden_layers": 3, "head_dim": 8,
           "num_key_value_heads": 2},
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=EXPERTS,
        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
    )  # fmt: skip
    return transformers.DeepseekV3ForCausalLM(config).eval()


FAMILIES: dict[str, Callable[..., PreTrainedModel]] = {"qwen3_moe": qwen3_moe, "mixtral": mixtral}


def _ids(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 120, (n, 32), generator=torch.Generator().manual_seed(seed))


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")


def _quantize(model: PreTrainedModel, recipe: str = "gptq", **kw: object) -> cp.QuantizedModel:
    return cp.quantize(
        model, recipe, tokenizer=_tokenizer(), calibration=_ids(), progress=False, device="cpu",
        **{"group_size": 16, **kw},
    )  # fmt: skip


def _never_route(model: PreTrainedModel, expert: int) -> None:
    """Make every router of ``model`` send nothing to ``expert`` (top-1 models only)."""
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            original = module.forward

            def forward(h: torch.Tensor, original: Callable = original) -> tuple:
                logits, scores, index = original(h)
                return logits, scores, torch.where(index == expert, (expert + 1) % EXPERTS, index)

            module.forward = forward


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unfused_experts_compute_the_same_logits(family: str) -> None:
    model = FAMILIES[family]()
    ids = _ids(2)
    with torch.no_grad():
        fused = model(ids).logits
        names = unfuse_experts(model)
        unfused = model(ids).logits
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(isinstance(model.get_submodule(n), ExpertLinears) for n in names)
    assert not [n for n, p in model.named_parameters() if p.ndim >= 3]
    torch.testing.assert_close(unfused, fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_expert_is_quantized_and_round_trips(family: str, tmp_path: Path) -> None:
    qm = _quantize(FAMILIES[family]())
    layers = dict(quantized_layers(qm.model))
    for b in range(2):
        for e in range(EXPERTS):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{b}.mlp.experts.{e}.{proj}" in layers
    assert len(layers) == 2 * (4 + 3 * EXPERTS)
    # Routers stay FP: not Linears, 2-D.
    assert isinstance(qm.model.get_submodule("model.layers.0.mlp.gate").weight, nn.Parameter)
    assert not [n for n, p in qm.model.named_parameters() if p.ndim >= 3]
    cp.save(qm, tmp_path / "q")
    loaded = cp.load(tmp_path / "q")
    ids = _ids(2, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, qm.model(ids).logits)


def _first_block(model: PreTrainedModel, ids: torch.Tensor) -> tuple[nn.Module, Stream]:
    """Block 0 of ``model`` (experts split) and its input stream."""
    unfuse_experts(model)
    blocks = get_adapter(model).blocks(model)
    cpu = torch.device("cpu")
    hidden, kwargs = capture_block_inputs(
        model, blocks, ids, batch_size=2, device=cpu, storage=Storage(cpu)
    )
    return blocks[0], Stream(hidden, kwargs[0])


def test_expert_statistics_are_over_exactly_its_routed_tokens() -> None:
    block, stream = _first_block(qwen3_moe(), _ids(4))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    moe = block.mlp
    hook = moe.register_forward_pre_hook(
        lambda m, a: seen.append((a[0].reshape(-1, 32), moe.gate(a[0].reshape(-1, 32))[2]))
    )
    names = [f"mlp.experts.{e}.gate_proj" for e in range(EXPERTS)]
    stats = collect_stats(
        block, names, stream, None, {"hessian"}, torch.device("cpu"),
        {"statistics": 0.0}, routed=set(names),
    )  # fmt: skip
    hook.remove()
    x = torch.cat([s[0] for s in seen])
    index = torch.cat([s[1] for s in seen])
    for e, name in enumerate(names):
        routed = x[(index == e).any(-1)]
        assert stats[name].tokens == routed.shape[0] > 0
        hessian = stats[name].hessian
        assert hessian is not None
        torch.testing.assert_close(hessian, routed.T @ routed / routed.shape[0])


@pytest.mark.parametrize("starved", ["all-tokens", "rtn"])
def test_expert_no_token_reaches_is_quantized_and_named(
    starved: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = qwen3_moe(top_k=1)
    _never_route(model, 3)
    with caplog.at_level(logging.WARNING):
        qm = _quantize(model, starved_experts=starved)
    warned = " ".join(r.getMessage() for r in caplog.records)
    for b in range(2):
        assert f"model.layers.{b}.mlp.experts.3.gate_proj (0)" in warned
        assert f"model.layers.{b}.mlp.experts.3.down_proj (0)" in warned
        # The experts that are reached have enough tokens: not named.
        assert f"model.layers.{b}.mlp.experts.0.gate_proj" not in warned
    layers = dict(quantized_layers(qm.model))
    assert all(
        f"model.layers.{b}.mlp.experts.3.{p}" in layers
        for b in range(2)
        for p in ("gate_proj", "down_proj")
    )
    assert ("all tokens" in warned) == (starved == "all-tokens")


def test_all_token_calibration_reads_every_token() -> None:
    model = qwen3_moe(top_k=1)
    _never_route(model, 3)
    ids = _ids(4)
    block, stream = _first_block(model, ids)
    names = ("mlp.experts.3.gate_proj", "mlp.experts.3.up_proj")
    stats = group_stats(
        block, [(n, block.get_submodule(n)) for n in names], stream, None, {"hessian"}, None,
        torch.device("cpu"), {"statistics": 0.0},
    )  # fmt: skip
    assert stats["mlp.experts.3.gate_proj"].tokens == ids.numel()
    assert block.mlp.experts.calibrate_all == frozenset()  # reset after the pass


def test_gptq_beats_rtn_on_a_tiny_moe() -> None:
    held = _ids(8, seed=3)
    ppl = {
        r: evaluate(_quantize(qwen3_moe(), r, bits=2).model, held, progress=False).ppl
        for r in ("rtn", "gptq")
    }
    assert ppl["gptq"] < ppl["rtn"], ppl


def test_recipes_comparing_streams_are_refused_on_experts() -> None:
    with pytest.raises(CompensatorError, match="route different tokens") as err:
        _quantize(qwen3_moe(), "gptaq-exact")
    assert "\n" not in str(err.value)


def test_fused_layout_left_fp_is_refused_before_the_run() -> None:
    model = qwen3_moe()
    model.model.layers[0].mlp.experts.is_transposed = True  # a layout unfuse does not know
    with pytest.raises(
        CompensatorError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj"
    ) as err:
        _quantize(model)
    assert "\n" not in str(err.value) and "full precision" in str(err.value)


def test_after_block_check_names_what_was_left_fp() -> None:
    qm = _quantize(qwen3_moe())
    block = qm.model.model.layers[1]
    check_block_quantized(block, "model.layers.1")  # everything rounded: passes
    block.mlp.extra = nn.Linear(32, 32)
    with pytest.raises(CompensatorError, match=r"model\.layers\.1\.mlp\.extra \(Linear, 32 x 32\)"):
        check_block_quantized(block, "model.layers.1")
    del block.mlp.extra
    block.mlp.experts[0].register_parameter("fused", nn.Parameter(torch.zeros(2, 3, 4)))
    with pytest.raises(CompensatorError, match=r"experts\.0\.fused \(Expert, 2 x 3 x 4\)"):
        check_block_quantized(block, "model.layers.1")


def test_convolutions_are_not_fused_experts() -> None:
    # Gemma 3's vision tower holds a 4-D patch embedding: not an experts tensor left fused.
    from test_models import FAMILIES as DENSE

    qm = _quantize(DENSE["gemma3"][0](), "rtn")
    assert len(quantized_layers(qm.model)) == 2 * 7


def test_deepseek_v3_latent_attention_shared_and_routed_experts_all_quantized(
    tmp_path: Path,
) -> None:
    model = deepseek_v3()
    ids = _ids(2, seed=5)
    with torch.no_grad():
        fp = model(ids).logits
        unfused = unfuse_experts(copy.deepcopy(model))
    assert unfused == ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]
    qm = _quantize(model)
    layers = dict(quantized_layers(qm.model))
    attn = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    for b in range(3):
        assert {f"model.layers.{b}.self_attn.{n}" for n in attn} <= layers.keys()
    assert {
        f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")
    } <= layers.keys()
    for b in (1, 2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{b}.mlp.shared_experts.{proj}" in layers
            for e in range(EXPERTS):
                assert f"model.layers.{b}.mlp.experts.{e}.{proj}" in layers
    assert len(layers) == 3 * 5 + 3 + 2 * (3 + 3 * EXPERTS)
    assert not [n for n, p in qm.model.named_parameters() if p.ndim >= 3]
    cp.save(qm, tmp_path / "q")
    with torch.no_grad():
        got = cp.load(tmp_path / "q")(ids).logits
        assert torch.equal(got, qm.model(ids).logits)
    assert (got - fp).abs().mean() < 0.5 * fp.abs().mean()  # 4-bit: near FP, not equal
