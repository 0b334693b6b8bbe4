"""The architecture holds: import contracts, no import cycle, one error hierarchy whose types
survive a failing pass, typed access to the state kept on a GraphModule, one pass runner."""
from __future__ import annotations

import inspect
from pathlib import Path

import networkx as nx
import pytest
import timm
import torch
import torch.nn as nn

import netsurgeon
import netsurgeon.errors as errors
from netsurgeon.graph import state

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(monkeypatch):
    """pyproject.toml's import-linter contracts: layers, independent passes, a CLI on the public
    API only, a torch-free math core."""
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0


def test_the_contracts_can_fail(tmp_path, monkeypatch):
    """A pass importing another pass breaks the independence contract."""
    from importlinter.cli import lint_imports

    pkg = tmp_path / "netsurgeon"
    import shutil

    shutil.copytree(ROOT / "netsurgeon", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "passes" / "pooling.py").write_text((pkg / "passes" / "pooling.py").read_text()
                                               + "\nfrom . import dks  # noqa\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in list(__import__("sys").modules) if m == "netsurgeon" or m.startswith("netsurgeon.")]:
        monkeypatch.delitem(__import__("sys").modules, name)
    assert lint_imports(config_filename=str(tmp_path / "pyproject.toml")) == 1


def test_no_import_cycle_anywhere_in_the_package():
    import grimp

    g = grimp.build_graph("netsurgeon")
    edges = [(m, d) for m in g.modules for d in g.find_modules_directly_imported_by(m)]
    cycles = list(nx.simple_cycles(nx.DiGraph(edges)))
    assert cycles == []


# ------------------------------------------------------------------------------------------ errors
def test_every_error_is_a_netsurgeon_error():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, BaseException)]
    assert len(classes) >= 15
    assert all(issubclass(c, errors.NetsurgeonError) for c in classes), classes
    from netsurgeon.kernels.transforms import TransformError

    assert issubclass(TransformError, netsurgeon.NetsurgeonError)
    assert set(errors.__all__) <= set(netsurgeon.__all__) | {"DataNotFoundError", "DataFormatError"}


def test_a_failure_inside_a_pass_keeps_its_type_and_gains_the_pass_context():
    model = timm.create_model("resnet10t")
    with pytest.raises(netsurgeon.UnsupportedNodeError) as info:  # what the user means to catch
        netsurgeon.transform(model, ["strip_bn", "tat"], example_inputs=torch.randn(1, 3, 32, 32))
    err = info.value
    assert isinstance(err, netsurgeon.PassError)  # and what callers caught before still works
    assert str(err).startswith("pass 'tat' failed (passes run before it: strip_bn): tat cannot handle")
    assert err.nodes and err.nodes == tuple(err.__cause__.nodes) and err.pass_name == "tat"
    assert type(err).__name__ == "UnsupportedNodeError"


def test_a_foreign_error_inside_a_pass_is_a_pass_error_chained_to_it():
    @netsurgeon.register_pass
    class _Broken(netsurgeon.Pass):
        name = "_test_broken"
        summary = "raises"

        def run(self, gm, record, example_inputs):
            raise ZeroDivisionError("inside")

    try:
        with pytest.raises(netsurgeon.PassError, match="pass '_test_broken' failed .*ZeroDivisionError: inside") as info:
            netsurgeon.transform(nn.Linear(2, 2), ["_test_broken"])
        assert isinstance(info.value.__cause__, ZeroDivisionError)
    finally:
        from netsurgeon.passes import base

        base._REGISTRY.pop("_test_broken")


# ------------------------------------------------------------------------------------------- state
def test_state_readers_say_what_to_run_first():
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))  # traced by torch.fx, not by netsurgeon
    with pytest.raises(netsurgeon.MissingAnalysisError, match="run netsurgeon.trace"):
        state.trace_info(gm)
    with pytest.raises(netsurgeon.MissingAnalysisError, match="run the dks pass first"):
        state.derivation(gm, "dks")
    with pytest.raises(netsurgeon.MissingAnalysisError, match="netsurgeon.load"):
        state.recipe(gm)
    with pytest.raises(netsurgeon.InvalidArgumentError, match="reserved"):
        state.set_derivation(gm, "report", {})


def test_default_inputs_are_one_definition_and_leave_the_global_rng_alone():
    gm = netsurgeon.trace(timm.create_model("resnet10t"))
    before = torch.random.get_rng_state()
    a, b = state.default_inputs(gm), state.default_inputs(gm)
    assert torch.equal(torch.random.get_rng_state(), before)
    shape = state.trace_info(gm).input_shape
    assert shape == (1, 3, 176, 176) and a[0].shape == shape and torch.equal(a[0], b[0])
    assert torch.equal(a[0], netsurgeon.example_inputs(shape, seed=0)[0])


def test_derivations_are_read_through_the_accessor():
    with pytest.warns(UserWarning, match="the ReLU family with its negative slope fixed, StarReLU\) cannot reach"):
        gm = netsurgeon.transform(timm.create_model("resnet10t"), [("strip_bn", {"mode": "remove"}),
                                  "maxpool_to_avgpool", "normalize_sums", "dks"], example_inputs=torch.randn(1, 3, 32, 32))
    dks = state.derivation(gm, "dks")
    assert dks["zeta"] == 1.5 and dks["xi"] > 1
    assert state.nodes_by_name(gm).keys() == {n.name for n in gm.graph.nodes}


def test_no_module_reads_the_meta_dict_but_the_state_module():
    """gm.meta["netsurgeon"] is private to netsurgeon/graph/state.py (and the per-node op info)."""
    offenders = []
    for path in (ROOT / "netsurgeon").rglob("*.py"):
        if path.name in ("state.py", "topology.py"):
            continue
        text = path.read_text()
        if any(raw in text for raw in ('meta["netsurgeon"]', "meta['netsurgeon']", 'meta.get("netsurgeon"',
                                       'meta.setdefault("netsurgeon"', "meta[META_KEY]", "meta.get(META_KEY",
                                       "meta.setdefault(META_KEY")):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_worked_examples_in_architecture_md_run(tmp_path):
    """docs/architecture.md's >>> examples (add a pass, add a module op), in a fresh process so
    the registrations they make do not leak into other tests."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "doctest", "-o", "ELLIPSIS", str(ROOT / "docs" / "architecture.md")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert docs_examples() >= 2


def docs_examples() -> int:
    return (ROOT / "docs" / "architecture.md").read_text().count(">>> netsurgeon.")


def test_an_error_from_a_pass_pickles_with_its_types():
    import pickle

    with pytest.raises(netsurgeon.UnsupportedNodeError) as info:
        netsurgeon.transform(nn.Linear(2, 2), ["dks"])
    again = pickle.loads(pickle.dumps(info.value))
    assert isinstance(again, netsurgeon.UnsupportedNodeError) and isinstance(again, netsurgeon.PassError)
    assert str(again) == str(info.value) and again.nodes == info.value.nodes and again.pass_name == "dks"
