"""Resumable runs: an interrupted run continues at its first unfinished block and gives
bit-identically the checkpoint an uninterrupted run gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import compensator.pipeline.resume as resume
from cli_helpers import assert_user_error, invoke, quantize_args
from compensator import api
from compensator.errors import CompensatorError, RunInterrupted
from compensator.io.atomic import state_dir
from compensator.pipeline.resume import RunState
from conftest import model_dir_like

CALIB = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(3))


def _tiny_dir(tmp_path: Path, tiny_dir: Path) -> Path:
    """A 4-block model (more blocks than the session one, so a run can stop in the middle)."""
    return model_dir_like(tiny_dir, tmp_path / "model", layers=4, seed=5)


def _stop_after(monkeypatch: pytest.MonkeyPatch, blocks: int) -> list[int]:
    """Ctrl-C right after block ``blocks - 1`` was written (a kill between two blocks)."""
    saved: list[int] = []
    real = RunState.save_block

    def save_then_stop(self: RunState, index: int, *args: object, **kw: object) -> None:
        real(self, index, *args, **kw)  # type: ignore[arg-type]
        saved.append(index)
        if len(saved) == blocks:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunState, "save_block", save_then_stop)
    return saved


def _interrupted_gptq(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blocks: int = 2
) -> tuple[Path, Path]:
    """The 4-block model, and the state of a W4 GPTQ run on it stopped after ``blocks``."""
    model = _tiny_dir(tmp_path, tiny_dir)
    where = tmp_path / "run.partial"
    _stop_after(monkeypatch, blocks)
    with pytest.raises(RunInterrupted):
        api.quantize(str(model), "gptq", bits=4, calibration=CALIB, progress=False, resume=where)
    monkeypatch.undo()
    return model, where


def _assert_identical(a: api.QuantizedModel, b: api.QuantizedModel, tmp_path: Path) -> None:
    """The same checkpoint, byte for byte (``b`` may have been read block by block and live
    in its run state, which saving it removes)."""
    assert a.quantization_config == b.quantization_config
    api.save(a, tmp_path / "a")
    api.save(b, tmp_path / "b")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize(
    ("recipe", "kw"),
    [
        ("gptq", {"bits": 3, "group_size": 16}),
        ("gptaq-exact", {"bits": 3, "group_size": 16}),  # reads the FP stream
        ("gptq-l2qer", {"bits": 3, "group_size": 16, "rank": 4}),  # low-rank factors
        ("omniquant", {"epochs": 1}),  # a trained block hook that folds into the norms
        ("sde-cll", {"epochs": 1}),  # trains against the next block
        # a model transform, online rotations, 4-bit activations, the split-input LRC
        ("quarot-gptq-lrc-split", {}),
        ("ssvq-2bit", {"epochs": 1}),  # codebooks
    ],
)
def test_resumed_run_is_bit_identical(
    recipe: str, kw: dict, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _tiny_dir(tmp_path, tiny_dir)
    common = dict(calibration=CALIB, progress=False, batch_size=2, **kw)
    whole = api.quantize(str(model), recipe, **common)
    where = tmp_path / "run.partial"
    saved = _stop_after(monkeypatch, 2)
    with pytest.raises(RunInterrupted, match="2 finished blocks are kept"):
        api.quantize(str(model), recipe, resume=where, **common)
    assert saved == [0, 1]
    monkeypatch.undo()
    restored: list[int] = []
    real = RunState.load_block
    monkeypatch.setattr(
        RunState,
        "load_block",
        lambda self, i, block: restored.append(i) or real(self, i, block),
    )
    again = api.quantize(str(model), recipe, resume=where, **common)
    assert restored == [0, 1]
    assert again.report["blocks"] == 4
    _assert_identical(whole, again, tmp_path)
    assert not where.exists(), "the state outlived the saved checkpoint"


def test_a_different_run_starts_over(
    tiny_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, where = _interrupted_gptq(tiny_dir, tmp_path, monkeypatch)
    loads: list[int] = []
    monkeypatch.setattr(RunState, "load_block", lambda *a: loads.append(1))  # none expected
    with caplog.at_level("WARNING"):
        api.quantize(str(model), "gptq", bits=3, calibration=CALIB, progress=False, resume=where)
    assert loads == []
    assert "starting over" in caplog.text and "recipe" in caplog.text
    # that run finished (its blocks are kept until a save): with restart they are not reused
    api.quantize(
        str(model), "gptq", bits=3, calibration=CALIB, progress=False, resume=where, restart=True
    )
    assert loads == []


def test_cli_resumes_and_says_so(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _tiny_dir(tmp_path, tiny_dir)
    out = tmp_path / "q"
    args = quantize_args(model, out, "--bits", 3, "--group-size", 16)
    _stop_after(monkeypatch, 3)
    result = invoke(*args)
    assert result.exit_code == 130, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "3 finished blocks are kept in" in lines[0] and "--restart" in lines[0]
    assert not out.exists() and state_dir(out).is_dir()
    monkeypatch.undo()
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert not state_dir(out).exists()
    whole = invoke(*quantize_args(model, tmp_path / "whole", "--bits", 3, "--group-size", 16))
    assert whole.exit_code == 0
    for name in ("model.safetensors", "config.json", "manifest.json"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_second_run_on_the_same_out_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    with RunState.open(state_dir(out)):  # another run holds it
        result = invoke(*quantize_args(tiny_dir, out))
    assert_user_error(result, "another run is writing to", "q.partial")
    assert not out.exists()


def test_a_damaged_saved_block_is_refused(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, where = _interrupted_gptq(tiny_dir, tmp_path, monkeypatch)
    block = where / "block-00001.safetensors"
    data = bytearray(block.read_bytes())
    data[len(data) // 2] ^= 0xFF
    block.write_bytes(bytes(data))
    with pytest.raises(CompensatorError, match=r"saved block 1 .* is damaged.*--restart"):
        api.quantize(str(model), "gptq", bits=4, calibration=CALIB, progress=False, resume=where)


def test_a_failed_start_leaves_no_state(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    result = invoke(*quantize_args(tmp_path / "missing-model", out))
    assert result.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_names_what_changed() -> None:
    old = {"model": {"files": {"a": 1}}, "recipe": {"x": 1}, "threads": 2}
    assert resume._difference(old, {**old, "threads": 1}) is None
    assert "recipe" in (resume._difference(old, {**old, "recipe": {"x": 2}}) or "")
    assert "model" in (resume._difference(old, {**old, "model": {}}) or "")


def test_run_json_records_the_fingerprint(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, where = _interrupted_gptq(tiny_dir, tmp_path, monkeypatch, blocks=1)
    fp = json.loads((where / "run.json").read_text())["fingerprint"]
    assert set(fp["model"]["files"]) == {"config.json", "model.safetensors"}
    assert len(fp["calibration"]["sha256"]) == 64
    assert fp["recipe"]["name"] == "gptq" and fp["threads"] == torch.get_num_threads()


# Run in a child process that SIGKILLs itself at block K: after the block was written
# ("after"), or while its metadata is being written ("mid-save", the block is not finished).
KILLER = """
import os, signal, sys
import compensator.pipeline.resume as r
k, phase = int(sys.argv[1]), sys.argv[2]
real_save = r.RunState.save_block
def save(self, i, *args, **kwargs):
    if phase == "mid-save" and i == k:
        r._write_atomic = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    real_save(self, i, *args, **kwargs)
    if phase == "after" and i == k:
        os.kill(os.getpid(), signal.SIGKILL)
r.RunState.save_block = save
from compensator.cli import main
main(sys.argv[3:])
"""


@pytest.fixture(scope="module")
def four_blocks(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The 4-block model, and its uninterrupted checkpoint."""
    root = tmp_path_factory.mktemp("four-blocks")
    model = _tiny_dir(root, tiny_dir)
    whole = root / "whole"
    assert invoke(*quantize_args(model, whole, "--bits", 3, recipe="gptaq-exact")).exit_code == 0
    return model, whole


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_block_then_resume(
    seed: int, four_blocks: tuple[Path, Path], tmp_path: Path
) -> None:
    import random
    import signal
    import subprocess
    import sys

    model, whole = four_blocks
    rng = random.Random(seed)
    k, phase = rng.randrange(3), rng.choice(["after", "mid-save"])
    out = tmp_path / "q"
    args = [str(a) for a in quantize_args(model, out, "--bits", 3, recipe="gptaq-exact")]
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, str(k), phase, *args], capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists()
    finished = sorted(p.name for p in state_dir(out).glob("block-*.json"))
    assert len(finished) == (k + 1 if phase == "after" else k), (k, phase, finished)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "config.json", "manifest.json"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), (k, phase, name)
    assert not state_dir(out).exists()
