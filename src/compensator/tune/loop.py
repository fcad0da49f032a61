"""The distillation loop: AdamW per part, warm-up then cosine decay, state every N steps."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from compensator.errors import CompensatorError
from compensator.tune.parts import Attached
from compensator.tune.spec import PARTS
from compensator.tune.state import TuneState
from compensator.tune.teacher import TeacherCache, topk_kl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """How many steps, how fast: ``lr`` overrides a part's default rate (``PARTS``)."""

    steps: int
    batch_size: int
    warmup: float = 0.1
    lr: dict[str, float] = field(default_factory=dict)
    save_every: int = 20
    seed: int = 0

    def rate(self, part: str) -> float:
        return self.lr.get(part, PARTS[part].lr)

    def factor(self, step: int) -> float:
        """Linear warm-up over the first ``warmup`` share of the steps, then cosine to 0."""
        warm = max(1, round(self.warmup * self.steps)) if self.warmup > 0 else 0
        if step < warm:
            return (step + 1) / warm
        span = max(1, self.steps - warm)
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / span))


def batch_rows(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The windows of ``step``: epochs are seeded permutations of all ``n`` windows, read in
    order, so a step's rows depend on nothing but its number."""
    first = step * batch_size
    rows = []
    for pos in range(first, first + batch_size):
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        rows.append(int(torch.randperm(n, generator=g)[i]))
    return rows


@dataclass
class TrainLog:
    losses: list[float]
    seconds: float
    tokens_per_second: float
    resumed_at: int = 0


def _optimizer(attached: Attached, schedule: Schedule) -> torch.optim.Optimizer:
    groups = [
        {"params": ps, "lr": schedule.rate(part), "base_lr": schedule.rate(part), "part": part}
        for part, ps in attached.groups.items()
    ]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)


def _state_tensors(
    model: nn.Module, attached: Attached, opt: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    tensors = {f"param.{n}": p.detach() for n, p in attached.named(model).items()}
    for i, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value)
    return tensors


def _restore(
    model: nn.Module, attached: Attached, opt: torch.optim.Optimizer, state: TuneState
) -> tuple[int, list[float]]:
    saved = state.load_step()
    if saved is None:
        return 0, []
    with torch.no_grad():
        for name, p in attached.named(model).items():
            p.copy_(saved.tensors[f"param.{name}"])
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in saved.tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = value
    sd = opt.state_dict()
    sd["state"] = opt_state
    opt.load_state_dict(sd)
    log.info("resuming fine-tuning at step %d of the run kept in %s", saved.step, state.directory)
    return saved.step, list(saved.meta.get("losses", []))


def train(
    model: nn.Module,
    windows: torch.Tensor,
    cache: TeacherCache,
    attached: Attached,
    schedule: Schedule,
    state: TuneState | None,
    progress: bool,
) -> TrainLog:
    """Distil the teacher's cached distributions into ``model``'s trainable tensors."""
    opt = _optimizer(attached, schedule)
    start, losses = (0, []) if state is None else _restore(model, attached, opt, state)
    device = next(model.parameters()).device
    t0, tokens = time.perf_counter(), 0
    bar = tqdm(
        total=schedule.steps, initial=start, desc="finetune", unit="step", disable=not progress
    )
    for step in range(start, schedule.steps):
        rows = batch_rows(step, schedule.batch_size, windows.shape[0], schedule.seed)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * schedule.factor(step)
        logits = model(input_ids=windows[rows].to(device), use_cache=False).logits
        loss = topk_kl(logits, *(t.to(device) for t in cache.batch(rows)))
        if not torch.isfinite(loss):
            raise CompensatorError(
                f"the loss is {loss.item()} at step {step + 1}: training diverged; lower the "
                "learning rates (--lr PART=RATE); the last saved step is kept"
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += windows[rows].numel()
        rate = tokens / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{rate:.0f}")
        bar.update()
        done = step + 1
        if state is not None and (done % schedule.save_every == 0 or done == schedule.steps):
            state.save_step(done, _state_tensors(model, attached, opt), {"losses": losses})
    bar.close()
    seconds = time.perf_counter() - t0
    return TrainLog(losses, seconds, tokens / seconds if seconds > 0 else 0.0, start)
