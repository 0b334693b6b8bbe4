"""A conversion directory is data: loading it imports and calls nothing it names unless trusted,
every recipe field is checked before anything is built, and the weights are verified by hash."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import timm
import torch

import netsurgeon
import netsurgeon.checkpoint as checkpoint
from netsurgeon.cli import main
from netsurgeon.errors import ModelSpecError, RecipeError, UntrustedCodeError
from netsurgeon.recipe import MAX_INPUT_ELEMENTS, UNTRUSTED_KWARG_PATTERNS

SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def conversion(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "r10"
    netsurgeon.convert("resnet10t", ["strip_bn"], out, input_shape=SHAPE)
    return out


@pytest.fixture
def copy(conversion, tmp_path):
    """A private copy of the conversion whose recipe the test may rewrite."""
    def make(**changes) -> Path:
        d = tmp_path / "c"
        shutil.copytree(conversion, d)
        recipe = json.loads((d / "recipe.json").read_text())
        recipe.update(changes)
        (d / "recipe.json").write_text(json.dumps(recipe))
        return d
    return make


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module whose import and whose factory each leave a marker file."""
    (tmp_path / "evil_netsurgeon_mod.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(tmp_path / 'imported')!r}).touch()\n"
        "def factory(**kw):\n"
        f"    Path({str(tmp_path / 'called')!r}).touch()\n"
        "    import torch\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("evil_netsurgeon_mod", None)
    yield tmp_path
    sys.modules.pop("evil_netsurgeon_mod", None)


# ----------------------------------------------------------------------------------- code in recipes
@pytest.mark.parametrize("model, kwargs", [
    ("os:system", {"command": "touch {marker}"}),
    ("subprocess:run", {"args": ["touch", "{marker}"]}),
    ("shutil:rmtree", {"path": "{victim}"}),
])
def test_load_never_runs_a_factory_a_recipe_names(copy, tmp_path, model, kwargs):
    victim = tmp_path / "victim"
    victim.mkdir()
    marker = tmp_path / "marker"
    text = json.dumps(kwargs).replace("{marker}", str(marker)).replace("{victim}", str(victim))
    d = copy(model=model, model_kwargs=json.loads(text))
    with pytest.raises(UntrustedCodeError, match=rf"factory '{model}'.*trust_code=True, CLI --trust-code"):
        netsurgeon.load(d)
    assert not marker.exists() and victim.is_dir()


def test_an_untrusted_factory_is_refused_before_its_module_is_imported(copy, evil_module, capsys):
    d = copy(model="evil_netsurgeon_mod:factory")
    with pytest.raises(UntrustedCodeError):
        netsurgeon.load(d)
    assert main(["inspect", str(d), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evil_netsurgeon_mod:factory" in err and "--trust-code" in err
    assert not (evil_module / "imported").exists() and "evil_netsurgeon_mod" not in sys.modules


def test_trust_code_opts_in(evil_module, tmp_path, capsys):
    out = tmp_path / "own"
    netsurgeon.convert("evil_netsurgeon_mod:factory", ["strip_bn"], out, input_shape=(1, 3, 8, 8))
    (evil_module / "called").unlink()
    sys.modules.pop("evil_netsurgeon_mod", None)
    gm = netsurgeon.load(out, trust_code=True)
    assert isinstance(gm, torch.fx.GraphModule) and (evil_module / "called").exists()
    assert main(["inspect", str(out), "--trust-code", "--quiet"]) == 0
    assert "Sequential" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, key", [
    ({"pretrained": True}, "pretrained"),
    ({"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "pretrained_cfg_overlay"),
    ({"checkpoint_path": "/tmp/x.pth"}, "checkpoint_path"),
    ({"cache_dir": "/tmp"}, "cache_dir"),
    ({"drop_rate": 0.0, "model_args": {"weights_file": "w.bin"}}, "model_args.weights_file"),
    ({"Pretrained_CFG": "x"}, "Pretrained_CFG"),
])
def test_model_kwargs_that_read_files_or_the_network_need_trust(copy, monkeypatch, kwargs, key):
    d = copy(model_kwargs=kwargs)
    monkeypatch.setattr(checkpoint, "create_model", lambda *a, **k: pytest.fail("refused before building"))
    with pytest.raises(UntrustedCodeError, match=f"sets {key}"):
        netsurgeon.load(d)
    assert {"pretrained", "checkpoint*", "*file*"} <= set(UNTRUSTED_KWARG_PATTERNS)


@pytest.mark.parametrize("model, error", [
    ("hf-hub:timm/resnet18", UntrustedCodeError),  # timm would download: a ':' spec is code or network
    ("local-dir:/tmp/model", UntrustedCodeError),
    ("timm/resnet18", RecipeError),
    ("../../resnet18", RecipeError),
])
def test_a_recipe_model_is_a_timm_registry_name(copy, model, error):
    with pytest.raises(error, match="'model'|factory|model source"):
        netsurgeon.load(copy(model=model))


# ------------------------------------------------------------------------------------ integrity
def test_recipe_records_the_hashes_and_load_refuses_other_weights(copy, tmp_path):
    d = copy()
    recipe = json.loads((d / "recipe.json").read_text())
    assert recipe["format"] == 2 and set(recipe["files"]) == {"model.safetensors", "report.md"}
    assert len(recipe["files"]["model.safetensors"]["sha256"]) == 64
    other = tmp_path / "seed1"
    netsurgeon.convert("resnet10t", ["strip_bn"], other, input_shape=SHAPE, seed=1)
    shutil.copy(other / "model.safetensors", d / "model.safetensors")  # same shapes, another seed
    with pytest.raises(netsurgeon.CheckpointError, match="sha256 differs.*verify=False"):
        netsurgeon.load(d)
    gm = netsurgeon.load(d, verify=False)
    ref = netsurgeon.load(other)
    assert all(torch.equal(a, b) for a, b in zip(gm.state_dict().values(), ref.state_dict().values()))


def test_a_format_1_recipe_has_no_hash_and_loads_only_unverified(copy):
    d = copy(format=1)
    recipe = json.loads((d / "recipe.json").read_text())
    del recipe["files"]
    (d / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(netsurgeon.CheckpointError, match="no sha256.*verify=False"):
        netsurgeon.load(d)
    assert isinstance(netsurgeon.load(d, verify=False), torch.fx.GraphModule)


@pytest.mark.parametrize("flag", ["trust_code", "verify"])
def test_load_flags_are_bools(conversion, flag):
    with pytest.raises(netsurgeon.NetsurgeonError, match=f"{flag} must be True or False"):
        netsurgeon.load(conversion, **{flag: "no"})


# ------------------------------------------------------------------------- every field validated
def _drop(field):
    return lambda r: {k: v for k, v in r.items() if k != field}


def _set(**kw):
    return lambda r: {**r, **kw}


BAD_RECIPES = {
    "missing model": (_drop("model"), "'model' is missing"),
    "missing passes": (_drop("passes"), "'passes' is missing"),
    "missing seed": (_drop("seed"), "'seed' is missing"),
    "missing input_shape": (_drop("input_shape"), "'input_shape' is missing"),
    "a list": (lambda r: [r], "must be a JSON object; got a JSON list"),
    "seed abc": (_set(seed="abc"), "seed' must be a whole number"),
    "seed negative": (_set(seed=-1), "seed' must be a whole number"),
    "seed huge": (_set(seed=1 << 70), "seed' must be a whole number"),
    "seed bool": (_set(seed=True), "seed' must be a whole number"),
    "passes string": (_set(passes="strip_bn"), "'passes' must be a list"),
    "pass not an object": (_set(passes=["strip_bn"]), "'passes\\[0\\]' must be an object"),
    "unknown pass": (_set(passes=[{"name": "strp_bn", "options": {}}]), "'passes\\[0\\]'.*strip_bn"),
    "bad pass option": (_set(passes=[{"name": "strip_bn", "options": {"mode": 3}}]), "'passes\\[0\\]'.*mode"),
    "model_kwargs list": (_set(model_kwargs=[1]), "'model_kwargs' must be an object"),
    "format newer": (_set(format=99), "format 99 was written by a newer netsurgeon"),
    "format string": (_set(format="2"), "'format' must be a whole number"),
    "unknown field": (_set(extra=1), "unknown field.*'extra'"),
    "negative shape": (_set(input_shape=[-1, 3, 32, 32]), "input_shape' must hold positive"),
    "float shape": (_set(input_shape=[1, 3, 32.5, 32]), "input_shape' must hold positive"),
    "huge shape": (_set(input_shape=[1, 3, 100000, 100000]), "30,000,000,000 elements"),
    "many dims": (_set(input_shape=[1] * 40), "1 to 8"),
    "num_classes 1e7": (_set(model_kwargs={"num_classes": 10 ** 7}), "'model_kwargs'.*would allocate more than"),
    "num_classes float": (_set(model_kwargs={"num_classes": 1e7}), "'model_kwargs'"),
    "bad checkpoint": (_set(checkpoint={"path": 3}), "'checkpoint' must be null"),
    "bad files": (_set(files={"model.safetensors": "abc"}), "'files.model.safetensors'"),
    "foreign file entry": (_set(files={"../../x": {}}), "only model.safetensors and report.md"),
    "versions": (_set(versions=[1]), "'versions' must be an object"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_every_recipe_field_is_checked_and_named(copy, case):
    change, message = BAD_RECIPES[case]
    d = copy()
    recipe = json.loads((d / "recipe.json").read_text())
    (d / "recipe.json").write_text(json.dumps(change(recipe)))
    with pytest.raises(RecipeError, match=message):
        netsurgeon.load(d)
    assert issubclass(RecipeError, netsurgeon.NetsurgeonError)


def test_non_utf8_huge_and_deeply_nested_recipes(copy):
    d = copy()
    (d / "recipe.json").write_bytes(b'{"format": 2, "model": "\xff\xfe"}')
    with pytest.raises(RecipeError, match="not UTF-8"):
        netsurgeon.load(d)
    (d / "recipe.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(RecipeError, match="a recipe is at most"):
        netsurgeon.load(d)
    (d / "recipe.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(RecipeError, match="nests too deeply|not valid JSON"):
        netsurgeon.load(d)


def test_a_huge_input_shape_is_refused_before_allocating(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch, "randn", lambda *a, **k: pytest.fail("allocated"))
    assert main(["convert", "resnet10t", "--passes", "strip_bn", "--input-shape", "1,3,100000,100000",
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{MAX_INPUT_ELEMENTS:,}" in err
    with pytest.raises(netsurgeon.NetsurgeonError, match="more than"):
        netsurgeon.convert("resnet10t", ["strip_bn"], tmp_path / "o", input_shape=(1, 3, 100000, 100000))


def test_the_model_build_cap_is_checked_before_each_allocation():
    from netsurgeon.models import create_model

    with pytest.raises(ModelSpecError, match="would allocate more than 1,000,000 tensor elements"):
        create_model("resnet10t", max_elements=10 ** 6)
    assert sum(p.numel() for p in create_model("resnet10t", max_elements=10 ** 8).parameters()) > 10 ** 6


# ------------------------------------------------------------- found by review: limits and oddities
def test_a_recipe_lists_at_most_32_passes(copy):
    d = copy(passes=[{"name": "identity_reparam", "options": {}}] * 33)
    with pytest.raises(RecipeError, match="lists 33 passes; a recipe holds at most 32"):
        netsurgeon.load(d)


def test_the_passes_allocations_share_the_build_cap(copy):
    """orthogonal_init draws ~1.2M elements of new weights for resnet10t, whose build takes ~5.4M."""
    d = copy(passes=[{"name": "orthogonal_init", "options": {}}], files={})
    with pytest.raises(netsurgeon.CheckpointError, match="does not match the model"):  # past the cap: the weights
        netsurgeon.load(d, verify=False, max_model_elements=8_000_000)             # (of a strip_bn model) differ
    with pytest.raises(RecipeError, match="recipe field 'passes'.*would allocate more than 6,000,000"):
        netsurgeon.load(d, verify=False, max_model_elements=6_000_000)


def test_a_factory_failing_on_recipe_arguments_is_a_recipe_error(copy, capsys):
    d = copy(model_kwargs={"global_pool": 5})
    with pytest.raises(RecipeError, match="'model'/'model_kwargs'.*global_pool"):
        netsurgeon.load(d)
    assert main(["inspect", str(d), "--quiet"]) == 2 and "internal error" not in capsys.readouterr().err


def test_a_huge_integer_in_a_recipe_is_a_recipe_error(copy):
    d = copy()
    (d / "recipe.json").write_text((d / "recipe.json").read_text().replace('"seed": 0', '"seed": ' + "9" * 5000))
    with pytest.raises(RecipeError, match="holds a value JSON cannot give here"):
        netsurgeon.load(d)


@pytest.mark.parametrize("name", ["recipe.json", "model.safetensors"])
def test_files_of_a_conversion_directory_that_are_links_are_refused(copy, tmp_path, name):
    d = copy()
    real = tmp_path / f"elsewhere-{name}"
    (d / name).rename(real)
    (d / name).symlink_to(real)
    with pytest.raises(netsurgeon.CheckpointError, match="is a symbolic link"):
        netsurgeon.load(d)


def test_names_from_files_reach_the_terminal_escaped(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = timm.create_model("resnet10t").state_dict()
    sd["\x1b[2J\x1b[31mOWNED\x1b[0m\nnetsurgeon: ok"] = torch.zeros(1)
    save_file(sd, tmp_path / "evil.safetensors")
    assert main(["convert", "resnet10t", "--checkpoint", str(tmp_path / "evil.safetensors"), "--passes",
                 "strip_bn", "--input-shape", "1,3,32,32", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and err.count("\n") == 1 and "unexpected keys (1)" in err
