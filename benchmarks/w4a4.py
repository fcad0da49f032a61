"""W4A4 / W4A8 on SmolLM2-135M (DESIGN quick protocol): rotation, GPTQ/GPTAQ, LRC.

    export COMPENSATOR_DATA=../shared/data
    python benchmarks/w4a4.py --name w4a4                 # every row (~45 min, 2 cores)
    python benchmarks/w4a4.py --name w4a4 --resume        # after an interruption
    python benchmarks/w4a4.py --schemes W4A4 --rows quarot-gptq,lrc-0.3

Weights 4-bit g128 asymmetric; activations per-token symmetric int4 with clip ratio 0.9
(W4A4) or int8 (W4A8), on every block Linear's input. Rows: plain RTN, rotation + RTN,
rotation + GPTQ, rotation + GPTAQ (exact form), rotation + GPTQ + LRC at rho 0.1 and 0.3,
LRC aimed at the FP model's output (GPTAQ's target, ours) at rho 0.3, and the SVD-of-error
baseline at the same ranks (L2QER factors on the unquantized input,
after rotation + GPTQ). LRC rows start from the relaxed optimum (the default); the
``-zero`` rows start from L = 0, the plain alternation. Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

from typing import Any

import common

SCHEMES = {"W4A4": (4, 0.9), "W4A8": (8, 1.0)}  # activation bits, clip ratio

ROTATE = {"rotate": {}}
ROTATE_O = {"rotate": {"online_o": True}}
GPTQ = {"gptq": {}}
ROWS: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "rtn": ("RTN (no rotation)", [{"rtn": {}}]),
    "quarot-rtn": ("rotation + RTN", [ROTATE, {"rtn": {}}]),
    "quarot-gptq": ("rotation + GPTQ", [ROTATE, GPTQ]),
    "quarot-gptaq": (
        "rotation + GPTAQ (exact form)",
        [ROTATE, {"gptq": {"asymmetric": True, "fp_precision": "bfloat16"}}],
    ),
    "lrc-0.1": ("rotation + GPTQ + LRC rho 0.1", [ROTATE, GPTQ, {"lrc": {"rank": "10%"}}]),
    "lrc-0.3": ("rotation + GPTQ + LRC rho 0.3", [ROTATE, GPTQ, {"lrc": {"rank": "30%"}}]),
    "lrc-0.3-it3": (
        "rotation + GPTQ + LRC rho 0.3, 3 iterations",
        [ROTATE, GPTQ, {"lrc": {"rank": "30%", "iterations": 3}}],
    ),
    "lrc-asym-0.3": (
        "rotation + GPTQ + LRC rho 0.3 aimed at the FP output (ours)",
        [ROTATE, GPTQ, {"lrc": {"rank": "30%", "asymmetric": True}}],
    ),
    "lrc-0.1-zero": (
        "rotation + GPTQ + LRC rho 0.1, from L = 0",
        [ROTATE, GPTQ, {"lrc": {"rank": "10%", "init": "zero"}}],
    ),
    "lrc-0.3-zero": (
        "rotation + GPTQ + LRC rho 0.3, from L = 0",
        [ROTATE, GPTQ, {"lrc": {"rank": "30%", "init": "zero"}}],
    ),
    "lrc-0.3-it3-zero": (
        "rotation + GPTQ + LRC rho 0.3, 3 iterations from L = 0",
        [ROTATE, GPTQ, {"lrc": {"rank": "30%", "iterations": 3, "init": "zero"}}],
    ),
    "lrc-asym-0.3-zero": (
        "rotation + GPTQ + LRC rho 0.3 aimed at the FP output (ours), from L = 0",
        [ROTATE, GPTQ, {"lrc": {"rank": "30%", "asymmetric": True, "init": "zero"}}],
    ),
    "lrc-split-0.1": (
        "rotation + GPTQ + LRC rho 0.1, split input (ours)",
        [ROTATE, GPTQ, {"lrc": {"rank": "10%", "split": True}}],
    ),
    "lrc-split-0.3": (
        "rotation + GPTQ + LRC rho 0.3, split input (ours)",
        [ROTATE, GPTQ, {"lrc": {"rank": "30%", "split": True}}],
    ),
    "quarot-o-gptq": ("rotation with online o_proj Hadamard + GPTQ", [ROTATE_O, GPTQ]),
    "lrc-o-0.3": (
        "rotation with online o_proj Hadamard + GPTQ + LRC rho 0.3",
        [ROTATE_O, GPTQ, {"lrc": {"rank": "30%"}}],
    ),
    "svd-0.1": (
        "rotation + GPTQ + SVD of error (L2QER) rho 0.1",
        [ROTATE, GPTQ, {"lqer": {"rank": "10%", "input": "raw"}}],
    ),
    "svd-0.3": (
        "rotation + GPTQ + SVD of error (L2QER) rho 0.3",
        [ROTATE, GPTQ, {"lqer": {"rank": "30%", "input": "raw"}}],
    ),
}


def recipe(row: str, scheme: str) -> Any:
    from compensator.recipes import Recipe

    bits, clip = SCHEMES[scheme]
    return Recipe.model_validate(
        {
            "name": row,
            "scheme": {
                "weights": {"bits": 4, "group_size": 128, "symmetric": False},
                "activations": {"bits": bits, "clip_ratio": clip},
            },
            "steps": ROWS[row][1],
        }
    )


def markdown(result: dict[str, Any]) -> str:
    p = result["protocol"]
    fp = p["fp_ppl"]
    lines = [
        f"# {p['model']}: W4A4 / W4A8 with rotations and LRC",
        "",
        f"Command: `{result['command']}`  ",
        f"Eval: {p['eval']}, {p['eval_windows']} windows; calibration: {p['calibration']}; "
        f"{p['threads']} CPU threads. FP ppl {fp:.2f}. Weights 4-bit g128 asymmetric; "
        "activations per-token symmetric (int4 with clip 0.9, int8 without). Bits per weight "
        "count codes, scales, zeros and fp16 low-rank factors. 'gap closed' is the share of "
        "rotation + GPTQ's distance to FP (in ppl) that a row removes, same scheme "
        "(empty where the row is worse).",
        "",
        *([result["note"], ""] if result.get("note") else []),
        "| row | scheme | ppl | KL | gap closed | bits/weight | quantize s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = {r["scheme"]: r["ppl"] for r in result["rows"] if r["row"] == "quarot-gptq"}
    order = {key: i for i, key in enumerate((s, r) for s in SCHEMES for r in ROWS)}
    for r in sorted(result["rows"], key=lambda r: order[(r["scheme"], r["row"])]):
        ref = base.get(r["scheme"])
        gap = "" if ref is None or r["ppl"] > ref else f"{(ref - r['ppl']) / (ref - fp):.0%}"
        lines.append(
            f"| {ROWS[r['row']][0]} | {r['scheme']} | {r['ppl']:.2f} | {r['kl']:.4f} | {gap} "
            f"| {r['bits_per_weight']:.2f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = common.parser(__doc__, "w4a4")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    args, rows, schemes = common.parse_rows(ap, ROWS, SCHEMES)

    bench = common.setup_from(args)
    result = common.new_result(bench, "w4a4.py")

    def run(row: str, scheme: str) -> dict[str, Any]:
        return {"row": row, "scheme": scheme, **common.run_row(bench, recipe(row, scheme))}

    jobs = [(row, s) for s in schemes for row in rows]
    common.run_jobs(args, result, jobs, lambda r: (r["row"], r["scheme"]), run, markdown)
    print(markdown(result))


if __name__ == "__main__":
    main()
