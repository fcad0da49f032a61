"""The README's headline table, rendered from a ``compensator compare`` report.json: one row
per method (ours and the peers' rows the report holds), ppl per bit width as mean ± sd over
the calibration seeds, and each row's quantization time as a ratio to our GPTQ's at the same
bits in the same report. With ``--write README.md`` it replaces the table between the
``<!-- headline -->`` and ``<!-- /headline -->`` markers; otherwise it prints it.

    python benchmarks/headline.py benchmarks/results/compare-smollm2/report.json --write README.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

OURS = {
    "rtn": "RTN",
    "gptq": "GPTQ",
    "gptaq-exact": "GPTAQ, exact form (`gptaq-exact`)",
}
REFERENCE = ("gptq", "compensator")  # the row every time is a ratio to
START, END = "<!-- headline -->", "<!-- /headline -->"


def _cell(stat: dict[str, Any]) -> str:
    mean, sd = stat["mean"], stat["sd"]
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


def _label(row: dict[str, Any], runs: int) -> str:
    if row["source"] == "compensator":
        return OURS.get(row["recipe"], f"`{row['recipe']}`")
    return f"{row['source']} {row['recipe']} (peer, measured, {runs} run{'s' * (runs > 1)})"


def table(report: dict[str, Any]) -> str:
    rows = report["summary"]
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    methods: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in rows:
        methods.setdefault((r["recipe"], r["source"]), {})[r["bits"]] = r
    ref = methods.get(REFERENCE, {})
    best = {b: min(r["ppl"]["mean"] for r in rows if r["bits"] == b) for b in bits}
    widths = " / ".join(f"W{b}" for b in bits)
    head = ["method", *(_scheme_of(rows, b) for b in bits), f"time vs GPTQ ({widths})"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    order = sorted(methods.items(), key=_rank)
    for (recipe, source), per_bits in order:
        any_row = next(iter(per_bits.values()))
        runs = max(r["ppl"]["n"] for r in per_bits.values())
        cells = []
        for b in bits:
            r = per_bits.get(b)
            text = "" if r is None else _cell(r["ppl"])
            cells.append(f"**{text}**" if r is not None and r["ppl"]["mean"] == best[b] else text)
        times = []
        for b in bits:
            r, g = per_bits.get(b), ref.get(b)
            if r is None or g is None:
                times.append("-")
            elif (recipe, source) == REFERENCE:
                times.append(f"1.00 ({g['quantize_seconds']['mean']:.0f} s)")
            else:
                times.append(f"{r['quantize_seconds']['mean'] / g['quantize_seconds']['mean']:.2f}")
        lines.append(
            f"| {_label(any_row, runs)} | " + " | ".join(cells) + f" | {' / '.join(times)} |"
        )
    return "\n".join(lines) + "\n"


def _scheme_of(rows: list[dict[str, Any]], b: int) -> str:
    return next(r["scheme"] for r in rows if r["bits"] == b)


def _rank(item: tuple[tuple[str, str], dict[int, dict[str, Any]]]) -> tuple[int, str]:
    """Ours in the order of OURS, then the peers by toolkit and method."""
    recipe, source = item[0]
    if source == "compensator":
        return (list(OURS).index(recipe) if recipe in OURS else len(OURS), "")
    return (len(OURS) + 1, f"{source} {recipe}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("report", type=Path)
    ap.add_argument("--write", type=Path, help="a markdown file with the headline markers")
    args = ap.parse_args()
    text = table(json.loads(args.report.read_text()))
    if args.write is None:
        print(text, end="")
        return
    doc = args.write.read_text()
    pattern = re.compile(re.escape(START) + r"\n.*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{args.write}: no {START} ... {END} markers to replace between")
    tmp = args.write.with_suffix(args.write.suffix + ".tmp")
    tmp.write_text(pattern.sub(lambda _: f"{START}\n{text}{END}", doc, count=1))
    tmp.replace(args.write)


if __name__ == "__main__":
    main()
