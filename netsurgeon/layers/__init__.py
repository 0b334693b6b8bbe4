"""Modules that passes insert into graphs."""
from .affine import ChannelAffine

__all__ = ["ChannelAffine"]
