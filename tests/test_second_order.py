"""Gradients of gradients (create_graph=True: Hessian-vector products, second-order methods) through the chunk
forms, whose backward is written out: they equal the recurrent form's, which autograd differentiates throughout,
in every input, the log-gate included."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hvp

from ttr.ops import delta_rule, linear_attention, titans, ttt_linear, ttt_mlp

from conftest import make_qkv, max_rel

B, T, H, D = 1, 11, 2, 4
_GEN = torch.Generator().manual_seed(7)
_RATE = 0.4 * torch.rand(B, T, H, generator=_GEN, dtype=torch.float64)
MILD = -0.3 * torch.rand(B, T, H, D, generator=_GEN, dtype=torch.float64)  # a chunk's decay factors: _Plain

OPS = {
    "linear_attention": lambda q, k, v, s, g, m: linear_attention(q, k, v, initial_state=s, output_final_state=True,
                                                               mode=m, chunk_size=4),
    "gla": lambda q, k, v, s, g, m: linear_attention(q, k, v, g, initial_state=s, output_final_state=True, mode=m,
                                                  chunk_size=4),
    "rwkv6": lambda q, k, v, s, g, m: linear_attention(q, k, v, g, bonus=torch.ones(H, D, dtype=q.dtype),  # blocked
                                                    initial_state=s, output_final_state=True, mode=m, chunk_size=4),
    "gated_delta_rule": lambda q, k, v, s, g, m: delta_rule(q, F.normalize(k, dim=-1), v, _RATE, g[..., 0],
                                                         initial_state=s, output_final_state=True, mode=m,
                                                         chunk_size=4),
    "ttt_linear": lambda q, k, v, s, g, m: ttt_linear(q, k, v, 0.1 * _RATE, batch_size=2, initial_state=s,
                                                   output_final_state=True, mode=m, chunk_size=4),
    "titans": lambda q, k, v, s, g, m: titans(q, k, v, 0.1 * _RATE, torch.full_like(_RATE, 0.5), g[..., 0],
                                           batch_size=2, initial_state=(s, s), output_final_state=True, mode=m,
                                           chunk_size=4),
    "ttt_mlp": lambda q, k, v, s, g, m: ttt_mlp(q, k, v, 0.1 * _RATE, batch_size=2, initial_state=(s, s.mT),
                                             output_final_state=True, mode=m),
}


def _weights(op, out, state):
    """The op's answer and final weights, as one tensor each."""
    return out, state if isinstance(state, torch.Tensor) else state.weights[0]


@pytest.mark.parametrize("op", sorted(OPS))
def test_hessian_vector_products_equal_the_recurrent_form(op):
    q, k, v = make_qkv(B, T, H, D, D)
    s0 = torch.randn(B, H, D, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    inputs = (q, k, v, s0, MILD)
    direction = tuple(torch.randn_like(x) for x in inputs)

    def loss(mode):
        def f(q, k, v, s, g):
            out, state = _weights(op, *OPS[op](q, k, v, s, g, mode))
            return ((out * w).sum() + state.sum()) ** 2
        return f

    chunk = hvp(loss("chunk"), inputs, direction)[1]
    recurrent = hvp(loss("recurrent"), inputs, direction)[1]
    for a, b in zip(chunk, recurrent):
        assert max_rel(a, b) < 1e-9


def test_one_token_chunks_take_strong_scalar_gates_in_float32():
    """chunk_size 1: no span is checked, so the decays are not factored (k exp(-g) would overflow at g = -90)."""
    q, k, v = make_qkv(B, 5, 1, D, D, dtype=torch.float32)
    g = torch.full((B, 5, 1), -90.0)
    got = linear_attention(q, k, v, g, chunk_size=1)[0]
    want = linear_attention(q.double(), k.double(), v.double(), g.double(), mode="recurrent")[0]
    assert max_rel(got.double(), want) < 1e-5


def test_ttt_mlp_hessian_vector_products_through_the_start_weights():
    """The written-out pass's start weights (the state a resumed call takes its gradients at) differentiate twice
    as the recurrent form's: the reference the second order redoes returns them too."""
    q, k, v = make_qkv(B, T, H, D, D)
    s0 = torch.randn(B, H, D, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inputs = (q, k, v, s0)
    direction = tuple(torch.randn_like(x) for x in inputs)

    def loss(mode):
        def f(q, k, v, s):
            _, state = ttt_mlp(q, k, v, 0.1 * _RATE, batch_size=2, initial_state=(s, s.mT), output_final_state=True,
                               mode=mode)
            return (state.start[0].sum() + state.start[1].sum()) ** 2
        return f

    chunk = hvp(loss("chunk"), inputs, direction)[1]
    recurrent = hvp(loss("recurrent"), inputs, direction)[1]
    for a, b in zip(chunk, recurrent):
        assert (a - b).abs().max() <= 1e-9 * b.abs().max().clamp_min(1.0)
