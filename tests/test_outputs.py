"""Outputs are never lost or trusted blindly: --force replaces only an earlier output, an
interrupted save leaves nothing (or keeps the old checkpoint), a damaged checkpoint is
refused before any number is computed, and so is a base model that is not the recorded one."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import compensator.api
import compensator.io.native
from cli_helpers import assert_user_error, eval_json, hidden_entries, invoke, quantize_args
from conftest import tiny_llama


def test_force_replaces_a_checkpoint(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    first = invoke(*quantize_args(tiny_dir, out, "--bits", 4, recipe="rtn"))
    assert first.exit_code == 0, (first.output, first.exception)

    refused = invoke(*quantize_args(tiny_dir, out, "--bits", 3, recipe="rtn"))
    assert_user_error(refused, "--force", str(out))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["weights"]["bits"] == 4  # untouched

    forced = invoke(*quantize_args(tiny_dir, out, "--bits", 3, "--force", recipe="rtn"))
    assert forced.exit_code == 0, (forced.output, forced.exception)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["weights"]["bits"] == 3
    assert [list(step) for step in qc["recipe"]["steps"]] == [["rtn"]]
    assert hidden_entries(tmp_path) == []  # no .q.partial-* nor .q.old-* left behind


def test_quantize_into_an_existing_empty_dir(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    result = invoke(*quantize_args(tiny_dir, out, recipe="rtn"))
    assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "model.safetensors").is_file()
    assert hidden_entries(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Interrupted saves
# --------------------------------------------------------------------------------------------


def interrupt_save(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def boom(tensors: Any, filename: str, *args: Any, **kwargs: Any) -> None:
        calls.append(filename)
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    def boom_streamed(path: Path, tensors: Any, metadata: Any) -> None:
        boom(tensors, str(path))

    # From memory, or assembled from the run state's block files (a model read lazily).
    monkeypatch.setattr(compensator.io.native, "save_file", boom)
    monkeypatch.setattr(compensator.io.native, "write_streamed", boom_streamed)
    return calls


def test_interrupted_save_leaves_nothing(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    qm = compensator.api.quantize(str(tiny_dir), "rtn", bits=4, group_size=16, progress=False)
    calls = interrupt_save(monkeypatch)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        compensator.api.save(qm, out)
    assert calls, "save_file was not reached"
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_cli_exits_130(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = interrupt_save(monkeypatch)
    out = tmp_path / "q"
    result = invoke(*quantize_args(tiny_dir, out, recipe="rtn"))
    assert calls, "save_file was not reached"
    assert result.exit_code == 130, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert "interrupted" in result.stderr and "q.partial" in result.stderr
    assert not out.exists()
    # Every block was finished: they are kept for the rerun, nothing else is left.
    assert [p.name for p in tmp_path.iterdir()] == ["q.partial"]
    monkeypatch.undo()
    assert invoke(*quantize_args(tiny_dir, out, recipe="rtn")).exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_interrupted_forced_save_keeps_the_old_checkpoint(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "q"
    assert invoke(*quantize_args(tiny_dir, out, "--bits", 4, recipe="rtn")).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    interrupt_save(monkeypatch)
    result = invoke(*quantize_args(tiny_dir, out, "--bits", 3, "--force", recipe="rtn"))
    assert result.exit_code == 130, (result.output, result.exception)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert hidden_entries(tmp_path) == []


@pytest.mark.parametrize("which", ["empty", "cwd", "parent", "model", "other"])
def test_force_never_replaces_what_is_not_an_output(
    which: str, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "keep.txt").write_text("mine")
    (work / "other").mkdir()
    (work / "other" / "data.csv").write_text("1,2")
    monkeypatch.chdir(work / "notes")
    out = {"empty": "", "cwd": ".", "parent": "..", "model": str(tiny_dir),
           "other": str(work / "other")}[which]  # fmt: skip
    before = sorted(p.name for p in Path(out or ".").resolve().iterdir())
    result = invoke(*quantize_args(tiny_dir, out, "--force", recipe="rtn"))
    why = {"empty": "--out is empty", "cwd": "working directory", "parent": "one of its parents",
           "model": "is the source", "other": "is not a checkpoint or export"}[which]  # fmt: skip
    assert_user_error(result, why)
    assert sorted(p.name for p in Path(out or ".").resolve().iterdir()) == before
    assert (work / "notes" / "keep.txt").read_text() == "mine"


def _flip(path: Path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = bytes(b ^ 0xFF for b in data[offset : offset + n])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "bits", "missing-embedding"])
def test_a_damaged_checkpoint_is_refused_before_any_number(
    damage: str, tiny_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "q"
    assert invoke(*quantize_args(tiny_dir, out, recipe="rtn")).exit_code == 0
    weights = out / "model.safetensors"
    if damage == "flip":
        _flip(weights, weights.stat().st_size // 2)
        why = "differs from the checkpoint's manifest"
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-4096])
        why = "truncated or changed"
    elif damage == "bits":
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"]["weights"]["bits"] = 3
        (out / "config.json").write_text(json.dumps(config))
        why = "config.json"
    else:
        from safetensors.torch import load_file, save_file

        state = load_file(weights)
        del state["model.embed_tokens.weight"]
        save_file(state, weights)
        # As in a format-2 checkpoint, which had no manifest: the loader checks the tensors.
        (out / "manifest.json").unlink()
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"]["format_version"] = 2
        (out / "config.json").write_text(json.dumps(config))
        why = "missing ['model.embed_tokens.weight']"
    for args in (["eval", str(out), "--windows", "1", "--json"],
                 ["export", str(out), "--format", "compressed-tensors", "--out",
                  str(tmp_path / "ct")]):  # fmt: skip
        result = invoke(*args)
        assert_user_error(result, why)
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("change", ["other-model", "gone"])
def test_eval_refuses_a_base_model_that_is_not_the_recorded_one(
    change: str, tiny_dir: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    out = tmp_path / "q"
    assert invoke(*quantize_args(base, out, recipe="rtn")).exit_code == 0
    if change == "other-model":  # another model saved at the recorded path
        tiny_llama(seed=9).save_pretrained(base, safe_serialization=True)
        why = ["is not the base model this checkpoint was made from", "--fp"]
    else:
        shutil.rmtree(base)
        why = ["is gone", "--fp"]
    assert_user_error(invoke("eval", out, "--windows", "1", "--json"), *why)
    # the way out the message names: the original model, passed explicitly
    result = eval_json(out, tiny_dir, "--fp", tiny_dir, windows=1)
    assert result["kl"] is not None and result["kl"] >= 0


def test_checkpoint_records_its_base_model_fingerprint(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    assert invoke(*quantize_args(tiny_dir, out, recipe="rtn")).exit_code == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    files = qc["base_model_fingerprint"]["files"]
    weights = tiny_dir / "model.safetensors"
    assert files["model.safetensors"] == {
        "bytes": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }


def test_leftovers_of_killed_saves_are_removed(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid no longer runs: a save killed mid-way
    gone = tmp_path / f".q.partial-{finished.pid}-1"
    gone.mkdir()
    (gone / "model.safetensors").write_bytes(b"x" * 1000)
    alive = tmp_path / f".q.partial-{os.getpid()}-2"  # a save still running
    alive.mkdir()
    assert invoke(*quantize_args(tiny_dir, out, recipe="rtn")).exit_code == 0
    assert not gone.exists() and alive.exists()


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on a 96 KiB filesystem (a tmpfs where mounting is allowed); elsewhere the
    checkpoint writer fails as a full disk makes safetensors fail."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        from safetensors import SafetensorError

        def full(*args: Any, **kwargs: Any) -> None:
            raise SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )

        def full_streamed(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(compensator.io.native, "save_file", full)
        monkeypatch.setattr(compensator.io.native, "write_streamed", full_streamed)
    yield where
    if mounted.returncode == 0:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_says_so_and_leaves_nothing(tiny_dir: Path, small_disk: Path) -> None:
    out = small_disk / "q"
    result = invoke(*quantize_args(tiny_dir, out, recipe="rtn"))
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("error: disk full while writing"), lines
    assert not out.exists() and hidden_entries(small_disk) == []
