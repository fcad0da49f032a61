"""Vector quantization on SmolLM2-135M (DESIGN quick protocol): plain VQ and SSVQ near 2 and
3 effective bits per weight, with GPTQ at W2A16 g64 / W3A16 g128 for reference.

    export COMPENSATOR_DATA=../shared/data
    python benchmarks/vq.py --name vq --epochs 2
    python benchmarks/vq.py --name vq --resume --rows ssvq-2bit

Effective bits count indices, sign bits, fp16 codebooks and row scales (VQ) or codes, fp16
scales and zero points (GPTQ). SSVQ rows train --epochs passes per block (batch 2 windows).
Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

from typing import Any

import common

ROWS: dict[str, tuple[str, str | dict[str, Any]]] = {
    "gptq-w2": (
        "GPTQ W2A16 g64",
        {"scheme": {"weights": {"bits": 2, "group_size": 64}}, "steps": [{"gptq": {}}]},
    ),
    "vq-2bit": ("VQ d4, 256 codewords", "vq-2bit"),
    "svq-2bit": (
        "sign-split VQ d8, 256 magnitude codewords + sign bits, untrained",
        {"steps": [{"vq": {"dim": 8, "bits": 8, "signs": True}}]},
    ),
    "ssvq-2bit": ("SSVQ d8, 256 magnitude codewords + sign bits", "ssvq-2bit"),
    "gptq-w3": (
        "GPTQ W3A16 g128",
        {"scheme": {"weights": {"bits": 3, "group_size": 128}}, "steps": [{"gptq": {}}]},
    ),
    "vq-3bit": ("VQ d2, 64 codewords", "vq-3bit"),
    "svq-3bit": (
        "sign-split VQ d4, 256 magnitude codewords + sign bits, untrained",
        {"steps": [{"vq": {"dim": 4, "bits": 8, "signs": True}}]},
    ),
    "ssvq-3bit": ("SSVQ d4, 256 magnitude codewords + sign bits", "ssvq-3bit"),
}


def recipe(row: str, epochs: int) -> Any:
    from compensator.recipes import Recipe, load_recipe

    spec = ROWS[row][1]
    r = load_recipe(spec) if isinstance(spec, str) else Recipe.model_validate({"name": row, **spec})
    return r.with_epochs(epochs) if r.learners else r


def markdown(result: dict[str, Any]) -> str:
    p = result["protocol"]
    lines = [
        f"# {p['model']}: vector quantization (VQ, SSVQ) vs GPTQ",
        "",
        f"Command: `{result['command']}`  ",
        f"Eval: {p['eval']}, {p['eval_windows']} windows; calibration: {p['calibration']}; "
        f"{p['threads']} CPU threads. FP ppl {p['fp_ppl']:.2f}. SSVQ: {p['epochs']} epochs "
        "per block. Bits per weight include codebooks, row scales and sign bits (VQ) or "
        "scales and zero points (GPTQ).",
        "",
        *([result["note"], ""] if result.get("note") else []),
        "| row | ppl | KL | bits/weight | quantize s | train s/block |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        tpb = r.get("train_seconds_per_block")
        lines.append(
            f"| {ROWS[r['row']][0]} | {r['ppl']:,.2f} | {r['kl']:.4f} | "
            f"{r['bits_per_weight']:.3f} | {r['seconds']:.1f} | "
            f"{'' if tpb is None else f'{tpb:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = common.parser(__doc__, "vq")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--epochs", type=int, default=2)
    args, rows, _ = common.parse_rows(ap, ROWS)

    bench = common.setup_from(args)
    bench.protocol["epochs"] = args.epochs
    result = common.new_result(bench, "vq.py")

    def run(row: str) -> dict[str, Any]:
        return {"row": row, **common.run_row(bench, recipe(row, args.epochs))}

    jobs = [(row,) for row in rows]
    common.run_jobs(args, result, jobs, lambda r: (r["row"],), run, markdown)
    print(markdown(result))


if __name__ == "__main__":
    main()
