"""The oracle itself: each literal solver against an independent closed form, and the paper's claims."""

import torch

from ttr import oracle
from ttr.weights import gamma_matrix

from conftest import F64_ATOL, make_gate, make_qkv


def test_gamma_is_product_of_decays():
    g = make_gate("vector", B=1, T=9, H=1, D=3)
    gamma = gamma_matrix(g, 9)
    alpha = torch.exp(g[0, :, 0])  # [T, D]
    for t in range(9):
        for i in range(9):
            want = torch.prod(alpha[i + 1: t + 1], dim=0) if i <= t else torch.zeros(3, dtype=torch.float64)
            assert torch.allclose(gamma[0, 0, t, i], want, atol=1e-14, rtol=1e-12)


def test_one_gd_step_is_weighted_sum_of_outer_products():
    """'Linear attention is one step of batch GD': M_t = sum_i gamma_i^(t) v_i k_i^T."""
    q, k, v = make_qkv(B=1, T=11, H=1)
    g = make_gate("scalar", B=1, T=11, H=1)
    y, state = oracle.parametric(q, k, v, g, optimizer=oracle.BatchGD(), scale=1.0)
    gamma = gamma_matrix(g, 11)[0, 0, :, :, 0]
    for t in range(11):
        M = sum(gamma[t, i] * torch.outer(v[0, i, 0], k[0, i, 0]) for i in range(t + 1))
        assert torch.allclose(y[0, t, 0], M @ q[0, t, 0], atol=F64_ATOL)
    assert torch.allclose(state[0, 0], M.T, atol=F64_ATOL)


def test_exact_recalls_perfectly_and_equals_gd_on_orthonormal_keys():
    """Kohonen's memory: with orthonormal keys one GD step is already the exact (Newton) solution."""
    D, T = 8, 6
    keys = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))[0][:, :T].T  # [T, D], orthonormal rows
    k = keys[None, :, None]
    v = torch.randn(1, T, 1, 5, dtype=torch.float64)
    y_gd, _ = oracle.parametric(k, k, v, optimizer=oracle.BatchGD(), scale=1.0)
    y_exact, _ = oracle.parametric(k, k, v, optimizer=oracle.Exact(), scale=1.0)
    assert torch.allclose(y_gd, v, atol=F64_ATOL)
    assert torch.allclose(y_exact, v, atol=1e-9)


def test_exact_matches_normal_equations_with_ridge():
    q, k, v = make_qkv(B=1, T=7, H=1, Dk=4, Dv=3)
    y, _ = oracle.parametric(q, k, v, optimizer=oracle.Exact(ridge=0.5), scale=1.0)
    K, V = k[0, :, 0], v[0, :, 0]
    M = V.T @ K @ torch.linalg.inv(K.T @ K + 0.5 * torch.eye(4, dtype=torch.float64))
    assert torch.allclose(y[0, -1, 0], M @ q[0, -1, 0], atol=F64_ATOL)


def test_many_small_gd_steps_converge_to_exact():
    q, k, v = make_qkv(B=1, T=12, H=1, Dk=3, Dv=2)
    y_exact, _ = oracle.parametric(q, k, v, optimizer=oracle.Exact(), scale=1.0)
    y_gd, _ = oracle.parametric(q, k, v, optimizer=oracle.BatchGD(steps=400, lr=0.02), scale=1.0)
    # From t = 3 on the problem is overdetermined (3 unknown columns), so GD converges to the unique solution.
    assert torch.allclose(y_gd[:, 5:], y_exact[:, 5:], atol=1e-6)


def test_local_constant_is_weighted_mean():
    q, k, v = make_qkv(B=1, T=9, H=1)
    y = oracle.local_constant(q, k, v, feature_map="elu1")
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    for t in range(9):
        w = fk[0, : t + 1, 0] @ fq[0, t, 0]
        assert torch.allclose(y[0, t, 0], (w[:, None] * v[0, : t + 1, 0]).sum(0) / w.sum(), atol=F64_ATOL)


def test_local_constant_with_gate_and_carried_state_is_weighted_mean():
    """The carried state (sum gamma phi(k) v^T, sum gamma phi(k)) enters as earlier associations would."""
    q, k, v = make_qkv(1, 7, 1, 3, 2)
    g = make_gate("vector", 1, 7, 1, 3)
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    # the state of three earlier associations, decayed to the start of the call
    k0, v0 = torch.rand(3, 3, dtype=torch.float64) + 0.1, torch.randn(3, 2, dtype=torch.float64)
    s0 = torch.cat([k0.T @ v0, k0.sum(0)[:, None]], dim=1)[None, None]
    y = oracle.local_constant(q, k, v, g, feature_map="elu1", initial_state=s0)
    G = g[0, :, 0].cumsum(0)
    for t in range(7):
        w_old = (torch.exp(G[t]) * k0) @ fq[0, t, 0]
        w_new = torch.stack([(torch.exp(G[t] - G[i]) * fk[0, i, 0]) @ fq[0, t, 0] for i in range(t + 1)])
        want = ((w_old[:, None] * v0).sum(0) + (w_new[:, None] * v[0, : t + 1, 0]).sum(0)) / (w_old.sum() + w_new.sum())
        assert torch.allclose(y[0, t, 0], want, atol=F64_ATOL)
