"""Kernel analysis: predicted and measured q/c at every node (MATH.md §1-§3), DKS/TAT targets
(§4-§5) and contractivity bounds (§8)."""
from .contractivity import GradientEnergy, OperatorNormBound, operator_norm_bound
from .engine import Analysis, analyze
from .measure import Measurement, NodeStats, measure

__all__ = ["Analysis", "GradientEnergy", "Measurement", "NodeStats", "OperatorNormBound", "analyze", "measure",
           "operator_norm_bound"]
