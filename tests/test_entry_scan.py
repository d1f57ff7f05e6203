"""ops._entry.chunked_entry, the per-entry gate's (Mamba) chunk form with a hand-written backward, against the
literal regression (ttr.oracle, float64) and gd.py's recurrent form (_recurrent, autograd through token steps):
outputs, final states and gradients (q, k, v, g, s0, through the outputs and a weighted sum of the final state),
in float64 at lengths that are not multiples of the chunk, with chunks run side by side or one by one; strong
decays (g down to -80 per token) in float32, finite and equal to float64; gradcheck on a tiny case."""

import pytest
import torch

from ttr import oracle
from ttr.ops import gd
from ttr.ops._entry import _plan, chunked_entry

from conftest import F64_ATOL, max_rel


def _inputs(B, T, H, Dk, Dv, *, s0, dtype=torch.float64, seed=0, gate=None):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, T, H, Dk, Dv, generator=gen, dtype=torch.float64) if gate is None else gate(gen)
    state = torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64) if s0 else None
    w_o = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
    w_s = torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64)
    cast = [x if x is None else x.to(dtype).requires_grad_() for x in (q, k, v, g, state)]
    return cast, (w_o.to(dtype), w_s.to(dtype))


def _run(form, inputs, weights, wrt=None):
    """(o, final state, gradients of sum(w_o o) + sum(w_s state) w.r.t. the inputs that require them)."""
    q, k, v, g, s0 = inputs
    o, state = form(q, k, v, g, s0)
    wrt = [x for x in inputs if x is not None and x.requires_grad] if wrt is None else wrt
    loss = (o * weights[0]).sum() + (state * weights[1]).sum()
    return [o, state, *torch.autograd.grad(loss, wrt)]


def _reference(C):
    return {"oracle": lambda q, k, v, g, s0: oracle.parametric(q, k, v, g, optimizer=oracle.BatchGD(), scale=1.0,
                                                               initial_state=s0),
            "recurrent": lambda q, k, v, g, s0: gd._recurrent(q, k, v, g, None, s0)}


@pytest.mark.parametrize("T", [13, 37])
@pytest.mark.parametrize("C", [4, 16])
@pytest.mark.parametrize("s0", [False, True])
@pytest.mark.parametrize("parallel", [None, 1, 3])
def test_equals_the_oracle_and_the_recurrent_form(T, C, s0, parallel):
    inputs, weights = _inputs(2, T, 2, 4, 3, s0=s0)
    got = _run(lambda *x: chunked_entry(*x, C, parallel=parallel), inputs, weights)
    assert len(got) == 2 + 4 + s0
    for name, form in _reference(C).items():
        ref = _run(form, inputs, weights)
        for what, a, b in zip(["o", "state", "dq", "dk", "dv", "dg", "ds0"], got, ref):
            assert a.shape == b.shape and max_rel(a, b) < F64_ATOL, (name, what, max_rel(a, b))


def test_plan_covers_every_token_once():
    for T in range(0, 70):
        for C in (1, 4, 16):
            for M in (1, 3, 8):
                plan = _plan(T, C, M)
                tokens = [t for t0, m, c, _ in plan for t in range(t0, t0 + m * c)]
                assert tokens == list(range(T))
                assert [j for *_, j in plan] == [sum(m for _, m, _, _ in plan[:i]) for i in range(len(plan))]
                assert all(1 <= m <= M and c <= C for _, m, c, _ in plan)


def test_gradients_through_one_output_only_and_without_a_gate_gradient():
    """backward with no gradient for the final state, none for the outputs, and g not requiring one (dg skipped)."""
    inputs, weights = _inputs(1, 29, 3, 5, 4, s0=True, seed=1)
    q, k, v, g, s0 = inputs
    for form in (lambda *x: chunked_entry(*x, 8), _reference(8)["recurrent"]):
        o, state = form(q, k, v, g, s0)
        assert o.shape == (1, 29, 3, 4)
    for pick in (0, 1):
        grads = []
        for form in (lambda *x: chunked_entry(*x, 8, parallel=2), _reference(8)["recurrent"]):
            out = form(q, k, v, g, s0)[pick]
            grads.append(torch.autograd.grad((out * weights[pick]).sum(), [q, k, v, g, s0], materialize_grads=True))
        assert all(max_rel(a, b) < F64_ATOL for a, b in zip(*grads))
    g_fixed = g.detach()
    got, ref = (_run(form, [q, k, v, g_fixed, s0], weights, wrt=[q, k, v, s0])
                for form in (lambda *x: chunked_entry(*x, 4, parallel=3), _reference(4)["recurrent"]))
    assert all(max_rel(a, b) < F64_ATOL for a, b in zip(got, ref))


def test_non_contiguous_inputs():
    inputs, weights = _inputs(2, 21, 2, 4, 3, s0=True, seed=2)
    q, k, v, g, s0 = inputs
    g_strided = g.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # [B, T, H, ...] strides
    q_strided = q.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not g_strided.is_contiguous() and not q_strided.is_contiguous()
    got = _run(lambda *x: chunked_entry(*x, 4), [q_strided, k, v, g_strided, s0], weights)
    ref = _run(_reference(4)["recurrent"], inputs, weights)
    assert all(max_rel(a, b) < F64_ATOL for a, b in zip(got, ref))


def test_strong_decays_in_float32_are_finite_and_exact():
    """g down to -80 per token: a whole token's gate at -80 wipes the state (exp(-80) underflows float32's products
    to 0), a fifth of the entries decay at -80, the rest mildly; no exponent > 0 is ever formed, so float32 stays
    finite and within 1e-5 of float64."""
    def gate(gen):
        g = -0.3 * torch.rand(1, 45, 2, 8, 6, generator=gen, dtype=torch.float64)
        strong = torch.rand(g.shape, generator=gen, dtype=torch.float64) < 0.2
        g = torch.where(strong, -80 + 20 * torch.rand(g.shape, generator=gen, dtype=torch.float64), g)
        g[:, 7] = -80.0
        g[:, 30, 1] = -80.0
        return g

    for C, parallel in ((4, None), (16, 2), (8, 1)):
        got = _run(lambda *x: chunked_entry(*x, C, parallel=parallel),
                   *_inputs(1, 45, 2, 8, 6, s0=True, dtype=torch.float32, seed=3, gate=gate))
        ref = _run(_reference(C)["recurrent"], *_inputs(1, 45, 2, 8, 6, s0=True, seed=3, gate=gate))
        for what, a, b in zip(["o", "state", "dq", "dk", "dv", "dg", "ds0"], got, ref):
            assert a.dtype == torch.float32 and bool(torch.isfinite(a).all()), what
            assert max_rel(a, b) < 1e-5, (C, what, max_rel(a, b))


def test_gradcheck():
    inputs, _ = _inputs(1, 7, 2, 3, 2, s0=True, seed=4)
    assert torch.autograd.gradcheck(lambda *x: chunked_entry(*x, 2, parallel=2), inputs)


def test_the_graph_keeps_the_inputs_and_one_state_per_chunk():
    """Memory linear in T: besides its inputs, the backward keeps each chunk's start state, nothing per token."""
    B, T, H, Dk, Dv, C = 1, 50, 2, 4, 3, 8
    inputs, _ = _inputs(B, T, H, Dk, Dv, s0=False, seed=5)
    o, state = chunked_entry(*inputs, C)
    saved = o.grad_fn.saved_tensors
    extra = sum(x.numel() for x in saved) - sum(x.numel() for x in inputs if x is not None)
    assert extra == -(-T // C) * B * H * Dk * Dv
