"""Tracing and the topology view."""
from .blocks import MergeBlock, find_merge_blocks
from .topology import Topology, UnknownOp, op_info, topology
from .tracer import META_KEY, NetsurgeonTracer, TraceInfo, trace

__all__ = ["META_KEY", "MergeBlock", "NetsurgeonTracer", "Topology", "TraceInfo", "UnknownOp",
           "find_merge_blocks", "op_info", "topology", "trace"]
