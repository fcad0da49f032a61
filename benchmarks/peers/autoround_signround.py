"""AutoRound's SignRound on our protocol; runs inside the auto-round virtual environment
(benchmarks/peers/install.sh), never in ours. Reads the model directory and the calibration
windows the harness wrote (safetensors), quantizes with ``AutoRound`` (weight-only,
asymmetric, per group; 10 iterations instead of its default 200, as PEERS.md measured it: 200
take hours on 2 CPU cores; its own CPU defaults otherwise, which train in bf16) and writes
the *dequantized* weights its ``quantize()`` leaves in the model as a plain fp32 model, which
the harness evaluates in our environment exactly like our own rows. Prints one JSON
line: seconds, peak RSS.

    python autoround_signround.py MODEL_DIR CALIB.safetensors OUT_DIR --bits 4 --group-size 128
"""

from __future__ import annotations

import json
import time

import torch
from peer_common import peak_rss_mb, peer_parser

ITERS = 10


def check_on_grid(model: torch.nn.Module, bits: int, group_size: int) -> int:
    """Every block Linear's weight takes at most 2^bits values in each group of a row: the
    fake format really holds rounded weights (not the untouched originals)."""
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "layers." not in name:
            continue
        row = module.weight.detach()[0]
        for g in range(0, row.numel(), group_size):
            values = row[g : g + group_size].unique().numel()
            assert values <= 2**bits, f"{name}: {values} values in a {bits}-bit group"
        checked += 1
    assert checked, "no block Linear found"
    return checked


def main() -> None:
    ap = peer_parser()
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from auto_round import AutoRound
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(args.calib)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    rounder = AutoRound(
        model,
        tok,
        scheme=f"W{args.bits}A16",
        bits=args.bits,
        group_size=args.group_size,
        sym=False,
        iters=ITERS,
        nsamples=ids.shape[0],
        seqlen=ids.shape[1],
        dataset=[row[None] for row in ids],
        device_map="cpu",
        # Offloading finished blocks to disk off: with its defaults, the weights its "fake"
        # format saved were not on a grid (47 values in a 4-bit group of q_proj).
        low_cpu_mem_usage=False,
    )
    t0 = time.perf_counter()
    model, _ = rounder.quantize()
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    model = model.float()  # the rounded weights, as its unwrapper left them in the model
    layers = check_on_grid(model, args.bits, args.group_size)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "layers": layers}))


if __name__ == "__main__":
    main()
