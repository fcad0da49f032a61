"""LQER / L2QER on SmolLM2-135M (DESIGN quick protocol): ppl, KL and stored bits per weight.

    export COMPENSATOR_DATA=../shared/data
    python benchmarks/lowrank.py --name lowrank                     # everything (~50 min, 2 cores)
    python benchmarks/lowrank.py --name lowrank --resume            # after an interruption
    python benchmarks/lowrank.py --schemes "W3A16 g128" --ranks 32 --methods gptq-l2qer

For each scheme: the plain rounders (rtn, gptq) as reference points, then every low-rank
preset at every rank. Everything runs in this process (the checkpoint round trip is a unit
test); the results are rewritten after every row, so an interrupted run keeps what it did.
Writes benchmarks/results/NAME.{json,md} and NAME.png (ppl against bits per weight).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import common
from common import Bench

# scheme label -> (weight bits, group size, activation bits or None)
SCHEMES = {
    "W4A16 g128": (4, 128, None),
    "W3A16 g128": (3, 128, None),
    "W4A8 g128": (4, 128, 8),
}


def run_row(bench: Bench, method: str, scheme: str, rank: int | None) -> dict[str, Any]:
    bits, gs, act_bits = SCHEMES[scheme]
    row = common.run_row(bench, method, bits=bits, group_size=gs, rank=rank, act_bits=act_bits)
    return {"method": method, "scheme": scheme, "rank": rank, **row}


def markdown(result: dict[str, Any]) -> str:
    p = result["protocol"]
    lines = [
        f"# {p['model']}: low-rank error reconstruction (LQER / L2QER)",
        "",
        f"Command: `{result['command']}`  ",
        f"Eval: {p['eval']}, {p['eval_windows']} windows; calibration: {p['calibration']}; "
        f"{p['threads']} CPU threads. FP ppl {p['fp_ppl']:.2f}. Bits per weight count the "
        "codes, the fp16 scales and zero points of every group, and the fp16 factors A and B.",
        "",
        *([result["note"], ""] if result.get("note") else []),
        "| method | scheme | rank | ppl | KL | bits/weight | quantize s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        f"| FP | - | - | {p['fp_ppl']:.2f} | 0 | 32 | |",
    ]
    for r in result["rows"]:
        rank = "-" if r["rank"] is None else r["rank"]
        lines.append(
            f"| {r['method']} | {r['scheme']} | {rank} | {r['ppl']:.2f} | {r['kl']:.4f} "
            f"| {r['bits_per_weight']:.2f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in result["rows"]:
        series.setdefault((r["method"], r["scheme"]), []).append(r)
    markers = {"W4A16 g128": "o", "W3A16 g128": "s", "W4A8 g128": "^"}
    for (method, scheme), rows in series.items():
        rows = sorted(rows, key=lambda r: r["bits_per_weight"])
        xs = [r["bits_per_weight"] for r in rows]
        ys = [r["ppl"] for r in rows]
        if rows[0]["rank"] is None:  # a plain rounder: one reference point
            ax.scatter(xs, ys, marker=markers[scheme], s=70, c="black", zorder=3)
            ax.annotate(f"{method} {scheme}", (xs[0], ys[0]), textcoords="offset points",
                        xytext=(5, 5), fontsize=7)  # fmt: skip
        else:
            ax.plot(xs, ys, marker=markers[scheme], label=f"{method} {scheme}")
    ax.axhline(result["protocol"]["fp_ppl"], color="grey", ls="--", lw=1, label="FP")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (codes + scales/zeros + low-rank factors)")
    ax.set_ylabel("WikiText-2 ppl (log scale)")
    ax.set_title(f"{result['protocol']['model']}: ranks {result['ranks']}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = common.parser(__doc__, "lowrank")
    ap.add_argument("--methods", default="rtn-lqer,rtn-l2qer,gptq-l2qer")
    ap.add_argument("--references", default="rtn,gptq", help="plain rounders per scheme")
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    args = ap.parse_args()

    bench = common.setup_from(args)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    result = common.new_result(bench, "lowrank.py", ranks=ranks)
    jobs = [
        (method, scheme, rank)
        for scheme in args.schemes.split(",")
        for method, rank_list in [
            *[(m, [None]) for m in args.references.split(",") if m],
            *[(m, ranks) for m in args.methods.split(",") if m],
        ]
        for rank in rank_list
    ]
    common.run_jobs(
        args,
        result,
        jobs,
        lambda r: (r["method"], r["scheme"], r["rank"]),
        lambda m, s, k: run_row(bench, m, s, k),
        markdown,
    )
    plot(result, common.RESULTS / f"{args.name}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
