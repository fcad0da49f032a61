"""The teacher's next-token distributions, cached once as their top k, and the loss on them.

Why top-k and not the full vocabulary: the full log-probs of 128 windows of 512 tokens over a
49k vocabulary are 12.9 GB in float32 (a 152k vocabulary: 40 GB), which neither fits in memory
beside the student nor is cheap to read back every epoch; the top 128 are 67 MB (int32 index +
float32 log-prob), and the teacher is run once and never resident beside the student.

The rest of the mass is kept as one more bucket: per position the cache holds the teacher's
top-k log-probs and log(1 - their sum) (computed from the full softmax, not by subtraction).
The loss is the KL divergence between the two (k+1)-bucket distributions,

    sum_i p_i log(p_i / q_i) + r_p log(r_p / r_q),   r = the mass outside the teacher's top k,

which is a true KL (never negative; zero only when the student matches the teacher on every
top-k token and on the rest's total), a lower bound on the full-vocabulary KL by the log-sum
inequality, and equal to it when k is the vocabulary size (tested).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from compensator.pipeline.resume import _write_atomic

log = logging.getLogger(__name__)

_NEG_INF = float("-inf")


def topk_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From logits ``[B, L, V]``: the top-k token ids (int32), their log-probs and the log
    of the remaining mass (float32), for the predictions of tokens 1..L-1."""
    lp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    k = min(k, lp.shape[-1])
    top = lp.topk(k, dim=-1)
    rest = lp.scatter(-1, top.indices, _NEG_INF).logsumexp(-1)
    return top.indices.to(torch.int32), top.values, rest


def topk_kl(
    logits: torch.Tensor, index: torch.Tensor, logp: torch.Tensor, log_rest: torch.Tensor
) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k buckets plus the
    rest (see the module's docstring); ``logits`` are the student's ``[B, L, V]``."""
    lq = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    idx = index.long()
    lq_top = lq.gather(-1, idx)
    lq_rest = lq.scatter(-1, idx, _NEG_INF).logsumexp(-1)
    kl_top = (logp.exp() * (logp - lq_top)).sum(-1)
    r = log_rest.exp()
    kl_rest = torch.where(r > 0, r * (log_rest - lq_rest), torch.zeros_like(r))
    return (kl_top + kl_rest).mean()


@dataclass
class TeacherCache:
    """Memory-mapped top-k targets of every training window: ``index`` [N, L-1, k] int32,
    ``logp`` [N, L-1, k] and ``log_rest`` [N, L-1] float32."""

    index: np.ndarray
    logp: np.ndarray
    log_rest: np.ndarray

    def batch(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(np.ascontiguousarray(self.index[rows])),
            torch.from_numpy(np.ascontiguousarray(self.logp[rows])),
            torch.from_numpy(np.ascontiguousarray(self.log_rest[rows])),
        )

    def coverage(self) -> float:
        """The teacher's mean probability mass inside its top k."""
        return float(1 - np.exp(self.log_rest.astype(np.float64)).mean())


_FILES = ("teacher-index.npy", "teacher-logp.npy", "teacher-rest.npy")
_DONE = "teacher.json"


def open_cache(directory: Path, key: dict[str, Any]) -> TeacherCache | None:
    """The cache in ``directory`` when it is complete and was made for ``key``."""
    try:
        if json.loads((directory / _DONE).read_text()) != key:
            return None
        arrays = [np.load(directory / f, mmap_mode="r") for f in _FILES]
    except (OSError, ValueError):  # absent, or damaged by a kill: built again
        return None
    return TeacherCache(*arrays)


def build_cache(
    teacher: nn.Module,
    windows: torch.Tensor,
    k: int,
    directory: Path,
    key: dict[str, Any],
    progress: bool,
) -> TeacherCache:
    """Run ``teacher`` over ``windows`` once and write its top-k targets under ``directory``
    (memory-mapped); marked complete (``teacher.json``, holding ``key``) only at the end."""
    (directory / _DONE).unlink(missing_ok=True)
    n, length = windows.shape
    vocab = teacher.get_output_embeddings().weight.shape[0]
    k = min(k, vocab)
    shapes = ((n, length - 1, k), (n, length - 1, k), (n, length - 1))
    dtypes = (np.int32, np.float32, np.float32)
    arrays = [
        np.lib.format.open_memmap(directory / f, mode="w+", dtype=d, shape=s)
        for f, d, s in zip(_FILES, dtypes, shapes, strict=True)
    ]
    t0 = time.perf_counter()
    device = next(teacher.parameters()).device
    with torch.inference_mode():
        for i in tqdm(range(n), desc="teacher", unit="window", disable=not progress):
            logits = teacher(input_ids=windows[i : i + 1].to(device), use_cache=False).logits
            for arr, t in zip(arrays, topk_targets(logits, k), strict=True):
                arr[i] = t[0].cpu().numpy()
    for arr in arrays:
        arr.flush()
    del arrays
    _write_atomic(directory / _DONE, json.dumps(key))
    cache = open_cache(directory, key)
    assert cache is not None
    log.info(
        "teacher: top-%d of %d windows cached in %.1fs (%.1f MB; %.1f%% of its mass inside)",
        k, n, time.perf_counter() - t0,
        sum((directory / f).stat().st_size for f in _FILES) / 1e6, 100 * cache.coverage(),
    )  # fmt: skip
    return cache
