"""Each named system is what its recipe says: its op equals the literal regression its ingredients define."""

import pytest
import torch

import ttr
from ttr.experiments.regress import parameter_free_gate

from conftest import F64_ATOL, make_qkv, max_rel


@pytest.mark.parametrize("name", list(ttr.PRESETS))
def test_preset_op_equals_its_recipe_oracle(name):
    preset = ttr.get_preset(name)
    q, k, v = make_qkv(2, 27, 1, 8, 5)
    g = parameter_free_gate(preset, 0.9, 2, 27, 8)
    s0 = None
    for mode in ("chunk", "recurrent"):
        o, _ = preset.recipe.op()(q, k, v, g, mode=mode, initial_state=s0)
        assert max_rel(o, preset.recipe.oracle(q, k, v, g)) < F64_ATOL


def test_recipe_without_an_op_says_so():
    recipe = ttr.Recipe(ttr.Uniform(), ttr.Linear(), ttr.BatchGD(steps=2))
    with pytest.raises(ValueError, match="no op implements"):
        recipe.op()
    # ... while the oracle still solves it literally: two GD steps differ from one.
    q, k, v = make_qkv(1, 6, 1, 3, 2)
    two = recipe.oracle(q, k, v)
    one = ttr.Recipe(ttr.Uniform(), ttr.Linear(), ttr.BatchGD()).oracle(q, k, v)
    assert (two - one).abs().max() > 1e-3


def test_local_constant_needs_positive_features():
    with pytest.raises(ValueError, match="positive feature map"):
        ttr.LocalConstant("identity")


def test_positive_random_features_approximate_the_softmax_kernel():
    # The estimator's variance grows like exp(4 ||x||^2 / sqrt(D)); at this scale 20k features give ~1% error.
    phi = ttr.PositiveRandomFeatures(n_features=20000, seed=1)
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.3
    approx = phi(x) @ phi(x).T
    exact = torch.exp(x @ x.T / 8 ** 0.5)
    assert max_rel(approx, exact) < 0.05


def test_presets_cover_the_issue_systems():
    assert {"linear_attention", "retnet", "mamba2", "gla"} <= set(ttr.PRESETS)
    kinds = {type(ttr.get_preset(n).recipe.weights) for n in ("linear_attention", "retnet", "mamba2", "gla")}
    assert kinds == {ttr.Uniform, ttr.FixedDecay, ttr.ScalarGate, ttr.VectorGate}
