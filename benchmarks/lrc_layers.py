"""Layer-level view of LRC at W4A4 on SmolLM2-135M: why the split input pays.

    export COMPENSATOR_DATA=../shared/data
    python benchmarks/lrc_layers.py --name lrc-layers      # ~2 min, 2 cores

The model is rotated (the `rotate` step's defaults) and run in FP on calibration windows;
the inputs of q_proj, o_proj, up_proj and down_proj in a few blocks are kept. The first
``--fit-windows`` fit each layer, the next ``--held-windows`` are held out. Per layer: the
share of input energy in the top-k principal subspace (k = rho 0.3 of the layer), and the
held-out error ||W x - y||^2 / ||W x||^2 of three fits with a real-valued Wq (the relaxed
problem, no weight rounding, so only the activation quantizer differs): no low-rank term
(Wq = W Sxa Saa^-1), LRC's relaxed optimum (y = Wq Q(x) + L x), and the split input
(y = Wq Q(x - x B B^T) + (x B) U). Activations: per-token symmetric int4, clip 0.9.
Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

import common


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.double().T @ b.double() / a.shape[0]


def layer_row(w: torch.Tensor, fit: torch.Tensor, held: torch.Tensor, act: Any) -> dict[str, Any]:
    from compensator.correctors import resolve_rank
    from compensator.correctors.lrc import lrc_target, principal_basis, relaxed_lowrank
    from compensator.quant.act import quantize_activations

    w = w.double()
    k = resolve_rank("30%", *w.shape)
    sxx = _gram(fit, fit)
    eig = torch.linalg.eigvalsh(sxx).flip(0)
    basis = principal_basis(sxx, k).half().double()
    y_held = held.double() @ w.T
    ref = float((y_held**2).sum())

    def quantized(x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        xs = x.double() if b is None else x.double() - x.double() @ b @ b.T
        return quantize_activations(xs.float(), act).double()

    def held_error(b: torch.Tensor | None, rank: int) -> float:
        a = quantized(fit, b)
        sxa, saa = _gram(fit, a), _gram(a, a)
        low = relaxed_lowrank(w, sxx, sxa, saa, rank, 1e-4, basis=b) if rank else None
        dense = None if low is None else low.dense().double()
        wq = lrc_target(w, dense, sxa, saa, 1e-4).double()
        y = quantized(held, b) @ wq.T
        if dense is not None:
            y = y + held.double() @ dense.T
        return float(((y_held - y) ** 2).sum()) / ref

    return {
        "rank": k,
        "top_k_energy": float(eig[:k].sum() / eig.sum()),
        "no_lowrank": held_error(None, 0),
        "lrc": held_error(None, k),
        "split": held_error(basis, k),
    }


def markdown(result: dict[str, Any]) -> str:
    p = result["protocol"]
    lines = [
        f"# {p['model']}: LRC at W4A4, layer by layer (relaxed fits, held-out tokens)",
        "",
        f"Command: `{result['command']}`  ",
        f"{p['fit_windows']} windows fitted, the next {p['held_windows']} held out "
        f"({p['calibration']}); rotated model in FP; activations per-token symmetric int4, "
        "clip 0.9; Wq real-valued (no weight rounding). Error = held-out ||W x - y||^2 / "
        "||W x||^2.",
        "",
        "| block | layer | k | top-k input energy | no low-rank | LRC | LRC split input |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['block']} | {r['layer']} | {r['rank']} | {r['top_k_energy']:.3f} "
            f"| {r['no_lowrank']:.4f} | {r['lrc']:.4f} | {r['split']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="3,15,25")
    ap.add_argument("--fit-windows", type=int, default=16)
    ap.add_argument("--held-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="lrc-layers")
    args = ap.parse_args()

    from compensator.data import load_calibration_windows
    from compensator.models.adapter import get_adapter
    from compensator.models.loading import load_model
    from compensator.nn.rotated import rotate_input
    from compensator.quant.act import ActSpec
    from compensator.transforms.rotation import rotate_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model, adapter = loaded.model, get_adapter(loaded.model)
    rotate_model(model, adapter.blocks(model), adapter.arch.rotation)
    n = args.fit_windows + args.held_windows
    windows = load_calibration_windows(loaded.tokenizer, "wikitext2-valid", n, 512, 0)
    blocks = [int(b) for b in args.blocks.split(",")]
    layers = ("q_proj", "o_proj", "up_proj", "down_proj")
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    modules = {}
    for b in blocks:
        for path, linear in adapter.linears(adapter.blocks(model)[b]).items():
            name = path.rsplit(".", 1)[-1]
            if name not in layers:
                continue
            modules[(b, name)] = linear

            def hook(m: torch.nn.Module, inp: tuple, out: torch.Tensor, key=(b, name)) -> None:
                x = rotate_input(m, inp[0])
                inputs.setdefault(key, []).append(x.reshape(-1, x.shape[-1]).float())

            linear.register_forward_hook(hook)
    with torch.no_grad():
        for i in range(n):
            model(windows[i : i + 1])
    act = ActSpec(bits=4, clip_ratio=0.9)
    split = args.fit_windows * windows.shape[1]
    rows = []
    for (b, name), linear in modules.items():
        x = torch.cat(inputs.pop((b, name)))
        row = layer_row(linear.weight.detach(), x[:split], x[split:], act)
        rows.append({"block": b, "layer": name, **row})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "protocol": {
            "model": args.model,
            "calibration": "wikitext2-valid, 512-token windows, seed 0",
            "fit_windows": args.fit_windows,
            "held_windows": args.held_windows,
        },
        "command": "python benchmarks/lrc_layers.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "threads"),
        "rows": rows,
    }
    common.write(args.name, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
