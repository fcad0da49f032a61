"""llm-compressor's GPTQ on our protocol; runs inside the llm-compressor virtual environment
(benchmarks/peers/install.sh), never in ours. Reads the model directory and the calibration
windows the harness wrote (safetensors), quantizes with ``oneshot`` + ``GPTQModifier``
(weight-only, asymmetric, per group, damp 0.01, static act-order: PEERS.md's settings) and
writes the *dequantized* weights as a plain fp32 model, which the harness evaluates in our
environment exactly like our own rows. Prints one JSON line: seconds, peak RSS.

    python llmcompressor_gptq.py MODEL_DIR CALIB.safetensors OUT_DIR --bits 4 --group-size 128
"""

from __future__ import annotations

import json
import time

import torch
from peer_common import peak_rss_mb, peer_parser


def pad_last_group() -> None:
    """llm-compressor 0.14's min/max observer reshapes a row into whole groups and fails on
    576 = 4 x 128 + 64 columns. Pad the short last group with repeats of its own columns,
    which leaves its min and max (so its scale and zero point) those of its real columns."""
    import llmcompressor.observers.helpers as helpers
    from compressed_tensors.quantization import QuantizationStrategy

    original = helpers._flatten_weight

    def flatten(value: torch.Tensor, args):  # type: ignore[no-untyped-def]
        g, cols = args.group_size, value.shape[-1]
        if args.strategy != QuantizationStrategy.GROUP or cols % g == 0:
            return original(value, args)
        start = cols - cols % g
        fill = start + torch.arange(g - cols % g, device=value.device) % (cols - start)
        return original(torch.cat([value, value[..., fill]], dim=-1), args)

    helpers._flatten_weight = flatten


def dequantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's quantized weights as their dequantized values. GPTQ leaves each weight at
    its rounded values; this re-derives the codes from the stored scale and zero point (groups
    of ``group_size`` columns, the last one short), checks the weight sits on that grid, and
    returns (codes - zero point) x scale. compressed-tensors' own fake_quantize refuses rows
    that are not whole groups, so it cannot be used here."""
    state = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        args = scheme.weights
        w = module.weight.detach().float()
        g, cols = args.group_size, w.shape[1]
        scale = module.weight_scale.detach().float().repeat_interleave(g, dim=1)[:, :cols]
        zp = module.weight_zero_point.detach().float().repeat_interleave(g, dim=1)[:, :cols]
        half = 2 ** (args.num_bits - 1)  # "int" codes are signed: -half .. half - 1
        codes = torch.clamp(torch.round(w / scale) + zp, -half, half - 1)
        dq = (codes - zp) * scale
        drift = ((dq - w).abs() / scale).max().item()
        # A bfloat16 weight holds (code - zero) x scale to 2^-9 relative: up to ~0.03 steps.
        tol = 1e-2 if module.weight.dtype == torch.float32 else 0.1
        assert drift < tol, f"{name}: weight off its grid by {drift:.3g} steps"
        state[f"{name}.weight"] = dq
    return state


def main() -> None:
    ap = peer_parser()
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(args.calib)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    tok = AutoTokenizer.from_pretrained(args.model)
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=False,
        strategy="group",
        group_size=args.group_size,
        actorder="static",
    )
    recipe = GPTQModifier(
        config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        dampening_frac=0.01,
        bypass_divisibility_checks=True,  # 576-wide rows: the last group holds 64 columns
    )
    pad_last_group()
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe,
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
        tokenizer=tok,
    )
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    dq = dequantized_state(model)
    plain = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    missing = set(dq) - set(plain.state_dict())
    assert not missing, f"dequantized tensors the plain model lacks: {sorted(missing)[:3]}"
    plain.load_state_dict(dq, strict=False)
    plain.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "layers": len(dq)}))


if __name__ == "__main__":
    main()
