"""netsurgeon: surgery on neural networks.

Trace any PyTorch model (timm first of all) with torch.fx, see its topology, and
rewrite it with composable passes that say exactly what they changed.

Example:
    >>> import timm, netsurgeon
    >>> gm = netsurgeon.transform(timm.create_model("resnet18"), passes=["strip_bn"])
    >>> print(netsurgeon.report(gm).preservation.value)
    exact_eval
"""
from ._version import __version__
from .analysis import (Analysis, KernelContext, NodeKernel, TokenAnalysis, analyze, measure, register_function_op,
                       register_module_op, token_kernels)
from .checkpoint import convert, load
from .errors import (CheckpointError, ExampleInputError, InvalidArgumentError, MissingAnalysisError, ModelSpecError,
                     NetsurgeonError, OutputExistsError, PassError, PassOptionError, RecipeError, TraceError,
                     TransformError, UnknownNodeError, UnknownPassError, UnsupportedNodeError, UntrustedCodeError)
from .graph import Topology, op_info, topology, trace
from .graph.state import derivation
from .ops import OpKind, register_activation
from .models import create_model, default_input_shape, example_inputs
from .passes import Pass, coerce_option, get_pass, list_passes, register_pass
from .pipeline import report, transform
from .recipe import read_recipe

__all__ = [
    # the pipeline
    "trace", "topology", "transform", "report", "op_info", "derivation", "Topology",
    # analysis
    "analyze", "measure", "Analysis", "token_kernels", "TokenAnalysis",
    # conversion directories and models
    "convert", "load", "read_recipe", "create_model", "default_input_shape", "example_inputs",
    # passes and extension points
    "Pass", "register_pass", "get_pass", "list_passes", "coerce_option",
    "register_activation", "register_module_op", "register_function_op", "OpKind", "KernelContext", "NodeKernel",
    # errors
    "NetsurgeonError", "CheckpointError", "ExampleInputError", "InvalidArgumentError", "MissingAnalysisError",
    "ModelSpecError", "OutputExistsError", "PassError", "PassOptionError", "RecipeError", "TraceError",
    "TransformError", "UnknownNodeError", "UnknownPassError", "UnsupportedNodeError", "UntrustedCodeError",
    "__version__",
]
