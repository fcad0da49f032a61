"""GPTQModel's GPTQ (or GPTAQ with ``--gptaq``) on our protocol; runs inside the gptqmodel
virtual environment (benchmarks/peers/install.sh), never in ours. Reads the model directory
and the calibration windows the harness wrote (safetensors), quantizes with GPTQModel's
defaults for its method (damp 0.05, no act-order, its group-aware ordering; weight-only,
asymmetric, per group; GPTAQ alpha 0.25, PEERS.md's settings), saves the checkpoint, loads
it back (PEERS.md: the weights right after ``quantize()`` are one zero-point step off; the
saved checkpoint is right) and writes the *dequantized* weights as a plain fp32 model, which
the harness evaluates in our environment exactly like our own rows. Prints one JSON line:
seconds, peak RSS.

    python gptqmodel_gptq.py MODEL_DIR CALIB.safetensors OUT_DIR --bits 4 --group-size 128
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch
from peer_common import peak_rss_mb, peer_parser


def dequantized_state(qmodel: torch.nn.Module, plain: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every GPTQ layer's weight from its own dequantizer, arithmetic in fp32 (the stored
    scales are fp16 values either way), checked against the plain model's original weight:
    the mean rounding offset must be well under one step, which a shifted zero point is not."""
    originals = dict(plain.named_parameters())
    state = {}
    for name, module in qmodel.named_modules():
        if not hasattr(module, "dequantize_weight") or not hasattr(module, "qweight"):
            continue
        module.scales.data = module.scales.data.float()
        w = module.dequantize_weight().float().t().contiguous()  # GPTQ keeps [in, out]
        key = name.removeprefix("model.") if f"{name}.weight" not in originals else name
        key = f"{key}.weight" if f"{key}.weight" in originals else f"model.{key}.weight"
        ref = originals[key].detach().float()
        assert w.shape == ref.shape, f"{name}: {tuple(w.shape)} vs {tuple(ref.shape)}"
        step = module.scales.float().t().repeat_interleave(module.group_size, dim=1)
        offset = ((ref - w) / step[:, : ref.shape[1]]).mean().abs().item()
        assert offset < 0.25, f"{name}: dequantized weight sits {offset:.2f} steps off"
        state[key] = w
    return state


def main() -> None:
    ap = peer_parser()
    ap.add_argument("--gptaq", action="store_true", help="GPTAQ (alpha 0.25) instead of GPTQ")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # Its default pool on a 2-core machine has 1 worker, fewer than its model loader asks for.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import GPTAQConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(args.calib)["input_ids"]
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]
    extra = {"gptaq": GPTAQConfig(alpha=0.25, device="cpu")} if args.gptaq else {}
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, sym=False, **extra)
    model = GPTQModel.load(args.model, config, device="cpu", dtype=torch.float32)
    t0 = time.perf_counter()
    model.quantize(calib, batch_size=1)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        del model
        reloaded = GPTQModel.load(tmp, device="cpu", backend=BACKEND.TORCH)
        plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        dq = dequantized_state(reloaded.model, plain)
    plain.load_state_dict(dq, strict=False)
    plain.save_pretrained(args.out, safe_serialization=True)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(args.out)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "layers": len(dq)}))


if __name__ == "__main__":
    main()
