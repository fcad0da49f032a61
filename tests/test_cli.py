"""The command line: one-line errors with exit status 2 and happy paths on the tiny model.

Every user error must print a single ``error: ...`` line on stderr naming what is wrong,
exit with status 2 and never show a traceback.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest

import compensator
from cli_helpers import FAST, assert_user_error, eval_json, hidden_entries, invoke, quantize_args
from compensator.recipes import load_recipe
from compensator.steps import STEPS, StepConfig
from compensator.steps.base import StepKind

# --------------------------------------------------------------------------------------------
# Happy paths
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "q"
    result = invoke(*quantize_args(tiny_dir, out, "--bits", 4, "--group-size", 16))
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout.startswith(f"saved {out}"), result.stdout
    return out


def test_quantize_writes_a_checkpoint(checkpoint: Path) -> None:
    names = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "recipe.yaml"} <= names
    qc = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compensator"
    assert qc["weights"]["bits"] == 4 and qc["weights"]["group_size"] == 16
    assert qc["calibration"]["windows"] == 4 and qc["calibration"]["seqlen"] == 32
    assert qc["modules"]
    # recipe.yaml reads back as the recipe that made it, overrides included.
    assert load_recipe(checkpoint / "recipe.yaml") == load_recipe("gptq").with_weights(
        bits=4, group_size=16
    )
    assert hidden_entries(checkpoint.parent) == []


def test_eval_checkpoint_json(checkpoint: Path, tiny_dir: Path) -> None:
    q = eval_json(checkpoint, tiny_dir)
    assert {"ppl", "fp_ppl", "kl", "windows", "seqlen"} <= set(q)
    assert (q["windows"], q["seqlen"]) == (3, 32)
    assert q["kl"] > 0
    assert math.isfinite(q["ppl"]) and q["ppl"] > 1
    # The FP reference is the base model recorded in the checkpoint.
    fp = eval_json(tiny_dir, tiny_dir)
    assert fp["fp_ppl"] is None and fp["kl"] is None and fp["bits_per_weight"] is None
    # 4-bit codes plus an fp16 scale and a 4-bit zero per group of 16: 4 + 20/16 bits.
    assert q["bits_per_weight"] == pytest.approx(4 + 20 / 16)
    assert q["fp_ppl"] == pytest.approx(fp["ppl"], rel=1e-6)
    # 4 bits with groups of 16 stays close to the FP model.
    assert abs(math.log(q["ppl"] / q["fp_ppl"])) < 0.1


def test_eval_with_explicit_fp_and_text_output(checkpoint: Path, tiny_dir: Path) -> None:
    result = invoke(
        "eval",
        checkpoint,
        "--fp",
        tiny_dir,
        "--data",
        tiny_dir / "eval.txt",
        "--windows",
        2,
        "--seqlen",
        32,
        "--no-progress",
    )
    assert result.exit_code == 0, (result.output, result.exception)
    line = result.stdout.strip()
    assert line.startswith("ppl ") and " fp_ppl " in line and " kl " in line
    assert "(2 windows x 32)" in line


def test_eval_more_windows_than_available_warns(
    tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="compensator"):
        data = eval_json(tiny_dir, tiny_dir, "--seqlen", 512, windows=50)
    assert data["seqlen"] == 512
    assert 1 <= data["windows"] < 50
    assert any("asked for 50 eval windows" in r.getMessage() for r in caplog.records)


def test_recipes_lists_the_presets() -> None:
    result = invoke("recipes")
    assert result.exit_code == 0, (result.output, result.exception)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert {"rtn", "gptq"} <= set(names)


def test_help_and_version() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("quantize", "eval", "recipes", "demo"):
        assert command in result.stdout
    version = invoke("--version")
    assert version.exit_code == 0, (version.output, version.exception)
    assert compensator.__version__ in version.stdout


# --------------------------------------------------------------------------------------------
# User errors: exit 2, one line, no traceback
# --------------------------------------------------------------------------------------------


def test_unknown_model_name(tmp_path: Path) -> None:
    result = invoke("quantize", "no-such-model", "--out", tmp_path / "q", *FAST)
    assert_user_error(result, "no-such-model", "smollm2-135m")
    assert not (tmp_path / "q").exists()


def test_missing_model_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model"
    result = invoke("quantize", missing, "--out", tmp_path / "q", *FAST)
    assert_user_error(result, str(missing))


def test_model_file_that_is_not_gguf(tmp_path: Path, tiny_dir: Path) -> None:
    result = invoke("quantize", tiny_dir / "calib.txt", "--out", tmp_path / "q", *FAST)
    assert_user_error(result, "calib.txt", ".gguf")


def test_unknown_recipe_name(tiny_dir: Path, tmp_path: Path, no_model_load: list[str]) -> None:
    result = invoke(*quantize_args(tiny_dir, tmp_path / "q", recipe="gtpq"))
    assert_user_error(result, "'gtpq'", "gptq", "rtn")
    assert no_model_load == []


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


class NoopTransform(StepConfig):
    name: ClassVar[str] = "noop_transform"
    kind: ClassVar[StepKind] = "transform"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("steps:\n  - awq: {}\n", ("awq", "gptq", "rtn")),
        ("steps:\n  - gptq: {damp: -1}\n", ("damp",)),
        ("steps:\n  - gptq: {act_ordr: true}\n", ("act_ordr",)),
        ("scheme: {weights: {bits: 1}}\nsteps: [rtn]\n", ("bits",)),
        ("steps: [\n  - gptq\n", ("not valid YAML", "line")),
        ("steps:\n\t- gptq\n", ("not valid YAML", "line 2")),
        ("- gptq\n", ("mapping",)),
        ("steps: []\n", ("steps",)),
        ("steps:\n  - gptq\n  - rtn\n", ("at most 1 rounder step", "gptq, rtn")),
        ("steps:\n  - noop_transform\n", ("needs a rounder step", "none")),
    ],
    ids=[
        "unknown-step",
        "bad-damp",
        "unknown-field",
        "bad-bits",
        "bad-yaml",
        "yaml-tab",
        "not-mapping",
        "no-steps",
        "two-rounders",
        "zero-rounders",
    ],
)
def test_bad_recipe_file(
    tiny_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_model_load: list[str],
    text: str,
    needles: Sequence[str],
) -> None:
    monkeypatch.setitem(STEPS, NoopTransform.name, NoopTransform)
    path = write_recipe(tmp_path, text)
    result = invoke(*quantize_args(tiny_dir, tmp_path / "q", recipe=str(path)))
    assert_user_error(result, str(path), *needles)
    assert no_model_load == []
    assert not (tmp_path / "q").exists()


def test_bits_out_of_range_is_a_usage_error(tiny_dir: Path, tmp_path: Path) -> None:
    result = invoke(*quantize_args(tiny_dir, tmp_path / "q", "--bits", 9))
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "--bits" in result.stderr and "9" in result.stderr
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("value", ["0", "-2"])
def test_bad_group_size(
    tiny_dir: Path, tmp_path: Path, no_model_load: list[str], value: str
) -> None:
    result = invoke(*quantize_args(tiny_dir, tmp_path / "q", "--group-size", value))
    assert_user_error(result, "group")
    assert no_model_load == []


def test_out_not_empty_fails_before_loading_the_model(
    tiny_dir: Path, tmp_path: Path, no_model_load: list[str]
) -> None:
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    t0 = time.perf_counter()
    result = invoke(*quantize_args(tiny_dir, out))
    elapsed = time.perf_counter() - t0
    assert_user_error(result, str(out), "--force")
    assert no_model_load == []
    assert elapsed < 5
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_out_is_a_file(tiny_dir: Path, tmp_path: Path, no_model_load: list[str]) -> None:
    out = tmp_path / "q"
    out.write_text("a file")
    result = invoke(*quantize_args(tiny_dir, out, "--force"))
    # click's Path(file_okay=False) or our check: either way exit 2 and it names --out.
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert str(out) in result.stderr or "'--out'" in result.stderr
    assert no_model_load == []
    assert out.read_text() == "a file"


def test_missing_calib_file(tiny_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    result = invoke("quantize", tiny_dir, "--out", tmp_path / "q", "--calib", missing, *FAST)
    assert_user_error(result, str(missing))
    assert not (tmp_path / "q").exists()


def test_unknown_calib_source(tiny_dir: Path, tmp_path: Path) -> None:
    result = invoke("quantize", tiny_dir, "--out", tmp_path / "q", "--calib", "wikitext9", *FAST)
    assert_user_error(result, "wikitext9")


@pytest.mark.parametrize("value", ["0", "-1"])
def test_bad_calib_windows(
    tiny_dir: Path, tmp_path: Path, no_model_load: list[str], value: str
) -> None:
    args = quantize_args(tiny_dir, tmp_path / "q")
    args[args.index("--calib-windows") + 1] = value
    result = invoke(*args)
    assert_user_error(result, "--calib-windows", value)
    assert no_model_load == []


def test_calib_text_too_short_for_seqlen(tiny_dir: Path, tmp_path: Path) -> None:
    args = quantize_args(tiny_dir, tmp_path / "q")
    args[args.index("--seqlen") + 1] = "100000"
    assert_user_error(invoke(*args), "seqlen")


def test_unknown_device(tiny_dir: Path, tmp_path: Path, no_model_load: list[str]) -> None:
    result = invoke(*quantize_args(tiny_dir, tmp_path / "q", "--device", "tpu9"))
    assert_user_error(result, "tpu9")
    assert no_model_load == []


def test_eval_dir_that_is_neither_model_nor_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert_user_error(invoke("eval", tmp_path, "--no-progress"), str(tmp_path), "config.json")


def test_eval_dir_with_config_but_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_user_error(invoke("eval", tmp_path, "--no-progress"), str(tmp_path), "safetensors")


def test_eval_incomplete_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    # format 3: without its manifest the checkpoint is incomplete, whatever else is missing
    assert_user_error(invoke("eval", broken, "--no-progress"), str(broken), "has no manifest.json")


def test_eval_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    assert_user_error(invoke("eval", missing, "--no-progress"), str(missing))


@pytest.mark.parametrize("value", ["0", "-3"])
def test_eval_bad_windows(tiny_dir: Path, no_model_load: list[str], value: str) -> None:
    result = invoke(
        "eval", tiny_dir, "--data", tiny_dir / "eval.txt", "--windows", value, "--no-progress"
    )
    assert_user_error(result, "--windows", value)
    assert no_model_load == []


def test_eval_missing_data_file(tiny_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "eval.txt"
    result = invoke("eval", tiny_dir, "--data", missing, "--seqlen", 32, "--no-progress")
    assert_user_error(result, str(missing))


def test_real_process_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    """The installed entry point, not CliRunner: real stderr, real exit status."""
    src = str(Path(compensator.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "compensator.cli", "quantize", "no-such-model", "--out", "q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "no-such-model" in lines[0]
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_rank_and_act_bits_flags(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    args = quantize_args(tiny_dir, out, "--rank", 4, "--act-bits", 8, recipe="gptq-l2qer")
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["activations"]["bits"] == 8
    assert qc["recipe"]["steps"][1]["lqer"]["rank"] == 4
    q = eval_json(out, tiny_dir)
    # 4-bit codes + scale/zero per group of 128 (one ragged group per row of 64 or 96 inputs),
    # + rank-4 fp16 factors: well above 4 bits on layers this narrow.
    assert q["bits_per_weight"] > 4 + 4 * 16 * 2 / 96


def test_rank_without_a_corrector(tiny_dir: Path, tmp_path: Path, no_model_load: list[str]) -> None:
    result = invoke(*quantize_args(tiny_dir, tmp_path / "q", "--rank", 8, recipe="gptq"))
    assert_user_error(result, "--rank needs a recipe with a low-rank corrector")
    assert no_model_load == []


def test_bad_rank(tiny_dir: Path, tmp_path: Path, no_model_load: list[str]) -> None:
    for bad, why in (
        ("-3", "rank must be >= 0"),
        ("abc", "'abc' is not valid"),
        ("0.3", "ambiguous"),
    ):
        result = invoke(
            *quantize_args(tiny_dir, tmp_path / "q", "--rank", bad, recipe="gptq-l2qer")
        )
        assert result.exit_code == 2 and "Traceback" not in result.output  # click's usage error
        assert "--rank" in result.stderr and why in result.stderr
    assert no_model_load == []


def test_quantize_with_a_learned_recipe_and_epochs(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sde"
    result = invoke(*quantize_args(tiny_dir, out, "--group-size", 16, "--epochs", 1, recipe="sde"))
    assert result.exit_code == 0, (result.output, result.exception)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    train = next(s["train"] for s in qc["recipe"]["steps"] if "train" in s)
    assert train["epochs"] == 1
    assert eval_json(out, tiny_dir)["ppl"] > 0


def test_epochs_on_a_recipe_without_learned_steps_is_a_clear_error(
    tiny_dir: Path, tmp_path: Path, no_model_load: list[str]
) -> None:
    result = invoke(*quantize_args(tiny_dir, tmp_path / "x", "--epochs", 2, recipe="gptq"))
    assert result.exit_code != 0
    assert "--epochs needs a recipe with a learned step" in result.output
    assert no_model_load == []
