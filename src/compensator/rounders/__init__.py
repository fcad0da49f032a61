"""Rounders: pure functions that choose the quantized weight of one Linear."""

from compensator.rounders.gptaq import gptaq
from compensator.rounders.gptq import gptq, prepare_hessian
from compensator.rounders.rtn import rtn

__all__ = ["gptaq", "gptq", "prepare_hessian", "rtn"]
