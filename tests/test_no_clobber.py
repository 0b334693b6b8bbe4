"""No output is lost or clobbered: racing conversions, kills mid-replacement, staging directories
of dead and live runs, --force only on what netsurgeon wrote, and checkpoints inside the output."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import netsurgeon
from netsurgeon import _outdir
from netsurgeon.cli import main

SHAPE = "1,3,32,32"
FILES = ["model.safetensors", "recipe.json", "report.md"]


def _convert(out: Path, *extra: str) -> int:
    return main(["convert", "resnet10t", "--passes", "strip_bn", "--input-shape", SHAPE, "--out", str(out),
                 "--quiet", *extra])


def _seed(out: Path) -> int:
    return json.loads((out / "recipe.json").read_text())["seed"]


def _hidden(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


def test_a_conversion_that_loses_the_race_fails_and_keeps_the_winner(tmp_path):
    out = tmp_path / "o"
    inner: list[int] = []

    def progress(msg: str) -> None:  # while the outer run writes, another one finishes first
        if msg.startswith("writing") and not inner:
            inner.append(_convert(out, "--seed", "7"))

    with pytest.raises(netsurgeon.OutputExistsError, match="created by another run.*--force"):
        netsurgeon.convert("resnet10t", ["strip_bn"], out, input_shape=(1, 3, 32, 32), progress=progress)
    assert inner == [0] and _seed(out) == 7 and sorted(os.listdir(out)) == FILES
    assert _hidden(tmp_path) == []


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "netsurgeon", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_two_processes_racing_for_one_out_one_wins_one_fails(tmp_path):
    out = tmp_path / "o"
    args = ["convert", "resnet10t", "--passes", "strip_bn", "--input-shape", SHAPE, "--out", str(out), "--quiet"]
    first = _cli(*args, "--seed", "1")
    second = _cli(*args, "--seed", "2")  # started right after: both pass the up-front check
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "--force" in loser and "Traceback" not in loser
    winner = 1 if results[0][0] == 0 else 2
    assert _seed(out) == winner and netsurgeon.load(out) is not None
    assert _hidden(tmp_path) == []


_KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    import netsurgeon
    rename = os.rename
    def rename_then_die(src, dst):
        rename(src, dst)
        if "netsurgeon-old-" in str(dst):          # the old output is aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename_then_die
    netsurgeon.convert("resnet10t", [("strip_bn", {"mode": "remove"})], sys.argv[1], input_shape=(1, 3, 32, 32),
                       force=True, seed=5)
""")


def test_a_kill_between_the_renames_of_a_force_replace_is_restored_next_run(tmp_path, capsys):
    out = tmp_path / "o"
    assert _convert(out) == 0
    before = {n: (out / n).read_bytes() for n in FILES}
    proc = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(out)], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # the state the issue describes: only hidden .o.netsurgeon-old-* and .o.netsurgeon-tmp-*
    assert any("-old-" in n for n in _hidden(tmp_path)) and any("-tmp-" in n for n in _hidden(tmp_path))
    assert _convert(out) == 2  # the next run restores the previous output, then needs --force as always
    err = capsys.readouterr().err
    assert "restored o from .o.netsurgeon-old-" in err and "removed .o.netsurgeon-tmp-" in err and "pass --force" in err
    assert {n: (out / n).read_bytes() for n in FILES} == before and _hidden(tmp_path) == []


def test_an_old_output_left_after_a_completed_swap_is_removed(tmp_path, capsys):
    out = tmp_path / "o"
    assert _convert(out) == 0
    shutil.copytree(out, tmp_path / ".o.netsurgeon-old-abc12345")  # killed during the final rmtree of the old output
    assert _convert(out, "--force", "--seed", "3") == 0
    assert "removed .o.netsurgeon-old-abc12345" in capsys.readouterr().err
    assert _seed(out) == 3 and _hidden(tmp_path) == []


def test_staging_directories_of_dead_runs_are_removed_and_of_live_runs_kept(tmp_path, capsys):
    out = tmp_path / "o"
    dead = tmp_path / ".o.netsurgeon-tmp-dead1234"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    with _outdir.staging(out) as live:  # a run that is still converting holds its lock
        (live / "model.safetensors").write_bytes(b"in progress")
        assert _convert(out) == 0
        assert live.is_dir() and not dead.exists()
        assert "removed .o.netsurgeon-tmp-dead1234" in capsys.readouterr().err
        with pytest.raises(netsurgeon.CheckpointError, match="recipe.json is missing"):
            netsurgeon.load(live)  # never mistaken for an output
    assert not live.exists() and _hidden(tmp_path) == []


def test_a_hidden_directory_with_foreign_files_is_never_removed(tmp_path):
    mine = tmp_path / ".o.netsurgeon-tmp-mine1234"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert _convert(tmp_path / "o") == 0
    assert (mine / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ --force replaces only our output
def test_force_refuses_a_users_own_recipe_json(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "recipe.json").write_text('{"steps": ["mine"]}')
    assert _convert(out, "--force") == 2
    assert "not a netsurgeon recipe" in capsys.readouterr().err
    assert (out / "recipe.json").read_text() == '{"steps": ["mine"]}'


def test_force_refuses_a_conversion_whose_files_were_changed(tmp_path, capsys):
    out = tmp_path / "o"
    assert _convert(out) == 0
    (out / "report.md").write_text("my notes about this model")
    assert _convert(out, "--force") == 2
    assert "report.md that differs from the one netsurgeon wrote" in capsys.readouterr().err
    assert (out / "report.md").read_text() == "my notes about this model"


def test_force_refuses_files_a_format_1_recipe_cannot_vouch_for(tmp_path, capsys):
    out = tmp_path / "o"
    assert _convert(out) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    del recipe["files"]
    (out / "recipe.json").write_text(json.dumps({**recipe, "format": 1}))
    assert _convert(out, "--force") == 2
    assert "records no sha256" in capsys.readouterr().err and (out / "model.safetensors").exists()


def test_a_checkpoint_inside_the_output_being_replaced_is_refused(tmp_path, capsys):
    out = tmp_path / "selfconv"
    assert _convert(out) == 0
    before = (out / "model.safetensors").read_bytes()
    assert _convert(out, "--checkpoint", str(out / "model.safetensors"), "--force") == 2
    assert "lies inside the output" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before and _hidden(tmp_path) == []


def test_a_dead_runs_staging_directory_with_safetensors_temp_file_is_removed(tmp_path, capsys):
    """safetensors writes ``.tmpXXXX`` and renames it: a kill mid-write leaves that file behind."""
    dead = tmp_path / ".o.netsurgeon-tmp-dead5678"
    dead.mkdir()
    (dead / ".tmpAbC123").write_bytes(b"half of the weights")
    foreign = tmp_path / ".o.netsurgeon-tmp-deadbeef"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert _convert(tmp_path / "o") == 0
    err = capsys.readouterr().err
    assert not dead.exists() and "removed .o.netsurgeon-tmp-dead5678" in err
    assert (foreign / "notes.txt").read_text() == "mine" and "left .o.netsurgeon-tmp-deadbeef alone" in err


def test_recovery_touches_only_its_own_leftovers(tmp_path, capsys):
    """A user's backup named like a leftover, another output's leftover, and a set-aside directory
    whose files are not the ones netsurgeon wrote are all left alone."""
    out = tmp_path / "a"
    assert _convert(out) == 0
    backup = tmp_path / ".a.old-mybackup"  # a user's name, not netsurgeon's
    shutil.copytree(out, backup)
    other = tmp_path / ".a.old-v2.netsurgeon-old-abcd1234"  # the leftover of an output named "a.old-v2"
    shutil.copytree(out, other)
    tampered = tmp_path / ".a.netsurgeon-old-zzzz9999"
    shutil.copytree(out, tampered)
    (tampered / "report.md").write_text("edited by the user")
    assert _convert(out, "--force") == 0
    err = capsys.readouterr().err
    assert backup.is_dir() and other.is_dir() and tampered.is_dir()
    assert "left .a.netsurgeon-old-zzzz9999 alone: it has a report.md that differs" in err


def test_force_refuses_a_directory_holding_only_a_recipe(tmp_path, capsys):
    """netsurgeon never leaves a recipe.json alone in a directory: such a file is someone's own."""
    out = tmp_path / "o"
    assert _convert(out) == 0
    (out / "model.safetensors").unlink()
    (out / "report.md").unlink()
    assert _convert(out, "--force") == 2
    assert "not the 3 files a conversion writes" in capsys.readouterr().err
    assert (out / "recipe.json").exists()
