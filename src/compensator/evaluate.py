"""Perplexity and KL divergence of a (quantized) causal LM over token windows.

Protocol: every window is fed alone (no context carried over from earlier windows), so a window
of L tokens yields L-1 next-token predictions. Perplexity is exp of the average over windows of
each window's mean cross-entropy. KL is KL(P_fp || P_q), the full-precision model being the
reference, averaged over every predicted position of all windows; log-probs are float32.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compensator.errors import CompensatorError

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Scores of one evaluation; ``fp_ppl`` and ``kl`` only when a reference model was given."""

    ppl: float
    fp_ppl: float | None
    kl: float | None
    windows: int
    seqlen: int
    seconds: float
    bits_per_weight: float | None = None  # stored bits per quantized weight, when quantized
    tasks: dict[str, dict[str, float | None]] | None = None  # lm-eval: {task: {metric: value}}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: a non-finite score becomes None, with an ``error`` saying which."""
        out = asdict(self)
        bad = [k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v)]
        for k in bad:
            out[k] = None
        if bad:
            out["error"] = f"{', '.join(bad)} not finite (NaN or Inf in the model's outputs)"
        return out


def perplexity(losses: torch.Tensor | Sequence[float]) -> float:
    """exp of the mean of per-window mean losses (nats)."""
    values = torch.as_tensor(losses, dtype=torch.float64).reshape(-1)
    if values.numel() == 0:
        raise CompensatorError("cannot compute perplexity of zero windows: pass at least one")
    return math.exp(values.mean().item())


def _check_windows(windows: torch.Tensor, batch_size: int) -> None:
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise CompensatorError(
            f"windows must have shape [n >= 1, seqlen >= 2], got {tuple(windows.shape)}: "
            "build them with compensator.data.eval_windows()"
        )
    if windows.dtype not in (torch.long, torch.int32, torch.int64):
        raise CompensatorError(f"windows must hold integer token ids, got {windows.dtype}")
    if batch_size < 1:
        raise CompensatorError(f"batch_size={batch_size} is not valid: use a positive integer")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    # Restore the caller's train/eval flags afterwards: evaluation must not have side effects.
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(models, was_training, strict=True):
            m.train(flag)


def _next_token_logprobs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """float32 log-probs ``[B, L-1, V]`` of the predictions for tokens 1..L-1."""
    logits = model(input_ids=batch.to(_device_of(model)), use_cache=False).logits
    return torch.log_softmax(logits[:, :-1, :].float(), dim=-1)


def _mean_nll(logprobs: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Per-window mean next-token cross-entropy, float64 ``[B]``."""
    targets = batch[:, 1:].to(logprobs.device).unsqueeze(-1)
    nll = -logprobs.gather(-1, targets).squeeze(-1)
    return nll.double().mean(dim=1).cpu()


def _kl_sum(logp_fp: torch.Tensor, logp_q: torch.Tensor) -> float:
    """Sum over positions of KL(P_fp || P_q); float32 per position, float64 accumulation."""
    kl = (logp_fp.exp() * (logp_fp - logp_q)).sum(dim=-1)
    return kl.double().sum().item()


def _batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]


def window_losses(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: bool = True,
) -> torch.Tensor:
    """Mean next-token cross-entropy of every window (float64 ``[n]``), each window alone."""
    _check_windows(windows, batch_size)
    losses: list[torch.Tensor] = []
    with (
        _eval_mode(model),
        torch.inference_mode(),
        tqdm(total=windows.shape[0], desc="ppl", unit="window", disable=not progress) as bar,
    ):
        for batch in _batches(windows, batch_size):
            losses.append(_mean_nll(_next_token_logprobs(model, batch), batch))
            bar.update(batch.shape[0])
    return torch.cat(losses)


def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    fp_model: nn.Module | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> EvalResult:
    """Perplexity of ``model``; with ``fp_model`` also its perplexity and KL(fp || model).

    Both models see the same batch in turn, so only one batch of logits per model is alive at a
    time (a 49k vocabulary makes keeping all windows' logits prohibitive).
    """
    _check_windows(windows, batch_size)
    start = time.perf_counter()
    if fp_model is None:
        losses = window_losses(model, windows, batch_size=batch_size, progress=progress)
        fp_ppl: float | None = None
        kl: float | None = None
    else:
        losses, fp_losses, kl = _evaluate_pair(model, fp_model, windows, batch_size, progress)
        fp_ppl = perplexity(fp_losses)
    result = EvalResult(
        ppl=perplexity(losses),
        fp_ppl=fp_ppl,
        kl=kl,
        windows=int(windows.shape[0]),
        seqlen=int(windows.shape[1]),
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "evaluated %d windows of %d tokens in %.1fs: ppl %.4f, fp ppl %s, kl %s",
        result.windows,
        result.seqlen,
        result.seconds,
        result.ppl,
        "n/a" if fp_ppl is None else f"{fp_ppl:.4f}",
        "n/a" if kl is None else f"{kl:.6f}",
    )
    return result


def _evaluate_pair(
    model: nn.Module,
    fp_model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    losses: list[torch.Tensor] = []
    fp_losses: list[torch.Tensor] = []
    kl_total = 0.0
    positions = 0
    with (
        _eval_mode(model, fp_model),
        torch.inference_mode(),
        tqdm(total=windows.shape[0], desc="ppl+kl", unit="window", disable=not progress) as bar,
    ):
        for batch in _batches(windows, batch_size):
            logp_q = _next_token_logprobs(model, batch)
            logp_fp = _next_token_logprobs(fp_model, batch).to(logp_q.device)
            losses.append(_mean_nll(logp_q, batch))
            fp_losses.append(_mean_nll(logp_fp, batch))
            kl_total += _kl_sum(logp_fp, logp_q)
            positions += logp_q.shape[0] * logp_q.shape[1]
            del logp_q, logp_fp
            bar.update(batch.shape[0])
    return torch.cat(losses), torch.cat(fp_losses), kl_total / positions
