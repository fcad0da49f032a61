"""Helpers for the command-line tests: run the CLI in-process, check one-line user errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from compensator.cli import main

FAST = ["--calib-windows", "4", "--seqlen", "32", "--no-progress"]


def invoke(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result: Result, *needles: str) -> str:
    """Exit 2, one non-empty stderr line starting with ``error:`` that contains every needle."""
    detail = f"exit {result.exit_code}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.exit_code == 2, detail
    assert isinstance(result.exception, SystemExit), f"{result.exception!r}\n{detail}"
    assert "Traceback" not in result.output, detail
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, detail
    line = lines[0]
    assert line.startswith("error: ") and len(line) > len("error: "), detail
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert result.stdout == "", detail
    return line


def hidden_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def quantize_args(tiny_dir: Path, out: Path, *extra: Any, recipe: str = "gptq") -> list[Any]:
    return [
        "quantize",
        tiny_dir,
        "--recipe",
        recipe,
        "--out",
        out,
        "--calib",
        tiny_dir / "calib.txt",
        *FAST,
        *extra,
    ]


def eval_json(target: Path, tiny_dir: Path, *extra: Any, windows: int = 3) -> dict[str, Any]:
    result = invoke(
        "eval",
        target,
        "--data",
        tiny_dir / "eval.txt",
        "--windows",
        windows,
        "--seqlen",
        32,
        "--json",
        "--no-progress",
        *extra,
    )
    assert result.exit_code == 0, (result.output, result.exception)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    data = json.loads(lines[0])
    assert isinstance(data, dict)
    return data
