"""Op knowledge: which module, function or method is which kind of op.

Example:
    >>> import torch.nn as nn
    >>> from netsurgeon.ops import module_rule
    >>> module_rule(nn.ReLU()) is not None
    True
"""
from .kinds import ActivationSpec, NormSpec, OpInfo, OpKind
from .registry import (ClassifyContext, classify, module_rule, register_function, register_method,
                       register_module, registered_module_types, unknown_hint)
from . import torch_ops as _torch_ops  # noqa: F401  (registers the rules)
from . import timm_ops as _timm_ops  # noqa: F401
from . import layers_ops as _layers_ops  # noqa: F401

__all__ = ["ActivationSpec", "NormSpec", "OpInfo", "OpKind", "ClassifyContext", "classify", "module_rule",
           "register_function", "register_method", "register_module", "registered_module_types", "unknown_hint"]
