"""Recipe objects, their validation, YAML loading and the presets shipped with the package.

YAML form::

    scheme: {weights: {bits: 4, group_size: 128, symmetric: false}}
    steps:
      - gptq: {damp: 0.01, act_order: true}

Python form: ``Recipe(scheme=Scheme(weights=QuantSpec(bits=4)), steps=[GPTQStep()])``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from compensator.errors import CompensatorError
from compensator.quant.act import ActSpec
from compensator.quant.spec import QuantSpec
from compensator.steps import STEPS, CorrectorStep, LearnerStep, StepConfig, TransformStep
from compensator.steps.learned import TrainStep

PRESET_DIR = Path(__file__).parent / "presets"


class Scheme(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: QuantSpec = QuantSpec()
    activations: ActSpec | None = None  # dynamic quantization of Linear inputs (W4A8)

    def label(self) -> str:
        """E.g. ``W4A8 g128``, ``W3A16 per-channel sym``."""
        w = self.weights
        acts = "A16" if self.activations is None else self.activations.label()
        groups = "per-channel" if w.group_size is None else f"g{w.group_size}"
        return f"W{w.bits}{acts} {groups}{' sym' if w.symmetric else ''}"


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
        return [_build_step(item) for item in raw]

    @model_validator(mode="after")
    def _one_rounder(self) -> Recipe:
        rounders = [s.name for s in self.steps if s.kind == "rounder"]
        if len(rounders) != 1:
            raise ValueError(f"a recipe needs exactly one rounder step, got {rounders or 'none'}")
        correctors = [s.name for s in self.steps if s.kind == "corrector"]
        if len(correctors) > 1:
            raise ValueError(f"a recipe takes at most one corrector step for now, got {correctors}")
        transforms = [s.name for s in self.steps if s.kind == "transform"]
        if len(transforms) != len(set(transforms)):
            raise ValueError(f"each transform step may appear once, got {transforms}")
        joint = [s for s in self.correctors if s.joint]
        extra = self.rounder.stats() - {"hessian"}
        if joint and (extra or self.rounder.needs_fp_stream()):
            raise ValueError(
                f"{joint[0].name} re-runs the rounder on its own target and Hessian, so it "
                f"composes with rtn or plain gptq; {self.rounder.name} also needs {sorted(extra)}"
            )
        self._check_learners()
        return self

    def _check_learners(self) -> None:
        roles = [s.role for s in self.learners]
        if len(roles) != len(set(roles)):
            names = [s.name for s in self.learners]
            raise ValueError(
                f"learned steps {names} overlap: take at most one of lwc/ssvq, let, lsi/sde"
            )
        trainers = [s for s in self.steps if isinstance(s, TrainStep)]
        if len(trainers) > 1:
            raise ValueError("a recipe takes at most one train step")
        if trainers and not self.learners:
            raise ValueError("a train step needs a learned step (lwc, let, lsi or sde) to train")
        storage = self.rounder.storage() or {}
        fmt = storage.get("format", "uniform")
        if fmt != "uniform" and self.correctors:
            raise ValueError(f"{self.rounder.name} layers take no low-rank corrector yet")
        for s in self.learners:
            if s.weight_format != fmt:
                raise ValueError(
                    f"{s.name} learns for {s.weight_format} weights but the rounder "
                    f"{self.rounder.name} stores {fmt} ones"
                )
        if not self.learners:
            return
        rounder = self.rounder
        if not getattr(rounder, "accepts_params", False):
            raise ValueError(
                f"learned steps fold into the block before rounding and hand it their "
                f"clipping, so they compose with rtn, gptq or vq, not {rounder.name}"
            )
        movers = [s.name for s in self.learners if s.moves_inputs]
        if rounder.needs_fp_stream() and movers:
            raise ValueError(
                f"{movers[0]} rescales what the Linears read, so {rounder.name}'s asymmetric "
                "calibration (FP-stream inputs) no longer matches; drop one of them"
            )
        if any(c.joint for c in self.correctors):
            raise ValueError("learned steps do not compose with a joint corrector (lrc) yet")

    @property
    def learners(self) -> list[LearnerStep]:
        return [s for s in self.steps if isinstance(s, LearnerStep)]

    @property
    def trainer(self) -> TrainStep:
        """The train settings (defaults when the recipe has learned steps but no train step)."""
        return next((s for s in self.steps if isinstance(s, TrainStep)), TrainStep())

    def with_epochs(self, epochs: int | None) -> Recipe:
        """The same recipe trained for ``epochs`` per block (None: unchanged)."""
        if epochs is None:
            return self
        if not self.learners:
            raise CompensatorError(
                f"--epochs needs a learned recipe (omniquant, lsi, sde, sde-cll, ssvq-* or one "
                f"with lwc/let/lsi/sde/ssvq steps); {self.name or 'this recipe'} has none"
            )
        if epochs < 0:
            raise CompensatorError(f"--epochs {epochs} is not valid: use >= 0")
        trainer = self.trainer.model_copy(update={"epochs": epochs})
        steps = [s for s in self.steps if not isinstance(s, TrainStep)] + [trainer]
        return self.model_copy(update={"steps": steps})

    @property
    def rounder(self) -> StepConfig:
        return next(s for s in self.steps if s.kind == "rounder")

    @property
    def correctors(self) -> list[CorrectorStep]:
        return [s for s in self.steps if isinstance(s, CorrectorStep)]

    @property
    def transforms(self) -> list[TransformStep]:
        return [s for s in self.steps if isinstance(s, TransformStep)]

    @property
    def lowrank_input(self) -> str:
        """What the correctors' factors multiply: ``raw`` or ``quantized`` activations, or
        ``split``: raw, with their subspace taken out of the quantized path's input."""
        if any(s.split_input() for s in self.correctors):
            return "split"
        return "raw" if any(s.raw_input() for s in self.correctors) else "quantized"

    def with_rank(self, rank: int | float | None) -> Recipe:
        """The same recipe with the corrector's rank replaced (None: unchanged)."""
        if rank is None:
            return self
        if not self.correctors:
            raise CompensatorError(
                f"--rank needs a recipe with a low-rank corrector step (e.g. gptq-l2qer); "
                f"{self.name or 'this recipe'} has none"
            )
        steps = []
        for s in self.steps:
            if isinstance(s, CorrectorStep):
                try:
                    s = type(s).model_validate({**s.model_dump(), "rank": rank})
                except ValidationError as e:
                    raise CompensatorError(f"invalid --rank: {_first_error(e)}") from None
            steps.append(s)
        return self.model_copy(update={"steps": steps})

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
                raise CompensatorError(f"invalid --act-bits: {_first_error(e)}") from None
        return self.model_copy(
            update={"scheme": self.scheme.model_copy(update={"activations": acts})}
        )

    def with_weights(self, **overrides: Any) -> Recipe:
        """The same recipe with some weight-scheme fields replaced (None values are ignored)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if not changes:
            return self
        try:
            weights = QuantSpec(**{**self.scheme.weights.model_dump(), **changes})
        except ValidationError as e:
            raise CompensatorError(f"invalid scheme override: {_first_error(e)}") from None
        return self.model_copy(
            update={"scheme": self.scheme.model_copy(update={"weights": weights})}
        )

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
    return STEPS[name].model_validate(options or {})


def _first_error(e: ValidationError) -> str:
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
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CompensatorError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise CompensatorError(f"recipe {path} must be a mapping with 'scheme' and 'steps'")
    data.setdefault("name", path.stem)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise CompensatorError(f"recipe {path}: {_first_error(e)}") from None
