"""Modules that passes insert into graphs."""
from .activation import FunctionActivation, ShapedActivation
from .affine import ChannelAffine
from .attention import ShapedAttention, ValueSkipInit
from .consistency import MinimalRMSNorm, Modulus
from .dks_layers import ExclusiveAvgPool2dSame, LocationNorm
from .farkas import FarkasLayer, FarkasSum
from .identity import AddIdentity, FixedLinear, ModeConstant, ScalarBias, ScalarGate

__all__ = ["AddIdentity", "ChannelAffine", "ExclusiveAvgPool2dSame", "FarkasLayer", "FarkasSum", "FixedLinear",
           "FunctionActivation", "LocationNorm", "MinimalRMSNorm", "ModeConstant", "Modulus", "ScalarBias", "ScalarGate",
           "ShapedActivation", "ShapedAttention", "ValueSkipInit"]
