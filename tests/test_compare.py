"""``compensator compare``: the grid, resumable cells, the report files, the noise verdicts."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from compensator.compare.cells import Cell, Settings, grid
from compensator.compare.report import mean_sd, noise, summarize
from compensator.errors import CompensatorError


def _cli(*args: str):
    from compensator.cli import main

    return CliRunner().invoke(main, ["compare", *args])


def _grid_args(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        str(tiny_dir), "--recipes", "rtn,gptq", "--bits", "3,4", "--seeds", "0,1",
        "--out", str(out), "--group-size", "16", "--calib", str(tiny_dir / "calib.txt"),
        "--calib-windows", "8", "--seqlen", "64", "--data", str(tiny_dir / "eval.txt"),
        "--windows", "4", "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def test_mean_sd_is_the_sample_statistic() -> None:
    assert mean_sd([1.0, 2.0, 4.0]) == {
        "mean": pytest.approx(7 / 3), "sd": pytest.approx(statistics.stdev([1, 2, 4])), "n": 3,
    }  # fmt: skip
    assert mean_sd([5.0, None, float("nan")]) == {"mean": 5.0, "sd": None, "n": 1}
    assert mean_sd([]) == {"mean": None, "sd": None, "n": 0}


def _rows(recipe: str, ppls: list[float], fixed: bool = False) -> list[dict]:
    return [
        {"recipe": recipe, "bits": 4, "seed": i, "ppl": p, "fixed": fixed, "scheme": "W4"}
        for i, p in enumerate(ppls)
    ]


def test_noise_verdicts_use_two_standard_errors() -> None:
    a, b = _rows("a", [10.0, 10.2, 9.8]), _rows("b", [10.5, 10.7, 10.3])
    close = _rows("c", [10.1, 10.4, 9.9])
    notes = {n["other"]: n for n in noise(summarize(a + b + close)) if n["against"] == "best"}
    nexts = [n for n in noise(summarize(a + b + close)) if n["against"] == "next"]
    assert [(n["reference"], n["other"]) for n in nexts] == [("c W4", "b W4")]
    two_se = 2 * math.sqrt(0.2**2 / 3 + 0.2**2 / 3)
    assert notes["b W4"]["two_se"] == pytest.approx(two_se)
    assert notes["b W4"]["within_noise"] is False  # a 0.5 gap against 2 SE of 0.33
    assert notes["c W4"]["within_noise"] is True
    # A fixed row (RTN) adds no variance; a seeded row with one run cannot be judged.
    fixed = noise(summarize(_rows("rtn", [11.0], fixed=True) + a))[0]
    assert fixed["two_se"] == pytest.approx(2 * 0.2 / math.sqrt(3))
    assert noise(summarize(_rows("one", [11.0]) + a))[0]["within_noise"] is None


def test_grid_runs_unseeded_recipes_once_and_refuses_bad_seeds() -> None:
    cells = grid(["rtn", "gptq"], [3, 4], [0, 1], {"rtn": False, "gptq": True})
    assert [c.name for c in cells] == [
        "rtn-w3-s0", "rtn-w4-s0", "gptq-w3-s0", "gptq-w3-s1", "gptq-w4-s0", "gptq-w4-s1",
    ]  # fmt: skip
    with pytest.raises(CompensatorError, match="distinct"):
        grid(["gptq"], [4], [0, 0], {"gptq": True})
    assert Cell(None).name == "fp" and Cell("my/r.yaml", None, 2).name == "r-wdefault-s2"
    assert Settings("m").key(Cell("gptq", 4, 1))["seed"] == 1


def test_compare_writes_the_report_and_a_rerun_reuses_every_cell(
    tiny_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    t0 = time.perf_counter()
    first = _cli(*_grid_args(tiny_dir, out))
    t_first = time.perf_counter() - t0
    assert first.exit_code == 0, first.output
    report = json.loads((out / "report.json").read_text())
    names = sorted(c["name"] for c in report["cells"])
    assert names == sorted(["rtn-w3-s0", "rtn-w4-s0", "gptq-w3-s0", "gptq-w3-s1",
                            "gptq-w4-s0", "gptq-w4-s1"])  # fmt: skip
    gptq4 = next(s for s in report["summary"] if s["recipe"] == "gptq" and s["bits"] == 4)
    seeds = [c["ppl"] for c in report["cells"] if c["recipe"] == "gptq" and c["bits"] == 4]
    assert gptq4["ppl"]["n"] == 2 and gptq4["ppl"]["mean"] == pytest.approx(statistics.fmean(seeds))
    assert seeds[0] != seeds[1]  # the seed reached the calibration windows
    assert all(c["quantize_seconds"] > 0 and c["peak_rss_mb"] > 100 for c in report["cells"])
    assert report["fp"]["ppl"] == pytest.approx(report["cells"][0]["fp_ppl"])
    page = (out / "report.md").read_text()
    assert "| gptq | W4A16 g16 | 2 |" in page and "±" in page and "compensator compare" in page
    assert not list(out.glob("cells/*/config.json"))  # checkpoints removed after evaluation

    from PIL import Image

    with Image.open(out / "frontier.png") as png:
        assert png.size[0] > 400 and len(set(png.convert("L").getdata())) > 16  # drawn, not blank

    t0 = time.perf_counter()
    second = _cli(*_grid_args(tiny_dir, out))
    assert second.exit_code == 0, second.output
    assert time.perf_counter() - t0 < 0.1 * t_first
    assert json.loads((out / "report.json").read_text())["cells"] == report["cells"]


def test_a_changed_setting_reruns_only_what_it_touches(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    args = _grid_args(tiny_dir, out)
    args[args.index("--recipes") + 1], args[args.index("--bits") + 1] = "rtn", "4"
    assert _cli(*args).exit_code == 0
    before = (out / "cells" / "rtn-w4-s0.json").read_text()
    args[args.index("--bits") + 1] = "3,4"
    assert _cli(*args).exit_code == 0
    assert (out / "cells" / "rtn-w4-s0.json").read_text() == before  # reused
    assert (out / "cells" / "rtn-w3-s0.json").is_file()
    args[args.index("--windows") + 1] = "3"  # another protocol: every cell again
    assert _cli(*args).exit_code == 0
    assert json.loads((out / "cells" / "rtn-w4-s0.json").read_text())["eval_windows"] == 3


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (("--recipes", "rtn,nosuch"), "nosuch"),
        (("--bits", "9"), "within 2..8"),
        (("--seeds", "0,x"), "comma-separated integers"),
        (("--peers", "/nonexistent.json"), "cannot be read as a peer results file"),
    ],
)
def test_bad_input_is_one_line_before_any_cell(
    tiny_dir: Path, tmp_path: Path, change: tuple[str, str], says: str
) -> None:
    args = _grid_args(tiny_dir, tmp_path / "r")
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    r = _cli(*args)
    assert r.exit_code == 2, r.output
    assert says in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "cells").exists()


def test_a_failing_cell_is_named_and_the_others_are_kept(tiny_dir: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("w5 w6 w7 w8")  # rtn reads no data; gptq needs windows of 64 tokens
    args = _grid_args(tiny_dir, tmp_path / "r", "--seeds", "0")
    args[args.index("--calib") + 1] = str(short)
    r = _cli(*args)
    assert r.exit_code == 1, r.output
    assert "2 of 5 cells failed" in r.output and "gptq-w3-s0: error:" in r.output
    assert (tmp_path / "r" / "cells" / "rtn-w3-s0.json").is_file()
    assert not (tmp_path / "r" / "cells" / "gptq-w3-s0.json").exists()


def test_a_non_local_model_is_copied_once_as_plain_safetensors(
    tiny_dir: Path, tmp_path: Path
) -> None:
    import torch

    from compensator.compare.run import model_dir
    from compensator.models.loading import load_model, save_plain

    assert model_dir(str(tiny_dir), tmp_path) == str(tiny_dir.resolve())  # used as is
    loaded = load_model(str(tiny_dir))
    save_plain(loaded, tmp_path / "copy")
    again = load_model(str(tmp_path / "copy"))
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert "quantization_config" not in config
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name
    assert again.tokenizer("w5 w6")["input_ids"] == loaded.tokenizer("w5 w6")["input_ids"]
