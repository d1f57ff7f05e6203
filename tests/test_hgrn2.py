"""HGRN-2: GLA's vector-gated linear attention with the key tied to the forget gate (k = 1 - f, g = log f), a query
through SiLU, and a lower bound on f that grows with depth; in a layer, with GQA and masks, and in a model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ttr import ops
from ttr.layers import TTRLayer
from ttr.layers.gates import HGRN2Gate, make_inputs
from ttr.models import LanguageModel, LMConfig
from ttr.recipe import Preset, get_preset


def capture_op_call(layer: TTRLayer) -> dict:
    """Replace the layer's op by one that records its arguments and runs it."""
    seen, op = {}, layer.op

    def spy(q, k, v, **kw):
        seen.update(q=q, k=k, v=v, **kw)
        return op(q, k, v, **kw)
    spy.func = op.func
    layer.op = spy
    return seen


@pytest.mark.parametrize("num_kv_heads, conv_size", [(None, 4), (1, 0), (2, 4)])
@torch.no_grad()
def test_layer_calls_the_gla_op_with_k_one_minus_f_and_g_log_f(num_kv_heads, conv_size):
    torch.manual_seed(0)
    d, H, Dk = 32, 4, 8
    layer = TTRLayer(d, H, "hgrn2", num_kv_heads=num_kv_heads, conv_size=conv_size, layer_idx=1, n_layers=3,
                     chunk_size=4)
    assert layer.op.func is ops.linear_attention and layer.joint == ["g"]
    seen = capture_op_call(layer)
    x = torch.randn(2, 11, d)
    y, _ = layer(x)
    # q, f's pre-activation and v straight from the layer's projections (and convolution)
    qkv = layer.qkv(x)
    if layer.conv is not None:
        qkv, _ = layer.conv(qkv, None, None)
    q, z, v = qkv.split(layer.widths, dim=-1)
    Hkv = layer.num_kv_heads
    z = z.view(2, 11, Hkv, Dk)
    lb = torch.sigmoid(layer.inputs["g"].bound_logit)
    f = lb + (1 - lb) * torch.sigmoid(z)
    rep = lambda t: t.repeat_interleave(H // Hkv, dim=2)  # noqa: E731
    torch.testing.assert_close(seen["g"], rep(f.log()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["k"], rep(1 - f), rtol=1e-5, atol=1e-6)
    assert torch.equal(seen["k"], -torch.expm1(seen["g"]))  # the key is exactly 1 - exp(g)
    assert torch.equal(seen["q"], F.silu(q.view(2, 11, H, Dk)))
    assert torch.equal(seen["v"], rep(v.view(2, 11, Hkv, Dk)))
    # the layer's output is the GLA op's on those tensors, then the norm, the output gate and the projection
    o, _ = ops.linear_attention(seen["q"], seen["k"], seen["v"], g=seen["g"], mode="chunk", chunk_size=4)
    o = layer.norm(o).reshape(2, 11, -1) * F.silu(layer.out_gate(x))
    assert torch.equal(layer.out(o), y)
    # ...and the recurrent form of the GLA op agrees
    o_rec, _ = ops.linear_attention(seen["q"], seen["k"], seen["v"], g=seen["g"], mode="recurrent")
    torch.testing.assert_close(layer.out(layer.norm(o_rec).reshape(2, 11, -1) * F.silu(layer.out_gate(x))), y,
                               rtol=1e-4, atol=1e-5)


def test_lower_bound_grows_with_depth_and_bounds_f():
    L = 4
    gates = [HGRN2Gate(2, 8, i, L) for i in range(L)]
    assert gates[0].lower_bound() is None  # the first layer forgets freely
    bounds = [0.0] + [float(g.lower_bound().detach().mean()) for g in gates[1:]]
    assert bounds == pytest.approx([i / L for i in range(L)])  # HGRN's initialization, layer_idx / n_layers
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    z = torch.randn(3, 5, 2, 8) * 20  # saturated pre-activations too
    for i, gate in enumerate(gates):
        _, k, _, made = gate(None, torch.randn(3, 5, 2, 8), z, None)
        g = made["g"]
        f = g.exp()
        assert bool((g <= 0).all()) and bool((f >= bounds[i] - 1e-6).all())
        torch.testing.assert_close(k, 1 - f)
    # a layer not told its depth has no bound, like layer 0
    assert HGRN2Gate(2, 8).lower_bound() is None
    with pytest.raises(ValueError, match="layer_idx"):
        HGRN2Gate(2, 8, 4, 4)
    with pytest.raises(ValueError, match="both"):
        HGRN2Gate(2, 8, 1)


def test_model_layers_get_increasing_bounds():
    model = LanguageModel(LMConfig(vocab_size=16, d_model=32, n_layers=3, n_heads=2, memory="hgrn2"))
    gates = [b.layer.inputs["g"] for b in model.blocks]
    assert [g.layer_idx for g in gates] == [0, 1, 2]
    assert gates[0].lower_bound() is None
    assert float(gates[1].lower_bound().detach().max()) < float(gates[2].lower_bound().detach().min())
    assert math.isclose(float(gates[2].lower_bound().detach().mean()), 2 / 3, rel_tol=1e-6)


def test_preset_and_gate_are_checked():
    p = get_preset("hgrn2")
    assert p.gate == "hgrn2" and "k = 1 - f" in p.parameterization and "Deviation" in p.parameterization
    with pytest.raises(ValueError, match="gate"):
        Preset("x", "x", get_preset("mamba2").recipe, "", "", gate="hgrn2")
    with pytest.raises(ValueError, match="gate"):
        Preset("x", "x", p.recipe, "", "", gate="nope")
    with pytest.raises(ValueError, match="unknown gate"):
        make_inputs(p.recipe, 8, 2, 4, gate="nope")
    # the recipe alone (no preset) is GLA's parameterization: a free key
    assert TTRLayer(16, 2, p.recipe).joint == []


def tiny(**kw) -> LanguageModel:
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=2, memory="hgrn2", chunk_size=4, init_std=0.3,
                   **kw)
    return LanguageModel(cfg).eval()


@pytest.mark.parametrize("kw", [{}, {"num_kv_heads": 1}])
@torch.no_grad()
def test_model_prefill_then_decode_equals_one_forward_and_padding_changes_nothing(kw):
    model = tiny(**kw)
    ids = torch.randint(0, 40, (3, 13), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache = model.new_cache()
    steps = [model(ids[:, :6], cache)] + [model(ids[:, t:t + 1], cache) for t in range(6, 13)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    # a padded batch (left padding in row 1, right padding in row 2) equals each row alone
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, 9:] = 0
    padded = model(ids, attention_mask=mask)
    torch.testing.assert_close(padded[0], model(ids[:1])[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[1, 5:], model(ids[1:2, 5:])[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(padded[2, :9], model(ids[2:, :9])[0], rtol=1e-4, atol=1e-4)
    # left-padded prefill, then decoding
    cache = model.new_cache()
    out = [model(ids[:2, :8], cache, mask[:2, :8])] + [model(ids[:2, t:t + 1], cache) for t in range(8, 13)]
    torch.testing.assert_close(torch.cat(out, 1)[1, 5:], model(ids[1:2, 5:])[0], rtol=1e-4, atol=1e-4)
    assert cache.seen.tolist() == [13, 8]


def test_gradients_reach_the_bound_and_the_gate():
    layer = TTRLayer(16, 2, "hgrn2", layer_idx=1, n_layers=2)
    y, _ = layer(torch.randn(2, 7, 16))
    y.square().sum().backward()
    assert layer.inputs["g"].bound_logit.grad.abs().sum() > 0 and layer.qkv.weight.grad.abs().sum() > 0
