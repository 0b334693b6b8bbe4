"""The CLI and conversion directories: convert, inspect, passes, load, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import netsurgeon
from netsurgeon.cli import main

SHAPE = "1,3,32,32"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netsurgeon", *args], capture_output=True, text=True, timeout=300)


def test_convert_writes_three_files_and_load_reproduces_exactly(tmp_path):
    out = tmp_path / "r10"
    assert main(["convert", "resnet10t", "--passes", "strip_bn", "--out", str(out), "--input-shape", SHAPE,
                 "--quiet"]) == 0
    assert sorted(os.listdir(out)) == ["model.safetensors", "recipe.json", "report.md"]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["model"] == "resnet10t" and recipe["passes"] == [{"name": "strip_bn", "options": {"mode": "fold"}}]
    assert recipe["input_shape"] == [1, 3, 32, 32] and {"torch", "timm", "netsurgeon"} <= set(recipe["versions"])
    assert "folded into preceding" in (out / "report.md").read_text()
    gm = netsurgeon.load(out).eval()
    torch.manual_seed(0)
    ref = timm.create_model("resnet10t").eval()  # seed 0 was the recipe's seed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref(x), rtol=1e-4, atol=1e-5)
    again = netsurgeon.load(out).eval()
    with torch.no_grad():
        assert torch.equal(again(x), gm(x))


def test_convert_with_checkpoint_and_set_option(tmp_path):
    model = timm.create_model("resnet10t")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ckpt = tmp_path / "base.pt"
    torch.save(model.state_dict(), ckpt)
    stat = ckpt.stat()
    out = tmp_path / "conv"
    assert main(["convert", "resnet10t", "--checkpoint", str(ckpt), "--passes", "strip_bn", "--set",
                 "strip_bn.mode=remove", "--out", str(out), "--input-shape", SHAPE, "--quiet"]) == 0
    assert ckpt.stat().st_mtime_ns == stat.st_mtime_ns  # input never modified
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["passes"][0]["options"] == {"mode": "remove"} and len(recipe["checkpoint"]["sha256"]) == 64
    gm = netsurgeon.load(out)
    w = gm.state_dict()["conv1.0.weight"]
    assert torch.equal(w, model.state_dict()["conv1.0.weight"])


def test_existing_output_needs_force_and_force_replaces(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["convert", "resnet10t", "--passes", "strip_bn", "--set", "strip_bn.mode=remove", "--out", str(out),
                 "--input-shape", SHAPE, "--quiet"]) == 0  # a previous conversion: --force may replace it
    before = (out / "recipe.json").read_text()
    assert main(["convert", "resnet10t", "--passes", "strip_bn", "--out", str(out), "--quiet"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (out / "recipe.json").read_text() == before
    assert main(["convert", "resnet10t", "--passes", "strip_bn", "--out", str(out), "--input-shape", SHAPE,
                 "--force", "--quiet"]) == 0
    assert sorted(os.listdir(out)) == ["model.safetensors", "recipe.json", "report.md"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".o.")]  # no temporary leftovers


@pytest.mark.parametrize("args, message", [
    (["convert", "resnt18", "--passes", "strip_bn", "--out", "X"], "Close timm names: resnet18"),
    (["convert", "resnet10t", "--passes", "strp_bn", "--out", "X"], "Did you mean 'strip_bn'"),
    (["convert", "resnet10t", "--passes", "strip_bn", "--set", "strip_bn", "--out", "X"], "malformed --set"),
    (["convert", "resnet10t", "--passes", "strip_bn", "--set", "strip_bn.mode=squash", "--out", "X"],
     "expected one of fold, remove"),
    (["convert", "resnet10t", "--passes", "strip_bn", "--set", "other.mode=fold", "--out", "X"], "not in --passes"),
    (["convert", "resnet10t", "--passes", "strip_bn", "--input-shape", "1,a", "--out", "X"], "malformed --input-shape"),
    (["convert", "nosuchpkg.mod:make", "--passes", "strip_bn", "--out", "X"], "cannot import 'nosuchpkg.mod'"),
    (["convert", "resnet10t", "--checkpoint", "missing.pt", "--passes", "strip_bn", "--out", "X"], "does not exist"),
])
def test_bad_input_is_one_line_error_without_traceback(tmp_path, args, message):
    args = [a.replace("X", str(tmp_path / "out")) for a in args]
    proc = _run(*args, "--quiet")
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_mismatched_checkpoint_lists_keys(tmp_path):
    sd = timm.create_model("resnet18").state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["conv1.weight"] = torch.zeros(1, 1, 1, 1)
    ckpt = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt))
    proc = _run("convert", "resnet18", "--checkpoint", str(ckpt), "--passes", "strip_bn", "--out",
                str(tmp_path / "o"), "--quiet")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for part in ("missing keys (1): fc.bias", "unexpected keys (1): extra.weight", "conv1.weight (1, 1, 1, 1)"):
        assert part in proc.stderr


def test_output_parent_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    assert main(["convert", "resnet10t", "--passes", "strip_bn", "--out", str(blocker / "x"), "--quiet"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "not a directory"


def test_inspect_and_passes_listing(tmp_path):
    dot = tmp_path / "g.dot"
    proc = _run("inspect", "resnet18", "--blocks", "--dot", str(dot), "--graphml", str(tmp_path / "g.graphml"),
                "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "residual blocks: 8 (3 with projection shortcut)" in proc.stdout
    assert "norm layers: batch=20" in proc.stdout and "activations: relu=17" in proc.stdout
    assert dot.read_text().startswith("digraph") and (tmp_path / "g.graphml").stat().st_size > 0
    proc = _run("passes")
    assert proc.returncode == 0 and "strip_bn:" in proc.stdout and "strip_bn.mode" in proc.stdout


def test_factory_spec(tmp_path):
    out = tmp_path / "f"
    assert main(["convert", "torchvision.models:resnet18", "--passes", "strip_bn", "--out", str(out),
                 "--input-shape", SHAPE, "--quiet"]) == 0
    with pytest.raises(netsurgeon.UntrustedCodeError, match="torchvision.models:resnet18"):
        netsurgeon.load(out)  # a recipe that names a factory is code: only with trust_code
    assert isinstance(netsurgeon.load(out, trust_code=True), torch.fx.GraphModule)
