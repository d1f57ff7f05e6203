"""Longer checks (`make test-slow`): the same equalities at sizes the default suite keeps small."""

import pytest
import torch
import torch.nn.functional as F

import ttr
from ttr import ops

from conftest import causal_presets, make_gate, make_qkv, max_rel

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("gate", [None, "scalar", "vector"])
def test_linear_attention_long_float32(gate):
    q, k, v = make_qkv(1, 8192, 2, 64, 64, dtype=torch.float32)
    g = make_gate(gate, 1, 8192, 2, 64, dtype=torch.float32)
    o_c, s_c = ops.linear_attention(q, k, v, g, output_final_state=True)
    o_r, s_r = ops.linear_attention(q, k, v, g, output_final_state=True, mode="recurrent")
    assert max_rel(o_c, o_r) < 1e-4 and max_rel(s_c, s_r) < 1e-4


def test_gated_delta_rule_very_long_float32():
    T = 32768
    q, k, v = make_qkv(1, T, 1, 32, 32, dtype=torch.float32)
    beta = torch.sigmoid(torch.randn(1, T, 1, generator=torch.Generator().manual_seed(0)))
    g = make_gate("scalar", 1, T, 1, dtype=torch.float32)
    o_c, s_c = ops.delta_rule(q, k, v, beta, g, output_final_state=True, qk_l2norm=True)
    o_r, s_r = ops.delta_rule(q, k, v, beta, g, output_final_state=True, mode="recurrent", qk_l2norm=True)
    assert torch.isfinite(o_c).all() and max_rel(o_c, o_r) < 1e-4 and max_rel(s_c, s_r) < 1e-4


@pytest.mark.parametrize("name", causal_presets())
def test_every_layer_decodes_token_by_token(name):
    """Prefill 200 tokens in chunk form, then decode 40 one at a time: equal to one pass over 240."""
    torch.manual_seed(0)
    layer = ttr.TTRLayer(64, 4, name).double()
    x = torch.randn(2, 240, 64, dtype=torch.float64)
    whole, _ = layer(x)
    y, state = layer(x[:, :200])
    outs = [y]
    for t in range(200, 240):
        y, state = layer(x[:, t: t + 1], state)
        outs.append(y)
    assert (torch.cat(outs, 1) - whole).abs().max() < 1e-9


def test_mesa_long_gated_chunk_equals_recurrent():
    q, k, v = make_qkv(1, 2048, 2, 32, 32)
    k = F.normalize(k, dim=-1)
    g = make_gate("scalar", 1, 2048, 2)
    beta = torch.sigmoid(torch.randn(1, 2048, 2, dtype=torch.float64))
    o_c, _ = ops.mesa(q, k, v, g, beta, lamb=0.5)
    o_r, _ = ops.mesa(q, k, v, g, beta, lamb=0.5, mode="recurrent")
    assert max_rel(o_c, o_r) < 1e-10


@pytest.mark.parametrize("qk_norm", [False, True])
def test_local_linear_long_float32_stays_finite_and_accurate(qk_norm):
    """T = 8192 in float32, order 1: finite everywhere, and the last 64 queries (each a fit over ~8k keys) agree
    with float64 to 1e-3 relative."""
    q, k, v = make_qkv(1, 8192, 1, 16, 16, dtype=torch.float32)
    o, _ = ops.local_polynomial_attention(q, k, v, order=1, ridge=0.1, qk_norm=qk_norm)
    assert bool(torch.isfinite(o).all())
    cache = (k[:, :-64].double(), v[:, :-64].double())
    tail, _ = ops.local_polynomial_attention(q[:, -64:].double(), k[:, -64:].double(), v[:, -64:].double(), order=1,
                                             ridge=0.1, qk_norm=qk_norm, initial_state=cache)
    assert max_rel(o[:, -64:], tail) < 1e-3
