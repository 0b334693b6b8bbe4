"""Op-kind rules for PyTorch's own modules, functions and tensor methods, one file per family
(activations: :mod:`netsurgeon.ops.activations`). Importing the package registers them, in the
order below."""
from . import layers, pooling, shapes, arithmetic  # noqa: F401  (registers the rules)
from .layers import conv_attrs

__all__ = ["conv_attrs"]
