"""The package boundary: ``netsurgeon`` never imports the benchmark harness or the scripts.

The training harness and the dataset loader live in ``benchmarks/harness`` (imported as
``harness``), outside the package, and are not shipped in the wheel. This test parses every module
under ``netsurgeon/`` with :mod:`ast` (relative imports resolved against the module's package) and
fails on an import of ``benchmarks``, ``harness``, a benchmark script, or the old in-package
locations ``netsurgeon.bench`` and ``netsurgeon.data``, which must not exist any more.
"""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "netsurgeon"
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
FORBIDDEN = ["benchmarks", "harness", "netsurgeon.bench", "netsurgeon.data", *SCRIPTS]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path``; ``from X import y`` yields
    both ``X`` and ``X.y`` (``y`` may be a submodule), relative imports are made absolute."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return out


def _forbidden(name: str) -> str | None:
    return next((f for f in FORBIDDEN if name == f or name.startswith(f + ".")), None)


def test_relative_imports_are_resolved() -> None:
    """The checker itself: a relative import of ``data`` from the package root is caught."""
    assert _module_name(PACKAGE / "__init__.py") == "netsurgeon"
    assert _module_name(PACKAGE / "passes" / "dks.py") == "netsurgeon.passes.dks"
    assert _forbidden("netsurgeon.data") == "netsurgeon.data" and _forbidden("netsurgeon.database") is None
    assert _forbidden("harness.data") == "harness" and _forbidden("netsurgeon.bench.train") == "netsurgeon.bench"
    assert {"train_deep", "train_consistency"} <= set(SCRIPTS)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_netsurgeon_does_not_import_the_benchmarks(path: Path) -> None:
    bad = [f"line {line}: {name}" for line, name in imported_names(path) if _forbidden(name)]
    assert not bad, f"{path.relative_to(ROOT)} imports the benchmark side: {bad}"


def test_harness_modules_left_the_package() -> None:
    assert not (PACKAGE / "bench").exists(), "netsurgeon/bench must not exist: the harness is benchmarks/harness"
    assert not (PACKAGE / "data.py").exists(), "netsurgeon/data.py must not exist: it is benchmarks/harness/data.py"
    assert (ROOT / "benchmarks" / "harness" / "__init__.py").is_file()
    assert (ROOT / "benchmarks" / "harness" / "data.py").is_file()


def test_wheel_packages_leave_the_harness_out() -> None:
    """``[tool.setuptools.packages.find]`` selects ``netsurgeon`` and its subpackages only."""
    setuptools = pytest.importorskip("setuptools")
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(where=str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    assert "netsurgeon" in packages
    assert all(p == "netsurgeon" or p.startswith("netsurgeon.") for p in packages), packages
