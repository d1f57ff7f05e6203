"""Association sets: a sliding window of w tokens {t - w < i <= t} and the whole sequence (causal=False), on linear
attention (uniform, scalar and vector gates) and softmax attention (local polynomial order 0). Chunk == recurrent ==
the literal oracle (outputs, final states, gradients), a sequence in pieces == the whole, packed sequences, bf16 and
float32 against float64, and the errors."""

import pytest
import torch

from ttr import oracle
from ttr.ops import linear_attention, local_polynomial_attention
from ttr.ops.kv_cache import KVCache
from ttr.weights import association_set, gamma_matrix

from conftest import F64_ATOL, make_gate, make_qkv, max_rel

C = 16
T = 37  # 2 C + 5: not a multiple of the chunk
WINDOWS = [1, 3, C - 1, C, C + 5, 100]  # 100 > T
CUT = 20  # where a sequence is split into two calls
CU = torch.tensor([0, 11, 11, 30, T])  # packed: lengths 11, 0, 19, 7


def _bd(gate, B=1, H=2, D=4, Dv=3, seed=0, requires_grad=False, strength=0.0):
    q, k, v = make_qkv(B, T, H, D, Dv, seed=seed, requires_grad=requires_grad)
    return q, k, v, make_gate(gate, B, T, H, D, requires_grad=requires_grad, strength=strength)


def _cut(x, a, b):
    return None if x is None else x[:, a:b]


def _memory(ring):
    """The window's memory S_T = sum_i gamma_i^(T) k_i v_i^T from its ring (K, V)."""
    return ring[0].transpose(-1, -2) @ ring[1]


def _linear_pieces(q, k, v, g, w, **kw):
    """One sequence fed as two calls, the ring carried."""
    o1, s1 = linear_attention(q[:, :CUT], k[:, :CUT], v[:, :CUT], _cut(g, 0, CUT), window=w, output_final_state=True,
                              **kw)
    o2, s2 = linear_attention(q[:, CUT:], k[:, CUT:], v[:, CUT:], _cut(g, CUT, T), window=w, initial_state=s1,
                              output_final_state=True, **kw)
    return torch.cat([o1, o2], 1), s2


def test_the_sets_written_out():
    inside = association_set(5, window=2)
    assert inside.tolist()[3] == [False, False, True, True, False]
    assert association_set(4, causal=False).all()
    g = make_gate("vector", 1, 6, 1, 2)
    gamma = gamma_matrix(g, 6, window=3)
    assert (gamma[0, 0, 5, :3] == 0).all() and (gamma[0, 0, 5, 3:] > 0).all()
    assert torch.equal(gamma * association_set(6, window=3)[..., None], gamma)


# -- linear attention: windows ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate", [None, "scalar", "vector"])
@pytest.mark.parametrize("w", WINDOWS)
def test_linear_window_chunk_recurrent_oracle_and_pieces(gate, w):
    q, k, v, g = _bd(gate)
    o_c, s_c = linear_attention(q, k, v, g, window=w, chunk_size=C, output_final_state=True)
    o_r, s_r = linear_attention(q, k, v, g, window=w, mode="recurrent", output_final_state=True)
    o_o, s_o = oracle.parametric(q, k, v, g, optimizer=oracle.BatchGD(), window=w)
    assert max_rel(o_c, o_o) < F64_ATOL and max_rel(o_r, o_o) < F64_ATOL
    assert s_c[0].shape == (1, 2, w, 4) and s_c[1].shape == (1, 2, w, 3)
    assert max_rel(_memory(s_c), s_o) < F64_ATOL
    for a, b in zip(s_c, s_r):
        assert (a - b).abs().max() < F64_ATOL
    for mode in ("chunk", "recurrent"):  # the ring carries exactly: two calls == one
        o_p, s_p = _linear_pieces(q, k, v, g, w, mode=mode, chunk_size=C)
        assert max_rel(o_p, o_o) < F64_ATOL
        assert max_rel(_memory(s_p), s_o) < F64_ATOL


@pytest.mark.parametrize("w", [3, C + 5])
def test_linear_window_with_bonus_and_normalized(w):
    q, k, v, g = _bd("vector")
    u = torch.rand(2, 4, dtype=torch.float64)
    want = oracle.parametric(q, k, v, g, optimizer=oracle.BatchGD(), bonus=u, window=w)[0]
    for mode in ("chunk", "recurrent"):
        assert max_rel(linear_attention(q, k, v, g, bonus=u, window=w, mode=mode, chunk_size=C)[0], want) < F64_ATOL
        assert max_rel(_linear_pieces(q, k, v, g, w, bonus=u, mode=mode, chunk_size=C)[0], want) < F64_ATOL
    g = make_gate("scalar", 1, T, 2, 4)
    want = oracle.local_constant(q, k, v, g, feature_map="elu1", window=w)
    for mode in ("chunk", "recurrent"):
        kw = dict(feature_map="elu1", normalize=True, mode=mode, chunk_size=C)
        o, ring = linear_attention(q, k, v, g, window=w, output_final_state=True, **kw)
        assert max_rel(o, want) < F64_ATOL and ring[1].shape[-1] == 4  # the normalizer's column rides along
        assert max_rel(_linear_pieces(q, k, v, g, w, **kw)[0], want) < F64_ATOL


@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("w", [3, C + 5])
def test_linear_window_gradients_match_the_oracle(gate, w):
    q, k, v, g = _bd(gate, requires_grad=True)
    leaves = [q, k, v, g]
    r = torch.randn(1, T, 2, 3, dtype=torch.float64)
    r_state = torch.randn(1, 2, 4, 3, dtype=torch.float64)

    def loss(o, memory):
        return (o * r).sum() + (memory * r_state).sum()

    o_o, s_o = oracle.parametric(q, k, v, g, optimizer=oracle.BatchGD(), window=w)
    want = torch.autograd.grad(loss(o_o, s_o), leaves)
    for mode in ("chunk", "recurrent"):
        o, ring = _linear_pieces(q, k, v, g, w, mode=mode, chunk_size=C)
        for a, b in zip(torch.autograd.grad(loss(o, _memory(ring)), leaves), want):
            assert max_rel(a, b) < 1e-9


@pytest.mark.parametrize("dtype,strength", [(torch.float64, 25.0), (torch.float32, 4.0)])
def test_linear_window_strong_vector_decay(dtype, strength):
    """Decays strong enough that the vector gate's scores factor through leaves smaller than the chunk."""
    q, k, v, g = _bd("vector", strength=strength)
    want = oracle.parametric(q, k, v, g, optimizer=oracle.BatchGD(), window=C + 5)[0]
    for mode in ("chunk", "recurrent"):
        o = linear_attention(*(x.to(dtype) for x in (q, k, v, g)), window=C + 5, mode=mode, chunk_size=C)[0]
        assert max_rel(o, want) < (F64_ATOL if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_linear_window_low_precision_against_float64(dtype, tol):
    q, k, v, g = _bd("vector")
    low = [x.to(dtype) for x in (q, k, v, g)]
    want = oracle.parametric(*(x.to(dtype).double() for x in (q, k, v, g)), optimizer=oracle.BatchGD(), window=C - 1)
    for mode in ("chunk", "recurrent"):
        o, ring = linear_attention(*low, window=C - 1, mode=mode, chunk_size=C, output_final_state=True)
        assert o.dtype == dtype and ring[0].dtype == torch.float32  # float32 accumulation, float32 state
        assert max_rel(o, want[0]) < tol and max_rel(_memory(ring), want[1]) < tol


@pytest.mark.parametrize("w", [3, C + 5])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_linear_window_packed(w, mode):
    """Each packed sequence (one empty) has its own window and ring: the same as a call per sequence."""
    q, k, v, g = _bd("scalar")
    gen = torch.Generator().manual_seed(5)
    rings = (torch.randn(4, 2, w, 4, generator=gen, dtype=torch.float64),
             torch.randn(4, 2, w, 3, generator=gen, dtype=torch.float64))
    for s0 in (None, rings):
        o, s = linear_attention(q, k, v, g, window=w, mode=mode, chunk_size=C, cu_seqlens=CU, initial_state=s0,
                                output_final_state=True)
        bounds = CU.tolist()
        for n, (a, b) in enumerate(zip(bounds, bounds[1:])):
            ring_n = None if s0 is None else tuple(x[n:n + 1] for x in s0)
            if a == b:  # no tokens: the ring it was given, or zeros
                want = (torch.zeros_like(s[0][:1]), torch.zeros_like(s[1][:1])) if s0 is None else ring_n
                assert all(torch.equal(x[n:n + 1], y) for x, y in zip(s, want))
                continue
            o_n, s_n = linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], window=w, initial_state=ring_n,
                                        output_final_state=True)
            assert (o[:, a:b] - o_n).abs().max() < F64_ATOL
            assert all((x[n:n + 1] - y).abs().max() < F64_ATOL for x, y in zip(s, s_n))
            if s0 is None:
                want = oracle.parametric(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], optimizer=oracle.BatchGD(),
                                         window=w)[0]
                assert max_rel(o_n, want) < F64_ATOL


# -- linear attention: the whole sequence ----------------------------------------------------------------------------

def test_linear_non_causal_against_the_oracle():
    q, k, v, _ = _bd(None, requires_grad=True)
    o = linear_attention(q, k, v, causal=False)[0]
    want = oracle.parametric(q, k, v, optimizer=oracle.BatchGD(), causal=False)[0]
    assert max_rel(o, want) < F64_ATOL
    r = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((o * r).sum(), [q, k, v]), torch.autograd.grad((want * r).sum(), [q, k, v])):
        assert max_rel(a, b) < 1e-9
    o = linear_attention(q, k, v, causal=False, feature_map="elu1", normalize=True)[0]
    assert max_rel(o, oracle.local_constant(q, k, v, feature_map="elu1", causal=False)) < F64_ATOL
    o = linear_attention(q, k, v, causal=False, cu_seqlens=CU)[0]
    bounds = CU.tolist()
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            want = oracle.parametric(q[:, a:b], k[:, a:b], v[:, a:b], optimizer=oracle.BatchGD(), causal=False)[0]
            assert max_rel(o[:, a:b], want) < F64_ATOL


# -- softmax attention (local polynomial, order 0) -------------------------------------------------------------------

@pytest.mark.parametrize("w", WINDOWS)
def test_softmax_window_chunk_recurrent_oracle_pieces_and_decoding(w):
    q, k, v, _ = _bd(None, B=2)
    want = oracle.local_polynomial(q, k, v, order=0, window=w)
    for mode in ("chunk", "recurrent"):
        o, cache = local_polynomial_attention(q, k, v, window=w, mode=mode, output_final_state=True)
        assert max_rel(o, want) < F64_ATOL
        assert cache[0].shape[1] == min(w - 1, T)  # the cache keeps what a next query can see
        o1, c1 = local_polynomial_attention(q[:, :CUT], k[:, :CUT], v[:, :CUT], window=w, output_final_state=True)
        o2, _ = local_polynomial_attention(q[:, CUT:], k[:, CUT:], v[:, CUT:], window=w, initial_state=c1, mode=mode)
        assert max_rel(torch.cat([o1, o2], 1), want) < F64_ATOL


@pytest.mark.parametrize("w", [1, 3])
def test_softmax_window_decoding_keeps_the_cache_bounded(w):
    """Token by token into a KVCache, long enough that the cache is cut several times: it never outgrows
    2 (w - 1) + 2 MIN_CAPACITY tokens, and every answer is the oracle's."""
    n = 150
    q, k, v = make_qkv(1, n, 1, 4, 3, seed=2)
    want = oracle.local_polynomial(q, k, v, order=0, window=w)
    cache, outs, biggest = KVCache.empty(), [], 0
    for t in range(n):
        o, cache = local_polynomial_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], window=w,
                                              initial_state=cache, output_final_state=True, mode="recurrent")
        outs.append(o)
        biggest = max(biggest, cache.capacity)
    assert max_rel(torch.cat(outs, 1), want) < F64_ATOL
    assert biggest <= 2 * (w - 1 + 64) and cache.size < n


def test_softmax_window_ragged_cache_and_per_head_scale():
    """Rows whose caches hold different numbers of tokens each see their own window."""
    q, k, v, _ = _bd(None, B=2)
    lengths, w = (9, 4), 6
    cache = KVCache.stack([(k[b:b + 1, :L], v[b:b + 1, :L]) for b, L in enumerate(lengths)])
    scale = torch.tensor([0.3, 0.7], dtype=torch.float64)
    o, _ = local_polynomial_attention(q[:, 20:], k[:, 20:], v[:, 20:], window=w, initial_state=cache, scale=scale)
    for b, L in enumerate(lengths):
        for h in range(2):
            want = oracle.local_polynomial(q[b:b + 1, 20:, h:h + 1], k[b:b + 1, 20:, h:h + 1],
                                           v[b:b + 1, 20:, h:h + 1], order=0, window=w, scale=float(scale[h]),
                                           initial_state=(k[b:b + 1, :L, h:h + 1], v[b:b + 1, :L, h:h + 1]))
            assert max_rel(o[b:b + 1, :, h:h + 1], want) < F64_ATOL


@pytest.mark.parametrize("w", [3, C + 5])
def test_softmax_window_packed_and_gradients(w):
    q, k, v, _ = _bd(None, requires_grad=True)
    o, finals = local_polynomial_attention(q, k, v, window=w, cu_seqlens=CU, output_final_state=True)
    bounds = CU.tolist()
    want = torch.cat([oracle.local_polynomial(q[:, a:b], k[:, a:b], v[:, a:b], order=0, window=w)
                      for a, b in zip(bounds, bounds[1:]) if b > a], 1)
    assert max_rel(o, want) < F64_ATOL
    assert [f[0].shape[1] for f in finals] == [min(w - 1, b - a) for a, b in zip(bounds, bounds[1:])]
    r = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((o * r).sum(), [q, k, v]), torch.autograd.grad((want * r).sum(), [q, k, v])):
        assert max_rel(a, b) < 1e-9


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_softmax_window_low_precision_against_float64(dtype, tol):
    q, k, v, _ = _bd(None)
    low = [x.to(dtype) for x in (q, k, v)]
    o = local_polynomial_attention(*low, window=C + 5)[0]
    assert o.dtype == dtype
    assert max_rel(o, oracle.local_polynomial(*(x.double() for x in low), order=0, window=C + 5)) < tol


def test_softmax_non_causal_against_the_oracle():
    q, k, v, _ = _bd(None, requires_grad=True)
    o = local_polynomial_attention(q, k, v, causal=False, qk_norm=True)[0]
    want = oracle.local_polynomial(q, k, v, order=0, causal=False, qk_norm=True)
    assert max_rel(o, want) < F64_ATOL
    r = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((o * r).sum(), [q, k, v]), torch.autograd.grad((want * r).sum(), [q, k, v])):
        assert max_rel(a, b) < 1e-9
    o = local_polynomial_attention(q, k, v, causal=False, cu_seqlens=CU)[0]
    bounds = CU.tolist()
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            assert max_rel(o[:, a:b], oracle.local_polynomial(q[:, a:b], k[:, a:b], v[:, a:b], order=0,
                                                              causal=False)) < F64_ATOL


# -- errors ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(window=0), "window must be None or a positive int"),
    (dict(window=2.0), "window must be None or a positive int"),
    (dict(window=True), "window must be None or a positive int"),
    (dict(window=3, causal=False), "pass causal=True with a window"),
    (dict(causal=1), "causal must be a bool"),
    (dict(causal=False, gate="scalar"), "no single meaning"),
    (dict(causal=False, mode="recurrent"), "no recurrent form"),
    (dict(causal=False, output_final_state=True), "carries no state"),
    (dict(window=3, initial_state=torch.zeros(1, 2, 4, 3)), "the ring of the last w associations"),
    (dict(window=3, initial_state=(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 3))), r"\[1, 2, 3, 4\]"),
    (dict(window=3, gate="entry"), "per-entry gate"),
    (dict(window=3, angle=True), "angle"),
])
def test_linear_errors(kwargs, match):
    q, k, v, _ = _bd(None)
    gate = kwargs.pop("gate", None)
    g = {None: None, "scalar": make_gate("scalar", 1, T, 2, 4),
         "entry": -torch.rand(1, T, 2, 4, 3, dtype=torch.float64)}[gate]
    if kwargs.pop("angle", False):
        kwargs["angle"] = torch.zeros(1, T, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, g, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=-1), "window must be None or a positive int"),
    (dict(window=3, order=1), "offered at order 0"),
    (dict(causal=False, order=2), "offered at order 0"),
    (dict(causal=False, mode="recurrent"), "no recurrent form"),
    (dict(causal=False, output_final_state=True), "keeps no cache"),
])
def test_softmax_errors(kwargs, match):
    q, k, v, _ = _bd(None)
    with pytest.raises(ValueError, match=match):
        local_polynomial_attention(q, k, v, **kwargs)


def test_oracle_errors():
    q, k, v, _ = _bd(None)
    with pytest.raises(ValueError, match="pass the whole sequence"):
        oracle.parametric(q, k, v, optimizer=oracle.BatchGD(), window=3, initial_state=torch.zeros(1, 2, 4, 3))
    with pytest.raises(ValueError, match="pass g=None"):
        gamma_matrix(make_gate("scalar", 1, T, 2, 4), T, causal=False)
