"""Calibration passes with and without reuse (issue 17, per-block speed), interleaved.

Quantizes SmolLM2 with each recipe twice per round, reuse on and off in alternating order,
and records the pipeline's own split of the time (forward passes, statistics, rounding maths)
and whether the two quantized models are bit-identical. Ratios within a round are the claim;
absolute seconds move with the machine.

    python benchmarks/passes.py --recipes gptq,gptaq-exact --calib-windows 16 --rounds 2
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

from common import Bench, new_result, parser, write

RECIPES = ("gptq", "gptaq-exact", "quarot-gptq-lrc-split")


def one_run(fp: Any, recipe: str, calibration: torch.Tensor, reuse: bool) -> dict[str, Any]:
    from compensator.models.adapter import get_adapter
    from compensator.pipeline.runner import run_pipeline
    from compensator.recipes.recipe import load_recipe

    model = copy.deepcopy(fp.model)
    t0 = time.perf_counter()
    report = run_pipeline(
        model, get_adapter(model), load_recipe(recipe), calibration,
        device=torch.device("cpu"), progress=False, reuse_passes=reuse,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    seconds = report.to_dict()["seconds"]
    return {
        "wall": wall,
        "forward": seconds["forward"],
        "statistics": seconds["statistics"],
        "solve": seconds["solve"],
        "state": model.state_dict(),
    }


def markdown(result: dict[str, Any]) -> str:
    p = result["protocol"]
    lines = [
        "# Calibration passes: reuse on vs off",
        "",
        f"`{result['command']}`",
        "",
        f"{p['model']}, {p['calibration']}, {p['threads']} threads, {p['rounds']} rounds "
        "(on/off order alternating). Seconds are medians over rounds; ratios are on/off "
        "per round, then the median.",
        "",
        "| recipe | wall on | wall off | wall ratio | forward on | forward off | forward ratio "
        "| identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['recipe']} | {r['wall_on']:.1f} | {r['wall_off']:.1f} | "
            f"{r['wall_ratio']:.2f}x | {r['forward_on']:.1f} | {r['forward_off']:.1f} | "
            f"{r['forward_ratio']:.2f}x | {'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = parser(__doc__, "passes")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from compensator.data import load_calibration_windows
    from compensator.models.loading import load_model

    torch.set_num_threads(args.threads)
    fp = load_model(args.model)
    calibration = load_calibration_windows(fp.tokenizer, args.calib, args.calib_windows, 512, 0)

    protocol = {
        "model": args.model,
        "calibration": f"{args.calib}, {args.calib_windows} x 512, seed 0",
        "threads": args.threads,
        "rounds": args.rounds,
    }
    result = new_result(Bench(fp, torch.empty(0), calibration, protocol), "passes.py")
    for recipe in args.recipes.split(","):
        runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        identical = True
        for k in range(args.rounds):
            for reuse in (True, False) if k % 2 == 0 else (False, True):
                runs[reuse].append(one_run(fp, recipe, calibration, reuse))
                print(recipe, "reuse" if reuse else "recompute", round(runs[reuse][-1]["wall"], 1))
            on, off = runs[True][-1]["state"], runs[False][-1]["state"]
            identical &= all(torch.equal(on[n], off[n]) for n in on)
            for r in (runs[True][-1], runs[False][-1]):
                r.pop("state")

        def med(reuse: bool, key: str, runs: dict[bool, list[dict[str, Any]]] = runs) -> float:
            return statistics.median(r[key] for r in runs[reuse])

        def ratio(key: str, runs: dict[bool, list[dict[str, Any]]] = runs) -> float:
            return statistics.median(
                a[key] / b[key] for a, b in zip(runs[True], runs[False], strict=True)
            )

        result["rows"].append(
            {
                "recipe": recipe,
                **{f"{key}_on": med(True, key) for key in ("wall", "forward", "statistics")},
                **{f"{key}_off": med(False, key) for key in ("wall", "forward", "statistics")},
                "solve_on": med(True, "solve"),
                "wall_ratio": ratio("wall"),
                "forward_ratio": ratio("forward"),
                "identical": identical,
            }
        )
        write(args.name, result, markdown(result))


if __name__ == "__main__":
    main()
