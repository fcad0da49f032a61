"""GPTQ's time on SmolLM2 under the CLI's allocator setting (``fix_mmap_threshold``): none,
1 MiB (the earlier setting) and 8 MiB (the current one), each in a fresh process, rounds
interleaved with their order reversed every round (issue 17; docs/big-models.md).

    python benchmarks/allocator.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

from common import RESULTS

_RUN = """
import json, sys, time
import torch
from compensator.pipeline.memory import fix_mmap_threshold, peak_rss_mb
if int(sys.argv[1]):
    fix_mmap_threshold(int(sys.argv[1]))
torch.set_num_threads(int(sys.argv[2]))
import compensator as cp
from compensator.models.loading import load_model
fp = load_model("smollm2-135m")
t0 = time.perf_counter()
qm = cp.quantize(fp.model, "gptq", tokenizer=fp.tokenizer, calibration="wikitext2-valid",
                 calib_windows=32, seqlen=512, progress=False, inplace=True)
s = qm.report["seconds"]
print(json.dumps({"seconds": time.perf_counter() - t0, "forward": s["forward"],
                  "statistics": s["statistics"], "solve": s["solve"], "peak_rss_mb": peak_rss_mb()}))
"""
SETTINGS = {"none": 0, "1 MiB": 1 << 20, "8 MiB": 8 << 20}


def run(nbytes: int, threads: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _RUN, str(nbytes), str(threads)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SETTINGS}
    for r in range(args.rounds):
        for name in list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]:
            runs[name].append(run(SETTINGS[name], args.threads))
            print(r, name, runs[name][-1], flush=True)
    command = " ".join(["python", "benchmarks/allocator.py", *sys.argv[1:]])
    lines = [
        "# GPTQ's time under the CLI's allocator setting",
        "",
        f"`{command}`",
        "",
        f"SmolLM2-135M, GPTQ W4 g128, 32 x 512 calibration, {args.threads} threads, a fresh "
        f"process per run, {args.rounds} interleaved rounds (medians). Seconds exclude loading.",
        "",
        "| mmap threshold | seconds | vs none | forward passes s | statistics s | rounding s "
        "| peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    for name, m in med.items():
        lines.append(
            f"| {name} | {m['seconds']:.1f} | {m['seconds'] / med['none']['seconds']:.2f}x | "
            f"{m['forward']:.1f} | {m['statistics']:.1f} | {m['solve']:.1f} | "
            f"{m['peak_rss_mb']:.0f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    result = {"command": command, "threads": args.threads, "runs": runs, "medians": med}
    (RESULTS / "allocator.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "allocator.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
