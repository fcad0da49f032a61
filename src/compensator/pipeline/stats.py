"""Per-Linear input statistics accumulated over calibration batches.

Each statistic is a small class registered by name; steps ask for names. All statistics
see the quantized-stream input ``x`` of a Linear and, when the recipe keeps an FP stream,
the FP model's input ``x_fp`` to the same Linear for the same tokens.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from compensator.linalg import add_gram_upper_, symmetric_from_upper
from compensator.parallel import Ranks
from compensator.quant.act import ActSpec, quantize_activations
from compensator.types import LinearStats


class Statistic:
    needs_fp: ClassVar[bool] = False
    # Whether it reads the input as the layer quantizes it (``quantized``), which depends on
    # the split basis and the activation spec; if not, a pass without them gives the same.
    uses_basis: ClassVar[bool] = False

    def __init__(
        self,
        d_in: int,
        device: torch.device,
        act: ActSpec | None = None,
        basis: torch.Tensor | None = None,
    ) -> None:
        self.tokens = 0
        self.act = act
        # LRC's split input: the quantized path reads x - x B B^T.
        self.basis = basis

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the layer will see it at run time (the scheme's activation quantizer,
        after taking out the split basis' subspace if there is one)."""
        if self.basis is not None:
            x = x - (x @ self.basis) @ self.basis.T
        return x if self.act is None else quantize_activations(x, self.act)

    def update(self, x: torch.Tensor, x_fp: torch.Tensor | None) -> None:
        raise NotImplementedError

    def result(self) -> torch.Tensor:
        raise NotImplementedError

    def reduced(self, ranks: Ranks) -> list[torch.Tensor]:
        """Its running sums, summed over the ranks in place (the token count apart)."""
        raise NotImplementedError


class _GramMean(Statistic):
    """A d_in x d_in sum of products over tokens; the result is its mean."""

    def __init__(
        self,
        d_in: int,
        device: torch.device,
        act: ActSpec | None = None,
        basis: torch.Tensor | None = None,
    ) -> None:
        super().__init__(d_in, device, act, basis)
        self.sum = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)

    def result(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)

    def reduced(self, ranks: Ranks) -> list[torch.Tensor]:
        return [self.sum]


class Hessian(_GramMean):
    """H = mean over tokens of x x^T (d_in x d_in), the GPTQ proxy Hessian up to a factor 2.

    A ``symmetric`` statistic sums only its upper block triangle (of ``left(x)``, which must
    then equal ``right(x)``); the result mirrors it. A subclass whose sides differ sets
    ``symmetric = False``."""

    symmetric: ClassVar[bool] = True

    def update(self, x: torch.Tensor, x_fp: torch.Tensor | None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.symmetric:
            add_gram_upper_(self.sum, self.left(x))
        else:
            self.sum.addmm_(self.left(x).T, self.right(x))
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        total = symmetric_from_upper(self.sum) if self.symmetric else self.sum
        return total / max(self.tokens, 1)

    def left(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def right(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FPCross(_GramMean):
    """D = mean over tokens of (x_fp - x) x^T: how the FP model's input to this Linear differs
    from the quantized model's, correlated with the latter (GPTAQ's asymmetric term)."""

    needs_fp = True
    bfloat16: ClassVar[bool] = False

    def update(self, x: torch.Tensor, x_fp: torch.Tensor | None) -> None:
        if x_fp is None:
            raise ValueError("the fp_cross statistic needs the FP stream")
        x = x.reshape(-1, x.shape[-1]).float()
        dx = x_fp.reshape(-1, x_fp.shape[-1]).to(x) - x
        right = self.right(x)
        if self.bfloat16:
            self.sum += (dx.T.bfloat16() @ right.bfloat16()).float()
        else:
            self.sum.addmm_(dx.T, right)
        self.tokens += x.shape[0]

    def right(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FPCrossBF16(FPCross):
    """D with each batch's product in bfloat16, summed in float32: 3x faster where the CPU
    has AMX/AVX512-BF16, at ~0.4% relative error per batch product."""

    bfloat16 = True


class AbsMean(Statistic):
    """Per-feature mean |x| over each batch's tokens, the maximum over batches (L2QER's s).

    Over ranks a batch's mean is over the tokens of every rank's share of it, so each batch's
    sums and token count are kept (by batch index) until the ranks' are added up."""

    def __init__(
        self,
        d_in: int,
        device: torch.device,
        act: ActSpec | None = None,
        basis: torch.Tensor | None = None,
    ) -> None:
        super().__init__(d_in, device, act, basis)
        self.max = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.batch = 0  # the index of the batch the next update comes from
        self.per_batch: dict[int, tuple[torch.Tensor, int]] = {}

    def update(self, x: torch.Tensor, x_fp: torch.Tensor | None) -> None:
        x = x.reshape(-1, x.shape[-1])
        torch.maximum(self.max, x.abs().float().mean(dim=0), out=self.max)
        self.per_batch[self.batch] = (x.abs().float().sum(dim=0), x.shape[0])
        self.tokens += x.shape[0]

    def result(self) -> torch.Tensor:
        return self.max.clone()

    def reduced(self, ranks: Ranks) -> list[torch.Tensor]:
        last = int(ranks.max_numbers([max(self.per_batch, default=-1)])[0])
        sums = torch.zeros(last + 1, self.max.shape[0], device=self.max.device)
        counts = [0.0] * (last + 1)
        for b, (total, n) in self.per_batch.items():
            sums[b], counts[b] = total, n
        ranks.sum_([sums])
        counts = ranks.sum_numbers(counts)
        reached = [b for b, n in enumerate(counts) if n > 0]
        means = (
            sums[reached] / torch.tensor([counts[b] for b in reached], device=sums.device)[:, None]
        )
        self.max = means.amax(dim=0) if reached else torch.zeros_like(self.max)
        return []


class ActHessian(Hessian):
    """S_aa = mean of a a^T with a = Q(x), the quantized input (LRC's Hessian for Wq)."""

    uses_basis = True

    def update(self, x: torch.Tensor, x_fp: torch.Tensor | None) -> None:
        super().update(self.quantized(x.reshape(-1, x.shape[-1]).float()), x_fp)


class ActCross(Hessian):
    """S_xa = mean of x a^T: the unquantized input against the quantized one (LRC)."""

    uses_basis = True
    symmetric = False

    def right(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(x)


class FPActCross(FPCross):
    """D_a = mean of (x_fp - x) a^T with a = Q(x): the FP input's offset against the
    quantized activations (LRC aimed at the FP output)."""

    uses_basis = True

    def right(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(x)


STATISTICS: dict[str, type[Statistic]] = {
    "hessian": Hessian,
    "fp_cross": FPCross,
    "fp_cross_bf16": FPCrossBF16,
    "abs_mean": AbsMean,
    "act_hessian": ActHessian,
    "act_cross": ActCross,
    "fp_act_cross": FPActCross,
}


class StatsAccumulator:
    """All requested statistics for one Linear input."""

    def __init__(
        self,
        names: set[str],
        d_in: int,
        device: torch.device,
        act: ActSpec | None = None,
        basis: torch.Tensor | None = None,
    ) -> None:
        unknown = names - STATISTICS.keys()
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}")
        self.basis = None if basis is None else basis.to(device=device, dtype=torch.float32)
        self.stats = {n: STATISTICS[n](d_in, device, act, self.basis) for n in sorted(names)}

    @property
    def needs_fp(self) -> bool:
        return any(s.needs_fp for s in self.stats.values())

    def update(self, x: torch.Tensor, x_fp: torch.Tensor | None, batch: int = 0) -> None:
        for s in self.stats.values():
            if isinstance(s, AbsMean):
                s.batch = batch
            s.update(x, x_fp)

    def reduce(self, ranks: Ranks) -> None:
        """Make the statistics those of every rank's batches (a no-op in one process)."""
        if not ranks.parallel:
            return
        ranks.sum_([t for s in self.stats.values() for t in s.reduced(ranks)])
        counts = ranks.sum_numbers([s.tokens for s in self.stats.values()])
        for s, n in zip(self.stats.values(), counts, strict=True):
            s.tokens = int(n)

    def finalize(self) -> LinearStats:
        tokens = max((s.tokens for s in self.stats.values()), default=0)
        values = {n: s.result() for n, s in self.stats.items()}
        if self.basis is not None:
            values["act_basis"] = self.basis
        return LinearStats(values, tokens)
