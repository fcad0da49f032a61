"""``compensator plan`` against measurement (issue 17), and the per-block rates it uses.

Each quantize row runs in a fresh process (peak RSS is the process's ru_maxrss) as
``compensator quantize`` does (block by block, the CLI's allocator settings), and is set
against what :func:`compensator.plan.plan` predicts for it from the config alone:

* SmolLM2-135M (its GGUF, read block by block) with GPTQ W4 g128 on the DESIGN quick
  protocol (32 x 512 calibration tokens), and the in-run baseline the issue asks for: plain
  RTN plus one forward pass of the FP model over the same windows, in the same run;
* random Llamas of width 1024 (benchmarks/big_models.py's) with 4 and 16 blocks.

The rates (``compensator.plan.CpuRates``) are timed here on bare matrices and on SmolLM2:
GPTQ's rounding per column and per FLOP, X^T X accumulation, a block forward.

    python benchmarks/plan.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from big_models import build
from common import RESULTS, parser

_QUANTIZE = """
import json, resource, sys, time
import torch
import compensator as cp
from compensator.pipeline.memory import fix_mmap_threshold
fix_mmap_threshold()  # as the CLI does
model, recipe, out, windows, seqlen, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
t0 = time.perf_counter()
qm = cp.quantize(model, recipe, calibration="wikitext2-valid" if model == "smollm2-135m"
                 else "embedded", calib_windows=int(windows), seqlen=int(seqlen),
                 progress=False, resume=out + ".partial")
cp.save(qm, out)
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0, "pipeline": qm.report["seconds"]}))
"""

_BASELINE = """
import json, sys, time
import torch
import compensator as cp
from compensator.data import load_calibration_windows
from compensator.models.loading import load_model
model, windows, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
fp = load_model(model)
ids = load_calibration_windows(fp.tokenizer, "wikitext2-valid", windows, 512, 0)
t0 = time.perf_counter()
with torch.no_grad():
    for start in range(0, ids.shape[0], 8):
        fp.model(input_ids=ids[start:start + 8], use_cache=False)
forward = time.perf_counter() - t0
t0 = time.perf_counter()
with torch.no_grad():  # the blocks alone, as the pipeline runs them (no head)
    for start in range(0, ids.shape[0], 8):
        fp.model.model(input_ids=ids[start:start + 8], use_cache=False)
decoder = time.perf_counter() - t0
t0 = time.perf_counter()
cp.quantize(fp, "rtn", progress=False, inplace=True)
print(json.dumps({"forward": forward, "decoder": decoder, "rtn": time.perf_counter() - t0}))
"""


def _child(code: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=7200
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted(model: str, recipe: str, windows: int, seqlen: int) -> dict[str, Any]:
    from compensator.plan import plan
    from compensator.recipes.recipe import load_recipe

    return plan(model, load_recipe(recipe), windows, seqlen)


def quantize_row(
    model: str, label: str, recipe: str, windows: int, seqlen: int, threads: int, where: Path
) -> dict[str, Any]:
    out = where / f"q-{label}-{recipe}"
    m = _child(_QUANTIZE, model, recipe, str(out), str(windows), str(seqlen), str(threads))
    p = predicted(model, recipe, windows, seqlen)
    row = {
        "model": label, "recipe": recipe, "calibration": f"{windows} x {seqlen}",
        "measured_mb": m["maxrss_mb"], "predicted_mb": p["cpu"]["peak"] / 1e6,
        "seconds": m["seconds"], "pipeline": m["pipeline"], "predicted_s": p["seconds"],
    }  # fmt: skip
    row["ratio"] = row["predicted_mb"] / row["measured_mb"]
    print(row, flush=True)
    return row


def _timed(fn: Any, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rates() -> dict[str, float]:
    """GPTQ on bare matrices at two sizes (t = a * columns + FLOPs / b), and X^T X."""
    from compensator.quant.spec import QuantSpec
    from compensator.rounders.gptq import gptq

    spec = QuantSpec(bits=4, group_size=128)
    g = torch.Generator().manual_seed(0)
    times = {}
    for n in (256, 2048):
        x = torch.randn(4 * n, n, generator=g)
        h, w = x.T @ x, torch.randn(n, n, generator=g)
        times[n] = _timed(lambda h=h, w=w: gptq(w, h, spec), repeat=2)
    flops = {n: 2 * n**3 + n**3 for n in times}
    # Two equations in (a, 1/b): columns n and FLOPs.
    inv_b = (times[2048] - times[256] * 2048 / 256) / (flops[2048] - flops[256] * 2048 / 256)
    inv_b = max(inv_b, 1e-13)
    a = max((times[256] - flops[256] * inv_b) / 256, 0.0)
    x = torch.randn(4096, 1536, generator=g)
    acc = torch.zeros(1536, 1536)
    stat = _timed(lambda: acc.addmm_(x.T, x))
    return {
        "solve_column_s": a,
        "solve_flops_s": 1 / inv_b,
        "addmm_flops_s": 2 * 4096 * 1536**2 / stat,
        "gptq_256_s": times[256],
        "gptq_2048_s": times[2048],
    }


def fitted(smol: dict[str, Any], base: dict[str, Any], windows: int) -> dict[str, float]:
    """Rates from the SmolLM2 run: block FLOP/s of a plain forward, and how many such
    forwards GPTQ's passes add up to; X^T X FLOP/s inside the pipeline."""
    from compensator.pipeline.footprint import ModelShape
    from compensator.plan import read_config

    shape = ModelShape.from_config(read_config("smollm2-135m")[0])
    tokens, seqlen = windows * 512, 512
    per_token = 2 * shape.linear_params(False) + 4 * seqlen * shape.heads * shape.head_dim
    seconds = smol["pipeline"]
    gram = sum(n * 2 * i * i for (i, _), n in shape.groups(False)) * shape.layers * tokens
    return {
        "forward_flops_s": tokens * shape.layers * per_token / base["decoder"],
        "passes_gptq": seconds["forward"] / base["decoder"],
        "statistics_flops_s": gram / seconds["statistics"],
        "solve_measured_s": seconds["solve"],
    }


def markdown(result: dict[str, Any]) -> str:
    base = result["baseline"]
    lines = [
        "# The plan against measurement",
        "",
        f"`{result['command']}`",
        "",
        f"{result['threads']} CPU threads; a fresh process per row; peak RSS is ru_maxrss. "
        "Predicted: `compensator plan` from the config alone (block by block, as run)"
        + (
            "; the predicted columns recomputed by `--repredict` with the current plan code "
            "against these measurements."
            if result.get("repredicted")
            else "."
        ),
        "",
        "| model | recipe | calibration | measured peak RSS (MB) | predicted (MB) | "
        "predicted / measured | quantize s | plan's s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['calibration']} | {r['measured_mb']:.0f} | "
            f"{r['predicted_mb']:.0f} | {r['ratio']:.2f} | {r['seconds']:.1f} | "
            f"{r['predicted_s']['total']:.1f} |"
        )
    smol = result["rows"][0]
    lines += [
        "",
        f"In-run baseline on {smol['model']} ({smol['calibration']}): plain RTN "
        f"{base['rtn']:.1f} s + one FP forward pass over the calibration windows "
        f"{base['forward']:.1f} s = {base['rtn'] + base['forward']:.1f} s; GPTQ's pipeline "
        f"took {smol['pipeline']['total']:.1f} s (forward passes "
        f"{smol['pipeline']['forward']:.1f}, statistics {smol['pipeline']['statistics']:.1f}, "
        f"rounding {smol['pipeline']['solve']:.1f}), "
        f"{smol['pipeline']['total'] / (base['rtn'] + base['forward']):.2f}x the baseline "
        f"({smol['seconds']:.1f} s with loading the model). llm-compressor's GPTQ on the same "
        "protocol: 121 s and 1.2 GB peak, and its RTN 69 s (../shared/PEERS.md, another "
        "machine state: not side by side).",
        "",
        "Rates: " + ", ".join(f"{k} {v:.3g}" for k, v in result["rates"].items()),
    ]
    return "\n".join(lines) + "\n"


def repredict(json_path: Path, md_path: Path) -> None:
    """The plan's columns again from the current code, against the same measurements (for
    a change of the plan's arithmetic alone; the random Llamas are rebuilt to read their
    configs)."""
    result = json.loads(json_path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for row in result["rows"]:
            model = "smollm2-135m"
            if row["model"] != model:
                model = str(build(int(row["model"].rsplit("x", 1)[1]), Path(tmp)))
            windows, seqlen = (int(x) for x in row["calibration"].split(" x "))
            p = predicted(model, row["recipe"], windows, seqlen)
            row["predicted_mb"], row["predicted_s"] = p["cpu"]["peak"] / 1e6, p["seconds"]
            row["ratio"] = row["predicted_mb"] / row["measured_mb"]
    result["repredicted"] = True
    json_path.write_text(json.dumps(result, indent=2))
    md_path.write_text(markdown(result))


def main() -> None:
    ap = parser(__doc__, "plan")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where to write the files")
    ap.add_argument(
        "--repredict", action="store_true",
        help="keep NAME.json's measured rows and rates; recompute only the plan's columns",
    )  # fmt: skip
    args = ap.parse_args()
    if args.repredict:
        repredict(args.results / f"{args.name}.json", args.results / f"{args.name}.md")
        return
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/plan.py", *sys.argv[1:]]),
        "threads": args.threads,
        "rates": rates(),
        "rows": [],
    }
    print(result["rates"], flush=True)
    t = str(args.threads)
    base = result["baseline"] = _child(_BASELINE, "smollm2-135m", str(args.calib_windows), t)
    print(base, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        result["rows"].append(
            quantize_row("smollm2-135m", "smollm2-135m", "gptq", args.calib_windows, 512,
                         args.threads, where)
        )  # fmt: skip
        for layers in (4, 16):
            model = build(layers, where)
            result["rows"].append(
                quantize_row(str(model), f"random llama w1024 x{layers}", "gptq", 4, 128,
                             args.threads, where)
            )  # fmt: skip
    result["rates"].update(fitted(result["rows"][0], base, args.calib_windows))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.results / f"{args.name}.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
