"""local_polynomial_attention: order 0 == SDPA, QKNorm == the smoothing kernel, every order == the literal
weighted least squares per query (float64), blocks and tiles == one query at a time, the cache, gradients,
the singular-design guard, bad input. Tolerances: float64 forms 1e-10, float32 against float64 1e-4 relative."""

import pytest
import torch
import torch.nn.functional as F

from ttr import oracle
from ttr.ops import local, local_polynomial_attention

from conftest import F64_ATOL, make_qkv, max_rel


def _sdpa(q, k, v, scale=None):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       scale=scale)
    return o.transpose(1, 2)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks and tiles of 8 so that short sequences cross several of each (lengths not multiples of 8)."""
    monkeypatch.setattr(local, "BLOCK", 8)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64_ATOL), (torch.float32, 1e-5)])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_order0_is_softmax_attention(dtype, tol, mode):
    q, k, v = make_qkv(2, 37, 2, 8, 6, dtype=dtype)
    o, _ = local_polynomial_attention(q, k, v, order=0, mode=mode)
    assert o.dtype == dtype and max_rel(o, _sdpa(q, k, v)) < tol


def test_qk_norm_weights_are_the_smoothing_kernel():
    """Unit q and k: exp(scale q.k) and exp(-scale ||k - q||^2 / 2) differ by the factor exp(-scale), which
    cancels; the op with qk_norm equals the oracle fitted with the smoothing kernel, order 0 and 1."""
    q, k, v = make_qkv(1, 13, 2, 6, 4)
    for order in (0, 1):
        o, _ = local_polynomial_attention(q, k, v, order=order, ridge=0.3, qk_norm=True)
        ref = oracle.local_polynomial(q, k, v, order=order, ridge=0.3, qk_norm=True, kernel="smoothing")
        assert max_rel(o, ref) < F64_ATOL
    unit_q, unit_k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    assert max_rel(local_polynomial_attention(q, k, v, qk_norm=True)[0], _sdpa(unit_q, unit_k, v)) < F64_ATOL


@pytest.mark.parametrize("order,D", [(0, 6), (1, 6), (2, 3)])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_every_order_equals_weighted_least_squares(order, D, mode, small_blocks):
    q, k, v = make_qkv(2, 21, 2, D, 4)
    o, _ = local_polynomial_attention(q, k, v, order=order, ridge=0.2, scale=0.7, mode=mode)
    ref = oracle.local_polynomial(q, k, v, order=order, ridge=0.2, scale=0.7)
    assert max_rel(o, ref) < F64_ATOL


def test_local_linear_fits_a_linear_map_exactly_where_softmax_cannot():
    """v = W k + c exactly: the local linear fit recovers W q + c at every query once it has seen D + 1 keys
    (a tiny ridge), while softmax attention answers a weighted mean of the values."""
    gen = torch.Generator().manual_seed(0)
    q, k, _ = make_qkv(1, 40, 1, 4, 4)
    W, c = torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    v = k @ W + c
    want = q @ W + c
    local1, _ = local_polynomial_attention(q, k, v, order=1, ridge=1e-10)
    softmax, _ = local_polynomial_attention(q, k, v, order=0)
    assert (local1[:, 10:] - want[:, 10:]).abs().max() < 1e-6
    assert (softmax[:, 10:] - want[:, 10:]).abs().max() > 0.5


def test_blocks_and_tiles_equal_one_query_at_a_time():
    """T = 300 crosses blocks and key tiles of the default size (128) at lengths that are not multiples."""
    q, k, v = make_qkv(1, 300, 2, 4, 3)
    a, _ = local_polynomial_attention(q, k, v, order=1, ridge=0.1)
    b, _ = local_polynomial_attention(q, k, v, order=1, ridge=0.1, mode="recurrent")
    assert max_rel(a, b) < F64_ATOL


@pytest.mark.parametrize("order", [0, 1, 2])
def test_cache_carries_the_past_and_decoding_equals_the_full_form(order, small_blocks):
    q, k, v = make_qkv(2, 19, 2, 3, 4)
    whole, cache_whole = local_polynomial_attention(q, k, v, order=order, ridge=0.2, output_final_state=True)
    ref = oracle.local_polynomial(q[:, 7:], k[:, 7:], v[:, 7:], order=order, ridge=0.2, initial_state=(k[:, :7], v[:, :7]))
    _, cache = local_polynomial_attention(q[:, :7], k[:, :7], v[:, :7], order=order, ridge=0.2, output_final_state=True)
    outs = []
    for t in range(7, 19):  # one token at a time, as decoding feeds them
        o, cache = local_polynomial_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], order=order, ridge=0.2,
                                              initial_state=cache, output_final_state=True, mode="recurrent")
        outs.append(o)
    rest, _ = local_polynomial_attention(q[:, 7:], k[:, 7:], v[:, 7:], order=order, ridge=0.2,
                                         initial_state=(k[:, :7], v[:, :7]))
    assert max_rel(torch.cat(outs, 1), whole[:, 7:]) < F64_ATOL
    assert max_rel(rest, whole[:, 7:]) < F64_ATOL and max_rel(rest, ref) < F64_ATOL
    assert all(max_rel(a, b) < F64_ATOL for a, b in zip(cache, cache_whole))


@pytest.mark.parametrize("order", [1, 2])
def test_gradients_match_the_oracle(order, small_blocks):
    q, k, v = make_qkv(1, 11, 1, 3, 2, requires_grad=True)
    w = torch.randn(1, 11, 1, 2, dtype=torch.float64)
    g_o = torch.autograd.grad((oracle.local_polynomial(q, k, v, order=order, ridge=0.3) * w).sum(), (q, k, v))
    for mode in ("chunk", "recurrent"):
        o, _ = local_polynomial_attention(q, k, v, order=order, ridge=0.3, mode=mode)
        for a, b in zip(torch.autograd.grad((o * w).sum(), (q, k, v)), g_o):
            assert max_rel(a, b) < 1e-9


def test_gradcheck(small_blocks):
    q, k, v = make_qkv(1, 10, 1, 2, 2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: local_polynomial_attention(q, k, v, order=1, ridge=0.5)[0],
                                    (q, k, v), eps=1e-6, atol=1e-7)


def test_singular_local_design_falls_back_to_order0():
    """Identical keys: every k_i - q is one vector c, the slope is unidentified, and with a tiny ridge the
    literal fit extrapolates (its intercept shrinks towards 0 by ridge / (|c|^2 + ridge)). The guard answers
    the order-0 mean instead, finite and without amplified noise."""
    q, _, v = make_qkv(1, 12, 1, 4, 3)
    k = torch.ones(1, 12, 1, 4, dtype=torch.float64)
    o1, _ = local_polynomial_attention(q, k, v, order=1, ridge=1e-14)
    o0, _ = local_polynomial_attention(q, k, v, order=0)
    assert bool(torch.isfinite(o1).all()) and max_rel(o1, o0) < F64_ATOL
    literal = oracle.local_polynomial(q, k, v, order=1, ridge=1e-14)
    assert (literal - o0).abs().max() > 0.1  # what the guard saves the user from


@pytest.mark.parametrize("ridge,fires", [(1e-9, True), (1e-7, False)])
def test_guard_threshold_is_relative_to_the_weight_mass(ridge, fires):
    """60 identical keys, every query at distance 1 from them: delta / omega = ridge / (1 + ridge) whatever
    omega is. Below sqrt(eps) = 1.5e-8 the guard answers order 0; above it the literal fit stands."""
    q, _, v = make_qkv(1, 60, 1, 4, 3)
    k = torch.ones(1, 60, 1, 4, dtype=torch.float64)
    q = k.clone()
    q[..., 0] += 1.0
    o1, _ = local_polynomial_attention(q, k, v, order=1, ridge=ridge)
    if fires:
        assert max_rel(o1, local_polynomial_attention(q, k, v, order=0)[0]) < F64_ATOL
    else:
        assert max_rel(o1, oracle.local_polynomial(q, k, v, order=1, ridge=ridge)) < 1e-6


def test_guard_keeps_gradients_finite():
    """ridge 1e-20 on random keys: the guard fires for early queries; their gradients stay finite."""
    q, k, v = make_qkv(1, 40, 1, 4, 3, requires_grad=True)
    for mode in ("chunk", "recurrent"):
        o, _ = local_polynomial_attention(q, k, v, order=1, ridge=1e-20, mode=mode)
        assert all(bool(torch.isfinite(g).all()) for g in torch.autograd.grad(o.sum(), (q, k, v)))


def test_large_scores_are_shifted_before_exp():
    """float32 scores up to ~150 (exp overflows past 88): the block form stays finite and equals SDPA."""
    q, k, v = make_qkv(1, 50, 2, 8, 4, dtype=torch.float32)
    o, _ = local_polynomial_attention(6 * q, 6 * k, v, order=0, mode="recurrent")
    assert bool(torch.isfinite(o).all()) and max_rel(o, _sdpa(6 * q, 6 * k, v)) < 1e-5


def test_order2_at_its_largest_dimension():
    q, k, v = make_qkv(1, 5, 1, 16, 2)
    assert max_rel(local_polynomial_attention(q, k, v, order=2, ridge=0.3)[0],
                   oracle.local_polynomial(q, k, v, order=2, ridge=0.3)) < 1e-9


@pytest.mark.parametrize("order", [0, 1])
def test_qk_norm_normalizes_the_cached_keys_too(order, small_blocks):
    q, k, v = make_qkv(2, 19, 2, 3, 4)
    cache = (k[:, :7], v[:, :7])
    rest, _ = local_polynomial_attention(q[:, 7:], k[:, 7:], v[:, 7:], order=order, ridge=0.2, qk_norm=True,
                                         initial_state=cache)
    ref = oracle.local_polynomial(q[:, 7:], k[:, 7:], v[:, 7:], order=order, ridge=0.2, qk_norm=True, initial_state=cache)
    assert max_rel(rest, ref) < F64_ATOL


@pytest.mark.parametrize("order,mode", [(0, "chunk"), (1, "chunk"), (0, "recurrent")])
def test_a_scale_per_head_equals_each_head_alone(order, mode, small_blocks):
    q, k, v = make_qkv(1, 17, 2, 3, 4)
    scale = torch.tensor([0.5, 7.0], dtype=torch.float64, requires_grad=True)
    o, _ = local_polynomial_attention(q, k, v, order=order, ridge=0.2, scale=scale, qk_norm=True, mode=mode)
    for h in range(2):
        alone, _ = local_polynomial_attention(q[:, :, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1], order=order,
                                              ridge=0.2, scale=float(scale[h].detach()), qk_norm=True, mode=mode)
        assert max_rel(o[:, :, h:h + 1], alone) < F64_ATOL
    (grad,) = torch.autograd.grad(o.square().sum(), scale)  # the temperature is learnable
    assert bool(torch.isfinite(grad).all()) and bool((grad != 0).all())


def test_float32_matches_float64():
    q, k, v = make_qkv(1, 600, 2, 8, 8, dtype=torch.float32)
    for order in (1,):
        o32, _ = local_polynomial_attention(q, k, v, order=order, ridge=0.1)
        o64, _ = local_polynomial_attention(q.double(), k.double(), v.double(), order=order, ridge=0.1)
        assert o32.dtype == torch.float32 and max_rel(o32, o64) < 1e-4


@pytest.mark.parametrize("kwargs,match", [
    ({"order": 3}, "order must be 0, 1 or 2"),
    ({"order": 1, "ridge": 0.0}, "ridge must be a positive"),
    ({"order": 1, "ridge": float("nan")}, "ridge must be a positive"),
    ({"mode": "parallel"}, "mode must be one of"),
    ({"scale": torch.ones(3)}, r"scale must have shape \[2\]"),
    ({"scale": -torch.ones(2)}, r"scale must lie in \[0, inf\]"),
    ({"initial_state": torch.zeros(1, 3, 2, 4)}, "cache pair"),
    ({"initial_state": (torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 2, 4))}, r"initial_state \(V\)"),
])
def test_bad_input(kwargs, match):
    q, k, v = make_qkv(1, 10, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        local_polynomial_attention(q, k, v, **kwargs)


def test_order2_above_its_dimension_is_a_clear_error():
    q, k, v = make_qkv(1, 5, 1, 17, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="order 2 needs 171 monomials"):
        local_polynomial_attention(q, k, v, order=2)
