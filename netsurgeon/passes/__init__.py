"""Passes: one file each, registered by name. See :func:`netsurgeon.list_passes`."""
from .base import Pass, PassSpec, coerce_option, get_pass, list_passes, make_pass, register_pass
from .strip_bn import StripBN

__all__ = ["Pass", "PassSpec", "StripBN", "coerce_option", "get_pass", "list_passes", "make_pass",
           "register_pass"]
