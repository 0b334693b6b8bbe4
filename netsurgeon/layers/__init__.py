"""Modules that passes insert into graphs."""
from .activation import ShapedActivation
from .affine import ChannelAffine
from .dks_layers import ExclusiveAvgPool2dSame, LocationNorm
from .farkas import FarkasLayer, FarkasSum

__all__ = ["ChannelAffine", "ExclusiveAvgPool2dSame", "FarkasLayer", "FarkasSum", "LocationNorm", "ShapedActivation"]
