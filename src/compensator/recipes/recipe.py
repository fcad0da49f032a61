"""Recipe objects, YAML loading and the presets shipped with the package.

YAML form::

    scheme: {weights: {bits: 4, group_size: 128, symmetric: false}}
    steps:
      - gptq: {damp: 0.01, act_order: true}

Python form: ``Recipe(scheme=Scheme(weights=QuantSpec(bits=4)), steps=[GPTQStep()])``.
Validation is :mod:`compensator.recipes.validate`, from the steps' own declarations.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from compensator.errors import CompensatorError
from compensator.quant.act import ActSpec
from compensator.quant.scheme import Scheme
from compensator.quant.spec import QuantSpec
from compensator.recipes.validate import RecipeError, validated
from compensator.steps.base import (
    STEPS,
    CorrectorStep,
    LearnerStep,
    LowRankCorrector,
    LowRankInput,
    RounderStep,
    StepConfig,
    TransformStep,
)

PRESET_DIR = Path(__file__).parent / "presets"

__all__ = ["PRESET_DIR", "Recipe", "Scheme", "load_recipe", "preset_names"]

log = logging.getLogger(__name__)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    scheme: Scheme = Scheme()
    steps: list[StepConfig]

    @field_validator("steps", mode="before")
    @classmethod
    def _build_steps(cls, raw: Any) -> list[StepConfig]:
        if not isinstance(raw, list) or not raw:
            raise ValueError("steps must be a non-empty list, e.g. [{gptq: {}}]")
        return validated([_build_step(item) for item in raw])

    @model_validator(mode="after")
    def _kquant_steps(self) -> Recipe:
        grid_problem(self)
        return self

    def of_kind(self, kind: str) -> list[StepConfig]:
        return [s for s in self.steps if s.kind == kind]

    @property
    def rounder(self) -> RounderStep:
        return next(s for s in self.steps if isinstance(s, RounderStep))

    @property
    def correctors(self) -> list[CorrectorStep]:
        return [s for s in self.steps if isinstance(s, CorrectorStep)]

    @property
    def learners(self) -> list[LearnerStep]:
        return [s for s in self.steps if isinstance(s, LearnerStep)]

    @property
    def trainer(self) -> StepConfig | None:
        return next(iter(self.of_kind("trainer")), None)

    @property
    def transforms(self) -> list[TransformStep]:
        return [s for s in self.steps if isinstance(s, TransformStep)]

    @property
    def lowrank_input(self) -> LowRankInput:
        """What the correctors' factors multiply (see ``CorrectorStep.lowrank_input``)."""
        return next((c.lowrank_input() for c in self.correctors), "quantized")

    def stats(self) -> set[str]:
        return set().union(*(s.stats() for s in self.steps))

    def needs_data(self) -> bool:
        return bool(self.stats()) or any(s.needs_fp_stream() for s in self.steps)

    def label(self) -> str:
        """The scheme as its layers hold it, e.g. ``W4A16 g128`` or ``VQ d8 b8+sign A16``."""
        if self.rounder.uses_weight_scheme:
            return self.scheme.label()
        acts = self.scheme.activations
        target = self.rounder.target_spec(self.scheme.weights)
        return f"{target.label()} {'A16' if acts is None else acts.label()}"

    # -- overrides from the command line or the API -------------------------------------

    def with_steps(self, steps: list[StepConfig]) -> Recipe:
        try:
            return self.model_copy(update={"steps": validated(steps)})
        except RecipeError as e:
            raise CompensatorError(f"{self.name or 'recipe'}: {e}") from None

    def with_epochs(self, epochs: int | None) -> Recipe:
        """The same recipe trained for ``epochs`` per block (None: unchanged)."""
        if epochs is None:
            return self
        trainers = [s for s in self.steps if s.has_block_hook and "epochs" in type(s).model_fields]
        if not trainers:
            learned = sorted(n for n, c in STEPS.items() if issubclass(c, LearnerStep))
            raise CompensatorError(
                f"--epochs needs a recipe with a learned step ({', '.join(learned)}); "
                f"{self.name or 'this recipe'} has none"
            )
        if epochs < 0:
            raise CompensatorError(f"--epochs {epochs} is not valid: use >= 0")
        return self.with_steps(
            [s.model_copy(update={"epochs": epochs}) if s in trainers else s for s in self.steps]
        )

    def seeded_steps(self) -> list[StepConfig]:
        """The steps that draw at random with their own ``seed`` (k-means, data order,
        rotations)."""
        return [s for s in self.steps if "seed" in type(s).model_fields]

    def draws_at_random(self) -> bool:
        """Whether a run's seed changes anything: calibration windows or a seeded step."""
        return self.needs_data() or bool(self.seeded_steps())

    def with_seed(self, seed: int) -> Recipe:
        """The same recipe with ``seed`` added to every seeded step's own seed, so one
        calibration seed moves every random draw of a run; 0: unchanged."""
        if seed == 0:
            return self
        seeded = self.seeded_steps()
        return self.with_steps(
            [s.model_copy(update={"seed": s.seed + seed}) if s in seeded else s for s in self.steps]
        )

    def with_overrides(
        self,
        *,
        bits: int | None = None,
        group_size: int | None = None,
        symmetric: bool | None = None,
        rank: int | str | None = None,
        act_bits: int | None = None,
        epochs: int | None = None,
        seed: int = 0,
        kquant: str | None = None,
        float_min: bool | None = None,
    ) -> Recipe:
        """Every command-line override at once, in the order quantize and plan apply them."""
        rec = self.with_weights(
            bits=bits, group_size=group_size, symmetric=symmetric, kquant=kquant,
            float_min=float_min,
        )  # fmt: skip
        rec = rec.with_rank(rank).with_act_bits(act_bits).with_epochs(epochs).with_seed(seed)
        acts = rec.scheme.activations
        if acts is not None and acts.bits not in KERNEL_ACT_BITS:  # legal, but only simulated
            log.warning(
                "%d-bit activations are simulated here and no engine has a kernel for them "
                "(A4 and A8 have): the checkpoint measures quality, it will not run faster",
                acts.bits,
            )
        return rec

    def with_rank(self, rank: int | str | None) -> Recipe:
        """The same recipe with the corrector's rank replaced (None: unchanged)."""
        if rank is None:
            return self
        if not any(isinstance(s, LowRankCorrector) for s in self.steps):
            names = sorted(n for n, c in STEPS.items() if issubclass(c, LowRankCorrector))
            raise CompensatorError(
                f"--rank needs a recipe with a low-rank corrector step ({', '.join(names)}); "
                f"{self.name or 'this recipe'} has none"
            )
        steps = []
        for s in self.steps:
            if isinstance(s, LowRankCorrector):
                try:
                    s = type(s).model_validate({**s.model_dump(), "rank": rank})
                except ValidationError as e:
                    raise CompensatorError(f"invalid --rank: {first_error(e)}") from None
            steps.append(s)
        return self.with_steps(steps)

    def with_act_bits(self, bits: int | None) -> Recipe:
        """The same recipe with per-token dynamic ``bits``-bit activations (None: unchanged)."""
        if bits is None:
            return self
        if bits >= 16:
            acts = None
        else:
            try:
                base = self.scheme.activations or ActSpec()
                acts = ActSpec(**{**base.model_dump(), "bits": bits})
            except ValidationError as e:
                raise CompensatorError(f"invalid --act-bits: {first_error(e)}") from None
        return self.model_copy(
            update={"scheme": self.scheme.model_copy(update={"activations": acts})}
        )

    def with_weights(self, **overrides: Any) -> Recipe:
        """The same recipe with some weight-scheme fields replaced (None values are ignored)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if not changes:
            return self
        if not self.rounder.uses_weight_scheme:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in changes)
            raise CompensatorError(
                f"{flags} mean nothing for {self.name or 'this recipe'}: its {self.rounder.name} "
                f"rounder does not use the uniform weight scheme; set its own options in the "
                f"recipe's {self.rounder.name} step instead"
            )
        # A K-quant type implies bits, groups and symmetry: the recipe's own give way to it.
        base = {} if changes.get("kquant") else self.scheme.weights.model_dump()
        try:
            weights = QuantSpec(**{**base, **changes})
        except ValidationError as e:
            raise CompensatorError(f"invalid scheme override: {first_error(e)}") from None
        rec = self.model_copy(
            update={"scheme": self.scheme.model_copy(update={"weights": weights})}
        )
        try:
            grid_problem(rec)
        except ValueError as e:
            raise CompensatorError(str(e)) from None
        return rec

    def to_yaml_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "scheme": {
                "weights": self.scheme.weights.model_dump(),
                "activations": None
                if self.scheme.activations is None
                else self.scheme.activations.model_dump(),
            },
            "steps": [{s.name: s.model_dump()} for s in self.steps],
        }


def grid_problem(recipe: Recipe) -> None:
    """Raise ValueError when the recipe asks for a GGUF grid (float mins, a K-quant) its
    steps cannot fit."""
    rounder, spec = recipe.rounder, recipe.scheme.weights
    if spec.float_min and rounder.uses_weight_scheme and not rounder.fits_float_min:
        raise ValueError(
            f"float_min needs a rounder that keeps float mins; {rounder.name} fits integer "
            "zero points"
        )
    kquant = spec.kquant
    if kquant is None:
        return
    if not (rounder.uses_weight_scheme and rounder.fits_kquant):
        fits = sorted(n for n, c in STEPS.items() if getattr(c, "fits_kquant", False))
        raise ValueError(
            f"kquant {kquant} needs a rounder that fits K-quant super-blocks "
            f"({', '.join(fits)}); {recipe.name or 'this recipe'} rounds with {rounder.name}"
        )
    if any(c.rounds_itself for c in recipe.correctors):
        raise ValueError(
            f"kquant {kquant} needs the rounder to fit the grid; {recipe.name or 'this recipe'}'s "
            "corrector chooses the rounding itself"
        )
    if recipe.learners or recipe.trainer is not None:
        raise ValueError(
            f"kquant {kquant} cannot be learned: {recipe.name or 'this recipe'}'s learned steps "
            "fit their own grid parameters; use gptq, gptaq-exact or rtn"
        )


def _build_step(item: Any) -> StepConfig:
    if isinstance(item, StepConfig):
        return item
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(
            f"each step is a one-key mapping like {{gptq: {{damp: 0.01}}}}, got {item!r}"
        )
    ((name, options),) = item.items()
    if name not in STEPS:
        raise ValueError(f"unknown step {name!r}; registered steps: {', '.join(sorted(STEPS))}")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"the options of step {name!r} must be a mapping, got {options!r}")
    return STEPS[name].model_validate(options or {})


def first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split()) or type(e).__name__


# Activation widths inference engines run with integer kernels (W4A4, W4A8 / W8A8).
KERNEL_ACT_BITS = (4, 8)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``safe_load`` that refuses a key given twice in one mapping: YAML would keep the last
    value without a word, so an option set further up is silently not the one used."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:  # before merge keys (<<) are flattened in: they may
            if key_node.tag == "tag:yaml.org,2002:merge":  # be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the mapping's own constructor says what is wrong with it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path | Recipe) -> Recipe:
    """A preset name, a YAML file path, or a Recipe (returned as is)."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    path = Path(name_or_path)
    if str(name_or_path) in preset_names():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    elif not path.is_file():
        raise CompensatorError(
            f"recipe {str(name_or_path)!r} is neither a preset ({', '.join(preset_names())}) "
            "nor an existing YAML file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise CompensatorError(f"cannot read recipe {path}: {reason}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        raise CompensatorError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise CompensatorError(f"recipe {path} must be a mapping with 'scheme' and 'steps'")
    data.setdefault("name", path.stem)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise CompensatorError(f"recipe {path}: {first_error(e)}") from None
