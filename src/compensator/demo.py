"""The demo: quantize one model with several recipes, evaluate each against FP, print a table."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

from compensator.api import quantize
from compensator.data import load_eval_windows
from compensator.evaluate import evaluate
from compensator.models.loading import LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass
class DemoRow:
    name: str
    ppl: float
    kl: float | None
    seconds: float | None
    bits_per_weight: float | None = None


def run_demo(
    model: str,
    recipes: list[str],
    *,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    kquant: str | None = None,
    float_min: bool | None = None,
    rank: int | str | None = None,
    act_bits: int | None = None,
    epochs: int | None = None,
    eval_windows: int = 16,
    calib_windows: int = 32,
    eval_data: str | None = None,
    calib_data: str | None = None,
    progress: bool = True,
) -> list[DemoRow]:
    fp = load_model(model)
    windows = load_eval_windows(fp.tokenizer, eval_data, 512, eval_windows)
    base = evaluate(fp.model, windows, progress=progress)
    rows = [DemoRow("FP", base.ppl, 0.0, None)]
    for name in recipes:
        t0 = time.perf_counter()
        copy_ = LoadedModel(copy.deepcopy(fp.model), fp.tokenizer, fp.source)
        qm = quantize(
            copy_,
            name,
            calibration=calib_data,
            calib_windows=calib_windows,
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
            kquant=kquant,
            float_min=float_min,
            rank=rank,
            act_bits=act_bits,
            epochs=epochs,
            inplace=True,
            progress=progress,
        )
        seconds = time.perf_counter() - t0
        result = evaluate(qm.model, windows, fp_model=fp.model, progress=progress)
        label = f"{name} {qm.quantization_config['scheme']}"
        bpw = qm.quantization_config["bits_per_weight"]
        rows.append(DemoRow(label, result.ppl, result.kl, seconds, bpw))
        log.info("%s: ppl %.3f, kl %.4f, %.1fs", label, result.ppl, result.kl, seconds)
    return rows


def format_table(rows: list[DemoRow]) -> str:
    lines = [
        "| model | ppl | KL vs FP | bits/weight | quantize s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        kl = "-" if r.kl is None else f"{r.kl:.4f}"
        sec = "-" if r.seconds is None else f"{r.seconds:.1f}"
        bpw = "-" if r.bits_per_weight is None else f"{r.bits_per_weight:.2f}"
        lines.append(f"| {r.name} | {r.ppl:.2f} | {kl} | {bpw} | {sec} |")
    return "\n".join(lines)
