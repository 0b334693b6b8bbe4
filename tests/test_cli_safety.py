"""Safety of the CLI's outputs: modes under the umask, what ``--force`` may replace, atomic
writes without stray temporary directories, clear errors for bad inspect paths, and a
``--blocks`` listing that stays readable on densely connected graphs."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import netsurgeon
import netsurgeon.checkpoint as checkpoint
from netsurgeon.cli import main

SHAPE = "1,3,32,32"
FILES = ["model.safetensors", "recipe.json", "report.md"]


def _convert(out: Path | str, *extra: str) -> int:
    return main(["convert", "resnet10t", "--passes", "strip_bn", "--input-shape", SHAPE, "--out", str(out),
                 "--quiet", *extra])


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.fixture
def no_build(monkeypatch):
    """Make any conversion that gets past the output checks fail loudly (and write nothing)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the output should have been refused before the model was built")

    monkeypatch.setattr(checkpoint, "_build", refuse)


def _strays(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if "-old-" in n or "-tmp-" in n or n.endswith(".tmp"))


# ---------------------------------------------------------------------------- convert: modes
@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_convert_output_gets_the_modes_of_mkdir_and_open_under_the_umask(tmp_path, umask, mask):
    umask(mask)
    out = tmp_path / "r10"
    assert _convert(out) == 0
    assert _mode(out) == 0o777 & ~mask
    for name in FILES:
        assert _mode(out / name) == 0o666 & ~mask, name
    assert _convert(out, "--force") == 0  # the replacement too
    assert _mode(out) == 0o777 & ~mask and _mode(out / "model.safetensors") == 0o666 & ~mask
    assert _strays(tmp_path) == []


# ---------------------------------------------------------------------------- convert: --force
@pytest.mark.parametrize("out", [".", "..", "ANCESTOR"])
def test_force_refuses_the_working_directory_and_its_parents(tmp_path, monkeypatch, capsys, no_build, out):
    work = tmp_path / "a" / "w"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    out = str(tmp_path / "a") if out == "ANCESTOR" else out
    for extra in ([], ["--force"]):  # the hint to pass --force must not lead here either
        assert _convert(out, *extra) == 2
        err = capsys.readouterr().err
        assert "current directory or one of its parents" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["a"] and sorted(os.listdir(tmp_path / "a")) == ["w"]
    assert os.listdir(work) == []


def test_force_refuses_the_filesystem_root(capsys, no_build):
    assert _convert("/", "--force") == 2
    assert "filesystem root" in capsys.readouterr().err


def test_force_refuses_a_directory_with_files_netsurgeon_did_not_write(tmp_path, capsys, no_build):
    out = tmp_path / "o"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    assert _convert(out, "--force") == 2
    err = capsys.readouterr().err
    assert "did not write (data, notes.txt)" in err  # the foreign entries only, not model.safetensors
    assert sorted(os.listdir(out)) == ["data", "model.safetensors", "notes.txt"]
    assert (out / "model.safetensors").read_bytes() == b"old weights" and (out / "notes.txt").read_text() == "mine"
    assert _strays(tmp_path) == []


def test_force_replaces_an_empty_directory_or_a_previous_conversion(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    assert _convert(out) == 2 and "pass --force" in capsys.readouterr().err  # still needs --force
    assert _convert(out, "--force") == 0
    assert sorted(os.listdir(out)) == FILES
    assert _convert(out, "--force") == 0
    assert sorted(os.listdir(out)) == FILES and _strays(tmp_path) == []
    assert netsurgeon.load(out) is not None


def test_a_failed_swap_puts_the_previous_output_back_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    assert _convert(out) == 0
    before = {n: (out / n).read_bytes() for n in FILES}
    rename = os.rename

    def failing_rename(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".o.netsurgeon-tmp-"):
            raise OSError(errno.EXDEV, "simulated failure")
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", failing_rename)
    assert main(["convert", "resnet10t", "--passes", "strip_bn", "--set", "strip_bn.mode=remove", "--input-shape",
                 SHAPE, "--out", str(out), "--force", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot write output" in err and "simulated failure" in err
    assert {n: (out / n).read_bytes() for n in FILES} == before
    assert sorted(os.listdir(tmp_path)) == ["o"]  # no .o.netsurgeon-old-* or -tmp-* directory


# ---------------------------------------------------------------------------- inspect: output files
@pytest.mark.parametrize("args, message", [
    (["--cmap", "/nonexistent-netsurgeon/c.png"], "'/nonexistent-netsurgeon' does not exist"),
    (["--cmap", "c.txt"], "unsupported plot format 'txt'"),
    (["--cmap", "c"], "unsupported plot format '(no extension)'"),
    (["--dot", "/nonexistent-netsurgeon/g.dot"], "'/nonexistent-netsurgeon' does not exist"),
    (["--graphml", "/nonexistent-netsurgeon/g.graphml"], "'/nonexistent-netsurgeon' does not exist"),
    (["--dot", "g", "--graphml", "g"], "also given to --dot"),
])
def test_inspect_bad_output_paths_are_one_line_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(netsurgeon, "trace", lambda *a, **k: pytest.fail("the path should be refused first"))
    assert main(["inspect", "resnet10t", "--input-shape", SHAPE, "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("netsurgeon: error: ") and err.count("\n") == 1 and message in err, err
    assert os.listdir(tmp_path) == []


def test_inspect_refuses_to_overwrite_without_force_and_writes_atomically(tmp_path, capsys, umask):
    umask(0o022)
    dot, graphml = tmp_path / "g.dot", tmp_path / "g.graphml"
    dot.write_text("keep me")
    args = ["inspect", "resnet10t", "--input-shape", SHAPE, "--quiet", "--dot", str(dot), "--graphml", str(graphml)]
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert dot.read_text() == "keep me" and not graphml.exists()
    assert main([*args, "--force"]) == 0
    assert dot.read_text().startswith("digraph") and "<graphml" in graphml.read_text()
    assert _mode(dot) == 0o644 and _mode(graphml) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["g.dot", "g.graphml"]  # no temporary files left


# ---------------------------------------------------------------------------- inspect --blocks
class TinyDense(nn.Module):
    """DenseNet-like: every layer sees the concatenation of all earlier outputs."""

    def __init__(self, layers: int = 8, growth: int = 2) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 + i * growth, growth, 1) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(conv(torch.cat(feats, 1)))
        return torch.cat(feats, 1)


def tiny_dense() -> nn.Module:
    return TinyDense()


def test_format_blocks_shortens_long_branches_and_many_branches_but_keeps_full_detail():
    topo = netsurgeon.topology(TinyDense())
    last = topo.blocks[-1]
    assert len(last.branch_layers) == 8 and len(last.branch_layers[-1]) == 8  # the full paths stay in the API
    short = topo.format_blocks().splitlines()
    assert len(short) == len(topo.blocks)
    assert "8 branches" in short[-1] and "... 6 more branches ..." in short[-1] and "... 6 more layers ..." in short[-1]
    assert short[-1].count("convs_") == 1 + 2  # the first branch (one layer), the ends of the last one
    full = topo.format_blocks(max_branches=None, max_layers=None).splitlines()[-1]
    assert "more" not in full and full.count("convs_") == sum(len(b) for b in last.branch_layers)
    assert len(short[-1]) < len(full) / 2


def test_inspect_blocks_listing_is_one_short_line_per_merge(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(["inspect", "test_cli_safety:tiny_dense", "--input-shape", "1,3,8,8", "--blocks", "--quiet"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  concat")]
    assert len(lines) == 8 and all(len(ln) < 300 for ln in lines)
    assert "more branches" in lines[-1]
