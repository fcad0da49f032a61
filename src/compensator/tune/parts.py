"""What fine-tuning moves: the parts a quantized model can train, and attaching them.

Each quantized layer kind declares which of its stored float tensors belong to which part
(``trainable()``, the layer registry); norms are the model's own (every module with a 1-D
``weight`` whose class name says Norm: RMSNorm, LayerNorm, Gemma's, any family). Integer codes
never train here, so the result is exactly what every export writes.

A trained tensor stays in the dtype it is stored in: the optimizer holds a float32 master,
and the forward sees it rounded to the stored dtype (a straight-through estimator), so the
model trained is bit for bit the model saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from compensator.errors import CompensatorError
from compensator.nn.layers import quantized_layers
from compensator.tune.spec import PARTS


class StoredAs(nn.Module):
    """The master tensor rounded to the dtype it is stored in, gradients passed through;
    a relative part is ``base * (1 + u)``."""

    def __init__(self, dtype: torch.dtype, base: torch.Tensor | None) -> None:
        super().__init__()
        self.dtype = dtype
        self.register_buffer("base", base, persistent=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        x = u if self.base is None else self.base * (1 + u)
        if self.dtype == torch.float32:
            return x
        return x + (x.to(self.dtype).float() - x).detach()

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x if self.base is None else torch.zeros_like(x)


@dataclass
class Attached:
    """The tensors being trained: per part, the parameters the optimizer moves."""

    groups: dict[str, list[nn.Parameter]]
    stored: list[Stored]  # every parametrized tensor, to commit at the end
    layers: list[nn.Module]

    def named(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The trained parameters by their names in ``model`` (state saved for resume)."""
        mine = {id(p) for ps in self.groups.values() for p in ps}
        return {n: p for n, p in model.named_parameters() if id(p) in mine}

    def count(self) -> dict[str, int]:
        return {k: sum(p.numel() for p in ps) for k, ps in self.groups.items()}


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if "norm" in type(m).__name__.lower()
        and isinstance(getattr(m, "weight", None), nn.Parameter)
        and m.weight.dim() == 1
    ]


def available_parts(model: nn.Module) -> set[str]:
    """The parts some layer (or the model's norms) of ``model`` holds."""
    found = {part for _, layer in quantized_layers(model) for part in layer.trainable()}
    return found | ({"norms"} if norm_modules(model) else set())


def check_parts(model: nn.Module, parts: tuple[str, ...], explicit: bool) -> list[str]:
    """The ``parts`` that ``model`` holds; a part no layer holds is refused when the user
    named it (``explicit``), else skipped."""
    have = available_parts(model)
    missing = [p for p in parts if p not in have]
    if explicit and missing:
        raise CompensatorError(
            f"--train {','.join(missing)}: no layer of this checkpoint holds it (it has "
            f"{', '.join(sorted(have)) or 'nothing trainable'}); drop it from --train"
        )
    chosen = [p for p in parts if p in have]
    if not chosen:
        raise CompensatorError(
            "nothing to train: this checkpoint holds none of "
            f"{', '.join(parts)}; pick --train from {', '.join(sorted(have)) or '(none)'}"
        )
    return chosen


def attach(model: nn.Module, parts: tuple[str, ...], explicit: bool) -> Attached:
    """Freeze ``model`` and make the tensors of ``parts`` trainable (:func:`check_parts`)."""
    chosen = check_parts(model, parts, explicit)
    for p in model.parameters():
        p.requires_grad_(False)
    groups: dict[str, list[nn.Parameter]] = {p: [] for p in chosen}
    stored: list[Stored] = []
    layers = [layer for _, layer in quantized_layers(model)]
    targets: list[tuple[nn.Module, str, str]] = []
    for layer in layers:
        layer.tune(True)
        declared = layer.trainable().items()
        targets += [(layer, n, part) for part, names in declared if part in groups for n in names]
    if "norms" in groups:  # bf16/fp16 norms too get a float32 master: Adam's steps would round away
        targets += [(m, "weight", "norms") for _, m in norm_modules(model)]
    for module, name, part in targets:
        param, kept = _parametrize(module, name, PARTS[part].relative)
        groups[part].append(param)
        stored.append(kept)
    return Attached(groups, stored, layers)


@dataclass(frozen=True)
class Stored:
    """A trained tensor: where it lives, its stored dtype, whether it was a parameter."""

    module: nn.Module
    name: str
    dtype: torch.dtype
    parameter: bool


def _parametrize(module: nn.Module, name: str, relative: bool) -> tuple[nn.Parameter, Stored]:
    """Buffer or parameter ``name`` becomes a float32 master seen through :class:`StoredAs`."""
    was_param = name in module._parameters
    t = (module._parameters if was_param else module._buffers).pop(name)
    module.register_parameter(name, nn.Parameter(t.detach().float().clone()))
    base = t.detach().float().clone() if relative else None
    parametrize.register_parametrization(module, name, StoredAs(t.dtype, base))
    original = module.parametrizations[name].original
    original.requires_grad_(True)
    return original, Stored(module, name, t.dtype, was_param)


def commit(attached: Attached) -> None:
    """Write every trained tensor back as the buffer or parameter it was, in its stored
    dtype (exactly what the last forward used), and leave tuning."""
    for kept in attached.stored:
        module, name = kept.module, kept.name
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        value = module._parameters.pop(name).detach().to(kept.dtype)
        if kept.parameter:
            module.register_parameter(name, nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(name, value)
    for layer in attached.layers:
        layer.tune(False)
    for ps in attached.groups.values():
        for p in ps:
            p.requires_grad_(False)
