"""Inference speed and memory of quantized models against FP32, measured in one run.

Rows: FP32, W4 g128, W4 g32, W4 + L2QER rank 32, W4A8, W4A4 + LRC split (SmolLM2-135M; the
quantized rows are RTN-rounded except LRC, since speed does not depend on which rounder
chose the codes), and FP32 / W4 g128 on a random Llama of width 4096 (2 blocks, intermediate
11008, vocabulary 1024, so that the blocks' Linears dominate). For each row and thread count:
decode tokens/s (batch 1, prompt 32, 64 new tokens, KV cache, greedy), prefill tokens/s
(1 x 512), resident bytes of the quantized layers' buffers, checkpoint size, and peak RSS of a
fresh process that loads the checkpoint and generates once. Timings are interleaved across
rows (round robin, 3 rounds, median), and reported as ratios to FP32 from the same run.

    python benchmarks/inference.py --threads 1,2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT, NEW, PREFILL = 32, 64, 512

_RSS_PROBE = """
import sys, torch
torch.set_num_threads({threads})
import compensator as cp
from compensator.io.native import is_checkpoint
from compensator.models.loading import load_model
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
path = {path!r}
model = cp.load(path) if is_checkpoint(path) else load_model(path).model
ids = torch.randint(100, 1000, (1, {prompt}), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    model.generate(ids, max_new_tokens={new}, min_new_tokens={new}, do_sample=False)
print(hwm())
"""


def _rows(tmp: Path) -> dict[str, tuple[Any, str]]:
    """name -> (model, path a fresh process can load it from)."""
    import compensator as cp
    from compensator.models.loading import LoadedModel, load_model

    fp = load_model("smollm2-135m")
    calib = torch.randint(100, 10000, (4, 512), generator=torch.Generator().manual_seed(0))
    specs = {
        "W4 g128": ("rtn", {}),
        "W4 g32": ("rtn", {"group_size": 32}),
        "W4 g128 + L2QER r32": ("rtn-l2qer", {}),
        "W4A8 g128": ("rtn", {"act_bits": 8}),
        "W4A4 g128 + LRC split": ("quarot-gptq-lrc-split", {}),
    }
    rows: dict[str, tuple[Any, str]] = {"FP32": (fp.model, "smollm2-135m")}
    for name, (recipe, kw) in specs.items():
        loaded = LoadedModel(copy.deepcopy(fp.model), fp.tokenizer, fp.source)
        qm = cp.quantize(loaded, recipe, calibration=calib, inplace=True, progress=False, **kw)
        path = cp.save(qm, tmp / name.replace(" ", "_").replace("+", "p"))
        rows[name] = (qm.model, str(path))
        print(f"quantized {name}", flush=True)
    return rows


def _wide_rows(tmp: Path) -> dict[str, tuple[Any, str]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import compensator as cp
    from compensator.models.loading import LoadedModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=1024)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    fp_path = tmp / "wide-fp"
    model.save_pretrained(fp_path)
    loaded = LoadedModel(copy.deepcopy(model), None, str(fp_path))
    qm = cp.quantize(loaded, "rtn", inplace=True, progress=False)
    q_path = cp.save(qm, tmp / "wide-w4")
    return {"4096-wide FP32": (model, ""), "4096-wide W4 g128": (qm.model, str(q_path))}


def _decode(model: Any) -> float:
    ids = torch.randint(100, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        model(ids)  # the prompt alone, to take it out of the decode time
        prompt = time.perf_counter() - t0
    return NEW / (total - prompt)


def _prefill(model: Any) -> float:
    ids = torch.randint(100, 1000, (1, PREFILL), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids)
    return PREFILL / (time.perf_counter() - t0)


def _resident(model: Any) -> int:
    from compensator.nn.layers import quantized_layers

    layers = [m for _, m in quantized_layers(model)]
    if not layers:  # FP: the same Linears' weights
        blocks = model.model.layers
        return sum(m.weight.numel() * m.weight.element_size()
                   for m in blocks.modules() if isinstance(m, torch.nn.Linear))  # fmt: skip
    return sum(b.numel() * b.element_size() for m in layers for b in m.buffers() if b is not None)


def _size(path: str) -> int | None:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else None


def _peak_rss(path: str, threads: int) -> float | None:
    if not path:
        return None
    code = _RSS_PROBE.format(threads=threads, path=path, prompt=PROMPT, new=NEW)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure(rows: dict[str, tuple[Any, str]], threads: int, rounds: int = 3) -> dict[str, Any]:
    torch.set_num_threads(threads)
    decode: dict[str, list[float]] = {n: [] for n in rows}
    prefill: dict[str, list[float]] = {n: [] for n in rows}
    for model, _ in rows.values():  # warm-up: kernels, caches, allocator
        _decode(model)
    for _ in range(rounds):
        for name, (model, _) in rows.items():
            decode[name].append(_decode(model))
            prefill[name].append(_prefill(model))
    out = {}
    for name, (model, path) in rows.items():
        out[name] = {
            "decode_tok_s": statistics.median(decode[name]),
            "prefill_tok_s": statistics.median(prefill[name]),
            "resident_weight_bytes": _resident(model),
            "checkpoint_bytes": _size(path),
            "peak_rss_mb": _peak_rss(path, threads),
        }
        print(threads, name, out[name], flush=True)
    return out


def _table(results: dict[str, Any], threads: int) -> list[str]:
    rows = results[str(threads)]
    lines = [
        f"**{threads} thread{'s' if threads > 1 else ''}**",
        "",
        "| row | decode tok/s | vs FP32 | prefill tok/s | vs FP32 | quantized-layer bytes | vs FP32 | checkpoint MB | peak RSS MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        base = rows["4096-wide FP32" if name.startswith("4096") else "FP32"]
        ck = "-" if r["checkpoint_bytes"] is None else f"{r['checkpoint_bytes'] / 1e6:.1f}"
        rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        lines.append(
            f"| {name} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f}x "
            f"| {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x "
            f"| {r['resident_weight_bytes'] / 1e6:.1f} MB "
            f"| {r['resident_weight_bytes'] / base['resident_weight_bytes']:.2f}x | {ck} | {rss} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out", default="inference")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = {**_rows(Path(tmp)), **_wide_rows(Path(tmp))}
        results = {str(t): measure(rows, t) for t in threads}
    from compensator.kernels import qgemv

    kernel = qgemv()
    meta = {"command": "python benchmarks/inference.py --threads " + args.threads,
            "kernel": kernel and {"avx2": kernel.has_avx2(), "avx512": kernel.has_avx512()},
            "prompt": PROMPT, "new_tokens": NEW, "prefill": PREFILL}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, **results}, indent=1))
    md = [
        "# Inference: packed int4 layers against FP32",
        "",
        f"`{meta['command']}`; decode: batch 1, prompt {PROMPT}, {NEW} new tokens (greedy, KV "
        f"cache), prompt time excluded; prefill: 1 x {PREFILL}. Medians of 3 interleaved rounds. "
        "Quantized-layer bytes: the buffers of the block Linears (FP32: their weights); "
        "embeddings and the tied LM head stay FP32 in every row. Int4 kernel paths compiled: "
        f"{meta['kernel']}.",
        "",
    ]
    for t in threads:
        md += _table(results, t)
    (RESULTS / f"{args.out}.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
