"""The text fine-tuning reads: windows disjoint from the ones the quantize run calibrated on.

By default the checkpoint's own calibration source (WikiText-2 validation), cut into
consecutive windows, less every window that overlaps one of the quantize run's calibration
windows (recomputed from what the checkpoint records: source, count, length, seed). The
evaluation text is another split (WikiText-2 test), so it is never trained on. ``--data`` is
the user's own text (a quantized fine-tune): all of its windows.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from compensator.data import (
    calibration_offsets,
    default_source,
    resolve_text,
    tokenize_text,
)
from compensator.errors import CompensatorError

log = logging.getLogger(__name__)


def free_windows(n_tokens: int, seqlen: int, taken: list[tuple[int, int]]) -> list[int]:
    """Starts of the consecutive ``seqlen`` windows of a text of ``n_tokens`` that overlap
    none of the ``taken`` spans (start, length)."""
    covered = torch.zeros(n_tokens + 1, dtype=torch.int32)
    for start, length in taken:
        covered[start] += 1
        covered[min(start + length, n_tokens)] -= 1
    busy = covered.cumsum(0)[:n_tokens] > 0
    starts = range(0, n_tokens - seqlen + 1, seqlen)
    return [s for s in starts if not bool(busy[s : s + seqlen].any())]


def calibration_spans(calibration: dict[str, Any] | None, n_tokens: int) -> list[tuple[int, int]]:
    """The token spans the quantize run calibrated on, from the checkpoint's record."""
    if not calibration or "seed" not in calibration:
        return []
    count, length = int(calibration["windows"]), int(calibration["seqlen"])
    return [(s, length) for s in calibration_offsets(n_tokens, count, length, calibration["seed"])]


def training_windows(
    tokenizer: Any,
    data: str | None,
    calibration: dict[str, Any] | None,
    n: int,
    seqlen: int,
    seed: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[n, seqlen]`` training windows (fewer, with a warning, when the text has fewer free
    ones) and a record of how they were chosen."""
    calib_source = (calibration or {}).get("source")
    if calib_source in (None, "default"):
        calib_source = default_source("calib")
    source = data or calib_source
    if source == "token ids":
        raise CompensatorError(
            "the checkpoint was calibrated on token ids given as a tensor, so its text is "
            "unknown: pass --data FILE (the text to fine-tune on)"
        )
    try:
        text, description = resolve_text(source, "calib")
    except CompensatorError as err:
        if data is not None:
            raise
        raise CompensatorError(
            f"the checkpoint's calibration text cannot be read ({err}); pass --data FILE"
        ) from None
    tokens = tokenize_text(tokenizer, text)
    same_text = data is None or data == calib_source
    taken = calibration_spans(calibration, tokens.numel()) if same_text else []
    if same_text and calibration and not taken:
        log.warning("the checkpoint records no calibration windows: fine-tuning windows may "
                    "overlap the ones it was quantized on")  # fmt: skip
    starts = free_windows(tokens.numel(), seqlen, taken)
    if not starts:
        raise CompensatorError(
            f"{description} has no window of {seqlen} tokens left for fine-tuning (it has "
            f"{tokens.numel()} tokens): use a longer text (--data) or a smaller --seqlen"
        )
    order = torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed))
    if len(starts) < n:
        log.warning("%s has %d free windows of %d tokens, fewer than the %d asked for: "
                    "using %d", description, len(starts), seqlen, n, len(starts))  # fmt: skip
    chosen = sorted(starts[i] for i in order[:n].tolist())
    windows = torch.stack([tokens[s : s + seqlen] for s in chosen]).clone()
    record = {
        "source": source,
        "windows": len(chosen),
        "seqlen": seqlen,
        "seed": seed,
        "disjoint_from_calibration": bool(taken),
    }
    log.info("fine-tuning data: %s, %d windows of %d tokens (%d excluded calibration spans)",
             description, len(chosen), seqlen, len(taken))  # fmt: skip
    return windows, record
