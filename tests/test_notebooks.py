"""The example notebooks run top to bottom (so they cannot rot)."""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_inspect_cmaps_notebook_executes(tmp_path):
    nb = nbformat.read(EXAMPLES / "inspect_cmaps.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "ordered: output C map spans" in text and "C'(1)" in text
