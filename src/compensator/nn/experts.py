"""Mixture-of-experts: transformers' fused expert tensors as one Linear per expert projection.

transformers 5 keeps a sparse block's experts as two 3-D parameters (``gate_up_proj``
[E, 2I, H], ``down_proj`` [E, H, I]) used by one module (Qwen3-MoE, Mixtral, OLMoE, ...).
Nothing that quantizes Linears sees them, so without this they stay in full precision.
:func:`unfuse_experts` replaces each such module by :class:`ExpertLinears`: the same routing
arithmetic over per-expert ``gate_proj``/``up_proj``/``down_proj`` Linears, so every expert is
rounded like any other Linear, on exactly the tokens routed to it.

Only the classes in :data:`PLAIN_EXPERTS` with the plain layout are split (gate and up
concatenated, not transposed, no biases); any other fused experts module stays as it is and
is refused before the run, by name (``models.checks.check_no_fused_weights``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Expert", "ExpertLinears", "unfuse_experts"]


class Expert(nn.Module):
    """One SwiGLU-style expert: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act_fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinears(nn.ModuleList):
    """Drop-in for a fused experts module: forward(hidden [T, H], top_k_index, top_k_weights).
    A list of :class:`Expert`, so expert ``e``'s Linears are named ``experts.e.gate_proj`` as
    in the per-expert checkpoints of vLLM and compressed-tensors.

    ``calibrate_all`` names experts that, during a statistics pass, read every token instead
    of only those routed to them (their routed outputs are then taken from that product); it
    is how an expert that calibration barely reaches still gets meaningful statistics.
    """

    def __init__(self, experts: list[Expert]) -> None:
        super().__init__(experts)
        self.calibrate_all: frozenset[int] = frozenset()

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # len + 1 classes: expert-parallel sharding marks foreign experts so.
            mask = nn.functional.one_hot(top_k_index, num_classes=len(self) + 1)
            mask = mask.permute(2, 1, 0)
        for e, expert in enumerate(self):
            top_k_pos, token_idx = torch.where(mask[e])
            if e in self.calibrate_all:
                y = expert(hidden_states)[token_idx]
            elif token_idx.numel() == 0:
                continue
            else:
                y = expert(hidden_states[token_idx])
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


# The fused experts classes whose forward is exactly Expert's routing arithmetic (checked in
# transformers 5.24): others (clamped gates, post-expert norms, two-argument activations,
# float32 gating) keep their own module and are refused before the run, by name.
PLAIN_EXPERTS = frozenset({"Qwen3MoeExperts", "MixtralExperts", "DeepseekV3Experts"})


def _fused_layout(module: nn.Module) -> tuple[int, int, int] | None:
    """(experts, hidden, intermediate) of a plain fused experts module, else None."""
    if type(module).__name__ not in PLAIN_EXPERTS:
        return None
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if not isinstance(gate_up, nn.Parameter) or not isinstance(down, nn.Parameter):
        return None
    if gate_up.ndim != 3 or down.ndim != 3 or not callable(getattr(module, "act_fn", None)):
        return None
    flags = ("is_transposed", "has_bias", "has_post_expert_norm")
    if any(getattr(module, f, False) for f in flags) or not getattr(
        module, "is_concatenated", True
    ):
        return None
    if getattr(module, "has_gate", True) is False:
        return None
    n, two_i, h = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (n, h, two_i // 2):
        return None
    return n, h, two_i // 2


def unfuse(module: nn.Module) -> ExpertLinears:
    layout = _fused_layout(module)
    if layout is None:
        raise ValueError(f"{type(module).__name__} is not a plain fused experts module")
    n, h, i = layout
    experts = []
    for e in range(n):
        with torch.device("meta"):  # no initialisation of weights that are replaced at once
            expert = Expert(h, i, module.act_fn)
        gate, up = module.gate_up_proj.data[e].chunk(2, dim=0)
        expert.gate_proj.weight = nn.Parameter(gate.contiguous())
        expert.up_proj.weight = nn.Parameter(up.contiguous())
        expert.down_proj.weight = nn.Parameter(module.down_proj.data[e].contiguous())
        experts.append(expert)
    return ExpertLinears(experts)


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every plain fused experts module of ``model`` in place; their names."""
    names = [n for n, m in model.named_modules() if n and _fused_layout(m) is not None]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, unfuse(parent.get_submodule(child)))
    return names


def routed_linears(block: nn.Module, names: list[str]) -> dict[str, tuple[ExpertLinears, int]]:
    """The named Linears that are experts: their ExpertLinears and expert index."""
    out: dict[str, tuple[ExpertLinears, int]] = {}
    for path, module in block.named_modules():
        if isinstance(module, ExpertLinears):
            for n in names:
                head, _, rest = n.partition(f"{path}.") if path else ("", "", "")
                if not head and rest and rest.split(".")[0].isdigit():
                    out[n] = (module, int(rest.split(".")[0]))
    return out
