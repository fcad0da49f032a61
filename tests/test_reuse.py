"""Pass reuse: the same bits as recomputing every calibration pass, with fewer forwards."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from compensator.models.adapter import get_adapter
from compensator.pipeline import storage
from compensator.pipeline.runner import run_pipeline
from compensator.recipes.recipe import load_recipe
from test_models import FAMILIES


def _counting(forward: Callable[..., Any], key: str, calls: dict[str, int]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[key] = calls.get(key, 0) + 1
        return forward(*args, **kwargs)

    return counted


def _quantized(
    model: nn.Module,
    recipe: str,
    ids: torch.Tensor,
    reuse: bool,
    **overrides: object,
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], dict[str, int]]:
    """The quantized state, the last block's output stream, and how often each child of a
    block (by name: self_attn, mlp, input_layernorm, ...) really ran."""
    model = copy.deepcopy(model)
    adapter = get_adapter(model)
    calls: dict[str, int] = {}
    for block in adapter.blocks(model):
        for name, child in block.named_children():
            # An instance forward: one that reuse swaps in (a replay, a pass-through) shadows
            # it while swapped in and is not counted.
            child.forward = _counting(child.forward, name, calls)
        act = getattr(getattr(block, "mlp", None), "act_fn", None)
        if isinstance(act, nn.Module):
            act.forward = _counting(act.forward, "mlp activation", calls)
        for linear in block.modules():
            if isinstance(linear, nn.Linear):  # rounding replaces it: what runs before that
                linear.forward = _counting(linear.forward, "fp linear", calls)
    outputs: list[torch.Tensor] = []
    last = adapter.blocks(model)[-1]
    last.register_forward_hook(
        lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
    )
    run_pipeline(
        model, adapter, load_recipe(recipe).with_weights(**overrides), ids, device=torch.device("cpu"),
        batch_size=2, progress=False, reuse_passes=reuse,
    )  # fmt: skip
    return {k: v.clone() for k, v in model.state_dict().items()}, outputs, calls


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reuse_is_bit_identical_per_family(family: str) -> None:
    model = FAMILIES[family][0]()
    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(0))
    on, out_on, calls_on = _quantized(model, "gptq", ids, True, group_size=16)
    off, out_off, calls_off = _quantized(model, "gptq", ids, False, group_size=16)
    assert on.keys() == off.keys()
    for name in on:
        assert torch.equal(on[name], off[name]), name
    # The last block's final pass: the next block's input, which resume recomputes uncached.
    assert torch.equal(out_on[-1], out_off[-1]) and torch.equal(out_on[-2], out_off[-2])
    arch = get_adapter(model).arch
    attention = next(t.linear for t in arch.tails if t.pair).split(".")[0]
    # Per block and batch, attention is entered by the passes for q/k/v (which stop inside it)
    # and o_proj, and no more; recomputed, also by those for gate/up, down and the output.
    runs = 2 * 2  # blocks x batches
    assert calls_on[attention] == 2 * runs and calls_off[attention] == 5 * runs, calls_on
    if any(t.linear.startswith("mlp.") for t in arch.tails):
        # The MLP by the passes for gate/up and down, not by the output pass: down_proj's
        # kept input gives its output.
        assert calls_on["mlp"] == 2 * runs and calls_off["mlp"] == 3 * runs, calls_on
    if "mlp activation" in calls_off:
        # Recomputed, gate's activation runs in the passes for gate/up (gate computed before
        # up is reached), down and the output; with reuse, in the one for down, and in the
        # one for gate/up for the first batch only: it shows that gate and up read one tensor.
        assert calls_off["mlp activation"] == 3 * runs
        assert calls_on["mlp activation"] == 2 * (1 + 2), calls_on  # blocks x (1 + batches)
    for feeder, sublayer in arch.feeds:
        # A declared feed runs once per batch (kept, then handed back while what it feeds
        # runs, then skipped); recomputed, whenever what it feeds runs.
        assert calls_on[feeder] == runs, (feeder, calls_on)
        assert calls_off[feeder] == calls_off[sublayer], (feeder, calls_off)
    assert arch.feeds or family == "opt"
    # A statistics pass computes none of the Linears it captures: none runs before it is
    # rounded. Recomputed, the passes for q/k/v and for gate/up compute q, k and gate
    # (phi3's fused qkv and gate_up are captured before they compute, OPT has no gate).
    assert calls_on.get("fp linear", 0) == 0, calls_on
    assert calls_off.get("fp linear", 0) == {"phi3": 0, "opt": 2}.get(family, 3) * runs


@pytest.mark.parametrize("recipe", ["gptaq-exact", "gptq-l2qer", "quarot-gptq-lrc-split"])
def test_reuse_is_bit_identical_per_recipe(recipe: str) -> None:
    model = FAMILIES["llama"][0]()
    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(1))
    on, out_on, calls_on = _quantized(model, recipe, ids, True)
    off, out_off, calls_off = _quantized(model, recipe, ids, False)
    for name in on:
        assert torch.equal(on[name], off[name]), (recipe, name)
    assert torch.equal(out_on[-1], out_off[-1])
    if recipe.endswith("-split"):
        # Two statistics passes per group (the split bases come from the first's Hessians):
        # recomputed, 9 per block and batch; with reuse the second over o_proj and over
        # down_proj read their kept inputs, so attention and the MLP are entered 3 times.
        runs = 2 * 2
        assert calls_off["self_attn"] == 9 * runs
        assert calls_on["self_attn"] == 3 * runs and calls_on["mlp"] == 3 * runs, calls_on


def test_no_room_for_the_mlp_input_recomputes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams that fit only without down_proj's kept input (intermediate width) make the
    output pass recompute the MLP; the bits stay the same."""
    model = FAMILIES["llama"][0]()
    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(2))
    # 64 tokens of width 32 (intermediate 64): streams 32 KiB, 40 KiB with the MLP input.
    monkeypatch.setattr(storage, "free_memory", lambda device: 70_000)
    on, _, calls_on = _quantized(model, "gptq", ids, True, group_size=16)
    monkeypatch.setattr(storage, "free_memory", lambda device: 10**9)
    wide, _, calls_wide = _quantized(model, "gptq", ids, True, group_size=16)
    runs = 2 * 2
    assert calls_on["mlp"] == 3 * runs and calls_wide["mlp"] == 2 * runs
    assert calls_on["self_attn"] == 2 * runs
    for name in on:
        assert torch.equal(on[name], wide[name]), name


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("windows", [6, 1])
def test_reuse_is_bit_identical_on_experts(family: str, windows: int) -> None:
    """The sparse families' declarations (attention's tail and norm; experts captured as
    zeros, some starved and calibrated on every token with one window) keep the bits."""
    from compensator.nn.experts import unfuse_experts
    from test_moe import deepseek_v3, mixtral, qwen3_moe

    model = {"qwen3_moe": qwen3_moe, "mixtral": mixtral, "deepseek_v3": deepseek_v3}[family]()
    unfuse_experts(model)
    assert not get_adapter(model).is_generic
    ids = torch.randint(3, 120, (windows, 16), generator=torch.Generator().manual_seed(0))
    on, out_on, calls_on = _quantized(model, "gptq", ids, True, group_size=16)
    off, out_off, _ = _quantized(model, "gptq", ids, False, group_size=16)
    assert on.keys() == off.keys()
    for name in on:
        assert torch.equal(on[name], off[name]), name
    assert torch.equal(out_on[-1], out_off[-1])
    blocks = len(get_adapter(model).blocks(model))
    assert calls_on["input_layernorm"] == blocks * ((windows + 1) // 2)  # once a block and batch
