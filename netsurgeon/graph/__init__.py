"""Tracing and the topology view."""
from . import state
from .blocks import BlockKind, MergeBlock, find_merge_blocks
from .topology import Topology, UnknownOp, op_info, topology
from .state import META_KEY
from .tracer import NetsurgeonTracer, TraceInfo, trace

__all__ = ["META_KEY", "BlockKind", "MergeBlock", "NetsurgeonTracer", "Topology", "TraceInfo", "UnknownOp",
           "find_merge_blocks", "op_info", "state", "topology", "trace"]
