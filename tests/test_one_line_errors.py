"""Every bad input to the CLI is one line, a non-zero exit and no traceback; checkpoints are
refused rather than silently cast, and what is converted is reported."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import netsurgeon
import netsurgeon.checkpoint as checkpoint
from netsurgeon.cli import main

SHAPE = "1,3,32,32"


def _convert(out: Path, *extra: str) -> int:
    return main(["convert", "resnet10t", "--passes", "strip_bn", "--input-shape", SHAPE, "--out", str(out),
                 "--quiet", *extra])


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err + captured.out, captured.err
    assert "\x1b[" not in captured.err
    return captured.err


class Opaque:
    """Stands for any pickled object in a checkpoint."""


def _state_dict(**overrides) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = timm.create_model("resnet10t").state_dict()
    sd.update(overrides)
    return sd


def test_a_pickled_checkpoint_is_refused_in_one_line_with_the_fix(tmp_path, capsys):
    ckpt = tmp_path / "pickled.pt"
    torch.save({"state_dict": _state_dict(), "extra": Opaque()}, ckpt)
    assert _convert(tmp_path / "o", "--checkpoint", str(ckpt)) == 2
    err = _one_line(capsys)
    assert "contains pickled Python objects (e.g. test_one_line_errors.Opaque)" in err
    assert "loads only tensors" in err and "save_file" in err and not (tmp_path / "o").exists()


def test_an_int64_checkpoint_is_refused_not_cast(tmp_path, capsys):
    sd = _state_dict()
    sd["conv1.0.weight"] = sd["conv1.0.weight"].round().long()
    save_file(sd, tmp_path / "int.safetensors")
    assert _convert(tmp_path / "o", "--checkpoint", str(tmp_path / "int.safetensors")) == 2
    err = _one_line(capsys)
    assert "dtype mismatches, refused rather than cast (1): conv1.0.weight int64 vs model float32" in err


def test_a_float16_checkpoint_is_converted_with_a_line_in_the_report(tmp_path):
    sd = {k: v.half() if v.is_floating_point() else v for k, v in _state_dict().items()}
    save_file(sd, tmp_path / "half.safetensors")
    out = tmp_path / "o"
    assert _convert(out, "--checkpoint", str(tmp_path / "half.safetensors")) == 0
    report = (out / "report.md").read_text()
    assert "tensor(s) converted from float16 to float32" in report
    gm = netsurgeon.load(out)
    assert gm.state_dict()["conv1.0.weight"].dtype == torch.float32


def test_a_checkpoint_with_nan_or_inf_names_the_tensors(tmp_path, capsys):
    sd = _state_dict()
    sd["fc.weight"][0, :3] = float("nan")
    sd["conv1.0.weight"][0, 0, 0, 0] = float("inf")
    save_file(sd, tmp_path / "nan.safetensors")
    assert _convert(tmp_path / "o", "--checkpoint", str(tmp_path / "nan.safetensors")) == 2
    err = _one_line(capsys)
    assert "non-finite values in 2 tensor(s)" in err and "fc.weight (3 NaN)" in err and "conv1.0.weight (1 inf)" in err
    assert "control flow" not in err


def test_disk_full_while_writing_the_weights_is_one_line(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_model", full)
    assert _convert(tmp_path / "o") == 2
    err = _one_line(capsys)
    assert "No space left on device" in err and "free some space" in err
    assert os.listdir(tmp_path) == []  # no staging directory left behind


def test_a_real_full_file_system_is_one_line(tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()}); the simulated "
                    f"disk-full test covers the code path")
    try:
        assert _convert(small / "o") == 2
        assert "No space left on device" in _one_line(capsys)
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.parametrize("extra, message", [
    (["--seed", "1180591620717411303424"], "seed must be a whole number from 0 to 2**64 - 1"),
    (["--seed", "-1"], "seed must be a whole number"),
    (["--input-shape", "1,3,100000,100000"], "elements, more than the"),
])
def test_out_of_range_numbers_are_one_line(tmp_path, capsys, extra, message):
    assert _convert(tmp_path / "o", *extra) == 2
    assert message in _one_line(capsys)


def test_an_out_name_longer_than_the_file_system_allows(tmp_path, capsys):
    assert _convert(tmp_path / ("n" * 300)) == 2
    assert "300 bytes long; this file system allows at most 255" in _one_line(capsys)
    assert _convert(tmp_path / ("n" * 250)) == 0  # a long name that fits is fine: staging names stay short
    assert os.listdir(tmp_path) == ["n" * 250]


def test_convert_of_a_conversion_directory_is_one_line(tmp_path, capsys):
    out = tmp_path / "o"
    assert _convert(out) == 0
    assert main(["convert", str(out), "--passes", "strip_bn", "--out", str(tmp_path / "p"), "--quiet"]) == 2
    assert "is a conversion directory" in _one_line(capsys)
    assert _convert(tmp_path / "p", "--checkpoint", str(out)) == 2
    assert "is a directory (a netsurgeon conversion" in _one_line(capsys)


def test_an_internal_error_is_one_line_and_verbose_shows_the_traceback(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("something inside")

    monkeypatch.setattr(checkpoint, "transform", broken)
    assert _convert(tmp_path / "o") == 1
    err = _one_line(capsys)
    assert err.startswith("netsurgeon: internal error: ZeroDivisionError: something inside") and "--verbose" in err
    assert _convert(tmp_path / "o", "--verbose") == 1
    assert "Traceback" in capsys.readouterr().err


def test_out_of_memory_in_torch_is_one_line(tmp_path, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1099511627776 bytes.\nmore torch text")

    monkeypatch.setattr(checkpoint, "transform", oom)
    assert _convert(tmp_path / "o") == 2
    assert "out of memory" in _one_line(capsys)


def test_the_cli_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "netsurgeon", "convert", "resnet10t", "--passes", "strip_bn",
                           "--seed", str(1 << 80), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_a_long_refusal_is_one_line_and_verbose_lists_every_node(tmp_path, capsys):
    args = ["convert", "resnet10t", "--passes", "tat,strip_bn", "--input-shape", SHAPE, "--quiet"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = _one_line(capsys)
    assert "more" in err and err.count("bn") < 12
    assert main([*args, "--out", str(tmp_path / "o"), "--verbose"]) == 2
    lines = capsys.readouterr().err.splitlines()
    detail = [ln for ln in lines[1:] if ln.startswith("  ")]
    assert lines[0] == err.strip() and len(detail) > 10  # one line a node: the full list
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["convert", "resnet10t", "--passes", "strip_bn", "--seed", "abc", "--out", "o"], "argument --seed: invalid int"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["convert", "resnet10t"], "the following arguments are required: --passes, --out"),
])
def test_usage_errors_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("netsurgeon: error: ")


def test_a_warning_is_one_line_without_source_paths(tmp_path, capsys):
    assert _convert(tmp_path / "o", "--passes", "strip_bn,maxpool_to_avgpool,normalize_sums,dks") == 0
    err = capsys.readouterr().err
    assert err.startswith("netsurgeon: warning: dks on relu") and err.count("\n") == 1 and ".py:" not in err
