"""RWKV-6's bonus u in ops.linear_attention: the newest association weighed by u, the earlier ones not yet decayed
by the current gate. Chunk form == recurrent form == the literal weighted regression (oracle), outputs, final
states and gradients, on lengths that are not multiples of the chunk, with initial states and packed sequences;
and equal to RWKV-6's recurrence as its paper writes it."""

import pytest
import torch

from ttr import oracle
from ttr.ops import linear_attention

from conftest import F64_ATOL, make_gate, make_qkv, max_rel

B, T, H, D, DV = 2, 13, 2, 8, 6
GATES = [None, "scalar", "vector"]


def _bonus(requires_grad=False, seed=5):
    u = torch.randn(H, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u.requires_grad_(requires_grad)


def _state(seed=3, requires_grad=False):
    s = torch.randn(B, H, D, DV, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return s.requires_grad_(requires_grad)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_bonus_equals_the_literal_regression(gate, mode):
    q, k, v = make_qkv(B, T, H, D, DV)
    g, u, s0 = make_gate(gate, B, T, H, D), _bonus(), _state()
    ref, ref_state = oracle.parametric(q, k, v, g, optimizer=oracle.BatchGD(), bonus=u, initial_state=s0)
    o, state = linear_attention(q, k, v, g, bonus=u, initial_state=s0, output_final_state=True, mode=mode,
                                chunk_size=4)
    assert max_rel(o, ref) < F64_ATOL and max_rel(state, ref_state) < F64_ATOL
    # the carried state is the one without a bonus: u changes what is read, not what is stored
    _, plain = linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, mode=mode, chunk_size=4)
    assert torch.equal(state, plain) or max_rel(state, plain) < F64_ATOL


@pytest.mark.parametrize("gate", GATES)
def test_bonus_equals_rwkv6_as_written(gate):
    """RWKV-6 (Peng et al., 2024): wkv_t = diag(u) k_t^T v_t + sum_{i<t} diag(w_{i+1} ... w_{t-1}) k_i^T v_i,
    o_t = r_t wkv_t, with w = exp(g); scale 1."""
    r, k, v = make_qkv(B, T, H, D, DV, seed=7)
    g, u = make_gate(gate, B, T, H, D, seed=8), _bonus(seed=9)
    w = torch.ones(B, T, H, D, dtype=torch.float64) if g is None else torch.exp(g if g.dim() == 4 else g[..., None])
    out = torch.zeros(B, T, H, DV, dtype=torch.float64)
    for t in range(T):
        for i in range(t + 1):
            weight = u[None] if i == t else torch.prod(w[:, i + 1:t], dim=1)   # [B, H, D]
            out[:, t] += ((r[:, t] * weight * k[:, i]).sum(-1, keepdim=True)) * v[:, i]
    o, _ = linear_attention(r, k, v, g, bonus=u, scale=1.0, chunk_size=4)
    assert max_rel(o, out) < F64_ATOL


@pytest.mark.parametrize("gate", GATES)
def test_bonus_gradients_chunk_recurrent_oracle(gate):
    inputs = make_qkv(2, 9, H, 4, 3, requires_grad=True)
    g = make_gate(gate, 2, 9, H, 4, requires_grad=True)
    u = torch.randn(H, 4, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(2, H, 4, 3, dtype=torch.float64, requires_grad=True)
    leaves = [*inputs, u, s0] + ([] if g is None else [g])
    weights = torch.randn(2, 9, H, 3, dtype=torch.float64)
    state_weights = torch.randn(2, H, 4, 3, dtype=torch.float64)
    grads = []
    for run in ("chunk", "recurrent", "oracle"):
        if run == "oracle":
            o, s = oracle.parametric(*inputs, g, optimizer=oracle.BatchGD(), bonus=u, initial_state=s0)
        else:
            o, s = linear_attention(*inputs, g, bonus=u, initial_state=s0, output_final_state=True, mode=run,
                                    chunk_size=4)
        grads.append(torch.autograd.grad((o * weights).sum() + (s * state_weights).sum(), leaves))
    for chunk, recurrent, ref in zip(*grads):
        assert max_rel(chunk, ref) < 1e-9 and max_rel(recurrent, ref) < 1e-9


def test_bonus_state_carried_across_calls_and_packed_sequences():
    q, k, v = make_qkv(1, 21, H, D, DV)
    g, u = make_gate("vector", 1, 21, H, D), _bonus()
    whole, s_whole = linear_attention(q, k, v, g, bonus=u, output_final_state=True, chunk_size=4)
    first, s = linear_attention(q[:, :8], k[:, :8], v[:, :8], g[:, :8], bonus=u, output_final_state=True,
                                chunk_size=4)
    second, s = linear_attention(q[:, 8:], k[:, 8:], v[:, 8:], g[:, 8:], bonus=u, initial_state=s,
                                 output_final_state=True, mode="recurrent")
    assert max_rel(torch.cat([first, second], 1), whole) < F64_ATOL and max_rel(s, s_whole) < F64_ATOL
    cu = torch.tensor([0, 8, 8, 21])
    for mode in ("chunk", "recurrent"):
        packed, states = linear_attention(q, k, v, g, bonus=u, output_final_state=True, cu_seqlens=cu, mode=mode,
                                          chunk_size=4)
        assert max_rel(packed[:, :8], first) < F64_ATOL
        alone, s_alone = linear_attention(q[:, 8:], k[:, 8:], v[:, 8:], g[:, 8:], bonus=u, output_final_state=True)
        assert max_rel(packed[:, 8:], alone) < F64_ATOL and max_rel(states[2:], s_alone) < F64_ATOL
        assert not states[1].any()  # the empty sequence keeps a zero state


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_bonus_with_strong_decay_stays_finite_in_float32(gate):
    q, k, v = make_qkv(1, 64, H, D, DV, dtype=torch.float32)
    g = make_gate(gate, 1, 64, H, D, dtype=torch.float32, strength=60.0)
    u = _bonus().float()
    o_chunk, _ = linear_attention(q, k, v, g, bonus=u, chunk_size=16)
    o_rec, _ = linear_attention(q, k, v, g, bonus=u, mode="recurrent")
    assert bool(torch.isfinite(o_chunk).all()) and max_rel(o_chunk, o_rec) < 1e-5


@pytest.mark.parametrize("bonus, kwargs, match", [
    (torch.zeros(H, D + 1), {}, r"bonus must be a floating-point tensor \[H, D_phi\] = \[2, 8\]"),
    (torch.zeros(H, D, dtype=torch.long), {}, "bonus must be a floating-point tensor"),
    (torch.full((H, D), float("nan")), {}, "bonus holds non-finite values"),
    (torch.zeros(H, D), {"normalize": True, "feature_map": "elu1"}, "pass normalize=False"),
])
def test_bad_bonus_is_a_clear_error(bonus, kwargs, match):
    q, k, v = make_qkv(1, 5, H, D, DV, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, bonus=bonus, **kwargs)


@pytest.mark.parametrize("C, leaf", [(1, 1), (2, 1), (2, 2), (8, 1), (8, 2), (8, 8)])
@pytest.mark.parametrize("shifted", [False, True])
def test_vector_gate_scores_hand_written_backward(C, leaf, shifted):
    """The vector-gate scores (leaf blocks of `leaf` tokens, halving above them) against the explicit C x C x D sum,
    and their hand-written backward against torch's numerical gradient, for R = G (GLA) and R = G_{i-1} (RWKV-6's
    bonus), with a strong decay."""
    from ttr.ops.gd import _vector_gate_scores
    gen = torch.Generator().manual_seed(C)
    q, k = (torch.randn(2, 3, C, 4, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    G = (-3 * torch.rand(2, 3, C, 4, generator=gen, dtype=torch.float64)).cumsum(-2).requires_grad_()
    R = torch.nn.functional.pad(G.detach()[..., :-1, :], (0, 0, 1, 0)).requires_grad_() if shifted else G
    diagonal = torch.randn(2, 3, C, generator=gen, dtype=torch.float64, requires_grad=True)
    explicit = (q[..., :, None, :] * k[..., None, :, :] * torch.exp(R[..., :, None, :] - G[..., None, :, :])).sum(-1)
    explicit = explicit.tril(-1) + torch.diag_embed(diagonal)
    torch.testing.assert_close(_vector_gate_scores(q, k, G, R, diagonal, leaf), explicit, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *x: _vector_gate_scores(*x, leaf), (q, k, G, R, diagonal))
