"""The bad-input table (issue 16): each row gets one line naming what is wrong and how to
fix it, exit status 2, no traceback, and nothing at --out."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cli_helpers import assert_user_error, invoke, quantize_args
from conftest import tiny_llama


def _copy_with(
    tiny_dir: Path, tmp_path: Path, change: Callable[..., None], **config: object
) -> Path:
    """The tiny model's directory with its weights changed by ``change(model)``."""
    directory = tmp_path / "model"
    shutil.copytree(tiny_dir, directory)
    model = tiny_llama(**config)
    change(model)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def nan_weight(m) -> None:
    m.model.layers[1].mlp.down_proj.weight.data[3, 5] = float("nan")


def inf_embedding(m) -> None:
    m.model.embed_tokens.weight.data[:, 3] = float("inf")


def huge_norm(m) -> None:  # finite weights, activations that overflow float32
    m.model.layers[0].post_attention_layernorm.weight.data.fill_(1e30)


MODEL_ROWS = {
    "nan-weight": (nan_weight, {}, "gptq", "model.layers.1.mlp.down_proj.weight holds 1 NaN/Inf"),
    "inf-embedding": (inf_embedding, {}, "gptq", "model.embed_tokens.weight holds"),
    "overflowing-activations": (
        huge_norm, {}, "gptq", "the inputs of model.layers.0.mlp.gate_proj overflow",
    ),
    "tokenizer-bigger-than-vocab": (
        lambda m: None, {"vocab_size": 64}, "gptq", "embedding has only 64 rows",
    ),
}  # fmt: skip


@pytest.mark.parametrize("row", sorted(MODEL_ROWS))
def test_bad_model(row: str, tiny_dir: Path, tmp_path: Path) -> None:
    change, config, recipe, needle = MODEL_ROWS[row]
    model = _copy_with(tiny_dir, tmp_path, change, **config)
    out = tmp_path / "q"
    assert_user_error(invoke(*quantize_args(model, out, recipe=recipe)), needle)
    assert not out.exists()


ARG_ROWS = {
    "group-size-1": (["--group-size", 1], "rtn", "--group-size 1 stores a scale"),
    "group-size-7": (["--group-size", 7], "rtn", "use 32-128, or -1"),
    "rank-beyond-layer": (["--rank", 1000], "rtn-lqer", "--rank 1000 is larger than"),
    "seqlen-beyond-context": (
        ["--seqlen", 4096],
        "gptq",
        "--seqlen 4096 is beyond the model's context (2048",
    ),
}


@pytest.mark.parametrize("row", sorted(ARG_ROWS))
def test_bad_argument(row: str, tiny_dir: Path, tmp_path: Path) -> None:
    extra, recipe, needle = ARG_ROWS[row]
    out = tmp_path / "q"
    assert_user_error(invoke(*quantize_args(tiny_dir, out, *extra, recipe=recipe)), needle)
    assert not out.exists()


def test_eval_seqlen_beyond_context(tiny_dir: Path) -> None:
    result = invoke("eval", tiny_dir, "--seqlen", 4096, "--windows", 1, "--no-progress")
    assert_user_error(result, "beyond the model's context (2048 positions)")


def test_missing_calib_file_is_an_error_even_for_rtn(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    args = ["quantize", tiny_dir, "--recipe", "rtn", "--out", out, "--no-progress"]
    assert_user_error(invoke(*args, "--calib", tmp_path / "nope.txt"), "nope.txt does not exist")
    assert not out.exists()


def test_an_encoder_model_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)  # fmt: skip
    BertForMaskedLM(config).save_pretrained(bert, safe_serialization=True)
    out = tmp_path / "q"
    result = invoke("quantize", bert, "--recipe", "rtn", "--out", out, "--no-progress")
    assert_user_error(result, "bert model, an encoder", "decoder-only causal LMs")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncated-safetensors", "8-byte-gguf"])
def test_damaged_model_files(damage: str, tiny_dir: Path, tmp_path: Path) -> None:
    if damage == "truncated-safetensors":
        model = tmp_path / "model"
        shutil.copytree(tiny_dir, model)
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-4096])
        needle = "truncated or damaged"
    else:
        model = tmp_path / "x.gguf"
        model.write_bytes(b"GGUF\x03\x00\x00\x00")
        needle = "cannot load GGUF file"
    out = tmp_path / "q"
    result = invoke("quantize", model, "--recipe", "rtn", "--out", out, "--no-progress")
    assert_user_error(result, needle)
    assert not out.exists()


def test_out_under_a_file(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "q"
    assert_user_error(invoke(*quantize_args(tiny_dir, out, recipe="rtn")), "afile")


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_remote_code_runs_only_when_asked(
    command: str, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import compensator.io.targets
    import compensator.pipeline.session
    from compensator.errors import CompensatorError

    asked: list[bool] = []

    def record(name: str, *args: object, trust_remote_code: bool = False, **kw: object) -> None:
        asked.append(trust_remote_code)
        raise CompensatorError("stop here")

    monkeypatch.setattr(compensator.io.targets, "load_model", record)  # eval
    monkeypatch.setattr(compensator.pipeline.session, "load_model", record)  # quantize
    args = (
        quantize_args(tiny_dir, tmp_path / "q", recipe="rtn")
        if command == "quantize"
        else ["eval", tiny_dir, "--no-progress"]
    )
    assert_user_error(invoke(*args), "stop here")
    assert_user_error(invoke(*args, "--trust-remote-code"), "stop here")
    assert asked == [False, True]


# --------------------------------------------------------------------------------------------
# Issue 34: the rest of the rows
# --------------------------------------------------------------------------------------------

HUGE = "99999999999999999999"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--group-size", HUGE], f"--group-size {HUGE} is out of range"),
        (["--seed", HUGE], f"--seed {HUGE} is out of range"),
    ],
    ids=["group-size", "seed"],
)
def test_huge_numbers_are_one_line_before_loading(
    extra: list[str], needle: str, tiny_dir: Path, tmp_path: Path, no_model_load: list[str]
) -> None:
    out = tmp_path / "q"
    assert_user_error(invoke(*quantize_args(tiny_dir, out, *extra)), needle)
    assert no_model_load == [] and not out.exists()
    assert list(tmp_path.iterdir()) == []  # no run state either


@pytest.mark.parametrize("length", [300, 250])
def test_an_out_name_too_long_for_the_file_system(
    length: int, tiny_dir: Path, tmp_path: Path, no_model_load: list[str]
) -> None:
    out = tmp_path / ("x" * length)
    line = assert_user_error(invoke(*quantize_args(tiny_dir, out)), f"{length} characters")
    assert "allows 215" in line  # 255, less the room our hidden siblings take
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("calib", ["directory", "directory.txt", "/dev/urandom", "device.txt"])
def test_calib_that_is_not_a_text_file(calib: str, tiny_dir: Path, tmp_path: Path) -> None:
    path = Path(calib)
    if calib.startswith("directory"):
        path = tmp_path / calib
        path.mkdir()
        needle = "is a directory"
    else:
        if calib == "device.txt":
            path = tmp_path / calib
            path.symlink_to("/dev/urandom")
        needle = "is a device or pipe"
    out = tmp_path / "q"
    args = ["quantize", tiny_dir, "--recipe", "rtn", "--out", out, "--calib", path, "--no-progress"]
    line = assert_user_error(invoke(*args), str(path), needle)
    assert "does not exist" not in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--calib-windows", -1], "--calib-windows -1 is not valid"),
        (["--seqlen", 4096], "--seqlen 4096 is beyond the model's context (2048"),
    ],
    ids=["windows", "seqlen"],
)
def test_plan_refuses_what_quantize_refuses(
    extra: list[object], needle: str, tiny_dir: Path, tmp_path: Path
) -> None:
    assert_user_error(invoke("plan", tiny_dir, "--recipe", "gptq", *extra), needle)
    assert_user_error(invoke(*quantize_args(tiny_dir, tmp_path / "q", *extra)), needle)


def test_calibration_windows_beyond_the_text_warn(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from compensator.data import calibration_windows

    tokens = torch.arange(1000)
    calibration_windows(tokens, 8, 64)  # 512 of 1000 tokens: quiet
    assert "overlap and repeat" not in caplog.text
    assert calibration_windows(tokens, 100, 64).shape == (100, 64)  # legal, but said
    assert "6400 tokens from a text of 1000" in caplog.text and "at most 15 windows" in caplog.text


def test_compare_dedupes_and_checks_matplotlib_before_any_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys

    import compensator.compare.run as run
    from compensator.compare import Settings, compare
    from compensator.errors import CompensatorError

    ran: list[tuple[object, ...]] = []

    def fake_run(settings: object, recipes: list[str], bits: list[object], seeds: list[int],
                 *args: object, **kwargs: object) -> list[dict[str, object]]:  # fmt: skip
        ran.append((recipes, bits, seeds))
        raise CompensatorError("stop after the grid is known")

    monkeypatch.setattr(run, "run_compare", fake_run)
    with pytest.raises(CompensatorError, match="stop after"):
        compare(Settings(model="m"), ["gptq", "gptq", "rtn"], [4, 4], [0, 1, 0], tmp_path,
                threads=1)  # fmt: skip
    assert ran == [(["gptq", "rtn"], [4], [0, 1])]
    assert "--recipes lists gptq more than once" in caplog.text
    assert "--bits lists 4 more than once" in caplog.text

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    with pytest.raises(CompensatorError, match="needs matplotlib"):
        compare(Settings(model="m"), ["rtn"], [4], [0], tmp_path, threads=1)
    assert len(ran) == 1  # no cell ran


def test_an_already_quantized_model_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    ck, ct = tmp_path / "ck", tmp_path / "ct"
    assert invoke(*quantize_args(tiny_dir, ck, "--group-size", 32, recipe="rtn")).exit_code == 0
    assert invoke("export", ck, "--format", "compressed-tensors", "--out", ct).exit_code == 0
    out = tmp_path / "q"
    result = invoke(*quantize_args(ct, out, recipe="rtn"))
    assert_user_error(result, "is already quantized (compressed-tensors)", "full-precision")
    assert not out.exists()


def test_a_quantized_gguf_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import torch

    import compensator as cp
    from compensator.models.checks import check_not_quantized
    from compensator.models.loading import LoadedModel
    from test_nothing_lost import _base_gguf

    model = tiny_llama()
    calib = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    qm = cp.quantize(LoadedModel(model, None, "tiny"), "rtn", bits=5, group_size=32,
                     symmetric=True, calibration=calib, progress=False)  # fmt: skip
    base = _base_gguf(tmp_path / "base.gguf", model.config)
    q5 = cp.save(qm, tmp_path / "q5.gguf", format="gguf", base=str(base))
    check_not_quantized(str(q5), builtin=False)
    assert "holds Q5_0-quantized weights" in caplog.text
    caplog.clear()
    check_not_quantized(str(q5), builtin=True)  # the bundled SmolLM2 is a Q4_1 GGUF on purpose
    assert "quantized weights" not in caplog.text


def _fewer_layers(directory: Path) -> str:
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    return "holds tensors its config.json's model has not, such as model.layers.1."


def _extra_tensor(directory: Path) -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(directory / "model.safetensors")
    state["model.extra.weight"] = state["model.norm.weight"].clone()
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return "such as model.extra.weight"


def _other_width(directory: Path) -> str:
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 80
    (directory / "config.json").write_text(json.dumps(config))
    return "has a shape other than its config.json's for model.layers.0.mlp"


@pytest.mark.parametrize("change", [_fewer_layers, _extra_tensor, _other_width],
                         ids=["fewer-layers", "extra-tensor", "size-mismatch"])  # fmt: skip
def test_config_and_weights_that_disagree(
    change: Callable[[Path], str], tiny_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    needle = change(model)
    out = tmp_path / "q"
    assert_user_error(invoke(*quantize_args(model, out, recipe="rtn")), needle)
    assert not out.exists() and not (tmp_path / "q.partial").exists()


def test_a_duplicate_yaml_key_is_an_error(tiny_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "scheme:\n  weights: {bits: 4, group_size: 32}\n  weights: {bits: 3, group_size: 32}\n"
        "steps:\n  - rtn\n"
    )
    out = tmp_path / "q"
    result = invoke(*quantize_args(tiny_dir, out, recipe=str(recipe)))
    assert_user_error(result, "key 'weights' is given twice at line 3")
    assert not out.exists()


def test_activation_bits_without_a_kernel_warn(caplog: pytest.LogCaptureFixture) -> None:
    from compensator.recipes.recipe import load_recipe

    load_recipe("rtn").with_overrides(act_bits=8)
    assert "no engine has a kernel" not in caplog.text
    rec = load_recipe("rtn").with_overrides(act_bits=3)
    assert rec.scheme.activations.bits == 3  # legal: simulated
    assert "3-bit activations are simulated here and no engine has a kernel" in caplog.text


def _api_calls() -> dict[str, tuple[Callable[[], object], str]]:
    import torch

    import compensator as cp
    from compensator.models.loading import LoadedModel

    def tiny() -> LoadedModel:
        return LoadedModel(tiny_llama(), None, "tiny")

    return {
        "recipe=5": (lambda: cp.quantize(tiny(), recipe=5), "recipe must be a preset name"),
        "1-D calibration": (
            lambda: cp.quantize(tiny(), "gptq", calibration=torch.arange(3, 67)),
            "calibration has shape (64,)",
        ),
        "float calibration": (
            lambda: cp.quantize(tiny(), "gptq", calibration=torch.rand(4, 32)),
            "calibration is a float32 tensor",
        ),
        "seqlen='64'": (
            lambda: cp.quantize(tiny(), "gptq", seqlen="64"),
            "seqlen='64' is not a whole number",
        ),
        "save(None)": (lambda: cp.save(None, "out"), "save() takes the QuantizedModel"),
        "quantize(123)": (lambda: cp.quantize(123), "model must be a model name, a path"),
        "load(None)": (lambda: cp.load(None), "the checkpoint path must be a str or Path"),
        "evaluate(5)": (lambda: cp.evaluate(5), "evaluate() takes a checkpoint or model path"),
    }


@pytest.mark.parametrize("call", sorted(_api_calls()))
def test_api_wrong_types_are_one_line(call: str, tmp_path: Path, monkeypatch) -> None:
    from compensator.errors import CompensatorError

    monkeypatch.chdir(tmp_path)
    fn, needle = _api_calls()[call]
    with pytest.raises(CompensatorError) as err:
        fn()
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


# Sends itself SIGTERM once block 0 is saved, as a scheduler stopping the job would.
TERMINATOR = """
import os, signal, sys
import compensator.pipeline.resume as r
real_save = r.RunState.save_block
def save(self, i, *args, **kwargs):
    real_save(self, i, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
r.RunState.save_block = save
from compensator.cli import main
main(sys.argv[1:])
"""


def test_sigterm_prints_a_line_like_ctrl_c(tiny_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "q"
    args = [str(a) for a in quantize_args(tiny_dir, out, recipe="gptq")]
    done = subprocess.run([sys.executable, "-c", TERMINATOR, *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 130, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted; 1 finished blocks are kept in"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not out.exists()
    assert invoke(*quantize_args(tiny_dir, out, recipe="gptq")).exit_code == 0  # resumes
