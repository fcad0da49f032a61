"""Correctors: pure functions that add full-precision terms repairing a rounded weight."""

from compensator.correctors.lowrank import l2qer_scale, lqer, parse_rank, resolve_rank
from compensator.types import LowRank

__all__ = ["LowRank", "l2qer_scale", "lqer", "parse_rank", "resolve_rank"]
