"""Flat in depth (issue 17): quantizing a deeper model from safetensors does not raise peak
memory, because neither the FP nor the quantized model is ever whole in memory. Runs
``benchmarks/big_models.py`` (GPTQ, read block by block) and checks what it measured; the
committed results also have gptaq-exact and the whole-load rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "big_models.py"


@pytest.mark.slow
def test_peak_memory_is_flat_in_depth(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--recipes", "gptq", "--modes", "lazy", "--results",
         str(tmp_path), "--name", "flat"],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "flat.json").read_text())
    (row,) = result["rows"]
    print(row, f"12 blocks of fp32 = {result['twelve_blocks_mb']:.0f} MB")
    assert row["rss_16"] - row["rss_4"] < 150, row
    assert result["twelve_blocks_mb"] > 700  # what a whole load would add
    assert "| gptq | lazy |" in (tmp_path / "flat.md").read_text()
