"""Kernel analysis: predicted and measured q/c at every node (docs/theory.md §1-§3), DKS/TAT targets
(§4-§5) and contractivity bounds (§8)."""
from .contractivity import GradientEnergy, OperatorNormBound, operator_norm_bound
from .engine import Analysis, analyze
from .measure import Measurement, NodeStats, measure
from . import attention_rules as _attention_rules  # noqa: F401  (registers the attention modules' rules)
from . import op_rules as _op_rules  # noqa: F401  (registers the rules)
from . import products as _products  # noqa: F401  (registers the product-of-signals kernel rule)
from . import tokens as _tokens  # noqa: F401  (registers the token-embedding rule)
from .rules import KernelContext, NodeKernel, register_function_op, register_module_op
from .token_kernels import NoTokenAxisError, TokenAnalysis, token_kernels

__all__ = ["Analysis", "GradientEnergy", "KernelContext", "Measurement", "NodeKernel", "NodeStats", "OperatorNormBound",
           "NoTokenAxisError", "TokenAnalysis", "analyze", "measure", "operator_norm_bound", "register_function_op",
           "register_module_op", "token_kernels"]
