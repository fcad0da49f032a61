"""benchmarks/headline.py: the README's headline table from a compare report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "headline.py"


def _stat(mean: float, sd: float | None, n: int) -> dict[str, object]:
    return {"mean": mean, "sd": sd, "n": n}


def _row(recipe: str, source: str, bits: int, ppl: tuple[float, float | None, int], s: float):
    return {"recipe": recipe, "source": source, "bits": bits, "scheme": f"W{bits}A16 g128",
            "ppl": _stat(*ppl), "quantize_seconds": _stat(s, None, ppl[2])}  # fmt: skip


def test_headline_table_replaces_the_marked_block(tmp_path: Path) -> None:
    summary = [
        _row("gptq", "compensator", 4, (45.0, 0.1, 3), 100.0),
        _row("gptq", "compensator", 3, (90.0, 1.0, 3), 120.0),
        _row("gptaq-exact", "compensator", 4, (40.7, 0.4, 3), 150.0),
        _row("gptaq-exact", "compensator", 3, (60.0, 0.2, 3), 180.0),
        _row("rtn", "compensator", 4, (49.9, None, 1), 5.0),
        _row("GPTAQ (alpha 0.25)", "GPTQModel 7.6.0", 4, (44.4, None, 1), 420.0),
    ]
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"summary": summary}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- headline -->\nold table\n<!-- /headline -->\nafter\n")
    done = subprocess.run([sys.executable, str(SCRIPT), str(report), "--write", str(readme)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("after\n")
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert lines[0] == "| method | W4A16 g128 | W3A16 g128 | time vs GPTQ (W4 / W3) |"
    rows = {ln.split(" | ")[0][2:]: ln for ln in lines[2:]}
    assert list(rows)[:3] == ["RTN", "GPTQ", "GPTAQ, exact form (`gptaq-exact`)"]
    assert "| 1.00 (100 s) / 1.00 (120 s) |" in rows["GPTQ"]
    assert "**40.70 ± 0.40** | **60.00 ± 0.20** | 1.50 / 1.50 |" in rows[list(rows)[2]]
    peer = rows["GPTQModel 7.6.0 GPTAQ (alpha 0.25) (peer, measured, 1 run)"]
    assert "| 44.40 |  | 4.20 / - |" in peer  # no W3 row: an empty cell, no ratio
    # A file without the markers is refused in one line and left as it was.
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    bad = subprocess.run([sys.executable, str(SCRIPT), str(report), "--write", str(plain)],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1 and "no <!-- headline -->" in bad.stderr
    assert plain.read_text() == "no markers\n"
