"""What the benchmark scripts share: the DESIGN quick protocol, one quantize-and-evaluate row,
and results files that are rewritten after every row (so an interrupted run keeps its rows
and ``--resume`` skips them)."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Bench:
    fp: Any  # LoadedModel
    windows: torch.Tensor
    calibration: torch.Tensor
    protocol: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # draws the calibration windows and reaches every recipe step's own seed


def setup(
    model: str, calib: str, calib_windows: int, eval_windows: int, threads: int, seed: int = 0
) -> Bench:
    """Load the FP model and the data once; measure the FP perplexity."""
    from compensator.data import load_calibration_windows, load_eval_windows
    from compensator.evaluate import evaluate
    from compensator.models.loading import load_model

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    fp = load_model(model)
    windows = load_eval_windows(fp.tokenizer, "wikitext2", 512, eval_windows or None)
    cal = load_calibration_windows(fp.tokenizer, calib, calib_windows, 512, seed)
    fp_ppl = evaluate(fp.model, windows, progress=False).ppl
    print(f"FP ppl {fp_ppl:.3f} on {windows.shape[0]} windows", flush=True)
    protocol = {
        "model": model,
        "eval": "wikitext2 test, 512-token windows",
        "eval_windows": int(windows.shape[0]),
        "calibration": f"{calib}, {calib_windows} x 512, seed {seed}",
        "threads": threads,
        "fp_ppl": fp_ppl,
    }
    return Bench(fp, windows, cal, protocol, seed)


def run_row(
    bench: Bench,
    recipe: Any,
    *,
    extra_eval: dict[str, torch.Tensor] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Quantize a copy of the FP model with ``recipe`` and evaluate it: ppl, KL, stored bits
    per weight, quantization seconds (and the rounding maths' share); ``ppl_NAME``/``kl_NAME``
    on each ``extra_eval`` set of windows; training seconds per block for learned recipes."""
    import compensator as cp
    from compensator.evaluate import evaluate
    from compensator.models.loading import LoadedModel

    fp = bench.fp
    t0 = time.perf_counter()
    qm = cp.quantize(
        LoadedModel(copy.deepcopy(fp.model), fp.tokenizer, fp.source),
        recipe,
        calibration=bench.calibration,
        inplace=True,
        progress=False,
        seed=bench.seed,
        **overrides,
    )
    seconds = time.perf_counter() - t0
    res = evaluate(qm.model, bench.windows, fp_model=fp.model, progress=False)
    row = {
        "ppl": res.ppl,
        "kl": res.kl,
        "bits_per_weight": qm.quantization_config["bits_per_weight"],
        "seconds": seconds,
        "solve_seconds": qm.report["seconds"]["solve"],
    }
    for name, windows in (extra_eval or {}).items():
        other = evaluate(qm.model, windows, fp_model=fp.model, progress=False)
        row[f"ppl_{name}"], row[f"kl_{name}"] = other.ppl, other.kl
    train = qm.report.get("train")
    if train:
        row["train_seconds_per_block"] = sum(t["seconds"] for t in train) / len(train)
        row["block_loss"] = [[t["initial_loss"], t["final_loss"]] for t in train]
    return row


def new_result(bench: Bench, script: str, **extra: Any) -> dict[str, Any]:
    return {
        "protocol": bench.protocol,
        "machine": {"python": platform.python_version(), "torch": torch.__version__},
        "command": " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]]),
        **extra,
        "rows": [],
    }


def previous_rows(name: str, resume: bool) -> list[dict[str, Any]]:
    path = RESULTS / f"{name}.json"
    if not resume or not path.is_file():
        return []
    return json.loads(path.read_text())["rows"]


def write(name: str, result: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2)), (".md", markdown)):
        tmp = RESULTS / f".{name}{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(RESULTS / f"{name}{suffix}")


def parser(doc: str | None, name: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes (protocol, threads, results file)."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="wikitext2-valid")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=16, help="0 = every window")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--seed", type=int, default=0, help="calibration seed (windows and every step's draws)"
    )
    ap.add_argument("--name", default=name, help="results file stem")
    ap.add_argument(
        "--resume", action="store_true", help="keep the rows already in NAME.json, run the rest"
    )
    return ap


def parse_rows(
    ap: argparse.ArgumentParser, rows: dict[str, Any], schemes: dict[str, Any] | None = None
) -> tuple[argparse.Namespace, list[str], list[str]]:
    """Parse the command line; ``--rows`` (and ``--schemes``) as lists of known names."""
    args = ap.parse_args()
    picked = args.rows.split(",")
    picked_schemes = args.schemes.split(",") if schemes is not None else []
    unknown = set(picked) - rows.keys() or set(picked_schemes) - (schemes or {}).keys()
    if unknown:
        ap.error(f"unknown rows or schemes {sorted(unknown)}; rows: {', '.join(rows)}")
    return args, picked, picked_schemes


def setup_from(args: argparse.Namespace) -> Bench:
    return setup(
        args.model, args.calib, args.calib_windows, args.eval_windows, args.threads, args.seed
    )


def run_jobs(
    args: argparse.Namespace,
    result: dict[str, Any],
    jobs: list[tuple[Any, ...]],
    key: Callable[[dict[str, Any]], tuple[Any, ...]],
    run: Callable[..., dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
) -> None:
    """Run every job not already in the results (``--resume``), rewriting the results files
    after each row so an interruption keeps what was measured."""
    result["rows"] = previous_rows(args.name, args.resume)
    done = {key(r) for r in result["rows"]}
    for job in jobs:
        if job in done:
            continue
        row = run(*job)
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "block_loss"}), flush=True)
        write(args.name, result, markdown(result))
