"""Peer toolkits on our protocol, measured here, in rows ``compensator compare --peers`` reads.

For every (peer, bits, seed): the calibration windows are drawn by compensator's own sampler
(the seed as in ``compare``) and handed to the peer as a safetensors file; the peer's script
runs in its own virtual environment (``benchmarks/peers/install.sh``) and writes its
*dequantized* weights as a plain fp32 model; that model is evaluated here with the same code,
windows and FP reference as our rows. Seconds and peak RSS are the peer process's own
quantization (its script measures them). Rows accumulate in
``benchmarks/peers/results/PEER.json`` (a rerun skips the rows it has).

    export COMPENSATOR_DATA=../shared/data
    bash benchmarks/peers/install.sh
    python benchmarks/peers/run.py --model benchmarks/results/compare-smollm2/model \\
        --bits 3,4 --seeds 0,1,2 --group-size 128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HOME = Path(os.environ.get("PEERS_HOME", Path.home() / ".cache" / "compensator-peers"))
# name -> (virtual environment, script and its extra arguments, method as the report shows
# it, toolkit version)
PEERS = {
    "llm-compressor-gptq": (
        "llm-compressor",
        ["llmcompressor_gptq.py"],
        "GPTQ (damp 0.01, static act-order)",
        "llm-compressor 0.14.0.1",
    ),
    "gptqmodel-gptq": (
        "gptqmodel",
        ["gptqmodel_gptq.py"],
        "GPTQ (damp 0.05, no act-order)",
        "GPTQModel 7.6.0",
    ),
    "gptqmodel-gptaq": (
        "gptqmodel",
        ["gptqmodel_gptq.py", "--gptaq"],
        "GPTAQ (alpha 0.25)",
        "GPTQModel 7.6.0",
    ),
    "autoround": (
        "auto-round",
        ["autoround_signround.py"],
        "SignRound (10 iterations, bf16)",
        "AutoRound 0.16.1",
    ),
}


def stored_bits(model_dir: str, bits: int, group_size: int) -> float:
    """Bits per weight of the block Linears stored as we store them (codes, an fp16 scale and
    a ``bits``-bit zero point per group, the short last group counted whole): the same
    layout the peer's codes need, so rows compare at equal cost."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # (rows, columns)
    weights = sum(r * k for r, k in shapes)
    groups = sum(r * math.ceil(k / group_size) for r, k in shapes)
    return bits + groups * (16 + bits) / weights


def run_row(args: argparse.Namespace, peer: str, bits: int, seed: int) -> dict[str, Any]:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    import compensator as cp
    from compensator.data import load_calibration_windows

    env_name, script, method, version = PEERS[peer]
    python = HOME / env_name / "bin" / "python"
    if not python.is_file():
        sys.exit(f"{python} missing: run bash benchmarks/peers/install.sh first")
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = load_calibration_windows(tok, args.calib, args.calib_windows, 512, seed)
    with tempfile.TemporaryDirectory() as tmp:
        save_file({"input_ids": ids.contiguous()}, f"{tmp}/calib.safetensors")
        model = str(Path(args.model).resolve())
        cmd = [str(python), str(HERE / script[0]), model, f"{tmp}/calib.safetensors",
               f"{tmp}/model", "--bits", str(bits), "--group-size", str(args.group_size),
               "--threads", str(args.threads), *script[1:]]  # fmt: skip
        t0 = time.perf_counter()
        # In the temporary directory: GPTQModel writes a logs/ folder where it runs.
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, cwd=tmp)
        if done.returncode != 0:
            raise RuntimeError(f"{peer} W{bits} seed {seed} failed:\n{done.stderr[-3000:]}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        wall = time.perf_counter() - t0
        res = cp.evaluate(f"{tmp}/model", fp=args.model, data=args.data,
                          windows=args.windows, progress=False)  # fmt: skip
    return {
        "recipe": method,
        "source": version,
        "bits": bits,
        "seed": seed,
        "scheme": f"W{bits}A16 g{args.group_size}",
        "ppl": res.ppl,
        "kl": res.kl,
        "fp_ppl": res.fp_ppl,
        "bits_per_weight": stored_bits(args.model, bits, args.group_size),
        "quantize_seconds": measured["seconds"],
        "process_seconds": wall,
        "peak_rss_mb": measured["peak_rss_mb"],
        "key": _key(args, peer, bits, seed),
    }


def _key(args: argparse.Namespace, peer: str, bits: int, seed: int) -> dict[str, Any]:
    return {"peer": peer, "bits": bits, "seed": seed, "group_size": args.group_size,
            "calib": args.calib, "calib_windows": args.calib_windows, "data": args.data,
            "windows": args.windows, "model": str(Path(args.model).resolve())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help="a local safetensors model directory")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib", default="wikitext2-valid")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--data", default="wikitext2")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    for peer in args.peers.split(","):
        path = HERE / "results" / f"{peer}.json"
        rows = json.loads(path.read_text())["rows"] if path.is_file() else []
        for bits in (int(b) for b in args.bits.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                if any(r["key"] == _key(args, peer, bits, seed) for r in rows):
                    continue
                row = run_row(args, peer, bits, seed)
                rows.append(row)
                print(f"{peer} W{bits} seed {seed}: ppl {row['ppl']:.3f} "
                      f"({row['quantize_seconds']:.0f} s)", flush=True)  # fmt: skip
                path.parent.mkdir(exist_ok=True)
                command = " ".join(["python", "benchmarks/peers/run.py", *sys.argv[1:]])
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
                tmp.replace(path)


if __name__ == "__main__":
    main()
