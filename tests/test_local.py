"""local_polynomial_attention: order 0 == SDPA, QKNorm == the smoothing kernel, every order == the literal
weighted least squares per query (float64), blocks and tiles == one query at a time, the cache, gradients,
the singular-design guard, order 1 by conjugate gradients == the moments, bad input. Tolerances: float64 forms
1e-10, float32 against float64 1e-4 relative."""

import pytest
import torch
import torch.nn.functional as F

from ttr import oracle
from ttr.ops import local, local_polynomial_attention
from ttr.ops.kv_cache import KVCache

from conftest import F64_ATOL, make_qkv, max_rel


def _sdpa(q, k, v, scale=None):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       scale=scale)
    return o.transpose(1, 2)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks and tiles of 8 so that short sequences cross several of each (lengths not multiples of 8)."""
    monkeypatch.setattr(local, "BLOCK", 8)


def _moments_refused(*args):
    raise AssertionError("the moments answered where conjugate gradients should have")


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


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_singular_local_design_falls_back_to_order0(solver):
    """Identical keys: every k_i - q is one vector c, the slope is unidentified, and with a tiny ridge the
    literal fit extrapolates (its intercept shrinks towards 0 by ridge / (|c|^2 + ridge)). The guard answers
    the order-0 mean instead, finite and without amplified noise."""
    q, _, v = make_qkv(1, 12, 1, 4, 3)
    k = torch.ones(1, 12, 1, 4, dtype=torch.float64)
    o1, _ = local_polynomial_attention(q, k, v, order=1, ridge=1e-14, solver=solver)
    o0, _ = local_polynomial_attention(q, k, v, order=0)
    assert bool(torch.isfinite(o1).all()) and max_rel(o1, o0) < F64_ATOL
    literal = oracle.local_polynomial(q, k, v, order=1, ridge=1e-14)
    assert (literal - o0).abs().max() > 0.1  # what the guard saves the user from


@pytest.mark.parametrize("ridge,fires", [(1e-9, True), (1e-7, False)])
@pytest.mark.parametrize("solver,dtype", [("exact", torch.float64), ("cg", torch.float64), ("cg", torch.float32)])
def test_guard_threshold_is_relative_to_the_weight_mass(ridge, fires, solver, dtype, monkeypatch):
    """60 identical keys, every query at distance 1 from them: delta / omega = ridge / (1 + ridge) whatever
    omega is. Below sqrt(eps) = 1.5e-8 the guard answers order 0; above it the literal fit stands. Conjugate
    gradients read 1 + beta = omega / delta (and solve this system in one step); in float32 both cases pass
    float32's threshold, 3e-4, and go to float64, which decides."""
    if solver == "cg":
        monkeypatch.setattr(local, "_query_block", _moments_refused)
    q, _, v = make_qkv(1, 60, 1, 4, 3)
    k = torch.ones(1, 60, 1, 4, dtype=torch.float64)
    q = k.clone()
    q[..., 0] += 1.0
    o1, _ = local_polynomial_attention(q.to(dtype), k.to(dtype), v.to(dtype), order=1, ridge=ridge, solver=solver)
    tol = F64_ATOL if dtype == torch.float64 else 1e-6
    if fires:
        assert max_rel(o1, local_polynomial_attention(q, k, v, order=0)[0]) < tol
    else:
        assert max_rel(o1, oracle.local_polynomial(q, k, v, order=1, ridge=ridge)) < 1e-6


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_guard_keeps_gradients_finite(solver):
    """ridge 1e-20 on random keys: the guard fires for early queries; their gradients stay finite."""
    q, k, v = make_qkv(1, 40, 1, 4, 3, requires_grad=True)
    for mode in ("chunk", "recurrent"):
        o, _ = local_polynomial_attention(q, k, v, order=1, ridge=1e-20, mode=mode, solver=solver)
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
    ({"order": 1, "solver": "newton"}, "solver must be 'auto', 'exact' or 'cg'"),
    ({"order": 2, "solver": "cg"}, "solver='cg' is offered at order 1"),
    ({"order": 1, "cg_tol": 0.0}, r"cg_tol must be a number in \(0, 1\)"),
    ({"order": 1, "cg_tol": 1.0}, r"cg_tol must be a number in \(0, 1\)"),
    ({"order": 1, "cg_tol": float("nan")}, r"cg_tol must be a number in \(0, 1\)"),
    ({"order": 1, "cg_tol": True}, r"cg_tol must be a number in \(0, 1\)"),
])
def test_bad_input(kwargs, match):
    q, k, v = make_qkv(1, 10, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        local_polynomial_attention(q, k, v, **kwargs)


def test_order2_above_its_dimension_is_a_clear_error():
    q, k, v = make_qkv(1, 5, 1, 17, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="order 2 needs 171 monomials"):
        local_polynomial_attention(q, k, v, order=2)


# order 1 by conjugate gradients (solver="cg"): the same answers and gradients as the moments


def _cg_and_moments(q, k, v, inputs, **kw):
    """(answer, gradients of a weighted sum of it with respect to inputs) by conjugate gradients to 1e-13, failing
    where a block falls back on the moments (forward or backward), and the same by the moments."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local, "_query_block", _moments_refused)
        o, _ = local_polynomial_attention(q, k, v, order=1, solver="cg", cg_tol=1e-13, **kw)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(5), dtype=o.dtype)
        grads = torch.autograd.grad((o * w).sum(), inputs)
    ref, _ = local_polynomial_attention(q, k, v, order=1, solver="exact", **kw)
    return o, grads, ref, torch.autograd.grad((ref * w).sum(), inputs)


def _agree(o, grads, ref, grads_ref):
    assert max_rel(o, ref) < F64_ATOL
    assert all(max_rel(a, b) < 1e-9 for a, b in zip(grads, grads_ref, strict=True))


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_cg_equals_the_moments(mode, small_blocks):
    """T = 21 crosses blocks of 8; then a learned per-head scale with qk_norm, its gradient included."""
    q, k, v = make_qkv(2, 21, 2, 6, 4, requires_grad=True)
    _agree(*_cg_and_moments(q, k, v, (q, k, v), ridge=0.2, scale=0.7, mode=mode))
    scale = torch.tensor([0.5, 3.0], dtype=torch.float64, requires_grad=True)
    _agree(*_cg_and_moments(q, k, v, (q, k, v, scale), ridge=0.2, scale=scale, qk_norm=True, mode=mode))


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_cg_with_a_cache_and_on_ragged_rows(mode, small_blocks):
    """A cache of 7 tokens as the initial state; a KVCache whose rows hold 7 and 3 tokens (each row's queries
    see its own keys)."""
    q, k, v = make_qkv(2, 12, 2, 5, 3, requires_grad=True)
    cache = (k[:, :7], v[:, :7])
    _agree(*_cg_and_moments(q[:, 7:], k[:, 7:], v[:, 7:], (q, k, v), ridge=0.3, initial_state=cache, mode=mode))
    rows = KVCache.stack([(k[:1, :7].detach(), v[:1, :7].detach()), (k[1:, :3].detach(), v[1:, :3].detach())])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local, "_query_block", _moments_refused)
        o, _ = local_polynomial_attention(q[:, 7:], k[:, 7:], v[:, 7:], order=1, ridge=0.3, solver="cg",
                                          cg_tol=1e-13, initial_state=rows, mode=mode)
    for b, n in enumerate((7, 3)):
        alone, _ = local_polynomial_attention(q[b:b + 1, 7:], k[b:b + 1, 7:], v[b:b + 1, 7:], order=1, ridge=0.3,
                                              initial_state=(k[b:b + 1, :n], v[b:b + 1, :n]))
        assert max_rel(o[b:b + 1], alone) < F64_ATOL


def test_cg_on_packed_sequences(small_blocks):
    q, k, v = make_qkv(1, 30, 2, 5, 3, requires_grad=True)
    _agree(*_cg_and_moments(q, k, v, (q, k, v), ridge=0.3, cu_seqlens=torch.tensor([0, 11, 11, 30])))


def test_cg_gradcheck(small_blocks, monkeypatch):
    monkeypatch.setattr(local, "_query_block", _moments_refused)
    q, k, v = make_qkv(1, 10, 1, 2, 2, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: local_polynomial_attention(q, k, v, order=1, ridge=0.5, solver="cg", cg_tol=1e-14)[0],
        (q, k, v), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("misses", ["forward", "backward"])
def test_cg_short_of_its_tolerance_hands_the_block_to_the_moments(misses, small_blocks, monkeypatch):
    """A solve that misses cg_tol in its step budget: forward, the block is answered by the moments; backward
    (the adjoint solve), the moments' gradient stands in. Either way the answer and gradients are the moments'."""
    solve, missing = local._conjugate_gradients, [misses == "forward"]

    def short(*args):
        x, reached = solve(*args)
        return x, reached and not missing[0]

    q, k, v = make_qkv(1, 21, 2, 5, 3, requires_grad=True)
    ref, _ = local_polynomial_attention(q, k, v, order=1, ridge=0.3, solver="exact")
    monkeypatch.setattr(local, "_conjugate_gradients", short)
    o, _ = local_polynomial_attention(q, k, v, order=1, ridge=0.3, solver="cg", cg_tol=1e-13)
    missing[0] = True
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(5), dtype=o.dtype)
    _agree(o, torch.autograd.grad((o * w).sum(), (q, k, v)), ref, torch.autograd.grad((ref * w).sum(), (q, k, v)))


def test_auto_solves_by_cg_from_its_key_dim(monkeypatch):
    q, k, v = make_qkv(1, 9, 1, 6, 2)
    monkeypatch.setattr(local, "CG_MIN_DIM", 6)
    monkeypatch.setattr(local, "_query_block", _moments_refused)
    local_polynomial_attention(q, k, v, order=1)
    with pytest.raises(AssertionError, match="the moments answered"):
        local_polynomial_attention(q[..., :5], k[..., :5], v, order=1)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cg_default_tolerance_in_float32(qk_norm):
    """float32 at the default cg_tol (1e-4) against the float64 moments, at the key dim "auto" starts from:
    within 1e-4 relative, as the float32 moments are."""
    q, k, v = make_qkv(1, 300, 2, local.CG_MIN_DIM, 8, dtype=torch.float32)
    o, _ = local_polynomial_attention(q, k, v, order=1, qk_norm=qk_norm)
    ref, _ = local_polynomial_attention(q.double(), k.double(), v.double(), order=1, qk_norm=qk_norm, solver="exact")
    assert o.dtype == torch.float32 and max_rel(o, ref) < 1e-4


def test_cg_in_float32_with_offset_keys(monkeypatch):
    """Queries and keys 100 from the origin: the block's query mean takes the offset out of the products, as it
    does out of the moments. Measured 5e-4, as the moments (test_defects): the float32 rounding of the scores."""
    q, k, v = make_qkv(1, 200, 2, 16, 4)
    ref, _ = local_polynomial_attention(q + 100, k + 100, v, order=1, solver="exact")
    monkeypatch.setattr(local, "_query_block", _moments_refused)
    o, _ = local_polynomial_attention((q + 100).float(), (k + 100).float(), v.float(), order=1, solver="cg")
    assert max_rel(o, ref) < 1e-3


def test_cg_in_float32_with_drifting_keys(monkeypatch):
    """q and k drifting 1 a token with a sharp scale: a block's queries far from their mean, the weights on keys
    near each: the float32 products lose about eps |k - c|^2 / (C_t + ridge)_jj, 5e-3 here (erred 2e-3), so the
    blocks run in float64."""
    T = 256
    q, k, v = (torch.randn(1, T, 2, 16, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
               for i in range(3))
    drift = torch.arange(T, dtype=torch.float64).view(1, T, 1, 1)
    ref, _ = local_polynomial_attention(q + drift, k + drift, v, order=1, scale=0.5, solver="exact")
    monkeypatch.setattr(local, "_query_block", _moments_refused)
    o, _ = local_polynomial_attention((q + drift).float(), (k + drift).float(), v.float(), order=1, scale=0.5,
                                      solver="cg")
    assert max_rel(o, ref) < 1e-4
