"""Ready GPU check (issue 17, item 5; not part of CI): the block pipeline on CUDA.

Runs GPTQ and gptaq-exact on SmolLM2 and on a random Llama with Llama-3-8B's block shapes
(4 blocks, so it fits any GPU), in float32 and in bfloat16 (``quantize --dtype``: blocks and
streams in it, statistics and rounding in float32), reuse on and off, and prints seconds,
the pipeline's split of them, peak GPU memory, and whether the two runs are bit-identical. Writes
benchmarks/results/gpu-pipeline.{json,md}.

    COMPENSATOR_DATA=../shared/data python benchmarks/gpu/pipeline_check.py --calib-windows 32
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"


def models(args: argparse.Namespace) -> dict[str, tuple[Any, torch.Tensor]]:
    import transformers

    from compensator.data import load_calibration_windows
    from compensator.models.loading import load_model

    smol = load_model("smollm2-135m")
    out = {
        "smollm2-135m": (
            smol.model,
            load_calibration_windows(smol.tokenizer, args.calib, args.calib_windows, 512, 0),
        )
    }
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
    )  # fmt: skip
    big = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(
        0, 32000, (args.calib_windows, 512), generator=torch.Generator().manual_seed(0)
    )
    out["llama3-8b-shape-4-blocks"] = (big, ids)
    return out


def run(
    model: Any, ids: torch.Tensor, recipe: str, reuse: bool, dtype: torch.dtype
) -> dict[str, Any]:
    from compensator.models.adapter import get_adapter
    from compensator.pipeline.runner import run_pipeline
    from compensator.recipes.recipe import load_recipe

    net = copy.deepcopy(model).to(dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = run_pipeline(
        net, get_adapter(net), load_recipe(recipe), ids, device=torch.device("cuda"),
        progress=False, reuse_passes=reuse,
    )  # fmt: skip
    torch.cuda.synchronize()
    seconds = report.to_dict()["seconds"]
    return {
        "wall": time.perf_counter() - t0,
        "forward": seconds["forward"],
        "statistics": seconds["statistics"],
        "solve": seconds["solve"],
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
        "state": {k: v.cpu() for k, v in net.state_dict().items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calib", default="wikitext2-valid")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--recipes", default="gptq,gptaq-exact")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for a GPU machine")
    rows = []
    for name, (model, ids) in models(args).items():
        for recipe in args.recipes.split(","):
            for dtype in args.dtypes.split(","):
                on = run(model, ids, recipe, True, getattr(torch, dtype))
                off = run(model, ids, recipe, False, getattr(torch, dtype))
                same = all(torch.equal(on["state"][k], off["state"][k]) for k in on["state"])
                row = {"model": name, "recipe": recipe, "dtype": dtype, "identical": same}
                for tag, r in (("on", on), ("off", off)):
                    row.update({f"{k}_{tag}": v for k, v in r.items() if k != "state"})
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "command": " ".join(["python", "benchmarks/gpu/pipeline_check.py", *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": rows,
    }
    lines = [
        "# The block pipeline on CUDA",
        "",
        f"`{result['command']}` on {result['device']}",
        "",
        "| model | recipe | dtype | s (reuse) | s (recompute) | forward on/off | peak GPU GB "
        "| identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['dtype']} | {r['wall_on']:.1f} | "
            f"{r['wall_off']:.1f} | "
            f"{r['forward_on'] / r['forward_off']:.2f}x | {r['peak_gpu_gb_on']:.2f} | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu-pipeline.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "gpu-pipeline.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
