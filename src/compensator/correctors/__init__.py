"""Correctors: pure functions that add full-precision terms repairing a rounded weight."""

from compensator.correctors.lowrank import LowRank, l2qer_scale, lqer, resolve_rank

__all__ = ["LowRank", "l2qer_scale", "lqer", "resolve_rank"]
