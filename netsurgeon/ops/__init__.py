"""Op knowledge: which module, function or method is which kind of op.

Example:
    >>> import torch.nn as nn
    >>> from netsurgeon.ops import module_rule
    >>> module_rule(nn.ReLU()) is not None
    True
"""
from .kinds import KIND_TRAITS, ActivationSpec, KindTraits, NormFamily, NormSpec, OpInfo, OpKind, PoolType, pool_type
from .registry import (ClassifyContext, arg, classify, dense_weights, is_inplace, linear_parameters, module_rule, register_function,
                       register_method, register_module, registered_module_types, registered_python_functions, unknown_hint)
from . import torch_ops as _torch_ops  # noqa: F401  (registers the rules)
from .activations import TorchForms, activation_module, register_activation, torch_forms
from .modules import PLAIN_LAYER_TYPES, batch_norm_affine, layer_forward, pads_same, plain_layer
from . import timm_ops as _timm_ops  # noqa: F401
from . import layers_ops as _layers_ops  # noqa: F401
from .recognized import recognize_activations, recognize_norms

__all__ = ["ActivationSpec", "KIND_TRAITS", "KindTraits", "NormFamily", "NormSpec", "OpInfo", "OpKind", "PLAIN_LAYER_TYPES",
           "PoolType", "ClassifyContext", "arg", "is_inplace", "TorchForms", "activation_module", "batch_norm_affine", "classify",
           "dense_weights", "layer_forward", "linear_parameters", "module_rule", "pads_same", "plain_layer", "pool_type", "recognize_activations", "recognize_norms", "register_activation",
           "register_function", "register_method", "register_module", "registered_module_types",
           "registered_python_functions", "torch_forms",
           "unknown_hint"]
