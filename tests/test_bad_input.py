"""The bad-input table (issue 16): each row gets one line naming what is wrong and how to
fix it, exit status 2, no traceback, and nothing at --out."""

from __future__ import annotations

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
