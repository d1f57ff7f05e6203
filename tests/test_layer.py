"""TTRLayer: pieces equal the whole (conv cache and memory state), gradients reach every parameter."""

import pytest
import torch
import torch.nn.functional as F

import ttr
from ttr.layers.conv import ShortConv
from ttr.layers.gates import make_gate, make_inputs
from ttr.ops import MiniBatchState

from conftest import causal_presets

PIECES = [(0, 1), (1, 2), (2, 19), (19, 20), (20, 64), (64, 71)]


def _tensors(memory):
    """The tensors a layer's memory state holds, whatever its kind."""
    if isinstance(memory, MiniBatchState):
        return [*memory.weights, *memory.start]
    return list(memory) if isinstance(memory, tuple) else [memory]


@pytest.mark.parametrize("name", causal_presets())
@pytest.mark.parametrize("conv_size", [0, 4])
def test_pieces_equal_whole(name, conv_size):
    torch.manual_seed(0)
    layer = ttr.TTRLayer(32, 4, name, conv_size=conv_size, chunk_size=16).double()
    x = torch.randn(2, 71, 32, dtype=torch.float64)
    whole, state_whole = layer(x)
    outs, state = [], None
    for a, b in PIECES:
        y, state = layer(x[:, a:b], state)
        outs.append(y)
    assert (torch.cat(outs, 1) - whole).abs().max() < 1e-10
    for a, b in zip(_tensors(state.memory), _tensors(state_whole.memory), strict=True):
        assert (a - b).abs().max() < 1e-10
    if conv_size:  # the same projections (a token shift's mixing LoRA may round differently by length)
        assert (state.conv - state_whole.conv).abs().max() < 1e-12
    if state_whole.shift is not None:  # the last token's input, for the next call's token shift
        assert torch.equal(state.shift, state_whole.shift) and torch.equal(state.shift, x[:, -1])


@pytest.mark.parametrize("name", list(ttr.PRESETS))
def test_every_parameter_gets_a_finite_gradient(name):
    torch.manual_seed(0)
    layer = ttr.TTRLayer(32, 2, name)
    x = torch.randn(2, 40, 32)
    reached = set()
    # two steps: a low-rank product started with a zero factor (RWKV-6's LoRAs) gives the other factor its
    # gradient only once the zero one has moved
    for _ in range(2):
        layer.zero_grad()
        y, _ = layer(x)
        y.square().mean().backward()
        for pname, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            if p.grad.abs().sum() > 0:
                reached.add(pname)
        with torch.no_grad():
            for p in layer.parameters():
                p -= 0.1 * p.grad
    assert reached == {pname for pname, _ in layer.named_parameters()}


def test_short_conv_is_causal_and_caches():
    conv = ShortConv(3, 4).double()
    x = torch.randn(1, 10, 3, dtype=torch.float64)
    y, cache = conv(x)
    x2 = x.clone()
    x2[:, 6:] += 1.0  # changing the future leaves the past untouched
    assert torch.equal(conv(x2)[0][:, :6], y[:, :6])
    y_a, c = conv(x[:, :7])
    y_b, _ = conv(x[:, 7:], c)
    assert torch.allclose(torch.cat([y_a, y_b], 1), y, atol=1e-14)
    assert torch.equal(cache, x[:, -3:])


def test_shift_conv_makes_keys_previous_inputs():
    """k_t = x_{t-1}: a short conv with weight on the previous step is the slides' bigram construction."""
    conv = ShortConv(2, 2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, 0] = 1.0  # taps are ordered oldest first: tap 0 multiplies x_{t-1}
        conv.bias.zero_()
    x = torch.randn(1, 6, 2)
    y, _ = conv(x)
    assert torch.equal(y[:, 1:], x[:, :-1]) and torch.equal(y[:, 0], torch.zeros(1, 2))


@pytest.mark.parametrize("name", list(ttr.PRESETS))
def test_gates_are_log_gates_of_the_right_shape(name):
    preset = ttr.get_preset(name)
    weights = preset.recipe.weights
    modules = make_inputs(preset.recipe, 16, 2, 8, gate=preset.gate)
    if isinstance(weights, ttr.Uniform):
        assert "g" not in modules
        return
    x, q, k, v = torch.randn(3, 5, 16) * 10, *torch.randn(3, 3, 5, 2, 8)
    made = {}
    for module in modules.values():  # a joint module makes several inputs, from the layer's q, k, v too
        made.update(module(x, q, k, v)[3] if getattr(module, "joint", False) else {})
    g = made["g"] if "g" in made else modules["g"](x)
    want = {ttr.VectorGate: (3, 5, 2, 8), ttr.ComplexGate: (3, 5, 2, 8), ttr.EntryGate: (3, 5, 2, 8, 8)}
    assert g.shape == want.get(type(weights), (3, 5, 2)) and (g <= 0).all() and torch.isfinite(g).all()
    if isinstance(weights, ttr.ComplexGate):
        assert made["angle"].shape == g.shape and torch.isfinite(made["angle"]).all()


def test_retnet_decays_per_head():
    assert torch.allclose(ttr.FixedDecay.log_gamma(4), torch.log(1 - 2.0 ** (-5 - torch.arange(4.0))).double())
    gate = make_gate(ttr.FixedDecay(), 8, 4, 2)
    assert torch.allclose(gate(torch.randn(2, 3, 8))[0, 0].exp(), 1 - 2.0 ** (-5 - torch.arange(4.0)))


def test_gla_gate_is_logsigmoid_over_sixteen():
    gate = make_gate(ttr.VectorGate(), 8, 2, 4)
    with torch.no_grad():
        gate.up.weight.zero_()
        gate.up.bias.zero_()
    assert torch.allclose(gate(torch.randn(1, 2, 8)), torch.full((1, 2, 2, 4), float(F.logsigmoid(torch.tensor(0.0))) / 16))


def test_deltaproduct_layer_makes_n_keys_per_token():
    layer = ttr.TTRLayer(16, 2, "deltaproduct")
    assert layer.n_steps == 2 and layer.qkv.out_features == 5 * 16
    assert layer.inputs["beta"](torch.randn(1, 3, 16)).shape == (1, 3, 2, 2)


def test_layer_accepts_recipe_and_rejects_unknown_preset():
    recipe = ttr.Recipe(ttr.ScalarGate(), ttr.Linear("elu1"), ttr.BatchGD())
    y, _ = ttr.TTRLayer(16, 2, recipe)(torch.randn(1, 5, 16))
    assert y.shape == (1, 5, 16)
    with pytest.raises(ValueError, match="unknown preset"):
        ttr.TTRLayer(16, 2, "no_such_memory")


def test_qknorm_layer_learns_its_temperature():
    """QKNorm's scale is a parameter per head, starting at log2(L^2 - L), L = 1024 (Henry et al.), and it trains."""
    torch.manual_seed(0)
    layer = ttr.TTRLayer(32, 2, "softmax_qknorm")
    assert torch.allclose(layer.log_qk_scale.exp(), torch.full((2,), 19.9986), atol=1e-3)
    y, _ = layer(torch.randn(2, 12, 32))
    y.square().sum().backward()
    assert layer.log_qk_scale.grad is not None and bool((layer.log_qk_scale.grad != 0).all())
