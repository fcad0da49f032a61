"""Recipes: YAML and Python forms, overrides, presets, the step registry and one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from pydantic import ValidationError

from compensator.errors import CompensatorError
from compensator.quant.spec import QuantSpec
from compensator.recipes import Recipe, Scheme, load_recipe, preset_names
from compensator.steps import STEPS, RounderStep, StepConfig, register_step
from compensator.steps.base import StepKind
from compensator.steps.gptq import GPTQStep
from compensator.steps.rtn import RTNStep


class NoopTransform(StepConfig):
    """A non-rounder step, registered only inside the tests that need it."""

    name: ClassVar[str] = "noop_transform"
    kind: ClassVar[StepKind] = "transform"


@pytest.fixture
def noop_step(monkeypatch: pytest.MonkeyPatch) -> type[StepConfig]:
    monkeypatch.setitem(STEPS, NoopTransform.name, NoopTransform)
    return NoopTransform


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(path: Path | str) -> str:
    with pytest.raises(CompensatorError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# --------------------------------------------------------------------------------------------
# Forms
# --------------------------------------------------------------------------------------------


def test_yaml_and_python_forms_build_the_same_recipe(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
scheme: {weights: {bits: 3, group_size: 64, symmetric: true}}
steps:
  - gptq: {damp: 0.05, act_order: false, block_size: 32}
""",
        name="mine.yaml",
    )
    from_yaml = load_recipe(path)
    from_python = Recipe(
        name="mine",
        scheme=Scheme(weights=QuantSpec(bits=3, group_size=64, symmetric=True)),
        steps=[GPTQStep(damp=0.05, act_order=False, block_size=32)],
    )
    assert from_yaml == from_python
    assert isinstance(from_yaml.rounder, GPTQStep)
    assert from_yaml.rounder.damp == 0.05


def test_python_form_accepts_mappings_strings_and_step_objects() -> None:
    a = Recipe(steps=[{"gptq": {"damp": 0.02}}])
    b = Recipe(steps=[GPTQStep(damp=0.02)])
    c = Recipe.model_validate({"steps": [{"gptq": {"damp": 0.02}}]})
    assert a == b == c
    assert Recipe(steps=["rtn"]) == Recipe(steps=[RTNStep()])


def test_bare_string_step(tmp_path: Path) -> None:
    bare = load_recipe(write(tmp_path, "steps:\n  - gptq\n", name="x.yaml"))
    explicit = load_recipe(write(tmp_path, "steps:\n  - gptq: {}\n", name="x2.yaml"))
    null_options = load_recipe(write(tmp_path, "steps:\n  - gptq:\n", name="x3.yaml"))
    assert bare.steps == explicit.steps == null_options.steps == [GPTQStep()]
    assert bare.scheme == Scheme()
    assert bare.name == "x"  # the file's stem when the YAML gives none


def test_load_recipe_returns_a_recipe_object_unchanged() -> None:
    r = Recipe(steps=["rtn"])
    assert load_recipe(r) is r


# --------------------------------------------------------------------------------------------
# with_weights
# --------------------------------------------------------------------------------------------


def test_with_weights_overrides_only_bits() -> None:
    base = load_recipe("gptq")
    three = base.with_weights(bits=3)
    assert three.scheme.weights.bits == 3
    assert three.scheme.weights.model_dump() == {**base.scheme.weights.model_dump(), "bits": 3}
    assert three.steps == base.steps
    assert (three.name, three.description) == (base.name, base.description)
    assert base.scheme.weights.bits == 4  # the original is untouched


def test_with_weights_ignores_none_and_validates() -> None:
    base = load_recipe("rtn")
    assert base.with_weights(bits=None, group_size=None, symmetric=None) is base
    assert base.with_weights(group_size=-1).scheme.weights.group_size is None
    sym = base.with_weights(symmetric=True, group_size=32)
    assert (sym.scheme.weights.symmetric, sym.scheme.weights.group_size) == (True, 32)
    with pytest.raises(CompensatorError, match="bits") as info:
        base.with_weights(bits=9)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def test_presets_include_rtn_and_gptq() -> None:
    assert {"rtn", "gptq"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_round_trips(name: str) -> None:
    r = load_recipe(name)
    assert r.name == name
    assert r.description
    assert sum(s.kind == "rounder" for s in r.steps) == 1
    assert Recipe.model_validate(r.to_yaml_dict()) == r
    # What a checkpoint writes as recipe.yaml reads back to the same recipe.
    assert Recipe.model_validate(yaml.safe_load(yaml.safe_dump(r.to_yaml_dict()))) == r


def test_round_trip_keeps_overrides() -> None:
    r = load_recipe("gptq").with_weights(bits=3, group_size=16, symmetric=True)
    assert Recipe.model_validate(r.to_yaml_dict()) == r


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_maps_names_to_classes() -> None:
    assert STEPS["gptq"] is GPTQStep
    assert STEPS["rtn"] is RTNStep
    for name, cls in STEPS.items():
        assert issubclass(cls, StepConfig)
        assert cls.name == name
    assert issubclass(GPTQStep, RounderStep) and GPTQStep.kind == "rounder"
    assert "hessian" in GPTQStep().stats()
    assert RTNStep().stats() == set()


def test_register_step_rejects_a_duplicate_name() -> None:
    class Again(RounderStep):
        name: ClassVar[str] = "gptq"

    with pytest.raises(ValueError, match="gptq"):
        register_step(Again)
    assert STEPS["gptq"] is GPTQStep


def test_a_registered_step_is_usable_by_name(noop_step: type[StepConfig]) -> None:
    r = Recipe(steps=["noop_transform", "rtn"])
    assert [type(s) for s in r.steps] == [noop_step, RTNStep]
    assert r.rounder == RTNStep()


# --------------------------------------------------------------------------------------------
# Errors: one line naming the problem
# --------------------------------------------------------------------------------------------


def test_unknown_recipe_name() -> None:
    msg = load_error("no-such-recipe")
    assert "no-such-recipe" in msg and "gptq" in msg and "rtn" in msg


def test_unknown_step(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, "steps:\n  - awq: {}\n"))
    assert "awq" in msg and "gptq" in msg  # names it and lists the registered steps


@pytest.mark.parametrize(
    ("step", "needle"),
    [
        ("gptq: {damp: -1}", "damp"),
        ("gptq: {damp: 2}", "damp"),
        ("gptq: {block_size: 0}", "block_size"),
        ("gptq: {group_params: sometimes}", "group_params"),
        ("gptq: {dampp: 0.1}", "dampp"),
        ("rtn: {clip_search: maybe}", "clip_search"),
    ],
)
def test_bad_step_field(tmp_path: Path, step: str, needle: str) -> None:
    msg = load_error(write(tmp_path, f"steps:\n  - {step}\n"))
    assert needle in msg and str(tmp_path / "r.yaml") in msg


def test_bad_scheme_field(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, "scheme: {weights: {bits: 12}}\nsteps: [rtn]\n"))
    assert "bits" in msg


def test_not_valid_yaml(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, "steps: [\n"))
    assert "not valid YAML" in msg and "line" in msg


def test_not_a_mapping(tmp_path: Path) -> None:
    assert "mapping" in load_error(write(tmp_path, "- rtn\n"))
    assert "mapping" in load_error(write(tmp_path, "", name="empty.yaml"))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00steps")
    assert "bin.yaml" in load_error(path)


def test_empty_steps(tmp_path: Path) -> None:
    assert "steps" in load_error(write(tmp_path, "steps: []\n"))
    assert "steps" in load_error(write(tmp_path, "scheme: {}\n", name="nosteps.yaml"))


def test_step_with_two_keys(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, "steps:\n  - {gptq: {}, rtn: {}}\n"))
    assert "one-key" in msg


def test_two_rounders(tmp_path: Path) -> None:
    msg = load_error(write(tmp_path, "steps:\n  - gptq\n  - rtn\n"))
    assert "at most 1 rounder step, got gptq, rtn" in msg
    with pytest.raises(ValidationError, match="at most 1 rounder step"):
        Recipe(steps=[GPTQStep(), RTNStep()])


def test_zero_rounders(tmp_path: Path, noop_step: type[StepConfig]) -> None:
    msg = load_error(write(tmp_path, "steps:\n  - noop_transform\n"))
    rounders = ", ".join(sorted(n for n, c in STEPS.items() if c.kind == "rounder"))
    assert f"needs a rounder step ({rounders}); it has none" in msg


def test_the_run_seed_reaches_every_seeded_step() -> None:
    from compensator.recipes.recipe import load_recipe

    quarot = load_recipe("quarot-gptq-lrc-split")
    assert quarot.with_seed(0) is quarot
    moved = quarot.with_seed(3)
    seeds = {s.name: s.seed for s in moved.steps if "seed" in type(s).model_fields}
    assert seeds and all(v == 3 for v in seeds.values()), seeds
    ssvq = load_recipe("ssvq-2bit").with_seed(2)
    assert {s.name: s.seed for s in ssvq.steps if "seed" in type(s).model_fields} == {
        "train": 2,
        "vq": 2,
    }
    assert load_recipe("gptq").with_seed(5).steps == load_recipe("gptq").steps  # nothing drawn
    assert not load_recipe("rtn").draws_at_random()  # compare runs it once per bits
    assert load_recipe("gptq").draws_at_random() and quarot.draws_at_random()
