"""Each named system is what its recipe says: its op equals the literal regression its ingredients define."""

import pytest
import torch

import ttr
from ttr.experiments.regress import feature_map, initial_state, parameter_free_inputs

from conftest import F64_ATOL, make_qkv, max_rel


@pytest.mark.parametrize("name", list(ttr.PRESETS))
def test_preset_op_equals_its_recipe_oracle(name):
    """Every named system, chunk and recurrent, equals the literal solver of the regression its recipe names."""
    preset = ttr.get_preset(name)
    B, T, D = 2, 19, 6  # 19 tokens: two mini-batches of 16 for TTT and Titans, the second partial
    q, k, v = make_qkv(B, T, 1, D, D)
    opt = preset.recipe.optimizer
    if isinstance(opt, ttr.OnlineSGD) and opt.steps_per_token > 1:
        gen = torch.Generator().manual_seed(4)
        k, v = (torch.randn(B, T, 1, opt.steps_per_token, D, generator=gen, dtype=torch.float64) for _ in range(2))
    inputs = parameter_free_inputs(preset, 0.9, 0.5, B, T, D)
    phi = feature_map(preset, D)
    if phi is not None:  # a learnable map as its layer starts it, with its parameters moved off their start
        with torch.no_grad():
            for p in phi.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype))
        inputs["feature_map"] = phi
    if not preset.recipe.causal:  # SOFT, Skyformer: the whole sequence, over given landmarks, exactly inverted
        landmarks = torch.randn(B, 5, 1, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        o, _ = preset.recipe.op()(q, k, v, landmarks=landmarks, newton_steps=None)
        assert max_rel(o, preset.recipe.oracle(q, k, v, landmarks=landmarks)) < F64_ATOL
        return
    init = initial_state(preset, B, D)
    reference = preset.recipe.oracle(q, k, v, initial_state=init, **inputs)
    for mode in ("chunk", "recurrent"):
        o, _ = preset.recipe.op()(q, k, v, **inputs, mode=mode, initial_state=init)
        assert max_rel(o, reference) < F64_ATOL, mode


def test_recipe_without_a_fast_op_runs_the_generic_executor():
    recipe = ttr.Recipe(ttr.Uniform(), ttr.Linear(), ttr.BatchGD(steps=2))
    assert recipe.op_name == "generic_recurrent" and recipe.forms == ("recurrent",)
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
    assert {"linear_attention", "retnet", "mamba2", "gla", "deltanet", "longhorn", "gated_deltanet", "titans",
            "deltaproduct", "ttt_linear", "ttt_mlp"} <= set(ttr.PRESETS)
    kinds = {type(ttr.get_preset(n).recipe.weights) for n in ("linear_attention", "retnet", "mamba2", "gla")}
    assert kinds == {ttr.Uniform, ttr.FixedDecay, ttr.ScalarGate, ttr.VectorGate}


def test_nonparametric_presets_and_their_ingredients():
    assert {"mesa", "mesanet", "softmax_attention", "softmax_qknorm", "local_linear", "intention"} <= set(ttr.PRESETS)
    assert ttr.get_preset("local_linear").recipe.regressor == ttr.LocalPolynomial(1)
    with pytest.raises(ValueError, match="order must be 0, 1 or 2"):
        ttr.LocalPolynomial(3)
    with pytest.raises(ValueError, match="kernel must be one of"):
        ttr.RKHS("laplace")
    with pytest.raises(ValueError, match="needs a positive ridge"):
        ttr.Recipe(ttr.Uniform(), ttr.LocalPolynomial(1), ttr.Exact()).op()
    # softmax attention with a decay gate (the Forgetting Transformer's weights) has no fast op: the generic executor
    assert ttr.Recipe(ttr.ScalarGate(), ttr.LocalPolynomial(0), ttr.Exact()).op_name == "generic_recurrent"


@pytest.mark.parametrize("name", list(ttr.PRESETS))
def test_an_empty_sequence_is_a_clear_error(name):
    preset = ttr.get_preset(name)
    q, k, v = make_qkv(2, 0, 1, 4, 4)
    n = preset.recipe.steps_per_token
    if n > 1:
        k, v = (x.unsqueeze(3).expand(-1, -1, -1, n, -1) for x in (k, v))
    inputs = parameter_free_inputs(preset, 0.9, 0.5, 2, 0, 4)
    with pytest.raises(ValueError, match="T = 0"):
        preset.recipe.op()(q, k, v, **inputs, initial_state=initial_state(preset, 2, 4))
