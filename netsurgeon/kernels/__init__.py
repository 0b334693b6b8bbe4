"""Pure math of netsurgeon: activations and their local Q/C maps (numpy and scipy only).

This layer imports no torch and no fx; everything above it (op knowledge, graph,
analysis, passes) may use it, never the reverse.

Example:
    >>> from netsurgeon.kernels import LocalMaps, get_activation
    >>> maps = LocalMaps(get_activation("leaky_relu", negative_slope=0.2))
    >>> float(maps.c_map(1.0))
    1.0
"""
from .activations import Activation, get_activation, list_activations
from .local_maps import LocalMaps, relu_kernel
from .quadrature import Piecewise, bivariate_expectation, gauss_expectation
from .registry import ActivationEntry, activation_entry

__all__ = ["Activation", "ActivationEntry", "LocalMaps", "Piecewise", "activation_entry", "bivariate_expectation",
           "gauss_expectation", "get_activation", "list_activations", "relu_kernel"]
