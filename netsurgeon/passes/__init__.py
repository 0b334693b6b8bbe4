"""Passes: one file each, registered by name. See :func:`netsurgeon.list_passes`."""
from .attention import AttentionShaping
from .base import Pass, PassSpec, coerce_option, get_pass, list_passes, make_pass, register_pass
from .consistency import ModulusPass, RMSNormPass
from .dks import DKS, TAT
from .farkas import Farkas
from .identity import IdentityReparam, IdentityResidual
from .init import OrthogonalInit
from .input_norm import InputNorm
from .norms import RemoveNorms
from .pooling import MaxPoolToAvgPool
from .strip_bn import StripBN
from .sums import NormalizeSums, RemoveSkips

__all__ = ["AttentionShaping", "DKS", "Farkas", "IdentityReparam", "IdentityResidual", "InputNorm", "MaxPoolToAvgPool", "ModulusPass",
           "NormalizeSums", "OrthogonalInit", "Pass", "PassSpec", "RMSNormPass", "RemoveNorms", "RemoveSkips", "StripBN", "TAT",
           "coerce_option", "get_pass", "list_passes", "make_pass", "register_pass"]
