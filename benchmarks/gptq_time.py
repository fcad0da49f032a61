"""GPTQ's wall time against llm-compressor's, side by side (issue 17), with the in-run baseline.

SmolLM2-135M (its GGUF dequantized to fp32 and written as a plain safetensors model, which
both toolkits load), W4 g128 asymmetric, the DESIGN quick protocol's 32 x 512 calibration
windows (compensator's sampler, seed 0; the same token ids go to both), 2 threads. Every row
is a fresh process; rows are interleaved, round robin, their order reversed every round:

* ``baseline``: plain RTN plus one FP forward pass of the model over the calibration windows
  (what any calibrated method must at least spend), in our environment;
* ``compensator gptq`` (fp32 and bfloat16): ``compensator.quantize`` on the loaded model;
* ``llm-compressor gptq`` (fp32 and bfloat16): its ``oneshot`` with ``GPTQModifier``
  (PEERS.md's settings: damp 0.01, static act-order), in its own virtual environment
  (``bash benchmarks/peers/install.sh llm-compressor``).

Seconds exclude loading the model in every row (llm-compressor's script times ``oneshot``
alone; ours times ``quantize``). Perplexity and KL (16 windows of WikiText-2 test) are from the
first round's outputs. Ratios are taken per round, then the median.

    python benchmarks/gptq_time.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PEERS_HOME = Path(os.environ.get("PEERS_HOME", Path.home() / ".cache" / "compensator-peers"))

_PREPARE = """
import sys
from safetensors.torch import save_file
from compensator.data import load_calibration_windows
from compensator.models.loading import load_model, save_plain
out, windows = sys.argv[1], int(sys.argv[2])
fp = load_model("smollm2-135m")
save_plain(fp, out + "/model")
ids = load_calibration_windows(fp.tokenizer, "wikitext2-valid", windows, 512, 0)
save_file({"input_ids": ids.contiguous()}, out + "/calib.safetensors")
"""

# Ours: quantize the loaded model on the very windows llm-compressor gets; evaluate after.
_OURS = """
import json, sys, time
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
import compensator as cp
from compensator.pipeline.memory import fix_mmap_threshold
fix_mmap_threshold()  # as the CLI does
model_dir, recipe, dtype, threads, out = sys.argv[1:6]
torch.set_num_threads(int(threads))
ids = load_file(sys.argv[6])["input_ids"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
tok = AutoTokenizer.from_pretrained(model_dir)
t0 = time.perf_counter()
qm = cp.quantize(model, recipe, tokenizer=tok, calibration=ids, progress=False, inplace=True)
seconds = time.perf_counter() - t0
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
if out != "-":
    cp.save(qm, out)
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "pipeline": qm.report["seconds"]}))
"""

_BASELINE = """
import json, sys, time
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
import compensator as cp
model_dir, threads = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(threads)
ids = load_file(sys.argv[3])["input_ids"]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
t0 = time.perf_counter()
with torch.no_grad():
    for start in range(0, ids.shape[0], 8):
        model(input_ids=ids[start:start + 8], use_cache=False)
forward = time.perf_counter() - t0
t0 = time.perf_counter()
cp.quantize(model, "rtn", tokenizer=tok, progress=False, inplace=True)
rtn = time.perf_counter() - t0
print(json.dumps({"seconds": forward + rtn, "forward": forward, "rtn": rtn}))
"""


def _run(cmd: list[str], cwd: str | None = None) -> dict[str, Any]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(name: str, work: Path, threads: int, out: str) -> dict[str, Any]:
    """One timed run of row ``name`` in a fresh process; ``out`` is where its model goes
    ("-": nowhere)."""
    model, calib = str(work / "model"), str(work / "calib.safetensors")
    if name == "baseline":
        return _run([sys.executable, "-c", _BASELINE, model, str(threads), calib])
    toolkit, dtype = name.split(" gptq ")
    if toolkit == "compensator":
        return _run([sys.executable, "-c", _OURS, model, "gptq", dtype, str(threads), out, calib])
    python = PEERS_HOME / "llm-compressor" / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python} missing: run bash benchmarks/peers/install.sh llm-compressor")
    target = out if out != "-" else str(work / "peer-scratch")
    script = str(HERE / "peers" / "llmcompressor_gptq.py")
    cmd = [str(python), script, model, calib, target, "--bits", "4", "--group-size", "128",
           "--threads", str(threads), "--dtype", dtype]  # fmt: skip
    return _run(cmd, cwd=str(work))


def quality(path: str, fp: str) -> dict[str, float]:
    from compensator.api import evaluate

    res = evaluate(path, fp=fp, data="wikitext2", windows=16, progress=False)
    return {"ppl": res.ppl, "kl": res.kl}


ROWS = [
    "baseline",
    "compensator gptq float32",
    "llm-compressor gptq float32",
    "compensator gptq bfloat16",
    "llm-compressor gptq bfloat16",
]


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    times: dict[str, list[dict[str, Any]]] = {n: [] for n in args.rows}
    quality_of: dict[str, dict[str, float]] = {}
    for r in range(args.rounds):
        order = args.rows if r % 2 == 0 else args.rows[::-1]
        for name in order:
            out = "-" if r or name == "baseline" else str(work / name.replace(" ", "-"))
            times[name].append(row(name, work, args.threads, out))
            print(f"round {r} {name}: {times[name][-1]['seconds']:.1f} s", flush=True)
            if out != "-":
                quality_of[name] = quality(out, str(work / "model"))
    return {"times": times, "quality": quality_of}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    times = result["times"]
    rounds = len(next(iter(times.values())))
    out: dict[str, Any] = {}
    for name, runs in times.items():
        out[name] = {"median_s": statistics.median(t["seconds"] for t in runs)}
        for ref in ("baseline", "llm-compressor gptq float32"):
            if ref in times and name != ref:
                ratios = [
                    times[name][i]["seconds"] / times[ref][i]["seconds"] for i in range(rounds)
                ]
                out[name][f"vs {ref}"] = statistics.median(ratios)
    return out


def markdown(result: dict[str, Any]) -> str:
    s, q = result["summary"], result["quality"]
    lines = [
        "# GPTQ wall time against llm-compressor, side by side",
        "",
        f"`{result['command']}`",
        "",
        "SmolLM2-135M as a plain fp32 safetensors model, W4 g128 asymmetric, "
        f"{result['calib_windows']} x 512 "
        f"calibration windows (the same ids for both), {result['threads']} threads, "
        f"{result['rounds']} interleaved rounds (medians; ratios per round, then the median). "
        "Seconds exclude loading the model. Perplexity / KL: WikiText-2 test, 16 windows, "
        "first round's output. Peak RSS: the process's high-water mark after quantizing.",
        "",
        "| row | seconds | vs llm-compressor fp32 | vs baseline | peak RSS MB | ppl | KL |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, v in s.items():
        runs = result["times"][name]
        peak = (
            statistics.median(t["peak_rss_mb"] for t in runs) if "peak_rss_mb" in runs[0] else None
        )
        vs_peer = v.get("vs llm-compressor gptq float32")
        vs_base = v.get("vs baseline")
        cells = [
            name, f"{v['median_s']:.1f}",
            "-" if vs_peer is None else f"{vs_peer:.2f}x",
            "-" if vs_base is None else f"{vs_base:.2f}x",
            "-" if peak is None else f"{peak:.0f}",
            f"{q[name]['ppl']:.2f}" if name in q else "-",
            f"{q[name]['kl']:.4f}" if name in q else "-",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    ours = result["times"].get("compensator gptq float32")
    if ours:
        split = ours[0]["pipeline"]
        lines += [
            "",
            "Our fp32 pipeline, first round: "
            + ", ".join(f"{k} {split[k]:.1f} s" for k in ("forward", "statistics", "solve")),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"a subset of {ROWS}")
    ap.add_argument("--name", default="gptq-time")
    ap.add_argument("--calib-windows", type=int, default=32, help="windows of 512 tokens")
    args = ap.parse_args()
    args.rows = args.rows.split(",")
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}: use some of {ROWS}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-c", _PREPARE, tmp, str(args.calib_windows)], check=True)
        result: dict[str, Any] = {
            "command": " ".join(["python", "benchmarks/gptq_time.py", *sys.argv[1:]]),
            "threads": args.threads,
            "rounds": args.rounds,
            "calib_windows": args.calib_windows,
            **measure(args, work),
        }
    result["summary"] = summary(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
