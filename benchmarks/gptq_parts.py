"""The pieces of GPTQ's pipeline that this toolkit computes itself, each against the form it
replaced, interleaved in one process (issue 17; docs/big-models.md, "SmolLM2 against
llm-compressor"):

* ``X^T X``: the full product (``addmm_``) against the upper block triangle
  (``linalg.add_gram_upper_``), 4,096 tokens at SmolLM2's widths 576 and 1,536;
* the inverse Hessian's upper factor: Cholesky, inverse and a second Cholesky (the former
  form, written out here) against one Cholesky of the reversed matrix and a triangular inverse
  (``rounders.gptq.inverse_cholesky_upper``), and each one's distance to float64;
* packing 4-bit codes of a 3,072 x 576 layer (SmolLM2's gate/up): the general bit stream
  against the shortcut for widths dividing 32 (``quant.pack``).

Each pair runs alternately, ``--repeats`` times each; the table gives medians and their ratio.

    python benchmarks/gptq_parts.py --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from common import write


def _old_inverse_upper(h: torch.Tensor) -> torch.Tensor:
    chol = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def _paired(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[float, float]:
    ta, tb = [], []
    a(), b()  # warm up
    for _ in range(repeats):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def measure(repeats: int) -> list[dict[str, Any]]:
    from compensator.linalg import add_gram_upper_
    from compensator.quant.pack import _pack_aligned, _pack_stream, _unpack_aligned, _unpack_stream
    from compensator.rounders.gptq import inverse_cholesky_upper

    g = torch.Generator().manual_seed(0)
    rows = []
    for d in (576, 1536):
        x = torch.randn(4096, d, generator=g)
        acc = torch.zeros(d, d)
        full, upper = _paired(
            lambda x=x, acc=acc: acc.addmm_(x.T, x),
            lambda x=x, acc=acc: add_gram_upper_(acc, x),
            repeats,
        )
        rows.append({"part": f"X^T X, width {d}", "before_ms": full, "after_ms": upper})
    for d in (576, 1536):
        x = torch.randn(8 * d, d, generator=g) @ torch.randn(d, d, generator=g) * 0.1
        h = x.T @ x / x.shape[0]
        h += 0.01 * h.diagonal().mean() * torch.eye(d)
        old, new = _paired(
            lambda h=h: _old_inverse_upper(h), lambda h=h: inverse_cholesky_upper(h), repeats
        )
        ref = _old_inverse_upper(h.double())
        err = {
            name: float((u.double() - ref).norm() / ref.norm())
            for name, u in (("before", _old_inverse_upper(h)), ("after", inverse_cholesky_upper(h)))
        }
        rows.append({
            "part": f"inverse factor, width {d}", "before_ms": old, "after_ms": new,
            "error_before": err["before"], "error_after": err["after"],
        })  # fmt: skip
    codes = torch.randint(0, 16, (3072, 576), generator=g)
    words = _pack_aligned(codes, 4)
    assert torch.equal(words, _pack_stream(codes, 4))
    stream, aligned = _paired(
        lambda: _pack_stream(codes, 4), lambda: _pack_aligned(codes, 4), repeats
    )
    rows.append({"part": "pack 4-bit, 3072 x 576", "before_ms": stream, "after_ms": aligned})
    stream, aligned = _paired(
        lambda: _unpack_stream(words, 4, 576), lambda: _unpack_aligned(words, 4, 576), repeats
    )
    rows.append({"part": "unpack 4-bit, 3072 x 576", "before_ms": stream, "after_ms": aligned})
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# GPTQ's own pieces, before and after",
        "",
        f"`{result['command']}`",
        "",
        f"{result['threads']} threads, one process, each pair alternating, {result['repeats']} "
        "runs each; medians. Error: relative Frobenius distance to the former form in float64.",
        "",
        "| part | before ms | after ms | after / before | error before / after |",
        "|---|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        err = f"{r['error_before']:.1e} / {r['error_after']:.1e}" if "error_after" in r else "-"
        lines.append(
            f"| {r['part']} | {r['before_ms']:.2f} | {r['after_ms']:.2f} | "
            f"{r['after_ms'] / r['before_ms']:.2f}x | {err} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "command": " ".join(["python", "benchmarks/gptq_parts.py", *sys.argv[1:]]),
        "threads": args.threads,
        "repeats": args.repeats,
        "rows": measure(args.repeats),
    }
    write("gptq-parts", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
