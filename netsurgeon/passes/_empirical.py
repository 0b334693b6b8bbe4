"""Maps of products of signals in ``dks``/``tat`` (``products="rule"``, the default, or ``"empirical"``).

A product (squeeze-excite ``x * gate``, gating units) changes q and the C map by an amount that
depends on its gate, whose activations are not reshaped. Its map is read off the transformed
network, and the targets are solved again with it:

1. shape the network with the current product maps (none at first: pass-throughs);
2. compute with :func:`netsurgeon.analyze` each product's q and C map relative to its main
   operand (:class:`~netsurgeon.analysis.targets.ProductMap`): from the independence rule of
   :mod:`netsurgeon.analysis.products` (``"rule"``; products it does not cover are measured), or
   measured for every product (``"empirical"``);
3. repeat, since the maps depend on the constants; the last maps shape the model.

A map is a table over the cosines its main operand takes in the analysed network. Deep in a
network of ReLU-like activations those all lie near 1, and a later round (a TReLU slope closer
to 1, a C(0) target lower) asks the map at smaller cosines. A table read outside its range would
return its end value and make the network C(0) rise again as the activations get more linear,
so the targets' bisection would run to the wrong end. The table is therefore widened with the
same products measured on a copy whose signal-path activations are removed (the gate paths keep
theirs): there the cosines at each main operand span the whole range, and q stays what the
shaped network has (1, once the DKS conditions hold).

Each product is followed by a constant rescale ``1 / sqrt(q_ratio)`` so that q stays 1
downstream (the DKS condition at the next activation). The activations on a product's gate
path (nodes that reach an output only through a product's second operand) are not reshaped:
the gate is part of the measured map.
"""
from __future__ import annotations

import copy
import math
import operator
import warnings
from typing import Callable

import numpy as np
import torch
import torch.fx as fx

from ..analysis.ideal_rules import sum_terms
from ..analysis.targets import PRODUCT_RESCALE_PREFIX, ProductMap
from ..errors import UnsupportedNodeError
from ..graph import Topology
from ..graph.state import nodes_by_name
from ..ops import OpKind
from ..report import PassRecord, Preservation

__all__ = ["ITERATIONS", "iterate_product_maps", "linearized", "measure_product_maps", "measured_q_ratios",
           "insert_rescales", "monotone_table", "widened"]

ITERATIONS = 3
_PREFIX = PRODUCT_RESCALE_PREFIX


def measure_product_maps(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...] | None,
                         secant_from: float = 0.5, mode: str = "empirical") -> dict[str, ProductMap]:
    """Each product's map relative to its main signal operand (``targets.main_operand``) in ``gm``:
    from the analysis' product rule where it applies (``mode="rule"``) or measured (``"empirical"``)."""
    from ..analysis import analyze  # the analysis imports the passes' layers; import late
    from ..analysis.rules import KERNEL_RULES
    from ..analysis.targets import gate_nodes, main_operand, mapped_merges, q_reference

    topo = Topology(gm)
    gates = gate_nodes(topo)  # products on gate paths (shaped attention's rotary query) reach no output: no map
    names = [n for n in mapped_merges(topo) if n not in gates]
    if not names:
        return {}
    undo = KERNEL_RULES.add(OpKind.MULTIPLY, lambda ctx, ins: None) if mode == "empirical" else None
    try:
        a = analyze(gm, example_inputs, empirical_batch=8)
    except UnsupportedNodeError as exc:
        raise UnsupportedNodeError(f"products={mode!r} reads the products' maps from netsurgeon.analyze: {exc}",
                                   nodes=exc.nodes, details=exc.details) from None
    finally:
        if undo is not None:
            undo()
    grid = np.asarray(a.grid)
    # a correlated sum is measured while its terms follow rules: its q ratio is measured directly, against
    # the q its terms would give uncorrelated (Σ w_i² q(h_i): a normalized sum nested in another keeps its share)
    sums = {n: sum_terms(topo.graph, n) for n in names if topo.graph.nodes[n]["kind"] is OpKind.ADD}
    measured = measured_q_ratios(gm, sums, example_inputs)
    out = {}
    for name in names:
        first = main_operand(topo, name)
        c_first, c_prod = a.cmap(first)(grid), a.cmap(name)(grid)
        # local C'(1): least squares of 1 - c_prod = r (1 - c_first) over the input cosines >= secant_from
        near = grid >= secant_from
        dx, dy = 1.0 - c_first[near], 1.0 - c_prod[near]
        spread = float(dx @ dx)
        slope = float(dx @ dy) / spread if spread > 1e-10 else 1.0  # no spread: the signal has collapsed
        # C''(1): 1 - c_prod = s u - (p/2) u² with u = 1 - c_first, least squares over the same points
        design = np.stack([dx, -0.5 * dx * dx], axis=1)
        fit = np.linalg.lstsq(design, dy, rcond=None)[0] if spread > 1e-10 and near.sum() >= 3 else (slope, 0.0)
        # a C map of a positive semi-definite kernel is a power series with nonnegative coefficients, so
        # C''(1) >= 0; a negative fit is noise of the measured or interpolated map near c = 1
        curvature = max(0.0, float(fit[1])) if np.isfinite(fit[1]) else 0.0
        c_in, c_out = monotone_table(c_first, c_prod)
        # the q the rescale restores: the main operand's, or a sum's terms' taken uncorrelated
        base = sum(c * a.q(t) for c, t in sums[name]) if name in sums else a.q(q_reference(topo, name))
        q_ratio = measured.get(name, a.q(name) / base if base > 0 else 1.0)
        if not (math.isfinite(q_ratio) and q_ratio > 0 and math.isfinite(slope)):
            raise UnsupportedNodeError(f"products={mode!r}: product {name} has q ratio {q_ratio:.3g} and "
                                       f"slope {slope:.3g}; no usable map (an operand zero at init? "
                                       f"products='neutral' passes the product through, approximately)", nodes=[name])
        out[name] = ProductMap(float(q_ratio), float(slope), c_in, c_out, curvature)
    return out


def measured_q_ratios(gm: fx.GraphModule, pairs: dict[str, list[tuple[float, str]]],
                      example_inputs: tuple[torch.Tensor, ...] | None, draws: int = 4) -> dict[str, float]:
    """``{node: q(node) / Σ c·q(reference)}`` for ``pairs = {node: [(c, reference), ...]}``, from runs of
    ``gm`` (eval mode) on standard Gaussian inputs shaped like the floating-point ``example_inputs``
    (the analysis' inputs, q = 1). Empty without such inputs."""
    if not pairs or not example_inputs or not all(isinstance(t, torch.Tensor) and t.is_floating_point()
                                                  for t in example_inputs):
        return {}
    wanted = set(pairs) | {r for refs in pairs.values() for _, r in refs}
    totals = dict.fromkeys(wanted, 0.0)

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if n.name in totals and isinstance(out, torch.Tensor) and out.is_floating_point():
                totals[n.name] += float(out.detach().double().pow(2).mean())
            return out

    g = torch.Generator().manual_seed(0)
    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for _ in range(draws):
                _Recorder(gm).run(*(torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)
                                    for t in example_inputs))
    finally:
        gm.train(was)
    out = {}
    for n, refs in pairs.items():
        base = sum(c * totals[r] for c, r in refs)
        if base > 0 and totals[n] > 0:
            out[n] = totals[n] / base
    return out


def insert_rescales(gm: fx.GraphModule, maps: dict[str, ProductMap], record: PassRecord | None = None) -> None:
    """After each measured product, multiply by ``1 / sqrt(q_ratio)`` (an affine node).

    The factor is a scalar buffer ``ns_product_rescale_<product>``, not a constant in the code:
    it depends on the weights it was measured with, so it must travel with the ``state_dict``
    (a fresh transform of the same recipe, then ``load_state_dict``, reproduces the model).
    """
    nodes = nodes_by_name(gm)
    for name, pm in maps.items():
        node = nodes.get(name)
        if node is None:
            continue
        factor = 1.0 / math.sqrt(pm.q_ratio)
        users = list(node.users)
        attr = f"{_PREFIX}_{name}"
        gm.register_buffer(attr, torch.tensor(factor, dtype=torch.get_default_dtype(), device=_device(gm)))
        with gm.graph.inserting_after(node):
            const = gm.graph.get_attr(attr)
        with gm.graph.inserting_after(const):
            new = gm.graph.call_function(operator.mul, (node, const))
        for u in users:
            u.replace_input_with(node, new)
        if record is not None:
            record.change(name, f"product rescaled by {factor:.6g} (q ratio {pm.q_ratio:.4g}, local "
                                f"C'(1) {pm.slope:.4g})", "keeps q = 1 after the product")
    gm.graph.lint()
    gm.recompile()


def _device(gm: fx.GraphModule) -> torch.device:
    return next(iter(gm.parameters()), next(iter(gm.buffers()), torch.empty(0))).device


def iterate_product_maps(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...] | None,
                         shape: Callable[[fx.GraphModule, PassRecord, dict[str, ProductMap]], None],
                         mode: str = "empirical") -> dict[str, ProductMap]:
    """Run ``shape(copy, record, maps)`` on copies of ``gm`` and re-measure, ``ITERATIONS`` times;
    returns the last maps (``shape`` must install the constants and the rescales)."""
    maps: dict[str, ProductMap] = {}
    for _ in range(ITERATIONS):
        trial = copy.deepcopy(gm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shape(trial, PassRecord("trial", {}, Preservation.NONE), maps)
        maps = measure_product_maps(trial, example_inputs, mode=mode)  # of the raw product: the rescale follows
        wide = measure_product_maps(linearized(trial), example_inputs, mode=mode)
        maps = {name: widened(pm, wide.get(name)) for name, pm in maps.items()}
    return maps


def linearized(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose activations on the signal path are identities; those on the gate
    paths of products (which stay unshaped) and inside norm+activation composites are kept."""
    from ..analysis.targets import gate_nodes

    out = copy.deepcopy(gm)
    topo = Topology(out)
    gates = gate_nodes(topo)
    nodes = nodes_by_name(out)
    for name in topo.nodes_of(OpKind.ACTIVATION):
        node = nodes[name]
        if name in gates or not topo.graph.nodes[name]["signal"] or not node.args:
            continue
        if isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            out.graph.erase_node(node)
    out.graph.lint()
    out.recompile()
    return out


def widened(narrow: ProductMap, wide: ProductMap | None) -> ProductMap:
    """``narrow`` with its C map table extended by the points of ``wide`` outside its cosine range
    (``narrow`` keeps q, the slope and the curvature at c = 1, measured on the shaped network)."""
    if wide is None:
        return narrow
    lo, hi = min(narrow.c_in), max(narrow.c_in)
    pairs = [*zip(narrow.c_in, narrow.c_out), *((a, b) for a, b in zip(wide.c_in, wide.c_out) if a < lo or a > hi)]
    c_in, c_out = monotone_table(np.array([a for a, _ in pairs]), np.array([b for _, b in pairs]))
    return ProductMap(narrow.q_ratio, narrow.slope, c_in, c_out, narrow.curvature)


def monotone_table(c_in: np.ndarray, c_out: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The table ``c_in -> c_out`` sorted by ``c_in`` with repeats dropped (``np.interp`` needs
    increasing points), and non-decreasing where ``c_in >= 0``: a C map there is a power series
    with nonnegative coefficients, hence increasing. Where the product's other operand does not
    follow from its main one (mobilevitv2's context vector), nearby cosines of the main operand come
    with scattered products, and a table that jumps between them made the network C(0) depend on
    the fourth digit of a cosine; the isotonic fit (``scipy.optimize.isotonic_regression``) pools
    such points. Below 0 the table is kept (C maps need not increase there)."""
    from scipy.optimize import isotonic_regression

    order = np.argsort(c_in, kind="stable")
    xs, ys = np.asarray(c_in, dtype=float)[order], np.asarray(c_out, dtype=float)[order]
    keep = np.concatenate([[True], np.diff(xs) > 0])
    xs, ys = xs[keep], ys[keep]
    up = xs >= 0.0
    if up.sum() > 1:
        ys[up] = isotonic_regression(ys[up], increasing=True).x
    return tuple(map(float, xs)), tuple(map(float, ys))
