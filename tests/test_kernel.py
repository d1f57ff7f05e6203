"""kernel_regression: every kernel == the literal per-prefix representer solve (float64), chunk (one
factorization, leading principal blocks) == recurrent (one appended factor row per token), the cache and
its carried factor, gradients, bad input."""

import pytest
import torch

from ttr import oracle
from ttr.ops import kernel_regression

from conftest import F64_ATOL, make_qkv, max_rel


@pytest.mark.parametrize("kernel", ["exp", "rbf", "poly"])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_kernel_regression_equals_the_literal_solve(kernel, mode):
    q, k, v = make_qkv(2, 13, 2, 4, 3)
    o, _ = kernel_regression(q, k, v, kernel=kernel, ridge=0.5, degree=3, mode=mode)
    assert max_rel(o, oracle.kernel_regression(q, k, v, kernel=kernel, ridge=0.5, degree=3)) < F64_ATOL


def test_kernel_regression_interpolates_with_a_vanishing_ridge():
    """RBF kernel, distinct keys, ridge 1e-9: querying a stored key returns its value (an interpolating memory)."""
    q, k, v = make_qkv(1, 12, 1, 4, 3)
    o, _ = kernel_regression(k, k, v, kernel="rbf", ridge=1e-9, scale=1.0)
    assert (o - v).abs().max() < 1e-5


def test_cache_and_decoding():
    q, k, v = make_qkv(1, 15, 2, 4, 3)
    whole, cache_whole = kernel_regression(q, k, v, ridge=0.7, output_final_state=True)
    _, cache = kernel_regression(q[:, :6], k[:, :6], v[:, :6], ridge=0.7, output_final_state=True)
    outs = []
    for t in range(6, 15):
        o, cache = kernel_regression(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], ridge=0.7, initial_state=cache,
                                     output_final_state=True)
        outs.append(o)
    ref = oracle.kernel_regression(q[:, 6:], k[:, 6:], v[:, 6:], kernel="exp", ridge=0.7, initial_state=(k[:, :6], v[:, :6]))
    assert max_rel(torch.cat(outs, 1), whole[:, 6:]) < F64_ATOL and max_rel(whole[:, 6:], ref) < F64_ATOL
    assert all(max_rel(a, b) < F64_ATOL for a, b in zip(cache, cache_whole))


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_a_cache_and_several_queries(mode):
    q, k, v = make_qkv(1, 15, 2, 4, 3)
    cache = (k[:, :6], v[:, :6])
    rest, _ = kernel_regression(q[:, 6:], k[:, 6:], v[:, 6:], ridge=0.7, initial_state=cache, mode=mode)
    ref = oracle.kernel_regression(q[:, 6:], k[:, 6:], v[:, 6:], kernel="exp", ridge=0.7, initial_state=cache)
    assert max_rel(rest, ref) < F64_ATOL


def test_the_carried_factor_equals_a_fresh_one():
    """The state carries the Cholesky factor; passing (K, V, L) or only (K, V) (L recomputed) gives one answer,
    and a factor of the wrong shape is a clear error."""
    q, k, v = make_qkv(1, 12, 2, 4, 3)
    _, (K, V, L) = kernel_regression(q[:, :8], k[:, :8], v[:, :8], kernel="rbf", ridge=0.3, output_final_state=True)
    with_factor, _ = kernel_regression(q[:, 8:], k[:, 8:], v[:, 8:], kernel="rbf", ridge=0.3, initial_state=(K, V, L))
    without, _ = kernel_regression(q[:, 8:], k[:, 8:], v[:, 8:], kernel="rbf", ridge=0.3, initial_state=(K, V))
    assert L.shape == (1, 2, 8, 8) and max_rel(with_factor, without) < F64_ATOL
    with pytest.raises(ValueError, match=r"initial_state \(L\)"):
        kernel_regression(q[:, 8:], k[:, 8:], v[:, 8:], initial_state=(K, V, L[..., :7, :7]))


@pytest.mark.parametrize("kernel", ["exp", "rbf", "poly"])
def test_gradients_match_the_oracle(kernel):
    q, k, v = make_qkv(1, 9, 1, 3, 2, requires_grad=True)
    w = torch.randn(1, 9, 1, 2, dtype=torch.float64)
    g_o = torch.autograd.grad((oracle.kernel_regression(q, k, v, kernel=kernel, ridge=0.4, degree=3) * w).sum(),
                              (q, k, v))
    for mode in ("chunk", "recurrent"):
        o, _ = kernel_regression(q, k, v, kernel=kernel, ridge=0.4, degree=3, mode=mode)
        for a, b in zip(torch.autograd.grad((o * w).sum(), (q, k, v)), g_o):
            assert max_rel(a, b) < 1e-9


@pytest.mark.parametrize("kernel,ridge", [("exp", 1e-2), ("poly", 1e-4)])
def test_float32_inputs_factorize_in_float64(kernel, ridge):
    """Kernel Gram matrices with a small ridge are badly conditioned: a float32 factorization would err by
    3e-5 (exp, ridge 1e-2) to 6e-2 (poly, ridge 1e-4); float32 inputs agree with float64 to 1e-5."""
    q, k, v = make_qkv(1, 400, 2, 8, 4, dtype=torch.float32)
    o32, _ = kernel_regression(q, k, v, kernel=kernel, ridge=ridge, degree=3)
    o64, _ = kernel_regression(q.double(), k.double(), v.double(), kernel=kernel, ridge=ridge, degree=3)
    assert o32.dtype == torch.float32 and max_rel(o32, o64) < 1e-5


def test_lost_definiteness_is_a_clear_error():
    """Identical keys make Kern(K, K) rank one: with a ridge of 1e-6 against entries of e^18, float64 loses it."""
    q, _, v = make_qkv(1, 5, 1, 4, 3)
    k = torch.full((1, 5, 1, 4), 3.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="raise ridge"):
        kernel_regression(q, k, v, ridge=1e-6, scale=2.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"kernel": "laplace"}, "kernel must be one of"),
    ({"ridge": 0.0}, "ridge must be a positive"),
    ({"kernel": "poly", "degree": 0}, "degree must be a positive int"),
    ({"mode": "parallel"}, "mode must be one of"),
    ({"initial_state": (torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2))}, r"initial_state \(V\)"),
])
def test_bad_input(kwargs, match):
    q, k, v = make_qkv(1, 10, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        kernel_regression(q, k, v, **kwargs)
