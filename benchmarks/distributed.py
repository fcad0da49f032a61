"""Data-parallel quantization on this machine: ``torchrun --nproc-per-node 2`` with 1 thread
per rank against one process with 2 threads, same model, recipe and windows, interleaved.

    python benchmarks/distributed.py [--model smollm2-135m] [--recipe gptq] [--windows 32]
        [--repeats 1] [--eval-windows 16]

Writes results/distributed.json and results/distributed.md: wall seconds of each command
(load + pipeline + save), the pipeline's own seconds and the parts of it that do not run in
parallel (summing statistics over the ranks; waiting for and receiving what an owner rank
rounded), the save, and the perplexity of both checkpoints (DESIGN quick protocol).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
REPORT = re.compile(
    r"quantized \d+ layers in \d+ blocks in ([\d.]+)s \(capture ([\d.]+)s, forward passes "
    r"([\d.]+)s, statistics ([\d.]+)s, training ([\d.]+)s, rounding maths ([\d.]+)s"
    r"(?:, over ranks: reduce ([\d.]+)s, share ([\d.]+)s)?"
)
SAVED = re.compile(r"saved checkpoint to .* in ([\d.]+)s")


def _env(threads: int) -> dict[str, str]:
    data = os.environ.get("COMPENSATOR_DATA", str(ROOT.parent / "shared" / "data"))
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "COMPENSATOR_DATA": data}


def _run(cmd: list[str], threads: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True, timeout=7200)
    seconds = time.perf_counter() - t0
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    return seconds, text


def quantize(kind: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    common = [
        "quantize", args.model, "--recipe", args.recipe, "--bits", "4", "--group-size", "128",
        "--calib", "wikitext2-valid", "--calib-windows", str(args.windows), "--seqlen", "512",
        "--device", "cpu", "--no-progress", "--force", "--out", str(out),
    ]  # fmt: skip
    if kind == "one process, 2 threads":
        cmd, threads = [sys.executable, "-m", "compensator", "--threads", "2", *common], 2
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd = [*launcher, "--nproc-per-node=2", "-m", "compensator", "--threads", "1", *common]
        threads = 1
    wall, text = _run(cmd, threads)
    m = REPORT.search(text)
    if m is None:
        raise SystemExit(f"no pipeline report in:\n{text[-3000:]}")
    parts = [float(g) if g is not None else 0.0 for g in m.groups()]
    saved = SAVED.search(text)
    row = {
        "run": kind, "command": " ".join(Path(c).name if c == sys.executable else c for c in cmd),
        "wall_s": wall, "pipeline_s": parts[0], "forward_s": parts[2], "statistics_s": parts[3],
        "solve_s": parts[5], "reduce_s": parts[6], "share_s": parts[7],
        "save_s": float(saved.group(1)) if saved else None,
    }  # fmt: skip
    print(row, flush=True)
    return row


def perplexity(out: Path, windows: int) -> float:
    cmd = [sys.executable, "-m", "compensator", "--threads", "2", "eval", str(out)]
    _, text = _run([*cmd, "--windows", str(windows), "--json", "--no-progress"], 2)
    return float(json.loads(text[text.index("{") : text.rindex("}") + 1])["ppl"])


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Data-parallel quantization: {result['model']}, {result['recipe']} W4 g128, "
        f"{result['windows']} x 512 calibration",
        "",
        f"Machine: {result['machine']}. Command: `{result['command']}`. Runs interleaved; "
        "seconds are wall time on this shared 2-core machine (compare the ratio, not the "
        "absolute values).",
        "",
        "| run | wall s | pipeline s | forward s | statistics s | rounding s | reduce s | "
        "share s | save s | ppl |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['run']} | {r['wall_s']:.1f} | {r['pipeline_s']:.1f} | {r['forward_s']:.1f} "
            f"| {r['statistics_s']:.1f} | {r['solve_s']:.1f} | {r['reduce_s']:.2f} | "
            f"{r['share_s']:.1f} | {r['save_s'] or 0:.1f} | {r['ppl']:.3f} |"
        )
    s = result["summary"]
    lines += [
        "",
        f"- wall time, 2 ranks / 1 process: **{s['wall_ratio']:.2f}**; pipeline only: "
        f"**{s['pipeline_ratio']:.2f}**",
        f"- perplexity, 2 ranks vs 1 process: {s['ppl_change_pct']:+.3f}% "
        f"({result['eval_windows']} windows)",
        f"- not parallel in the 2-rank pipeline: reduce {s['reduce_share_pct']:.1f}%, "
        f"share (waiting for owners + receiving) {s['share_share_pct']:.1f}% of its seconds; "
        f"saving {s['save_s']:.1f}s on rank 0 only",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="gptq")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    kinds = ["one process, 2 threads", "torchrun, 2 ranks x 1 thread"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                out = Path(tmp) / f"q{len(rows)}"
                row = quantize(kind, args, out)
                row["ppl"] = perplexity(out, args.eval_windows)
                rows.append(row)
    one = [r for r in rows if r["run"] == kinds[0]]
    two = [r for r in rows if r["run"] == kinds[1]]

    def mean(rs: list[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in rs) / len(rs)

    summary = {
        "wall_ratio": mean(two, "wall_s") / mean(one, "wall_s"),
        "pipeline_ratio": mean(two, "pipeline_s") / mean(one, "pipeline_s"),
        "ppl_change_pct": 100 * (mean(two, "ppl") / mean(one, "ppl") - 1),
        "reduce_share_pct": 100 * mean(two, "reduce_s") / mean(two, "pipeline_s"),
        "share_share_pct": 100 * mean(two, "share_s") / mean(two, "pipeline_s"),
        "save_s": mean(two, "save_s"),
    }
    result = {
        "model": args.model, "recipe": args.recipe, "windows": args.windows,
        "eval_windows": args.eval_windows, "machine": f"{os.cpu_count()} CPU cores",
        "command": "python benchmarks/distributed.py " + " ".join(sys.argv[1:]),
        "rows": rows, "summary": summary,
    }  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "distributed.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
