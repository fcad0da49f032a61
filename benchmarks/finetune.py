"""Fine-tuning quantized SmolLM2-135M by distillation (``compensator finetune``), through the
CLI: a base checkpoint per setting and seed (``compensator quantize``), then each fine-tuning
row on it, each scored by ``compensator eval`` on WikiText-2 test (16 windows, ppl and KL to
FP) and, as a drift check, on the embedded offline corpus (Python's pydoc topics: another
domain than the WikiText-2 training text).

    export COMPENSATOR_DATA=../shared/data
    python benchmarks/finetune.py --settings w3 --rows none,default --seeds 0
    python benchmarks/finetune.py --settings w3 --rows scales,norms,default --resume

Time is wall seconds of each command (2 threads), the model load included; finetune's ratio
is to the quantize command of the same setting and seed, measured in the same run. Base
checkpoints stay in benchmarks/results/finetune-work/ (not committed) and are reused by
--resume. Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
WORK = RESULTS / "finetune-work"

SETTINGS: dict[str, tuple[str, list[str]]] = {
    "w4": (
        "gptaq-exact W4 g128",
        ["--recipe", "gptaq-exact", "--bits", "4", "--group-size", "128"],
    ),
    "w3": (
        "gptaq-exact W3 g128",
        ["--recipe", "gptaq-exact", "--bits", "3", "--group-size", "128"],
    ),
    "w3clip": (
        "gptaq-exact-clip W3 g128",
        ["--recipe", "gptaq-exact-clip", "--bits", "3", "--group-size", "128"],
    ),
    "w2": ("gptaq-exact W2 g64", ["--recipe", "gptaq-exact", "--bits", "2", "--group-size", "64"]),
    "ssvq2": ("ssvq-2bit", ["--recipe", "ssvq-2bit"]),
}
# Fine-tuning rows: (label, finetune options); "none" is the base checkpoint itself.
ROWS: dict[str, tuple[str, list[str] | None]] = {
    "none": ("no fine-tuning", None),
    "default": ("defaults: every part held, 64 windows x 1 epoch", []),
    "scales": ("scales only", ["--train", "scales"]),
    "norms": ("norms only", ["--train", "norms"]),
    "long": ("defaults, 128 windows x 1 epoch", ["--windows", "128"]),
}


def _cli(args: list[str], log: Path) -> float:
    """Run ``compensator ARGS`` (2 threads), its output to ``log``; wall seconds."""
    cmd = [sys.executable, "-m", "compensator", "--threads", "2", *args, "--no-progress"]
    t0 = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def _eval(checkpoint: Path, data: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "compensator", "--threads", "2", "eval", str(checkpoint),
           "--data", data, "--windows", "16", "--json", "--no-progress"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def _base(setting: str, seed: int) -> tuple[Path, float]:
    """The base checkpoint of ``setting`` and seed, and its quantize seconds (cached)."""
    path = WORK / f"{setting}-s{seed}"
    timing = WORK / f"{setting}-s{seed}.seconds"
    if path.is_dir() and timing.is_file():
        return path, float(timing.read_text())
    args = ["quantize", "smollm2-135m", *SETTINGS[setting][1], "--calib", "wikitext2-valid",
            "--calib-windows", "32", "--seqlen", "512", "--seed", str(seed), "--out", str(path),
            "--force"]  # fmt: skip
    seconds = _cli(args, WORK / f"{setting}-s{seed}.quantize.log")
    timing.write_text(f"{seconds:.1f}")
    return path, seconds


def _row(setting: str, row: str, seed: int, extra: list[str]) -> dict[str, Any]:
    base, q_seconds = _base(setting, seed)
    label, options = ROWS[row]
    target, ft_seconds = base, None
    if options is not None:
        target = WORK / f"{setting}-s{seed}-{row}"
        args = ["finetune", str(base), "--out", str(target), "--force", "--seed", str(seed)]
        ft_seconds = _cli([*args, *options, *extra], WORK / f"{target.name}.log")
    wiki, other = _eval(target, "wikitext2"), _eval(target, "embedded")
    record = {}
    if options is not None:
        config = json.loads((target / "config.json").read_text())["quantization_config"]
        record = config["finetune"]
    return {
        "setting": setting, "row": row, "label": label, "seed": seed,
        "ppl": wiki["ppl"], "kl": wiki["kl"], "fp_ppl": wiki["fp_ppl"],
        "ppl_embedded": other["ppl"], "kl_embedded": other["kl"],
        "fp_ppl_embedded": other["fp_ppl"], "bits_per_weight": wiki["bits_per_weight"],
        "quantize_seconds": q_seconds, "finetune_seconds": ft_seconds,
        "options": (options or []) + (extra if options is not None else []),
        "finetune": record,
    }  # fmt: skip


def _stat(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    fp = rows[0]["fp_ppl"] if rows else float("nan")
    fp_other = rows[0]["fp_ppl_embedded"] if rows else float("nan")
    lines = [
        "# Fine-tuning quantized SmolLM2-135M by distillation",
        "",
        f"Command: `{result['command']}`. CPU: {result['cpu']}, 2 threads. WikiText-2 test, "
        f"16 windows of 512 tokens (FP ppl {fp:.2f}); off-domain: the embedded corpus, 16 "
        f"windows (FP ppl {fp_other:.2f}). Mean ± sd over seeds where there are several; "
        "seconds are wall time of each CLI command (model load included).",
        "",
        "| setting | fine-tuning | seeds | ppl | KL | ppl (embedded) | bits/weight "
        "| quantize s | finetune s | finetune / quantize |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    keys = list(dict.fromkeys((r["setting"], r["row"], " ".join(r["options"])) for r in rows))
    for setting, row, opts in keys:
        cell = [
            r
            for r in rows
            if (r["setting"], r["row"], " ".join(r["options"])) == (setting, row, opts)
        ]
        q = [r["quantize_seconds"] for r in cell]
        f = [r["finetune_seconds"] for r in cell if r["finetune_seconds"] is not None]
        ratio = [
            r["finetune_seconds"] / r["quantize_seconds"] for r in cell if r["finetune_seconds"]
        ]
        label = ROWS[row][0] + (f" `{opts}`" if opts and row != "none" else "")
        lines.append(
            f"| {SETTINGS[setting][0]} | {label} | {len(cell)} | {_stat([r['ppl'] for r in cell])} "
            f"| {_stat([r['kl'] for r in cell], 4)} "
            f"| {_stat([r['ppl_embedded'] for r in cell])} | {cell[0]['bits_per_weight']:.2f} "
            f"| {_stat(q)} | {_stat(f) if f else '-'} | {_stat(ratio) + 'x' if ratio else '-'} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def _cpu() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), "unknown")  # fmt: skip
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])  # fmt: skip
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(simd)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="w3", help=f"comma-separated: {', '.join(SETTINGS)}")
    ap.add_argument("--rows", default="none,default", help=f"comma-separated: {', '.join(ROWS)}")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--name", default="finetune")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in NAME.json")
    ap.add_argument("--render", action="store_true", help="only rewrite NAME.md from NAME.json")
    ap.add_argument("extra", nargs="*", help="more finetune options for every row (after --)")
    args = ap.parse_args()
    if args.render:
        result = json.loads((RESULTS / f"{args.name}.json").read_text())
        (RESULTS / f"{args.name}.md").write_text(markdown(result))
        return
    if not os.environ.get("COMPENSATOR_DATA"):
        raise SystemExit("set COMPENSATOR_DATA to the shared data directory")
    WORK.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    old = json.loads(path.read_text())["rows"] if args.resume and path.is_file() else []
    result = {"command": " ".join(["python", "benchmarks/finetune.py", *sys.argv[1:]]),
              "cpu": _cpu(), "rows": old}  # fmt: skip
    for setting in args.settings.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            for row in args.rows.split(","):
                opts = (ROWS[row][1] or []) + (args.extra if ROWS[row][1] is not None else [])
                done = [r for r in old if (r["setting"], r["row"], r["seed"], r["options"])
                        == (setting, row, seed, opts)]  # fmt: skip
                if done:
                    continue
                record = _row(setting, row, seed, args.extra)
                result["rows"].append(record)
                print(f"{setting} {row} seed {seed}: ppl {record['ppl']:.2f} KL "
                      f"{record['kl']:.4f}", flush=True)  # fmt: skip
                path.write_text(json.dumps(result, indent=1))
                (RESULTS / f"{args.name}.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
