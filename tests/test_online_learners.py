"""The online learners (issue: SGD family): chunk == recurrent == the literal optimizer (ttr.oracle),
outputs, states and gradients, odd lengths, initial states, carried state, and bad input."""

import pytest
import torch

from ttr import ops, oracle
from ttr.features import FEATURE_MAPS
from ttr.ops import MiniBatchState

from conftest import F64_ATOL, make_gate, make_qkv, max_rel

l2 = FEATURE_MAPS["l2"]


def _rand(*shape, lo=0.0, hi=1.0, seed=5, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)
    return x.requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------- delta rule

@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T,chunk", [(37, 16), (16, 16), (5, 64), (70, 32)])
def test_delta_rule_is_online_sgd(gated, T, chunk):
    """DeltaNet: M_t = M_{t-1} - beta_t grad 1/2||v_t - M k_t||^2; gated: the slides' L2-regularized SGD
    with eta = alpha beta, lambda = (1 - alpha) / (alpha beta), on targets v / alpha."""
    B, H, D = 2, 2, 6
    q, k, v = make_qkv(B, T, H, D, 5)
    beta = _rand(B, T, H, lo=0.1, hi=2.0)
    g = make_gate("scalar", B, T, H) if gated else None
    s0 = torch.randn(B, H, D, 5, dtype=torch.float64)
    o_c, s_c = ops.delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, chunk_size=chunk, qk_l2norm=True)
    o_r, s_r = ops.delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, mode="recurrent", qk_l2norm=True)
    if gated:
        a = g.exp()
        o_o, s_o = oracle.online_sgd(l2(q), l2(k), v / a[..., None], a * beta, weight_decay=(1 - a) / (a * beta),
                                     initial_state=s0)
    else:
        o_o, s_o = oracle.online_sgd(l2(q), l2(k), v, beta, initial_state=s0)
    for x, y in ((o_c, o_o), (o_r, o_o), (s_c, s_o), (s_r, s_o)):
        assert (x - y).abs().max() < F64_ATOL


def test_longhorn_step_is_the_implicit_update():
    """Longhorn's proximal step argmin ||M - M_prev||^2/2 + delta/2 ||v - M k||^2 is the delta rule with
    beta = delta / (1 + delta ||k||^2) (the slides print 1 / (1 + delta ||k||^2)); raw keys, any delta > 0."""
    q, k, v = make_qkv(2, 23, 2, 5, 4)
    delta = _rand(2, 23, 2, lo=0.0, hi=20.0)
    beta = delta / (1 + delta * (k * k).sum(-1))
    o, s = ops.delta_rule(q, k, v, beta, qk_l2norm=False, output_final_state=True, chunk_size=8)
    o_o, s_o = oracle.online_sgd(q, k, v, delta, implicit=True)
    assert max_rel(o, o_o) < F64_ATOL and max_rel(s, s_o) < F64_ATOL


def test_delta_product_is_n_sgd_steps_per_token():
    B, T, H, D, n = 2, 19, 2, 5, 3
    q, _, _ = make_qkv(B, T, H, D, 4)
    gen = torch.Generator().manual_seed(9)
    k = torch.randn(B, T, H, n, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, H, n, 4, generator=gen, dtype=torch.float64)
    beta = _rand(B, T, H, n, lo=0.0, hi=2.0)
    s0 = torch.randn(B, H, D, 4, dtype=torch.float64)
    o_o, s_o = oracle.online_sgd(l2(q), l2(k), v, beta, initial_state=s0)
    for mode in ("chunk", "recurrent"):
        o, s = ops.delta_product(q, k, v, beta, initial_state=s0, output_final_state=True, mode=mode, chunk_size=16, qk_l2norm=True)
        assert (o - o_o).abs().max() < F64_ATOL and (s - s_o).abs().max() < F64_ATOL


def test_delta_rule_gradients_match_oracle():
    B, T, H, D = 1, 13, 2, 4
    q, k, v = make_qkv(B, T, H, D, 3, requires_grad=True)
    beta = _rand(B, T, H, lo=0.2, hi=1.8, requires_grad=True)
    g = make_gate("scalar", B, T, H, requires_grad=True)
    s0 = torch.randn(B, H, D, 3, dtype=torch.float64, requires_grad=True)
    leaves, w = [q, k, v, beta, g, s0], torch.randn(B, T, H, 3, dtype=torch.float64)

    def grads(fn):
        return torch.autograd.grad((fn() * w).sum(), leaves)

    def literal():
        a = g.exp()
        return oracle.online_sgd(l2(q), l2(k), v / a[..., None], a * beta, weight_decay=(1 - a) / (a * beta),
                                 initial_state=s0)[0]

    g_o = grads(literal)
    for mode in ("chunk", "recurrent"):
        g_m = grads(lambda: ops.delta_rule(q, k, v, beta, g, initial_state=s0, mode=mode, chunk_size=4, qk_l2norm=True)[0])
        for a, b in zip(g_m, g_o):
            assert max_rel(a, b) < 1e-9


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T", [37, 8])
def test_delta_rule_chunk_gradients_with_raw_keys_equal_recurrent(gated, T):
    """Raw keys (qk_l2norm=False): a key's gradient along itself, which the normalization's Jacobian removes,
    counts here. Every gradient, of a loss on the answer and on the final state, from an initial state."""
    B, H, Dk, Dv = 2, 3, 5, 4
    q, k, v = make_qkv(B, T, H, Dk, Dv, requires_grad=True)
    k = (0.9 * l2(k.detach())).requires_grad_()                     # beta ||k||^2 <= 2 with beta <= 1.8
    beta = _rand(B, T, H, lo=0.2, hi=1.8, requires_grad=True)
    g = make_gate("scalar", B, T, H, requires_grad=True) if gated else None
    s0 = torch.randn(B, H, Dk, Dv, dtype=torch.float64, requires_grad=True)
    leaves = [x for x in (q, k, v, beta, g, s0) if x is not None]
    w_o, w_s = torch.randn(B, T, H, Dv, dtype=torch.float64), torch.randn(B, H, Dk, Dv, dtype=torch.float64)
    got = {}
    for mode in ("chunk", "recurrent"):
        o, s = ops.delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, mode=mode, chunk_size=8)
        got[mode] = [o, s, *torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), leaves)]
    for a, b in zip(got["chunk"], got["recurrent"]):
        assert max_rel(a, b) < 1e-10


@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_chunk_normalizes_zero_and_tiny_vectors_as_the_recurrent_form(gated, tiny):
    """qk_l2norm in the chunk form is laid out with the chunks and differentiated by hand: rows of q and k that are
    zero or below the norm's floor (where l2 divides by the floor and takes no component out) give the recurrent
    form's answer and gradients, with a scale that is not Dk^-1/2 (and whose 1 / scale^2 float32 cannot hold:
    without tiny rows, whose gradients would dwarf an error in the others)."""
    B, T, H, Dk, Dv = 2, 21, 2, 4, 3
    q, k, v = (x.detach() for x in make_qkv(B, T, H, Dk, Dv))
    if tiny:
        q[0, 3], k[1, 5], k[0, 7, 1], q[1, 9, 0] = 0.0, 0.0, 1e-8, 3e-7
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_()]
    beta = _rand(B, T, H, lo=0.2, hi=1.8, requires_grad=True)
    g = make_gate("scalar", B, T, H, requires_grad=True) if gated else None
    leaves += [beta] + ([g] if gated else [])
    w = torch.randn(B, T, H, Dv, dtype=torch.float64)
    got = {}
    for mode in ("chunk", "recurrent"):
        o, _ = ops.delta_rule(q, k, v, beta, g, qk_l2norm=True, scale=0.7, mode=mode, chunk_size=8)
        got[mode] = [o, *torch.autograd.grad((o * w).sum(), leaves)]
    for a, b in zip(got["chunk"], got["recurrent"]):
        assert max_rel(a, b) < 1e-10


def test_delta_product_and_longhorn_gradients_match_oracle():
    B, T, H, D, n = 1, 9, 1, 4, 2
    q, _, _ = make_qkv(B, T, H, D, 3, requires_grad=True)
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(B, T, H, n, D, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, T, H, n, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    beta = _rand(B, T, H, n, lo=0.2, hi=1.8, requires_grad=True)
    g = make_gate("scalar", B, T, H, requires_grad=True)
    w = torch.randn(B, T, H, 3, dtype=torch.float64)

    def literal():  # the gate acts once per token, before its first step
        a = torch.cat([g.exp()[..., None], torch.ones_like(beta[..., 1:])], dim=-1)
        return oracle.online_sgd(l2(q), l2(k), v / a[..., None], a * beta, weight_decay=(1 - a) / (a * beta))[0]

    leaves = [q, k, v, beta, g]
    g_o = torch.autograd.grad((literal() * w).sum(), leaves)
    for mode in ("chunk", "recurrent"):
        o, _ = ops.delta_product(q, k, v, beta, g, mode=mode, chunk_size=4, qk_l2norm=True)
        for a, b in zip(torch.autograd.grad((o * w).sum(), leaves), g_o):
            assert max_rel(a, b) < 1e-9

    k1, v1 = k[..., 0, :].detach().requires_grad_(), v[..., 0, :].detach().requires_grad_()
    delta = _rand(B, T, H, hi=5.0, requires_grad=True)
    leaves = [q, k1, v1, delta]
    g_o = torch.autograd.grad((oracle.online_sgd(l2(q), l2(k1), v1, delta, implicit=True)[0] * w).sum(), leaves)
    for mode in ("chunk", "recurrent"):
        o, _ = ops.longhorn(q, k1, v1, delta, mode=mode, chunk_size=4, qk_l2norm=True)
        for a, b in zip(torch.autograd.grad((o * w).sum(), leaves), g_o):
            assert max_rel(a, b) < 1e-9


def test_delta_rule_state_carried_across_calls():
    q, k, v = make_qkv(2, 50, 2, 8, 8)
    beta = _rand(2, 50, 2, hi=2.0)
    g = make_gate("scalar", 2, 50, 2)
    whole, s_whole = ops.delta_rule(q, k, v, beta, g, output_final_state=True, chunk_size=16, qk_l2norm=True)
    outs, state = [], None
    for (a, b), mode in zip([(0, 3), (3, 4), (4, 37), (37, 50)], ["chunk", "recurrent", "chunk", "recurrent"]):
        o, state = ops.delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b], g[:, a:b], initial_state=state,
                                  output_final_state=True, mode=mode, chunk_size=16, qk_l2norm=True)
        outs.append(o)
    assert (torch.cat(outs, 1) - whole).abs().max() < F64_ATOL and (state - s_whole).abs().max() < F64_ATOL


def test_delta_rule_long_float32_stays_finite_and_matches_recurrent():
    T = 16384
    q, k, v = make_qkv(1, T, 1, 16, 16, dtype=torch.float32)
    beta = _rand(1, T, 1, hi=2.0).float()
    g = make_gate("scalar", 1, T, 1, dtype=torch.float32)
    o_c, s_c = ops.delta_rule(q, k, v, beta, g, output_final_state=True, qk_l2norm=True)
    o_r, s_r = ops.delta_rule(q, k, v, beta, g, output_final_state=True, mode="recurrent", qk_l2norm=True)
    assert torch.isfinite(o_c).all() and torch.isfinite(s_c).all()
    assert max_rel(o_c, o_r) < 1e-4 and max_rel(s_c, s_r) < 1e-4


def test_delta_rule_bfloat16_accumulates_in_float32():
    q, k, v = make_qkv(1, 200, 2, 16, 16, dtype=torch.bfloat16)
    beta = _rand(1, 200, 2, hi=1.0).bfloat16()
    o, s = ops.delta_rule(q, k, v, beta, output_final_state=True, qk_l2norm=True)
    ref, s_ref = ops.delta_rule(q.double(), k.double(), v.double(), beta.double(), output_final_state=True, qk_l2norm=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert max_rel(o, ref) < 1e-2 and max_rel(s, s_ref) < 1e-5


# ----------------------------------------------------------------------------------- mini-batch GD

def _minibatch_cases(B, T, H, D):
    lr = _rand(B, T, H, hi=0.5)
    momentum = _rand(B, T, H, lo=0.1, hi=1.0, seed=6)
    g = make_gate("scalar", B, T, H)
    gen = torch.Generator().manual_seed(11)
    W = (0.5 * torch.randn(B, H, 10, D, generator=gen, dtype=torch.float64),
         0.5 * torch.randn(B, H, D, 10, generator=gen, dtype=torch.float64))
    pair = (torch.randn(B, H, D, D, generator=gen, dtype=torch.float64),
            torch.randn(B, H, D, D, generator=gen, dtype=torch.float64))
    return {
        "ttt_linear": (lambda q, k, v, sl, **kw: ops.ttt_linear(q, k, v, lr[:, sl], **kw, qk_l2norm=True), pair[0],
                       lambda q, k, v: oracle.minibatch_gd(l2(q), l2(k), v, lr, batch_size=4, initial_state=pair[0])),
        "ttt_mlp": (lambda q, k, v, sl, **kw: ops.ttt_mlp(q, k, v, lr[:, sl], **kw, qk_l2norm=True), W,
                    lambda q, k, v: oracle.minibatch_gd(l2(q), l2(k), v, lr, batch_size=4, initial_state=W, mlp=True)),
        "titans": (lambda q, k, v, sl, **kw: ops.titans(q, k, v, lr[:, sl], momentum[:, sl], g[:, sl], **kw, qk_l2norm=True), pair,
                   lambda q, k, v: oracle.minibatch_gd(l2(q), l2(k), v, lr, batch_size=4, initial_state=pair,
                                                       momentum=momentum, g=g)),
    }


# TTT-Linear's and Titans' chunk forms hold chunk_size // 4 mini-batches a chunk: one, two, and all of them
SPANS = {"ttt_linear": [4, 8, 64], "ttt_mlp": [None], "titans": [4, 8, 64]}
SPAN_CASES = [(name, span) for name, spans in SPANS.items() for span in spans]


def _span(span):
    return {} if span is None else {"chunk_size": span}


@pytest.mark.parametrize("name,span", SPAN_CASES)
def test_minibatch_learners_equal_literal_minibatch_gd(name, span):
    B, T, H, D = 2, 21, 2, 6  # 5 mini-batches of 4 and one token
    q, k, v = make_qkv(B, T, H, D, D)
    op, init, literal = _minibatch_cases(B, T, H, D)[name]
    y_o, w_o = literal(q, k, v)
    for mode in ("chunk", "recurrent"):
        y, state = op(q, k, v, slice(None), batch_size=4, initial_state=init, output_final_state=True, mode=mode,
                      **_span(span))
        assert (y - y_o).abs().max() < F64_ATOL
        for a, b in zip(state.weights, w_o):
            assert (a - b).abs().max() < F64_ATOL
        assert state.offset.tolist() == [1] * B


@pytest.mark.parametrize("name,span", SPAN_CASES)
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_minibatch_state_carried_mid_batch_equals_whole(name, span, mode):
    B, T, H, D = 2, 21, 2, 6
    q, k, v = make_qkv(B, T, H, D, D)
    op, init, _ = _minibatch_cases(B, T, H, D)[name]
    whole, s_whole = op(q, k, v, slice(None), batch_size=4, initial_state=init, output_final_state=True, mode=mode,
                        **_span(span))
    outs, state = [], init
    for a, b in [(0, 1), (1, 6), (6, 7), (7, 16), (16, 21)]:  # cuts inside and on mini-batch boundaries
        o, state = op(q[:, a:b], k[:, a:b], v[:, a:b], slice(a, b), batch_size=4, initial_state=state,
                      output_final_state=True, mode=mode, **_span(span))
        outs.append(o)
    assert (torch.cat(outs, 1) - whole).abs().max() < F64_ATOL
    assert isinstance(state, MiniBatchState) and state.offset.tolist() == s_whole.offset.tolist() == [1, 1]
    for a, b in zip(state.weights + state.start, s_whole.weights + s_whole.start):
        assert (a - b).abs().max() < F64_ATOL


@pytest.mark.parametrize("name,span", SPAN_CASES)
def test_minibatch_gradients_match_oracle(name, span):
    B, T, H, D = 1, 9, 1, 4
    q, k, v = make_qkv(B, T, H, D, D, requires_grad=True)
    op, init, literal = _minibatch_cases(B, T, H, D)[name]
    w = torch.randn(B, T, H, D, dtype=torch.float64)
    g_o = torch.autograd.grad((literal(q, k, v)[0] * w).sum(), [q, k, v])
    for mode in ("chunk", "recurrent"):
        y, _ = op(q, k, v, slice(None), batch_size=4, initial_state=init, mode=mode, **_span(span))
        for a, b in zip(torch.autograd.grad((y * w).sum(), [q, k, v]), g_o):
            assert max_rel(a, b) < 1e-9


@pytest.mark.parametrize("keys", ["unit", "raw"])
@pytest.mark.parametrize("name", ["ttt_linear", "titans"])
@pytest.mark.parametrize("span", [4, 8, 64])
def test_chunks_of_minibatches_equal_recurrent_in_every_gradient(name, span, keys):
    """Every input's gradient (rates, momentum, gate and both starting weights too), through the answer and the
    final weights and start weights, equals the token-by-token form, at T = 37 (not a whole chunk). Raw keys
    (qk_l2norm=False) count a key's gradient along itself, which the normalization's Jacobian removes."""
    B, T, H, D = 2, 37, 2, 5
    q, k, v = make_qkv(B, T, H, D, D, requires_grad=True)
    if keys == "raw":
        k = (0.9 * l2(k.detach())).requires_grad_()
    theta = _rand(B, T, H, hi=0.2, requires_grad=True)
    momentum = _rand(B, T, H, lo=0.1, hi=0.9, seed=6, requires_grad=True)
    g = make_gate("scalar", B, T, H).detach().requires_grad_()
    gen = torch.Generator().manual_seed(3)
    S0, P0 = (torch.randn(B, H, D, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)

    def run(mode):
        if name == "titans":
            leaves = [q, k, v, theta, momentum, g, S0, P0]
            o, state = ops.titans(q, k, v, theta, momentum, g, batch_size=4, chunk_size=span, mode=mode,
                                  initial_state=(S0, P0), output_final_state=True, qk_l2norm=keys == "unit")
        else:
            leaves = [q, k, v, theta, S0]
            o, state = ops.ttt_linear(q, k, v, theta, batch_size=4, chunk_size=span, mode=mode, initial_state=S0,
                                      output_final_state=True, qk_l2norm=keys == "unit")
        loss = (o * w).sum() + sum((x * x).sum() for x in state.weights + state.start)
        return [o, *state.weights, *state.start, *torch.autograd.grad(loss, leaves)]

    for a, b in zip(run("chunk"), run("recurrent")):
        assert max_rel(a, b) < 1e-12


@pytest.mark.parametrize("layout", ["resumed", "packed"])
@pytest.mark.parametrize("name", ["ttt_linear", "titans"])
def test_chunks_of_minibatches_resumed_or_packed_equal_recurrent_in_every_gradient(name, layout):
    """A call resumed inside a mini-batch (its first gradients at the start weights: the shift of the first
    chunk's right-hand side) and packed rows ending inside different mini-batches, with raw keys: every gradient,
    through both calls' answers, the final weights and the start weights, equals the token-by-token form."""
    T, H, D = 37, 2, 5
    q, k, v = make_qkv(1, T, H, D, D, requires_grad=True)
    k = (0.9 * l2(k.detach())).requires_grad_()
    theta = _rand(1, T, H, hi=0.2, requires_grad=True)
    momentum = _rand(1, T, H, lo=0.1, hi=0.9, seed=6, requires_grad=True)
    g = make_gate("scalar", 1, T, H).detach().requires_grad_()
    w = torch.randn(1, T, H, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    leaves = [q, k, v, theta] + ([momentum, g] if name == "titans" else [])

    def call(sl, mode, state=None, **kw):
        rates = [theta[:, sl]] + ([momentum[:, sl], g[:, sl]] if name == "titans" else [])
        return getattr(ops, name)(q[:, sl], k[:, sl], v[:, sl], *rates, batch_size=4, chunk_size=8, mode=mode,
                                  initial_state=state, output_final_state=True, **kw)

    def run(mode):
        if layout == "resumed":  # 6 tokens: the second call starts inside the second mini-batch
            o1, s1 = call(slice(0, 6), mode)
            o2, state = call(slice(6, T), mode, s1)
            o = torch.cat([o1, o2], 1)
        else:
            o, state = call(slice(0, T), mode, cu_seqlens=torch.tensor([0, 9, 23, T]))
        loss = (o * w).sum() + sum((x * x).sum() for x in state.weights + state.start)
        return [o, *state.weights, *state.start, *torch.autograd.grad(loss, leaves)]

    for a, b in zip(run("chunk"), run("recurrent")):
        assert max_rel(a, b) < 1e-12


@pytest.mark.parametrize("uses", ["all", "final", "start"])
@pytest.mark.parametrize("layout", ["whole", "resumed", "packed"])
def test_ttt_mlp_chunk_form_equals_recurrent_in_every_gradient(layout, uses):
    """TTT-MLP's written-out pass: every input's gradient (rates and both starting weights too), through the answer,
    the final weights and the start weights (all of them, or a loss on the final or the start weights alone: no
    gradient reaches the answer), equals the token-by-token form; whole rows, a call resumed inside a mini-batch
    (its first mini-batch in autograd ops, the rest through the pass), and packed rows of lengths that end in
    different mini-batches."""
    B, T, H, D, Dh = 2, 37, 2, 5, 7
    q, k, v = make_qkv(B, T, H, D, D, requires_grad=True)
    lr = _rand(B, T, H, hi=0.3, requires_grad=True)
    gen = torch.Generator().manual_seed(3)
    W1 = (0.5 * torch.randn(B, H, Dh, D, generator=gen, dtype=torch.float64)).requires_grad_()
    W2 = (0.5 * torch.randn(B, H, D, Dh, generator=gen, dtype=torch.float64)).requires_grad_()
    w = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    leaves = [q, k, v, lr, W1, W2]

    def run(mode):
        kw = dict(batch_size=4, mode=mode, output_final_state=True, qk_l2norm=True)
        if layout == "packed":  # rows of 37, 9 and 28 tokens: the last mini-batch of each starts at 36, 8, 24
            cu = torch.tensor([0, 37, 46, 74])
            flat = [x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, lr)]
            weights = tuple(torch.cat([x, x[:1]]) for x in (W1, W2))
            o, state = ops.ttt_mlp(*flat, initial_state=weights, cu_seqlens=cu, **kw)
            o = o.view(B, T, H, D)
        elif layout == "resumed":  # 6 tokens, then the rest from inside the second mini-batch
            o1, state = ops.ttt_mlp(q[:, :6], k[:, :6], v[:, :6], lr[:, :6], initial_state=(W1, W2), **kw)
            o2, state = ops.ttt_mlp(q[:, 6:], k[:, 6:], v[:, 6:], lr[:, 6:], initial_state=state, **kw)
            o = torch.cat([o1, o2], 1)
        else:
            o, state = ops.ttt_mlp(q, k, v, lr, initial_state=(W1, W2), **kw)
        squares = {"final": state.weights, "start": state.start, "all": state.weights + state.start}[uses]
        loss = sum((x * x).sum() for x in squares) + ((o * w).sum() if uses == "all" else 0.0)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # q: no path without the answer
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
        return [o, *state.weights, *state.start, *grads]

    for a, b in zip(run("chunk"), run("recurrent")):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max().clamp_min(1.0)


def test_ttt_mlp_float32_answer_and_gradients_agree_with_float64():
    """The written-out pass in float32 (its buffers, strided outputs and in-place products) against float64, at
    sizes where the products take their vectorized paths: T = 70 (four mini-batches of 16 and 6 tokens)."""
    B, T, H, D, Dh = 1, 70, 2, 16, 64
    q, k, v = make_qkv(B, T, H, D, D)
    lr = _rand(B, T, H, hi=0.1)
    gen = torch.Generator().manual_seed(3)
    W1, W2 = (0.3 * torch.randn(B, H, *shape, generator=gen, dtype=torch.float64) for shape in [(Dh, D), (D, Dh)])
    w = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)

    def run(dtype):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, lr, W1, W2)]
        o, state = ops.ttt_mlp(*leaves[:4], initial_state=tuple(leaves[4:]), qk_l2norm=True, output_final_state=True)
        loss = (o * w.to(dtype)).sum() + sum((x * x).sum() for x in state.weights)
        return [o, *state.weights, *torch.autograd.grad(loss, leaves)]

    for a, b in zip(run(torch.float32), run(torch.float64)):
        assert max_rel(a.double(), b) < 1e-5  # float32 rounding: about 3e-7 here


def test_ttt_mlp_backward_leaves_the_callers_gradients_alone():
    """The written-out pass accumulates the gradients reaching each mini-batch's weights in place: it must start
    from copies of the ones it is handed (the final weights' gradients, views of the caller's), so that they come
    back unchanged and a second backward with them gives the same gradients."""
    B, T, H, D, Dh = 1, 12, 2, 4, 8
    q, k, v = make_qkv(B, T, H, D, D, requires_grad=True)
    lr = _rand(B, T, H, hi=0.3, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    W1 = torch.randn(B, H, Dh, D, generator=gen, dtype=torch.float64).requires_grad_()
    W2 = (torch.randn(B, H, D, Dh, generator=gen, dtype=torch.float64) / Dh ** 0.5).requires_grad_()
    o, state = ops.ttt_mlp(q, k, v, lr, initial_state=(W1, W2), batch_size=4, qk_l2norm=True,
                           output_final_state=True)
    outs = [o, *state.weights]
    given = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in outs]
    kept = [x.clone() for x in given]
    leaves = [q, k, v, lr, W1, W2]
    first = torch.autograd.grad(outs, leaves, given, retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(given, kept))
    second = torch.autograd.grad(outs, leaves, given)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_ttt_linear_with_batch_one_is_deltanet():
    q, k, v = make_qkv(2, 17, 2, 6, 6)
    lr = _rand(2, 17, 2, hi=1.5)
    y_ttt, _ = ops.ttt_linear(q, k, v, lr, batch_size=1, qk_l2norm=True)
    y_delta, _ = ops.delta_rule(q, k, v, lr, qk_l2norm=True)
    assert (y_ttt - y_delta).abs().max() < F64_ATOL


# ------------------------------------------------------------------------------------------ errors

def _qkv32():
    return make_qkv(1, 10, 2, 4, 4, dtype=torch.float32)


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: ops.delta_rule(q, k, v, torch.full((1, 10, 2), 2.5), qk_l2norm=True), r"beta must lie in \[0, 2\]"),
    (lambda q, k, v: ops.delta_rule(q, k, v, torch.full((1, 10, 2), -0.1), qk_l2norm=True), r"beta must lie in \[0, 2\]"),
    (lambda q, k, v: ops.delta_rule(q, k, v, torch.ones(1, 10, 3), qk_l2norm=True), "beta must have shape"),
    (lambda q, k, v: ops.delta_rule(q, k, v, torch.full((1, 10, 2), float("nan")), qk_l2norm=True), "beta has non-finite"),
    (lambda q, k, v: ops.delta_rule(q, k, v, torch.ones(1, 10, 2), torch.zeros(1, 10, 2, 4), qk_l2norm=True), "scalar log-gate"),
    (lambda q, k, v: ops.delta_rule(q, k, v, torch.ones(1, 10, 2), torch.ones(1, 10, 2), qk_l2norm=True), "must be <= 0"),
    (lambda q, k, v: ops.delta_rule(q, k, v[:, :, :1], torch.ones(1, 10, 2), qk_l2norm=True), "v must match k"),
    (lambda q, k, v: ops.ttt_linear(q, k, v, -torch.ones(1, 10, 2), qk_l2norm=True), r"lr must lie in \[0, inf\]"),
    (lambda q, k, v: ops.ttt_linear(q, k, v, torch.ones(1, 10, 2), batch_size=0, qk_l2norm=True), "batch_size"),
    (lambda q, k, v: ops.titans(q, k, v, torch.ones(1, 10, 2), torch.full((1, 10, 2), 0.5), chunk_size=0,
                                qk_l2norm=True), "chunk_size must be a positive int, got 0"),
    (lambda q, k, v: ops.ttt_mlp(q, k, v, torch.ones(1, 10, 2), initial_state=None, qk_l2norm=True), "initial_state must be"),
    (lambda q, k, v: ops.titans(q, k, v, torch.ones(1, 10, 2), torch.zeros(1, 10, 2), qk_l2norm=True), r"momentum must lie in \(0, 1\]"),
    (lambda q, k, v: ops.titans(q, k, v, torch.ones(1, 10, 2), torch.ones(1, 10, 2),
                                initial_state=(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 3, 4)), qk_l2norm=True), "momentum"),
    (lambda q, k, v: ops.delta_product(q, k, v, torch.ones(1, 10, 2), qk_l2norm=True), r"\[B, T, H, n, D\]"),
])
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(*_qkv32())
