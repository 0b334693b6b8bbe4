"""Rules that keep the default suite trustworthy on a fresh clone (issue 14, item 6).

- No test reads a clock: a wall-clock limit fails on a loaded machine and passes on a fast
  one, so it tests the machine. Speed goals live in ``benchmarks/`` (docs/performance.md);
  tests assert deterministic counts instead (e.g. test_local_maps.py counts activation calls).
  pytest-timeout limits (``@pytest.mark.timeout``) are hang guards, not assertions, and stay.
- A test that needs the datasets is skipped, with a reason naming NETSURGEON_DATA, when they
  are missing, and fails instead when NETSURGEON_REQUIRE_DATA=1 (tests/conftest.py).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# clock readings: time.perf_counter(), time.monotonic_ns(), datetime.now(), ...
_TIME_CLOCKS = {f + ns for f in ("time", "perf_counter", "monotonic", "process_time", "thread_time")
                for ns in ("", "_ns")}
_DATETIME_CLOCKS = {"now", "utcnow", "today"}
_TIMING_MODULES = {"timeit", "pytest_benchmark"}


def clock_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for every clock reading or timing module in Python ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner, attr = node.value.id, node.attr
            if (owner == "time" and attr in _TIME_CLOCKS) or (owner == "datetime" and attr in _DATETIME_CLOCKS) \
                    or owner in _TIMING_MODULES:
                found.append((node.lineno, f"{owner}.{attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            for alias in node.names:
                if (root == "time" and alias.name in _TIME_CLOCKS) or root in _TIMING_MODULES:
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in _TIMING_MODULES]
        elif isinstance(node, ast.arg) and node.arg == "benchmark":  # the pytest-benchmark fixture
            found.append((node.lineno, "benchmark fixture"))
    return found


def test_the_clock_scanner_finds_what_it_should():
    bad = ("import time\nimport timeit\nfrom time import perf_counter as pc\nfrom datetime import datetime\n"
           "def test_x(benchmark):\n    t = time.perf_counter()\n    time.monotonic_ns()\n    datetime.now()\n"
           "    timeit.timeit('1')\n    assert time.time() - t < 0.1\n")
    assert [line for line, _ in clock_uses(bad)] == [2, 3, 5, 6, 7, 8, 9, 10]
    assert clock_uses("import time\nfrom datetime import timedelta\ntime.sleep(0.1)\nx = timedelta(seconds=1)\n") == []


def test_no_test_reads_a_clock():
    offenders = [f"{path.relative_to(REPO)}:{line}: {what}"
                 for path in sorted(TESTS.rglob("*.py")) for line, what in clock_uses(path.read_text())]
    assert not offenders, ("wall-clock measurements in tests (move the speed goal to benchmarks/ and assert a "
                           "deterministic count instead):\n" + "\n".join(offenders))


def _pytest(node: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("NETSURGEON_DATA", "NETSURGEON_REQUIRE_DATA")}
    return subprocess.run([sys.executable, "-m", "pytest", node, "-q", "-rsE", "-p", "no:cacheprovider"],
                          cwd=REPO, env={**environ, **env}, capture_output=True, text=True, timeout=300)


def test_needs_data_marker_skips_with_the_reason_and_fails_when_required(tmp_path):
    """End to end, in a fresh pytest: a ``needs_data`` test (no fixture of its own) on a
    machine without the datasets."""
    node = "tests/test_bench.py::test_mlp_on_fashion_mnist_learns_and_is_reproducible"
    absent = str(tmp_path / "no-data")
    skipped = _pytest(node, tmp_path, NETSURGEON_DATA=absent)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "1 skipped" in skipped.stdout and f"dataset directory not found: {absent}" in skipped.stdout
    assert "set NETSURGEON_DATA=/path/to/shared/data" in skipped.stdout, skipped.stdout
    failed = _pytest(node, tmp_path, NETSURGEON_DATA=absent, NETSURGEON_REQUIRE_DATA="1")
    assert failed.returncode == 1 and "skipped" not in failed.stdout, failed.stdout + failed.stderr
    assert f"NETSURGEON_REQUIRE_DATA=1 and dataset directory not found: {absent}" in failed.stdout, failed.stdout
