"""Kernel analysis: predicted and measured q/c at every node (MATH.md §1-§3)."""
from .engine import Analysis, analyze
from .measure import Measurement, NodeStats, measure

__all__ = ["Analysis", "Measurement", "NodeStats", "analyze", "measure"]
