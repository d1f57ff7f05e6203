"""mesa (the exact memory): chunk == recurrent == literal per-token ridge regression, gradients, carried
state, ill-conditioned keys, bad input. Groundwork of the second-order family."""

import threading

import pytest
import torch
import torch.nn.functional as F

from ttr import oracle
from ttr.bench import repeated_keys
from ttr.ops import mesa
from ttr.ops.newton import _eigh

from conftest import F64_ATOL, make_gate, make_qkv, max_rel


def _inputs(B, T, H, D, gated, seed=3):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B, T, H, D, D, seed=seed)
    beta = 0.1 + torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    g = make_gate("scalar", B, T, H) if gated else None
    X = torch.randn(B, H, D, D, generator=gen, dtype=torch.float64)
    state = (X @ X.transpose(-1, -2), torch.randn(B, H, D, D, generator=gen, dtype=torch.float64))
    return q, k, v, g, beta, state


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("lamb", [0.7, torch.tensor([0.5, 2.0]), torch.tensor([[0.5, 1.0, 2.0, 0.1, 1.0, 3.0]] * 2)])
@pytest.mark.parametrize("with_state", [False, True])
def test_mesa_equals_per_token_ridge_regression(gated, lamb, with_state):
    q, k, v, g, beta, state = _inputs(2, 37, 2, 6, gated)
    state = state if with_state else None
    y_o, s_o = oracle.ridge_regression(q, k, v, g, beta, lamb=lamb, initial_state=state)
    for mode in ("chunk", "recurrent"):
        y, s = mesa(q, k, v, g, beta, lamb=lamb, initial_state=state, output_final_state=True, mode=mode,
                    chunk_size=16)
        assert (y - y_o).abs().max() < 1e-9
        assert max_rel(s[0], s_o[0]) < F64_ATOL and max_rel(s[1], s_o[1]) < F64_ATOL


def test_mesa_with_one_association_per_direction_recalls_exactly():
    """Orthonormal keys, tiny ridge: the exact memory recalls every stored value (linear attention would too,
    but only because K^T K = I; with correlated keys only the exact memory does, see the next test)."""
    keys = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0].T[None, :, None]
    v = torch.randn(1, 8, 1, 8, dtype=torch.float64)
    y, _ = mesa(keys, keys, v, lamb=1e-6, scale=1.0, chunk_size=4)
    assert (y[:, -1:] - v[:, -1:]).abs().max() < 1e-5


def test_mesa_recalls_correlated_keys_where_linear_attention_cannot():
    from ttr.ops import linear_attention

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 8, generator=gen, dtype=torch.float64)
    keys = F.normalize(base + 0.3 * torch.randn(8, 8, generator=gen, dtype=torch.float64), dim=-1)[None, :, None]
    v = torch.randn(1, 8, 1, 4, generator=gen, dtype=torch.float64)
    q = keys.clone()
    y_mesa, _ = mesa(q, keys, v, lamb=1e-8, scale=1.0, chunk_size=4)
    y_la, _ = linear_attention(q, keys, v, scale=1.0)
    # at t = 8 the memory holds 8 associations in 8 dimensions: the exact one recalls the newest
    assert (y_mesa[:, -1] - v[:, -1]).abs().max() < 1e-5
    assert (y_la[:, -1] - v[:, -1]).abs().max() > 0.1


@pytest.mark.parametrize("gated", [False, True])
def test_mesa_gradients_match_oracle(gated):
    q, k, v, g, beta, state = _inputs(1, 11, 1, 4, gated)
    leaves = [x.requires_grad_() for x in (q, k, v, beta)] + ([g.requires_grad_()] if gated else [])
    w = torch.randn(1, 11, 1, 4, dtype=torch.float64)
    g_o = torch.autograd.grad((oracle.ridge_regression(q, k, v, g, beta, lamb=0.5)[0] * w).sum(), leaves)
    for mode in ("chunk", "recurrent"):
        y, _ = mesa(q, k, v, g, beta, lamb=0.5, mode=mode, chunk_size=4)
        for a, b in zip(torch.autograd.grad((y * w).sum(), leaves), g_o):
            assert max_rel(a, b) < 1e-8


@pytest.mark.parametrize("D", [6, 128])
def test_gated_chunks_with_sub_chunks_equal_the_oracle(D):
    """chunk_size 64 with decay: each chunk keeps the state and the read-out, its sub-chunks (four of 16 tokens
    at D = 6, two of 32 at D = 128) each get an eigenbasis. T = 70 (a partial last chunk), an initial state, a
    per-channel ridge: output, final state and every gradient equal per-token least squares."""
    q, k, v, g, beta, (P, H_kv) = _inputs(1, 70, 2, D, True)
    lamb = torch.linspace(0.2, 2.0, 2 * D, dtype=torch.float64).reshape(2, D)
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta, lamb, P, H_kv)]
    state = (0.5 * (P + P.transpose(-1, -2)), H_kv)  # H_kk moves as a symmetric matrix, as below
    w = torch.randn(1, 70, 2, D, dtype=torch.float64)
    y_o, s_o = oracle.ridge_regression(q, k, v, g, beta, lamb=lamb, initial_state=state)
    y, s = mesa(q, k, v, g, beta, lamb=lamb, initial_state=state, output_final_state=True, chunk_size=64)
    assert (y - y_o).abs().max() < 1e-10
    assert max_rel(s[0], s_o[0]) < F64_ATOL and max_rel(s[1], s_o[1]) < F64_ATOL
    grads = torch.autograd.grad((y * w).sum() + s[0].sum() + s[1].sum(), leaves, retain_graph=True)
    for a, b in zip(grads, torch.autograd.grad((y_o * w).sum() + s_o[0].sum() + s_o[1].sum(), leaves)):
        assert max_rel(a, b) < 1e-8


@pytest.mark.parametrize("gated", [False, True])
def test_mesa_gradients_reach_state_and_ridge_with_low_rank_statistics(gated):
    """d = 8 with 4-token chunks: H_kk at the second chunk has rank 4 (repeated zero eigenvalues, where an
    eigendecomposition's derivative is singular), yet the implicit backward gives the oracle's gradients in
    every input, the initial state and a per-channel ridge included."""
    q, k, v, g, beta, _ = _inputs(1, 13, 2, 8, gated)
    lamb = torch.linspace(0.3, 1.5, 16, dtype=torch.float64).reshape(2, 8)
    X = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    P, H_kv = (0.1 * X @ X.transpose(-1, -2)).requires_grad_(), torch.randn(1, 2, 8, 8, dtype=torch.float64)
    leaves = [x.requires_grad_() for x in (q, k, v, beta, lamb, P, H_kv)] + ([g.requires_grad_()] if gated else [])
    w = torch.randn(1, 13, 2, 8, dtype=torch.float64)

    def state():  # H_kk moves as a symmetric matrix (a Cholesky factorization reads only half of it)
        return 0.5 * (P + P.transpose(-1, -2)), H_kv

    g_o = torch.autograd.grad((oracle.ridge_regression(q, k, v, g, beta, lamb=lamb, initial_state=state())[0] * w)
                              .sum(), leaves)
    for mode in ("chunk", "recurrent"):
        y, _ = mesa(q, k, v, g, beta, lamb=lamb, initial_state=state(), mode=mode, chunk_size=4)
        for a, b in zip(torch.autograd.grad((y * w).sum(), leaves), g_o):
            assert max_rel(a, b) < 1e-8


@pytest.mark.parametrize("gated,solver,mode", [(False, "exact", "chunk"), (True, "exact", "chunk"),
                                               (True, "exact", "recurrent"), (False, "cg", "chunk"),
                                               (True, "cg", "recurrent")])
def test_mesa_gradcheck(gated, solver, mode):
    """Every input, a learned initial state included: H_kk is an unconstrained matrix here, of which the
    objective reads the symmetric part (it was differentiated as it stood: not symmetric, and 33-55 % off the
    recurrent form). CG at its default tolerance: its implicit gradients are the exact ones."""
    q, k, v, g, beta, (H_kk, H_kv) = _inputs(1, 6, 1, 3, gated)
    H_kk = H_kk + 0.3 * torch.randn(1, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    args = [x.requires_grad_() for x in (q, k, v, beta, H_kk, H_kv)] + ([g.requires_grad_()] if gated else [])

    def f(q, k, v, beta, H_kk, H_kv, *g):
        return mesa(q, k, v, g[0] if g else None, beta, lamb=0.7, chunk_size=4, solver=solver, mode=mode,
                    initial_state=(H_kk, H_kv))[0]

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("gated", [False, True])
def test_mesa_state_carried_across_calls(gated):
    q, k, v, g, beta, _ = _inputs(2, 40, 2, 6, gated)
    whole, s_whole = mesa(q, k, v, g, beta, lamb=0.3, output_final_state=True, chunk_size=16)
    outs, state = [], None
    for (a, b), mode in zip([(0, 5), (5, 6), (6, 40)], ["chunk", "recurrent", "chunk"]):
        o, state = mesa(q[:, a:b], k[:, a:b], v[:, a:b], None if g is None else g[:, a:b], beta[:, a:b], lamb=0.3,
                        initial_state=state, output_final_state=True, mode=mode, chunk_size=16)
        outs.append(o)
    assert (torch.cat(outs, 1) - whole).abs().max() < 1e-10
    assert max_rel(state[0], s_whole[0]) < F64_ATOL and max_rel(state[1], s_whole[1]) < F64_ATOL


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_eigh_split_over_threads_equals_torch(threads):
    """The gated form's eigendecompositions, the batch split over CPU threads (3 parts of 3, 3, 1 matrices here):
    torch's decomposition of every matrix, and torch's thread count as it was, also for threads started later
    (they take the count the workers set and restore)."""
    X = torch.randn(7, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A = (X @ X.transpose(-1, -2)).reshape(1, 7, 9, 9)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mu, U = _eigh(A)
        seen = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert torch.get_num_threads() == threads and seen == [threads]
    finally:
        torch.set_num_threads(before)
    mu_ref, _ = torch.linalg.eigh(A)
    assert mu.shape == (1, 7, 9) and U.shape == (1, 7, 9, 9)
    assert (mu - mu_ref).abs().max() < 1e-12 * mu_ref.abs().max()
    assert (U @ torch.diag_embed(mu) @ U.transpose(-1, -2) - A).abs().max() < 1e-12 * mu_ref.abs().max()
    assert (U.transpose(-1, -2) @ U - torch.eye(9, dtype=torch.float64)).abs().max() < 1e-12


@pytest.mark.parametrize("gated", [False, True])
def test_mesa_under_no_grad_and_inference_mode(gated):
    """The chunk form gives the same numbers when torch records no graph (the decoding and evaluation modes)."""
    q, k, v, g, beta, _ = _inputs(1, 40, 2, 8, gated)
    y, _ = mesa(q, k, v, g, beta, lamb=0.5)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y_mode, _ = mesa(q, k, v, g, beta, lamb=0.5)
        assert (y_mode - y).abs().max() < 1e-12


def test_mesa_float32_matches_float64_when_well_conditioned():
    """T >> d in float32 with a moderate ridge (ill-conditioned keys: the test above)."""
    gen = torch.Generator().manual_seed(1)
    q, v = torch.randn(1, 1024, 2, 16, generator=gen), torch.randn(1, 1024, 2, 16, generator=gen)
    k = F.normalize(torch.randn(1, 1024, 2, 16, generator=gen), dim=-1)
    g = F.logsigmoid(torch.randn(1, 1024, 2, generator=gen) + 5)
    for gate in (None, g):
        y_ref, _ = mesa(q.double(), k.double(), v.double(), None if gate is None else gate.double(), lamb=0.1)
        for mode in ("chunk", "recurrent"):
            y, _ = mesa(q, k, v, gate, lamb=0.1, mode=mode)
            assert torch.isfinite(y).all() and max_rel(y, y_ref) < 1e-3


@pytest.mark.parametrize("gated", [False, True])
def test_cg_forms_agree_and_converge_to_the_exact_solve(gated):
    """With a fixed budget (cg_tol=0) CG takes the same steps in both forms; in exact arithmetic d steps solve a
    d x d system."""
    q, k, v, g, beta, state = _inputs(2, 37, 2, 6, gated)
    exact, _ = mesa(q, k, v, g, beta, lamb=0.5, initial_state=state, chunk_size=16)
    errors = []
    for steps in (1, 2, 6):
        c, s_c = mesa(q, k, v, g, beta, lamb=0.5, initial_state=state, chunk_size=16, solver="cg", cg_steps=steps,
                      cg_tol=0, output_final_state=True)
        r, s_r = mesa(q, k, v, g, beta, lamb=0.5, initial_state=state, mode="recurrent", solver="cg",
                      cg_steps=steps, cg_tol=0, output_final_state=True)
        assert (c - r).abs().max() < 1e-10 and (s_c[0] - s_r[0]).abs().max() < 1e-10
        errors.append(float((c - exact).norm() / exact.norm()))
    assert errors[0] > errors[1] > 1e3 * errors[2] and errors[2] < 1e-8


def test_cg_gradients_agree_between_forms():
    q, k, v, g, beta, _ = _inputs(1, 13, 1, 4, True)
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta)]
    w = torch.randn(1, 13, 1, 4, dtype=torch.float64)
    grads = [torch.autograd.grad((mesa(q, k, v, g, beta, lamb=0.5, mode=m, solver="cg", cg_steps=3, cg_tol=0,
                                       chunk_size=8)[0] * w).sum(), leaves) for m in ("chunk", "recurrent")]
    for a, b in zip(*grads):
        assert max_rel(a, b) < 1e-9


@pytest.mark.parametrize("gated", [False, True])
def test_cg_gradient_reaches_a_zero_beta(gated):
    """An association weighted 0 still has a gradient in its weight. CG at its default tolerance has converged,
    so its implicit gradients equal the exact solve's, zero betas included."""
    q, k, v, g, beta, _ = _inputs(1, 21, 1, 4, gated)
    beta[0, [2, 5, 12], 0] = 0.0
    leaves = [x.requires_grad_() for x in (q, k, v, beta)]
    w = torch.randn(1, 21, 1, 4, dtype=torch.float64)
    grads = [torch.autograd.grad((mesa(q, k, v, g, beta, lamb=0.5, solver=solver, chunk_size=8)[0]
                                  * w).sum(), leaves) for solver in ("cg", "exact")]
    assert grads[1][3][0, [2, 5, 12], 0].abs().min() > 1e-3
    for a, b in zip(*grads):
        assert max_rel(a, b) < 1e-8


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("lamb,bound", [(1e-2, 2e-3), (1e-3, 2e-2)])
def test_float32_stays_accurate_with_ill_conditioned_keys(gated, lamb, bound):
    """T = 16384 associations on 3 repeated unit keys in d = 16 (condition ~ T / lamb), decay 0.999 when gated,
    float32 inputs: finite, and within `bound` (relative, whole output) of the float64 answer; the error of
    the chunk form grows like 1 / lamb (module docstring, Precision). Recurrent works in float64 inside."""
    T = 16384
    q, k, v = repeated_keys(T, 16, 3)
    g = torch.full((1, T, 1), -1e-3) if gated else None
    ref, _ = mesa(q.double(), k.double(), v.double(), None if g is None else g.double(), lamb=lamb)
    for mode, tol in (("chunk", bound), ("recurrent", 1e-6)):
        o, _ = mesa(q, k, v, g, lamb=lamb, mode=mode)
        assert o.dtype == torch.float32 and bool(torch.isfinite(o).all())
        assert float((o.double() - ref).norm() / ref.norm()) < tol


@pytest.mark.parametrize("gated", [False, True])
def test_float32_gradients_with_ill_conditioned_keys(gated):
    """Keys ill-conditioned enough (T / lamb = 2e6) that the statistics run in float64: gradients stay finite and
    within 1e-1 (relative, per input) of float64's; measured 1e-5 to 4e-2, the null-space part of S^-1 q (size
    |q| / lamb) rounded to float32 is what limits them."""
    T = 2048
    q, k, v = repeated_keys(T, 8, 3)
    g = torch.full((1, T, 1), -1e-3) if gated else None
    w = torch.randn(1, T, 1, 8, generator=torch.Generator().manual_seed(0))
    grads = []
    for dtype in (torch.float64, torch.float32):
        leaves = [x.to(dtype).clone().requires_grad_() for x in (q, k, v) + ((g,) if gated else ())]
        o, _ = mesa(*leaves[:3], leaves[3] if gated else None, lamb=1e-3)
        grads.append(torch.autograd.grad((o * w.to(dtype)).sum(), leaves))
    for a, b in zip(grads[1], grads[0]):
        assert bool(torch.isfinite(a).all()) and float((a.double() - b).norm() / b.norm()) < 1e-1


@pytest.mark.parametrize("gated,mode", [(False, "chunk"), (True, "chunk"), (False, "recurrent")])
def test_lost_definiteness_is_a_clear_error(gated, mode):
    """An initial H_kk that is not positive semi-definite (here -2 lamb I) leaves H_kk + lamb indefinite:
    every form says so instead of returning numbers."""
    q, k, v, g, beta, _ = _inputs(1, 20, 2, 4, gated)
    bad = (-2.0 * torch.eye(4, dtype=torch.float64).expand(1, 2, 4, 4), torch.zeros(1, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="not positive definite"):
        mesa(q, k, v, g, beta, lamb=1.0, initial_state=bad, mode=mode, chunk_size=8)


@pytest.mark.parametrize("kwargs,match", [
    ({"lamb": 1.0, "solver": "newton"}, "solver must be"),
    ({"lamb": 1.0, "solver": "cg", "cg_steps": -1}, "cg_steps"),
    ({"lamb": 0.0}, "must be positive"),
    ({"lamb": -1.0}, "must be positive"),
    ({"lamb": torch.ones(3)}, "lamb must be a scalar"),
    ({"lamb": 1.0, "beta": -torch.ones(1, 10, 2)}, r"beta must lie in \[0, inf\]"),
    ({"lamb": 1.0, "g": torch.zeros(1, 10, 2, 4)}, "scalar log-gate"),
    ({"lamb": 1.0, "initial_state": torch.zeros(1, 2, 4, 4)}, "pair"),
    ({"lamb": 1.0, "initial_state": (torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 3, 4))}, "H_kv"),
])
def test_mesa_bad_input(kwargs, match):
    q, k, v = make_qkv(1, 10, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        mesa(q, k, v, **kwargs)


def test_the_threaded_eigh_leaves_lapack_working_for_the_rest_of_the_process():
    """The gated exact form splits its eigendecompositions over threads; setting torch's thread count from a worker
    thread once broke MKL's LU for the process: a later batched solve of a well-conditioned system raised."""
    from ttr.ops.newton import _eigh

    A = torch.randn(64, 16, 16, dtype=torch.float64)
    _eigh(A @ A.mT)
    M = torch.eye(153).expand(8, 153, 153) + 0.01 * torch.randn(8, 153, 153)
    x = torch.randn(8, 153, 16)
    assert torch.allclose(M @ torch.linalg.solve(M, x), x, atol=1e-4)
