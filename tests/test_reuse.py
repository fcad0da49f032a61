"""Pass reuse: the same bits as recomputing every calibration pass, with fewer forwards."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from compensator.models.adapter import get_adapter
from compensator.pipeline.runner import run_pipeline
from compensator.recipes.recipe import load_recipe
from test_models import FAMILIES


def _counting(forward: Callable[..., Any], key: str, calls: dict[str, int]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[key] = calls.get(key, 0) + 1
        return forward(*args, **kwargs)

    return counted


def _quantized(
    monkeypatch: pytest.MonkeyPatch,
    model: nn.Module,
    recipe: str,
    ids: torch.Tensor,
    reuse: bool,
    **overrides: object,
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], dict[str, int]]:
    """The quantized state, the last block's output stream, and how often each sublayer ran."""
    model = copy.deepcopy(model)
    adapter = get_adapter(model)
    calls: dict[str, int] = {}
    kinds = {
        type(child)
        for block in adapter.blocks(model)
        for child in block.children()
        if any(isinstance(m, nn.Linear) for m in child.modules())
    }
    for kind in kinds:
        # Counted on the class: a replayed sublayer's instance forward does not get here.
        monkeypatch.setattr(kind, "forward", _counting(kind.forward, kind.__name__, calls))
    outputs: list[torch.Tensor] = []
    last = adapter.blocks(model)[-1]
    last.register_forward_hook(
        lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out)
    )
    run_pipeline(
        model, adapter, load_recipe(recipe).with_weights(**overrides), ids, device=torch.device("cpu"),
        batch_size=2, progress=False, reuse_passes=reuse,
    )  # fmt: skip
    monkeypatch.undo()
    return {k: v.clone() for k, v in model.state_dict().items()}, outputs, calls


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reuse_is_bit_identical_per_family(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = FAMILIES[family][0]()
    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(0))
    on, out_on, calls_on = _quantized(monkeypatch, model, "gptq", ids, True, group_size=16)
    off, out_off, calls_off = _quantized(monkeypatch, model, "gptq", ids, False, group_size=16)
    assert on.keys() == off.keys()
    for name in on:
        assert torch.equal(on[name], off[name]), name
    # The last block's final pass: the next block's input, which resume recomputes uncached.
    assert torch.equal(out_on[-1], out_off[-1]) and torch.equal(out_on[-2], out_off[-2])
    attention = next(k for k in calls_off if "Attention" in k)
    # Per block and batch, attention is entered by the passes for q/k/v (which stop inside it)
    # and o_proj, and no more; recomputed, also by those for gate/up, down and the output.
    runs = 2 * 2  # blocks x batches
    assert calls_on[attention] == 2 * runs and calls_off[attention] == 5 * runs, calls_on


@pytest.mark.parametrize("recipe", ["gptaq-exact", "gptq-l2qer", "quarot-gptq-lrc-split"])
def test_reuse_is_bit_identical_per_recipe(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = FAMILIES["llama"][0]()
    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(1))
    on, out_on, _ = _quantized(monkeypatch, model, recipe, ids, True)
    off, out_off, _ = _quantized(monkeypatch, model, recipe, ids, False)
    for name in on:
        assert torch.equal(on[name], off[name]), (recipe, name)
    assert torch.equal(out_on[-1], out_off[-1])
