"""netsurgeon: surgery on neural networks.

Trace any PyTorch model (timm first of all) with torch.fx, see its topology, and
rewrite it with composable passes that say exactly what they changed.

Example:
    >>> import timm, netsurgeon
    >>> gm = netsurgeon.transform(timm.create_model("resnet18"), passes=["strip_bn"])
    >>> print(netsurgeon.report(gm).preservation.value)
    exact_eval
"""
from .analysis import Analysis, analyze, measure
from .checkpoint import convert, load
from .errors import (CheckpointError, ExampleInputError, ModelSpecError, NetsurgeonError, OutputExistsError,
                     PassError, PassOptionError, RecipeError, TraceError, UnknownPassError, UnsupportedNodeError,
                     UntrustedCodeError)
from .graph import Topology, op_info, topology, trace
from .passes import list_passes
from .pipeline import report, transform

__version__ = "0.1.0"

__all__ = ["Analysis", "analyze", "measure", "CheckpointError", "ExampleInputError", "ModelSpecError", "NetsurgeonError", "OutputExistsError", "PassError",
           "PassOptionError", "RecipeError", "TraceError", "UnknownPassError", "UnsupportedNodeError", "UntrustedCodeError", "Topology",
           "__version__", "convert", "list_passes", "load", "op_info", "report", "topology", "trace", "transform"]
