"""The DKS preparation passes are registered, with their options, CLI coercion and range errors."""
from __future__ import annotations

import pytest

import netsurgeon
from netsurgeon import PassOptionError
from netsurgeon.passes import OrthogonalInit, coerce_option, get_pass
from netsurgeon.report import Preservation

from structure_pass_models import _Scaled


def test_passes_registered_with_options_and_cli_coercion():
    assert {"normalize_sums", "remove_skips", "maxpool_to_avgpool", "input_norm", "orthogonal_init"} <= set(
        netsurgeon.list_passes())
    assert get_pass("normalize_sums")().options() == {"shortcut_weight2": 0.8, "reset_layer_scale": True}
    assert get_pass("input_norm")().options() == {"dim": 1, "eps": 1e-6}
    assert get_pass("orthogonal_init")().options() == {"gain": 1.0, "seed": None, "conv": "delta"}
    assert get_pass("remove_skips")().options() == {"reset_layer_scale": True}
    assert get_pass("maxpool_to_avgpool")().options() == {}
    assert coerce_option(get_pass("remove_skips"), "reset_layer_scale", "false") is False
    assert coerce_option(OrthogonalInit, "seed", "none") is None
    assert coerce_option(OrthogonalInit, "seed", "7") == 7
    assert all(get_pass(n).preserves is Preservation.NONE for n in ("normalize_sums", "orthogonal_init"))


def test_bad_options_name_the_parameter_and_range():
    with pytest.raises(PassOptionError, match=r"normalize_sums.shortcut_weight2 must lie in \(0, 1\); got 1.0"):
        netsurgeon.transform(_Scaled(), [("normalize_sums", {"shortcut_weight2": 1.0})])
    with pytest.raises(PassOptionError, match="Did you mean 'shortcut_weight2'"):
        netsurgeon.transform(_Scaled(), [("normalize_sums", {"shortcut_weight": 0.5})])
    with pytest.raises(PassOptionError, match="orthogonal_init.gain must be positive"):
        OrthogonalInit(gain=0.0)
