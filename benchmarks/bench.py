"""Benchmark recipes on SmolLM2-135M with the DESIGN protocol.

Each (recipe, scheme) is quantized in its own subprocess so that its wall time and peak
resident memory are its own; it saves a real checkpoint, which the parent process loads
and evaluates against the FP model (ppl and KL on the same windows). Times are also given
as a ratio to the first recipe's time at the same scheme, measured in the same run.

    export COMPENSATOR_DATA=../shared/data
    python benchmarks/bench.py --methods rtn,gptq --name foundation          # quick protocol
    python benchmarks/bench.py --methods gptq,gptaq,gptq-cae,rescomp --name gptaq
    python benchmarks/bench.py --eval-windows 0 --calib-windows 128 ...       # full protocol

Writes benchmarks/results/NAME.json and NAME.md. One seed per run (``--seed``): to compare
methods over several calibration seeds (mean ± sd, and whether a gap is within seed noise),
use ``compensator compare`` (docs/compare.md), which made the README's headline table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
SCHEMES = {"W4A16 g128": (4, 128), "W3A16 g128": (3, 128), "W2A16 g64": (2, 64)}
# Reference rows from ../shared/PEERS.md (same model, data and quick protocol, same machine type).
PEERS = {
    "llm-compressor 0.14 GPTQ (PEERS.md)": {
        "W4A16 g128": 45.38,
        "W3A16 g128": 95.46,
        "W2A16 g64": 5443,
    },
    "GPTQModel 7.6 GPTQ (PEERS.md)": {"W4A16 g128": 46.21, "W3A16 g128": 97.77, "W2A16 g64": 3816},
    "GPTQModel 7.6 GPTAQ (PEERS.md)": {"W4A16 g128": 44.42, "W3A16 g128": 83.26, "W2A16 g64": 3464},
    "AutoRound 0.16 (PEERS.md)": {"W4A16 g128": 43.97, "W3A16 g128": 99.72},
}


class PeakRSS:
    """Samples this process's resident set size in a background thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def current() -> int:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * 4096

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def worker(args: argparse.Namespace) -> None:
    """Quantize once and save; print one JSON line with timings and memory."""
    import resource

    import compensator as cp
    from compensator.models.loading import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    rss_loaded = PeakRSS.current()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        qm = cp.quantize(
            loaded,
            args.recipe,
            calibration=args.calib,
            calib_windows=args.calib_windows,
            bits=args.bits,
            group_size=args.group_size,
            seed=args.seed,
            inplace=True,
            progress=False,
        )
        seconds = time.perf_counter() - t0
    cp.save(qm, args.save, force=True)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "pipeline": qm.report["seconds"],
                "rss_model_loaded_mb": rss_loaded / 2**20,
                "rss_peak_quantize_mb": rss.peak / 2**20,
                "rss_process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def run_one(
    args: argparse.Namespace, recipe: str, bits: int, gs: int, save: Path
) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--worker", "--recipe", recipe, "--bits", str(bits),
        "--group-size", str(gs), "--save", str(save), "--model", args.model,
        "--calib-windows", str(args.calib_windows), "--threads", str(args.threads),
        "--seed", str(args.seed),
    ]  # fmt: skip
    if args.calib:
        cmd += ["--calib", args.calib]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker failed for {recipe} W{bits} g{gs}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", default="gptq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--save", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="rtn,gptq", help="comma-separated presets or YAML files")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--calib", default="wikitext2-valid")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=16, help="0 = every window")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="calibration seed")
    ap.add_argument("--name", default="bench", help="results file stem")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    import compensator as cp
    from compensator.data import load_eval_windows
    from compensator.evaluate import evaluate
    from compensator.models.loading import load_model

    torch.set_num_threads(args.threads)
    fp = load_model(args.model)
    windows = load_eval_windows(fp.tokenizer, "wikitext2", 512, args.eval_windows or None)
    fp_ppl = evaluate(fp.model, windows, progress=False).ppl
    print(f"FP ppl {fp_ppl:.3f} on {windows.shape[0]} windows", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes.split(","):
            bits, gs = SCHEMES[scheme]
            for method in args.methods.split(","):
                save = Path(tmp) / f"{Path(method).stem}-{bits}-{gs}"
                cost = run_one(args, method, bits, gs, save)
                q = cp.load(save)
                res = evaluate(q, windows, fp_model=fp.model, progress=False)
                row = {"method": method, "scheme": scheme, "ppl": res.ppl, "kl": res.kl, **cost}
                rows.append(row)
                print(json.dumps(row), flush=True)
                del q
    result = {
        "protocol": {
            "model": args.model,
            "eval": "wikitext2 test, 512-token windows",
            "eval_windows": int(windows.shape[0]),
            "calibration": f"{args.calib}, {args.calib_windows} x 512, seed {args.seed}",
            "threads": args.threads,
            "fp_ppl": fp_ppl,
        },
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor(),
        },
        "command": " ".join(["python", "benchmarks/bench.py", *sys.argv[1:]]),
        "rows": rows,
        "peers": PEERS,
    }
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    p = result["protocol"]
    schemes = list(dict.fromkeys(r["scheme"] for r in result["rows"]))
    first: dict[str, float] = {}
    for r in result["rows"]:
        first.setdefault(r["scheme"], r["seconds"])
    lines = [
        f"# {p['model']}: {', '.join(dict.fromkeys(r['method'] for r in result['rows']))}",
        "",
        f"Command: `{result['command']}`  ",
        f"Eval: {p['eval']}, {p['eval_windows']} windows; calibration: {p['calibration']}; "
        f"{p['threads']} CPU threads. FP ppl {p['fp_ppl']:.2f}.",
        "",
        "| method | scheme | ppl | KL | quantize s | time ratio | forward passes s | statistics s | rounding maths s | peak RSS during quantize MB | process peak RSS MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| FP | - | {p['fp_ppl']:.2f} | 0 | | | | | | | |",
    ]
    for r in result["rows"]:
        ratio = r["seconds"] / first[r["scheme"]]
        lines.append(
            f"| {r['method']} | {r['scheme']} | {r['ppl']:.2f} | {r['kl']:.4f} | {r['seconds']:.1f} | {ratio:.2f} "
            f"| {r['pipeline']['forward']:.1f} | {r['pipeline']['statistics']:.1f} "
            f"| {r['pipeline']['solve']:.1f} "
            f"| {r['rss_peak_quantize_mb']:.0f} | {r['rss_process_peak_mb']:.0f} |"
        )
    lines += ["", "Reference rows (ppl) from ../shared/PEERS.md, same protocol:", ""]
    lines += ["| toolkit | " + " | ".join(schemes) + " |", "| --- |" + " ---: |" * len(schemes)]
    for name, vals in result["peers"].items():
        lines.append(
            f"| {name} | " + " | ".join(f"{vals[s]:,}" if s in vals else "" for s in schemes) + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
