"""One generic check of a recipe's steps, from what each step declares (see steps.base):
their order, how many of each kind, exclusive slots, and the capabilities they need from
or refuse in one another. No method is named here."""

from __future__ import annotations

from itertools import pairwise

from compensator.steps.base import CAPABILITIES, KINDS, STEPS, StepConfig


class RecipeError(ValueError):
    """A recipe whose steps do not fit together; the message says which and why."""


def validated(steps: list[StepConfig]) -> list[StepConfig]:
    """``steps`` with implied steps added, or a :class:`RecipeError` naming the problem."""
    _check_order(steps)
    steps = _with_implied(steps)
    _check_counts(steps)
    _check_exclusive(steps)
    _check_capabilities(steps)
    return steps


def _rank(step: StepConfig) -> tuple[int, int]:
    return KINDS[step.kind].order, step.order_in_kind


def _order_text() -> str:
    return ", then ".join(rule.label for rule in sorted(KINDS.values(), key=lambda r: r.order))


def _check_order(steps: list[StepConfig]) -> None:
    for before, after in pairwise(steps):
        if _rank(after) < _rank(before):
            where = (
                f"{before.kind} steps in this order: "
                + ", ".join(sorted((n for n, c in STEPS.items() if c.kind == before.kind),
                                   key=lambda n: STEPS[n].order_in_kind))
                if before.kind == after.kind
                else _order_text()
            )  # fmt: skip
            raise RecipeError(
                f"step {after.name!r} ({after.kind}) is listed after {before.name!r} "
                f"({before.kind}), but steps run as listed and must come as {where}: reorder them"
            )


def _with_implied(steps: list[StepConfig]) -> list[StepConfig]:
    out = list(steps)
    for step in steps:
        for name in step.implies():
            if not any(s.name == name for s in out):
                extra = STEPS[name]()
                at = next((i for i, s in enumerate(out) if _rank(s) > _rank(extra)), len(out))
                out.insert(at, extra)
    return out


def _check_counts(steps: list[StepConfig]) -> None:
    names = [s.name for s in steps]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RecipeError(f"step {twice[0]!r} appears more than once; keep one")
    for kind, rule in KINDS.items():
        found = [s.name for s in steps if s.kind == kind]
        if len(found) < rule.min:
            choices = ", ".join(sorted(n for n, c in STEPS.items() if c.kind == kind))
            raise RecipeError(f"a recipe needs {rule.label} step ({choices}); it has none")
        if rule.max is not None and len(found) > rule.max:
            raise RecipeError(
                f"a recipe takes at most {rule.max} {kind} step{'s' if rule.max > 1 else ''}, "
                f"got {', '.join(found)}"
            )


def _check_exclusive(steps: list[StepConfig]) -> None:
    holder: dict[str, str] = {}
    for s in steps:
        slot = s.exclusive()
        if slot is None:
            continue
        if slot in holder:
            raise RecipeError(f"{holder[slot]} and {s.name} are both {slot}; keep one of them")
        holder[slot] = s.name


def providers(capability: str) -> list[str]:
    """Registered steps that provide ``capability`` with their default options."""
    out = []
    for name, cls in sorted(STEPS.items()):
        try:
            if capability in cls().provides():
                out.append(name)
        except Exception:  # a step without defaults for every option provides nothing here
            continue
    return out


def _check_capabilities(steps: list[StepConfig]) -> None:
    for s in steps:
        others = [o for o in steps if o is not s]
        offered = set().union(*(o.provides() for o in others))
        for need in sorted(s.requires() - offered):
            hint = ", ".join(providers(need)) or "none registered"
            raise RecipeError(
                f"{s.name} needs {CAPABILITIES[need]}, which no other step of this recipe "
                f"provides (steps that do: {hint})"
            )
        for cap, why in sorted(s.conflicts().items()):
            clash = next((o for o in others if cap in o.provides()), None)
            if clash is not None:
                raise RecipeError(f"{s.name} and {clash.name} do not compose: {why}")
