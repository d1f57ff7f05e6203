"""linear_attention: chunk == recurrent == oracle (outputs, final states, gradients), carried state,
numerics under strong decay and bf16, and clear errors for bad input."""

import pytest
import torch

from ttr import oracle
from ttr.ops import linear_attention

from conftest import F64_ATOL, make_gate, make_qkv, max_rel

GATES = [None, "scalar", "vector"]
# (feature map, normalize): every map unnormalized, the positive ones also normalized.
MAPS = [("identity", False), ("elu1", False), ("relu", False), ("prf", False),
        ("elu1", True), ("relu", True), ("prf", True)]


def _initial_state(B, H, D, Dv, normalize, seed=3):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(B, H, D, Dv + normalize, generator=gen, dtype=torch.float64)
    return s.abs() if normalize else s  # a normalized memory's state holds positive weights


def _oracle(q, k, v, g, fm, normalize, s0):
    if normalize:
        return oracle.local_constant(q, k, v, g, feature_map=fm, initial_state=s0)
    return oracle.parametric(q, k, v, g, optimizer=oracle.BatchGD(), feature_map=fm, initial_state=s0)[0]


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("fm,normalize", MAPS)
def test_chunk_recurrent_oracle_forward(gate, fm, normalize):
    B, T, H, D, Dv = 2, 37, 2, 8, 6  # T = 2 * 16 + 5: not a multiple of the chunk
    q, k, v = make_qkv(B, T, H, D, Dv)
    g = make_gate(gate, B, T, H, D)
    s0 = _initial_state(B, H, D, Dv, normalize)
    kw = dict(feature_map=fm, normalize=normalize, initial_state=s0, output_final_state=True)
    o_c, s_c = linear_attention(q, k, v, g, mode="chunk", chunk_size=16, **kw)
    o_r, s_r = linear_attention(q, k, v, g, mode="recurrent", **kw)
    o_o = _oracle(q, k, v, g, fm, normalize, s0)
    assert (o_c - o_r).abs().max() < F64_ATOL
    assert (s_c - s_r).abs().max() < F64_ATOL
    assert max_rel(o_c, o_o) < F64_ATOL
    if not normalize:
        _, s_o = oracle.parametric(q, k, v, g, optimizer=oracle.BatchGD(), feature_map=fm, initial_state=s0)
        assert (s_c - s_o).abs().max() < F64_ATOL


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("fm,normalize", [("identity", False), ("elu1", True), ("prf", False)])
def test_gradients_match_oracle(gate, fm, normalize):
    B, T, H, D, Dv = 1, 19, 2, 4, 3
    q, k, v = make_qkv(B, T, H, D, Dv, requires_grad=True)
    g = make_gate(gate, B, T, H, D, requires_grad=True)
    s0 = _initial_state(B, H, D, Dv, normalize).requires_grad_()
    leaves = [x for x in (q, k, v, g, s0) if x is not None]
    w = torch.randn(B, T, H, Dv, dtype=torch.float64)

    def grads(fn):
        return torch.autograd.grad((fn() * w).sum(), leaves)

    kw = dict(feature_map=fm, normalize=normalize, initial_state=s0)
    g_c = grads(lambda: linear_attention(q, k, v, g, mode="chunk", chunk_size=8, **kw)[0])
    g_r = grads(lambda: linear_attention(q, k, v, g, mode="recurrent", **kw)[0])
    g_o = grads(lambda: _oracle(q, k, v, g, fm, normalize, s0))
    for a, b, c in zip(g_c, g_r, g_o):
        assert max_rel(a, c) < 1e-9
        assert max_rel(b, c) < 1e-9


@pytest.mark.parametrize("gate", GATES)
def test_final_state_gradients_chunk_equal_recurrent(gate):
    q, k, v = make_qkv(1, 29, 2, 8, 8, requires_grad=True)
    g = make_gate(gate, 1, 29, 2, 8, requires_grad=True)
    leaves = [x for x in (k, v, g) if x is not None]  # the state does not depend on q
    w = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    res = []
    for mode in ("chunk", "recurrent"):
        _, s = linear_attention(q, k, v, g, mode=mode, chunk_size=16, output_final_state=True)
        res.append(torch.autograd.grad((s * w).sum(), leaves))
    for a, b in zip(*res):
        assert max_rel(a, b) < 1e-12


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 32, 64])
@pytest.mark.parametrize("T", [1, 15, 16, 17, 70])
def test_chunk_sizes_and_lengths(chunk_size, T):
    q, k, v = make_qkv(1, T, 1, 8, 4)
    g = make_gate("vector", 1, T, 1, 8)
    o_c, s_c = linear_attention(q, k, v, g, mode="chunk", chunk_size=chunk_size, output_final_state=True)
    o_r, s_r = linear_attention(q, k, v, g, mode="recurrent", output_final_state=True)
    assert (o_c - o_r).abs().max() < F64_ATOL and (s_c - s_r).abs().max() < F64_ATOL


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("normalize", [False, True])
def test_state_carried_across_calls_equals_one_call(gate, normalize):
    B, T, H, D = 2, 53, 2, 8
    q, k, v = make_qkv(B, T, H, D, 8)
    g = make_gate(gate, B, T, H, D)
    fm = "elu1" if normalize else None
    whole, s_whole = linear_attention(q, k, v, g, feature_map=fm, normalize=normalize, output_final_state=True,
                                      chunk_size=16)
    outs, state = [], None
    for (a, b), mode in zip([(0, 1), (1, 20), (20, 21), (21, 53)], ["recurrent", "chunk", "recurrent", "chunk"]):
        gp = None if g is None else g[:, a:b]
        o, state = linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], gp, feature_map=fm, normalize=normalize,
                                    initial_state=state, output_final_state=True, mode=mode, chunk_size=16)
        outs.append(o)
    assert (torch.cat(outs, 1) - whole).abs().max() < F64_ATOL
    assert (state - s_whole).abs().max() < F64_ATOL


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_strong_decay_stays_finite_in_float32(gate):
    """Log-gates down to -60 per token: exp(-G) would overflow float32 within a chunk; the chunk form never forms it."""
    q, k, v = make_qkv(1, 200, 2, 16, 16, dtype=torch.float32)
    g = make_gate(gate, 1, 200, 2, 16, dtype=torch.float32, strength=0.0)
    g = g * torch.linspace(1, 60, 200)[None, :, None, *([None] if gate == "vector" else [])]
    o_c, s_c = linear_attention(q, k, v, g, output_final_state=True)
    o_r, s_r = linear_attention(q, k, v, g, mode="recurrent", output_final_state=True)
    assert torch.isfinite(o_c).all() and torch.isfinite(s_c).all()
    assert max_rel(o_c, o_r) < 1e-5 and max_rel(s_c, s_r) < 1e-5


@pytest.mark.parametrize("dtype, strength, leaf", [(torch.float64, 1.0, 16), (torch.float64, 50.0, 4),
                                                   (torch.float32, 1.0, 16), (torch.float32, 6.0, 4),
                                                   (torch.float32, 100.0, 1)])
@pytest.mark.parametrize("extra", ["gla", "bonus", "angle"])
def test_vector_gate_leaf_sizes_equal_the_oracle(monkeypatch, dtype, strength, leaf, extra):
    """The vector-gate chunk form factors each leaf block's decays through one reference point only where the
    block's log-gates sum to at least -SPAN (40 in float32, 300 in float64): from one product per chunk (mild
    gates) down to single tokens (log-gates at the floor, -100). Every leaf size equals the float64 oracle on
    outputs, final states and gradients, at an odd length with an initial state."""
    from ttr.ops import gd
    seen, leaf_size = [], gd._leaf_size
    monkeypatch.setattr(gd, "_leaf_size", lambda G: seen.append(leaf_size(G)) or seen[-1])
    B, T, H, D, Dv = 1, 37, 2, 4, 3
    q, k, v = make_qkv(B, T, H, D, Dv, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    g = (-strength * (0.9 + 0.1 * torch.rand(B, T, H, D, generator=gen, dtype=torch.float64))).requires_grad_()
    s0 = _initial_state(B, H, 2 * D if extra == "angle" else D, Dv, False).requires_grad_()
    kw = {"bonus": torch.randn(H, D, generator=gen, dtype=torch.float64)} if extra == "bonus" else {}
    if extra == "angle":
        kw["angle"] = 3 * torch.rand(B, T, H, D, generator=gen, dtype=torch.float64)
    leaves = (q, k, v, g, s0)
    w = torch.randn(B, T, H, Dv, dtype=torch.float64)

    def run(fn, *x):
        o, s = fn(*x)
        return [o, s, *torch.autograd.grad((o * w).sum() + s.sum(), x)]

    op = lambda *x: linear_attention(*x[:4], initial_state=x[4], output_final_state=True, chunk_size=16,  # noqa: E731
                                     **{n: t.to(dtype) for n, t in kw.items()})
    ours = run(op, *(x.detach().to(dtype).requires_grad_() for x in leaves))
    assert seen == [leaf]
    truth = run(lambda *x: oracle.parametric(*x[:4], optimizer=oracle.BatchGD(), initial_state=x[4], **kw), *leaves)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for a, b in zip(ours[:5] + ours[6:], truth[:5] + truth[6:]):
        assert max_rel(a, b) < tol
    # a log-gate's gradient sums terms as large as the undecayed ones (exp(G_t - G_t) = 1) that cancel in pairs:
    # under strong decay it is tiny, and its error is measured against the size of those terms
    scale = max(float(x.abs().max()) for x in truth[2:5])
    assert float((ours[5] - truth[5]).abs().max()) < tol * scale


@pytest.mark.parametrize("gate", GATES)
def test_float32_matches_float64_oracle(gate):
    q, k, v = make_qkv(2, 45, 2, 8, 8)
    g = make_gate(gate, 2, 45, 2, 8)
    o_o, _ = oracle.parametric(q, k, v, g, optimizer=oracle.BatchGD())
    args = [x.float() for x in (q, k, v)] + [None if g is None else g.float()]
    o32, _ = linear_attention(*args, chunk_size=16)
    assert o32.dtype == torch.float32
    assert max_rel(o32, o_o) < 1e-5


def test_bfloat16_inputs_accumulate_in_float32():
    q, k, v = make_qkv(1, 300, 2, 16, 16, dtype=torch.bfloat16)
    g = make_gate("scalar", 1, 300, 2, 16, dtype=torch.bfloat16)
    o, s = linear_attention(q, k, v, g, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ref, s_ref = linear_attention(*(x.double() for x in (q, k, v, g)), output_final_state=True)
    # The inputs are exactly representable in float64; only the bf16 rounding of the output may differ.
    assert max_rel(o, ref) < 1e-2
    assert max_rel(s, s_ref) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    q, k, v = make_qkv(2, 100, 2, 16, 16, dtype=torch.float32)
    g = make_gate("vector", 2, 100, 2, 16, dtype=torch.float32)
    o_cpu, s_cpu = linear_attention(q, k, v, g, output_final_state=True)
    o_gpu, s_gpu = linear_attention(*(x.cuda() for x in (q, k, v, g)), output_final_state=True)
    assert max_rel(o_gpu.cpu(), o_cpu) < 1e-5 and max_rel(s_gpu.cpu(), s_cpu) < 1e-5


def _good():
    q, k, v = make_qkv(1, 10, 2, 4, 3, dtype=torch.float32)
    return q, k, v


@pytest.mark.parametrize("mutate,match", [
    (lambda q, k, v: (q[0], k, v, None, {}), "q must have rank 4"),
    (lambda q, k, v: (q, k[:, :, :1], v, None, {}), "same shape"),
    (lambda q, k, v: (q, k, v[:, :, :1], None, {}), "v must match k"),
    (lambda q, k, v: (q[..., :3], k, v, None, {}), "same shape"),
    (lambda q, k, v: (q, k, v.double(), None, {}), "share a dtype"),
    (lambda q, k, v: (q, k, v.long(), None, {}), "floating-point"),
    (lambda q, k, v: (q, k.index_fill(1, torch.tensor([3]), float("nan")), v, None, {}), "k has non-finite"),
    (lambda q, k, v: (q, k, v, torch.full((1, 10, 2), 0.1), {}), "must be <= 0"),
    (lambda q, k, v: (q, k, v, torch.full((1, 10, 2), -float("inf")), {}), "g has non-finite"),
    (lambda q, k, v: (q, k, v, torch.zeros(1, 10, 3), {}), r"g must be \[B, T, H\]"),
    (lambda q, k, v: (q, k, v, torch.zeros(1, 10, 2, 5), {}), r"g must be \[B, T, H\]"),
    (lambda q, k, v: (q, k, v, None, {"initial_state": torch.zeros(1, 2, 3, 3)}), "initial_state must have shape"),
    (lambda q, k, v: (q, k, v, None, {"mode": "parallel"}), "mode must be one of"),
    (lambda q, k, v: (q, k, v, None, {"chunk_size": 48}), "power of two"),
    (lambda q, k, v: (q, k, v, None, {"normalize": True}), "needs non-negative features"),
    (lambda q, k, v: (q, k, v, None, {"feature_map": "softmax"}), "feature_map must be one of"),
])
def test_bad_input_raises_clear_value_error(mutate, match):
    q, k, v, g, kw = mutate(*_good())
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, g, **kw)


def test_scale_is_applied_as_given_and_defaults_to_input_dk():
    """scale multiplies phi(q); its default is Dk^-1/2 with Dk the input head dim, not the feature dim."""
    q, k, v = make_qkv(1, 13, 2, 3, 4)
    phi = __import__("ttr").PositiveRandomFeatures(n_features=7, seed=2)
    for scale in (None, 0.3):
        o, _ = linear_attention(q, k, v, feature_map=phi, scale=scale, chunk_size=4)
        want = oracle.parametric(q, k, v, optimizer=oracle.BatchGD(), feature_map=phi,
                                 scale=3 ** -0.5 if scale is None else scale)[0]
        assert max_rel(o, want) < F64_ATOL


def test_normalized_all_zero_features_give_zero_not_nan():
    """relu features of an all-negative query vanish: the fit has no weight, and the answer is 0, not nan."""
    q, k, v = make_qkv(1, 9, 1, 4, 3)
    q = q.clone()
    q[:, 0] = -q[:, 0].abs() - 0.1
    k = k.abs()
    o, _ = linear_attention(q, k, v, feature_map="relu", normalize=True, chunk_size=4)
    assert torch.isfinite(o).all() and torch.equal(o[:, 0], torch.zeros_like(o[:, 0]))
    assert max_rel(o, oracle.local_constant(q, k, v, feature_map="relu")) < F64_ATOL


def test_final_state_only_when_asked():
    q, k, v = make_qkv(1, 5, 1, 4, 4)
    assert linear_attention(q, k, v)[1] is None and linear_attention(q, k, v, mode="recurrent")[1] is None


def test_feature_maps_are_their_closed_forms():
    from ttr.features import FEATURE_MAPS

    x = torch.randn(5, 7, dtype=torch.float64)
    assert torch.equal(FEATURE_MAPS["relu"](x), x.clamp_min(0))
    assert torch.allclose(FEATURE_MAPS["elu1"](x), torch.where(x > 0, x + 1, torch.exp(x)), atol=1e-15)
    assert torch.allclose(FEATURE_MAPS["l2"](x), x / x.norm(dim=-1, keepdim=True), atol=1e-15)
    assert torch.equal(FEATURE_MAPS["identity"](x), x)


def test_normalize_takes_the_callers_nonnegative_features():
    """fla's convention: features made outside the op (identity here) may be normalized when they are >= 0,
    and equal the op's own feature map on the same numbers; a negative feature is refused."""
    q, k, v = make_qkv(1, 21, 2, 5, 3)
    g = make_gate("scalar", 1, 21, 2)
    own, s_own = linear_attention(q, k, v, g, feature_map="relu", normalize=True, output_final_state=True,
                                  chunk_size=8)
    given, s_given = linear_attention(q.relu(), k.relu(), v, g, normalize=True, output_final_state=True, chunk_size=8)
    assert max_rel(given, own) < F64_ATOL and max_rel(s_given, s_own) < F64_ATOL
    with pytest.raises(ValueError, match="feature map 'identity' gave a value of"):
        linear_attention(q, k.relu(), v, normalize=True)
