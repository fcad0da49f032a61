"""Our GGUF exports against llama.cpp's own quantization, measured by llama.cpp itself.

llama.cpp quantizes activations to 8 bits in its dot products, so its perplexity is compared
only with its own: every row here is a GGUF file scored by ``llama-perplexity`` on the same
text (WikiText-2 test, 512-token chunks, the second half of each chunk scored, as llama.cpp
does), with the KL divergence to the F32 model's logits. Rows:
- ``F32``: the source dequantized by ``llama-quantize --allow-requantize`` (the reference);
- ``llama-quantize``: the same F32 file quantized by llama.cpp to TYPE, all block Linears at
  TYPE (``--pure``), token embedding and output kept F32 as our exporter keeps them; and
  again ``--imatrix`` from ``llama-imatrix`` over the text of our calibration windows of that
  seed (the same tokens our recipes calibrate on, decoded);
- ours: ``compensator quantize`` (W4 g32 symmetric for Q4_0, asymmetric with float mins
  for Q4_1, ``--kquant TYPE`` for the K-quants) then ``compensator export --format gguf --gguf-type TYPE``.
  K-quant rows need rows of whole 256-weight super-blocks; llama-quantize and we both give
  the other Linears the same fallback type (Q4_K -> Q5_0, Q3_K and Q2_K -> Q4_0, ...).
GGUFs and logits live in LLAMACPP_HOME/work (outside the repo); results go to
benchmarks/results/llamacpp.{json,md}, rewritten after every row (a rerun skips its rows and keeps
those of earlier commands; delete the JSON when our rounding changes).

    bash benchmarks/llamacpp/build.sh
    export COMPENSATOR_DATA=../shared/data
    python benchmarks/llamacpp/ppl.py --types Q4_0 --recipes rtn,gptq,gptaq-exact --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

HOME = Path(os.environ.get("LLAMACPP_HOME", Path.home() / ".cache" / "compensator-llamacpp"))
BIN, WORK = HOME / "build" / "bin", HOME / "work"
# This llama.cpp's repacked CPU kernels segfault on Q4_0 files (llama-quantize's own, too)
# on an AVX512-VNNI machine; the plain kernels score them.
NO_REPACK = ["--no-repack"]
BENCHMARKS = Path(__file__).resolve().parents[1]
SCHEME = {"Q4_0": ["--bits", "4", "--group-size", "32", "--sym"],
          "Q4_1": ["--bits", "4", "--group-size", "32", "--asym", "--float-min"],
          **{k: ["--kquant", k] for k in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}}  # fmt: skip


def run(cmd: list[str], log: Path) -> tuple[str, float]:
    """Run a command, its output kept in ``log``; its output and seconds."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"failed ({log}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr, seconds


def texts(args: argparse.Namespace, seeds: list[int]) -> tuple[Path, dict[int, Path]]:
    """The evaluation text and, per seed, the decoded text of our calibration windows."""
    from compensator.data import load_calibration_windows, resolve_text
    from compensator.models.loading import load_model

    test = WORK / "wikitext2-test.txt"
    test.write_text(resolve_text(args.data, "eval")[0])
    tok = load_model(args.model).tokenizer
    calib = {}
    for seed in seeds:
        ids = load_calibration_windows(tok, args.calib, args.calib_windows, 512, seed)
        calib[seed] = WORK / f"calib-{args.calib_windows}-s{seed}.txt"
        calib[seed].write_text("".join(tok.decode(row) for row in ids))
    return test, calib


def perplexity(args: argparse.Namespace, gguf: Path, test: Path) -> list[str]:
    return [str(BIN / "llama-perplexity"), "-m", str(gguf), "-f", str(test), "-c", "512",
            "--chunks", str(args.chunks), "-t", str(args.threads), "-b", "512", *NO_REPACK]  # fmt: skip


def score(args: argparse.Namespace, gguf: Path, test: Path, f32: Path) -> dict[str, float]:
    """llama-perplexity's ppl, mean KL and same-top-token share against the F32 logits."""
    base = WORK / f"f32-{args.data}-{args.chunks}.kld"
    if not base.is_file():  # the F32 model's logits, which every row's KL is taken against
        run([*perplexity(args, f32, test), "--kl-divergence-base", str(base)],
            base.with_suffix(".log"))  # fmt: skip
    out, _ = run([*perplexity(args, gguf, test), "--kl-divergence-base", str(base),
                  "--kl-divergence"], gguf.with_suffix(".ppl.log"))  # fmt: skip
    return {
        "ppl": float(re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", out)[1]),
        "kl": float(re.search(r"Mean\s+KLD:\s*([\d.]+)", out)[1]),
        "same_top_pct": float(re.search(r"Same top p:\s*([\d.]+)", out)[1]),
    }


def llama_quantize(src: Path, out: Path, qtype: str, imatrix: Path | None) -> tuple[Path, float]:
    cmd = [str(BIN / "llama-quantize"), "--allow-requantize"]
    if qtype != "F32":
        cmd += ["--pure", "--token-embedding-type", "f32", "--output-tensor-type", "f32"]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    return out, run([*cmd, str(src), str(out), qtype], out.with_suffix(".log"))[1]


def imatrix_quantize(
    args: argparse.Namespace, f32: Path, calib: Path, out: Path, qtype: str
) -> tuple[Path, float]:
    """llama-quantize with an imatrix that llama-imatrix computes over ``calib``."""
    imatrix = WORK / f"imatrix-{calib.stem}.gguf"
    run([str(BIN / "llama-imatrix"), "-m", str(f32), "-f", str(calib), "-c", "512",
         "-t", str(args.threads), "-o", str(imatrix), *NO_REPACK],
        imatrix.with_suffix(".log"))  # fmt: skip
    return llama_quantize(f32, out, qtype, imatrix)


def ours(
    args: argparse.Namespace, src: Path, recipe: str, qtype: str, seed: int
) -> tuple[Path, float]:
    """Our recipe quantized and exported to ``qtype``; the GGUF and the quantize seconds."""
    ckpt, out = WORK / f"{recipe}-{qtype}-s{seed}", WORK / f"{recipe}-{qtype}-s{seed}.gguf"
    cli = [sys.executable, "-m", "compensator"]
    _, seconds = run([*cli, "quantize", args.model, "--recipe", recipe, *SCHEME[qtype],
                      "--calib", args.calib, "--calib-windows", str(args.calib_windows),
                      "--seqlen", "512", "--seed", str(seed), "--out", str(ckpt), "--force",
                      "--no-progress"], ckpt.with_suffix(".log"))  # fmt: skip
    run([*cli, "export", str(ckpt), "--format", "gguf", "--gguf-type", qtype, "--gguf-base",
         str(src), "--out", str(out), "--force"], out.with_suffix(".export.log"))  # fmt: skip
    return out, seconds


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Our GGUF exports against llama-quantize, scored by llama.cpp",
        "",
        "Commands (rows of earlier commands stay until a command asks for them again):",
        "",
        *(f"    {c}" for c in result["commands"]),
        "",
        f"{result['protocol']}",
        "",
        "Seconds: llama-quantize's conversion; for ours the whole `compensator quantize` "
        "process (loading the GGUF included).",
        "",
        "| type | method | seed | ppl | KL to F32 | same top token % | seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['type']} | {r['method']} | {r.get('seed', '')} | {r['ppl']:.4f} | "
                     f"{r['kl']:.5f} | {r['same_top_pct']:.2f} | {r['seconds']:.1f} |")  # fmt: skip
    lines += ["", "Over seeds (mean ± sample sd; one row: that run):", "",
              "| type | method | runs | ppl | KL to F32 |", "| --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in result["rows"]:
        groups.setdefault((r["type"], r["method"]), []).append(r)
    for (qtype, method), rows in groups.items():
        ppl, kl = (spread([r[k] for r in rows], digits) for k, digits in (("ppl", 2), ("kl", 4)))
        lines.append(f"| {qtype} | {method} | {len(rows)} | {ppl} | {kl} |")
    return "\n".join(lines) + "\n"


def spread(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m", help="built-in name or GGUF file")
    ap.add_argument("--types", default="Q4_0")
    ap.add_argument("--recipes", default="rtn,gptq,gptaq-exact")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--calib", default="wikitext2-valid")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--data", default="wikitext2")
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(BENCHMARKS))  # the benchmarks' shared results writer
    from common import write
    from compensator.models.loading import gguf_source
    from compensator.recipes.recipe import load_recipe

    if not (BIN / "llama-perplexity").is_file():
        sys.exit(f"{BIN} has no llama.cpp tools: run bash benchmarks/llamacpp/build.sh first")
    src = gguf_source(args.model)
    if src is None:
        sys.exit(f"{args.model} is not a GGUF file or a built-in GGUF model")
    WORK.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")
    seeded = {r: load_recipe(r).draws_at_random() for r in recipes}
    test, calib = texts(args, seeds)
    path = BENCHMARKS / "results" / "llamacpp.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {"rows": [], "commands": []}
    old = earlier["rows"]
    command = " ".join(["python", "benchmarks/llamacpp/ppl.py", *sys.argv[1:]])
    protocol = (f"{args.model} ({src.name}); llama-perplexity on the first {args.chunks} "
                f"512-token chunks of {args.data} test, {args.threads} threads; calibration "
                f"{args.calib}, {args.calib_windows} x 512 per seed")  # fmt: skip
    commands = [c for c in earlier.get("commands", []) if c != command] + [command]
    result = {"commands": commands,
              "protocol": protocol, "llama_cpp": (HOME / "build" / "VERSION").read_text().strip(),
              "rows": []}  # fmt: skip
    f32 = WORK / "f32.gguf"

    def row(key: dict[str, Any], make: Any) -> None:
        key = {**key, "chunks": args.chunks, "data": args.data, "model": args.model}
        hit = next((r for r in old if r["key"] == key), None)
        if hit is None:
            gguf, seconds = make()
            hit = {**{k: key[k] for k in ("type", "method", "seed") if k in key}, "key": key,
                   **score(args, gguf, test, f32), "seconds": seconds}  # fmt: skip
            print(json.dumps({k: v for k, v in hit.items() if k != "key"}), flush=True)
        result["rows"].append(hit)
        # rows of earlier runs that this one did not ask for stay in the table
        kept = [r for r in old if all(r["key"] != n["key"] for n in result["rows"])]
        table = {**result, "rows": result["rows"] + kept}
        write("llamacpp", table, markdown(table))

    if not f32.is_file():
        llama_quantize(src, f32, "F32", None)
    row({"type": "F32", "method": "F32 (source dequantized)"}, lambda: (f32, 0.0))
    for qtype in args.types.split(","):
        out = WORK / f"llama-{qtype}.gguf"
        row({"type": qtype, "method": "llama-quantize"},
            partial(llama_quantize, f32, out, qtype, None))  # fmt: skip
        for seed in seeds:
            out_i = WORK / f"llama-{qtype}-imatrix-s{seed}.gguf"
            row({"type": qtype, "method": "llama-quantize + imatrix", "seed": seed},
                partial(imatrix_quantize, args, f32, calib[seed], out_i, qtype))  # fmt: skip
            for recipe in recipes:
                if seed != seeds[0] and not seeded[recipe]:
                    continue  # nothing in it is drawn at random: one run
                row({"type": qtype, "method": f"compensator {recipe}", "seed": seed},
                    partial(ours, args, src, recipe, qtype, seed))  # fmt: skip


if __name__ == "__main__":
    main()
