"""What the command line's commands share: one-line errors, logging, the scheme options."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from compensator.errors import CompensatorError


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    # transformers' own INFO chatter drowns ours.
    logging.getLogger("transformers").setLevel(logging.WARNING)


def no_progress_bars() -> None:
    """--no-progress also silences transformers' own bars (e.g. "Loading weights") and
    lm-eval's (plain tqdm bars, which read TQDM_DISABLE when created)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"


def interrupt_on_sigterm(ctx: click.Context) -> None:
    """Make SIGTERM (kill, a scheduler stopping the job) end a command as Ctrl-C does: one
    line saying where the kept blocks are, a save in progress removed. Its default action
    ends the process at once and says nothing. The previous handler is back when the
    command ends (the CLI may run inside another program, such as a test)."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CompensatorError as e:
            click.echo(f"error{_where()}: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            click.echo(str(e) or "interrupted; no output was written", err=True)
            sys.exit(130)
        except Exception as e:
            if not _from_other_rank(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            click.echo(
                f"error{_where()}: another rank of the run stopped or cannot be reached; its "
                f"own error above says why ({first[:200]})",
                err=True,
            )
            sys.exit(1)

    return wrapper


def _where() -> str:
    """ " (rank R of W)" under torchrun: which process of the run says it."""
    from compensator.parallel import rank_label

    label = rank_label()
    return f" ({label})" if label else ""


def _from_other_rank(e: Exception) -> bool:
    """Whether ``e`` is torch.distributed's report of a peer that went away."""
    from compensator.parallel import launched

    if not launched():
        return False
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and any(m in text for m in _PEER_GONE)
    )


# How gloo and nccl report a peer that went away (torch 2.13 raises a plain RuntimeError).
_PEER_GONE = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "gloo/transport",
    "NCCL communicator was aborted",
)


class RankType(click.ParamType):
    name = "rank"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        from compensator.correctors.lowrank import parse_rank

        try:
            return parse_rank(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


# compensator.quant.kquant.KTYPES, named here so the CLI starts without importing torch
KQUANT_CHOICES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def scheme_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(
        [
            click.option(
                "--bits",
                type=click.IntRange(2, 8),
                default=None,
                help="Weight bits (overrides the recipe).",
            ),
            click.option(
                "--group-size",
                type=int,
                default=None,
                help="Columns per group; -1 for per-channel.",
            ),
            click.option(
                "--sym/--asym", "symmetric", default=None, help="Symmetric or asymmetric weights."
            ),
            click.option(
                "--float-min/--int-zero",
                "float_min",
                default=None,
                help="Asymmetric groups keep a float16 min instead of an integer zero point "
                "(GGUF Q4_1/Q5_1 hold it; compressed-tensors does not).",
            ),
            click.option(
                "--kquant",
                type=click.Choice(KQUANT_CHOICES),
                default=None,
                help="Fit llama.cpp's K-quant grid (sets bits, groups, symmetry); rows that are "
                "not whole 256-weight super-blocks get llama.cpp's fallback type.",
            ),
            click.option(
                "--rank",
                type=RankType(),
                default=None,
                help="Rank of the recipe's low-rank corrector: components (16) or a share of each layer's parameters (30%).",
            ),
            click.option(
                "--act-bits",
                type=click.IntRange(2, 16),
                default=None,
                help="Per-token dynamic activation bits (8: W4A8, 4: W4A4; 16 turns it off).",
            ),
            click.option(
                "--epochs",
                type=click.IntRange(0),
                default=None,
                help="Training epochs per block of a learned recipe (omniquant, lsi, sde, sde-cll).",
            ),
        ]
    ):
        fn = opt(fn)
    return fn
