"""ops.mlstm, the mLSTM memory (xLSTM): chunk form == recurrent form == the literal weighted regression (oracle),
outputs, final states and gradients, on lengths that are not multiples of the chunk, with initial states and packed
sequences; the max-stabilizer keeps float32 finite where exp(itilde) overflows; and the same numbers as the
mlstm_kernels package's native PyTorch implementations."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from ttr import oracle
from ttr.ops import mlstm

from conftest import F64_ATOL, make_gate, make_qkv, max_rel

B, T, H, D, DV = 2, 13, 2, 8, 6
MODES = ["chunk", "recurrent"]


def _input_gate(B=B, T=T, H=H, shift=0.0, std=2.0, seed=4, dtype=torch.float64, requires_grad=False):
    i = torch.randn(B, T, H, generator=torch.Generator().manual_seed(seed), dtype=dtype) * std + shift
    return i.requires_grad_(requires_grad)


def _state(rows=B, H=H, Dk=D, Dv=DV, seed=3, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    state = (torch.randn(rows, H, Dk, Dv, generator=gen, dtype=torch.float64),
             torch.randn(rows, H, Dk, generator=gen, dtype=torch.float64),
             torch.randn(rows, H, generator=gen, dtype=torch.float64))
    return tuple(s.requires_grad_(requires_grad) for s in state)


def _unstabilized(state):
    """(C e^m, n e^m): the state's value, whatever stabilizer m it is kept at."""
    C, n, m = state
    return C * torch.exp(m)[..., None, None], n * torch.exp(m)[..., None]


def _assert_states_close(state, ref, tol=F64_ATOL):
    for mine, theirs in zip(_unstabilized(state), _unstabilized(ref)):
        assert max_rel(mine, theirs) < tol


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_mlstm_equals_the_literal_regression(mode, with_state):
    q, k, v = make_qkv(B, T, H, D, DV)
    i, g = _input_gate(), make_gate("scalar", B, T, H)
    s0 = _state() if with_state else None
    ref, ref_state = oracle.mlstm(q, k, v, i, g, initial_state=s0)
    o, state = mlstm(q, k, v, i, g, initial_state=s0, output_final_state=True, mode=mode, chunk_size=4)
    assert o.dtype == torch.float64 and [s.dtype for s in state] == [torch.float64] * 3
    assert max_rel(o, ref) < F64_ATOL
    _assert_states_close(state, ref_state)


def test_gradients_chunk_recurrent_oracle():
    Bg, Tg, Dk, Dv = 2, 9, 4, 3
    q, k, v = make_qkv(Bg, Tg, H, Dk, Dv, requires_grad=True)
    i, g = _input_gate(Bg, Tg, requires_grad=True), make_gate("scalar", Bg, Tg, H, requires_grad=True)
    s0 = _state(Bg, H, Dk, Dv, requires_grad=True)
    leaves = [q, k, v, i, g, *s0]
    gen = torch.Generator().manual_seed(11)
    weights = [torch.randn(Bg, Tg, H, Dv, generator=gen, dtype=torch.float64),
               torch.randn(Bg, H, Dk, Dv, generator=gen, dtype=torch.float64),
               torch.randn(Bg, H, Dk, generator=gen, dtype=torch.float64)]
    grads = []
    for run in ("chunk", "recurrent", "oracle"):
        if run == "oracle":
            o, state = oracle.mlstm(q, k, v, i, g, initial_state=s0)
        else:
            o, state = mlstm(q, k, v, i, g, initial_state=s0, output_final_state=True, mode=run, chunk_size=4)
        loss = sum((x * w).sum() for x, w in zip((o, *_unstabilized(state)), weights))
        grads.append(torch.autograd.grad(loss, leaves))
    for name, chunk, recurrent, ref in zip("q k v i g C0 n0 m0".split(), *grads):
        assert max_rel(chunk, ref) < 1e-9 and max_rel(recurrent, ref) < 1e-9, name


@pytest.mark.parametrize("then", MODES)
@pytest.mark.parametrize("first", MODES)
def test_state_carried_across_calls(first, then):
    """A prefix in one call, the rest in another (a chunked prefill, then decoding) == one call."""
    q, k, v = make_qkv(B, T, H, D, DV)
    i, g, s0 = _input_gate(), make_gate("scalar", B, T, H), _state()
    whole, whole_state = mlstm(q, k, v, i, g, initial_state=s0, output_final_state=True, mode=first, chunk_size=4)
    cut = 6
    head, mid = mlstm(q[:, :cut], k[:, :cut], v[:, :cut], i[:, :cut], g[:, :cut], initial_state=s0,
                      output_final_state=True, mode=first, chunk_size=4)
    tail, end = mlstm(q[:, cut:], k[:, cut:], v[:, cut:], i[:, cut:], g[:, cut:], initial_state=mid,
                      output_final_state=True, mode=then, chunk_size=4)
    assert max_rel(torch.cat([head, tail], 1), whole) < F64_ATOL
    for mine, ref in zip(end, whole_state):  # m included: the same recurrence for the stabilizer
        assert max_rel(mine, ref) < F64_ATOL


@pytest.mark.parametrize("mode", MODES)
def test_packed_sequences_equal_each_sequence_alone(mode):
    """One empty sequence among them; input gates mostly negative, so that m falls below 0 and a padded position
    with itilde = 0 would lift it (the packed frame and the chunk tail must write nothing and leave m alone)."""
    lengths = [5, 0, 7, 3]  # with chunks of 4, 5 and 7 share a padded batch (_varlen.length_groups)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    total = sum(lengths)
    q, k, v = make_qkv(1, total, H, D, DV)
    i, g = _input_gate(1, total, shift=-6.0, std=0.5), make_gate("scalar", 1, total, H)
    C0, n0, m0 = _state(len(lengths))
    s0 = (C0, n0, m0 - 3.0)
    for given in (s0, None):
        o, state = mlstm(q, k, v, i, g, initial_state=given, output_final_state=True, mode=mode, chunk_size=4,
                         cu_seqlens=cu)
        for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            rows = None if given is None else [s[n:n + 1] for s in given]
            if a == b:  # no tokens: the initial state, or a fresh one (zeros, m = 0)
                assert all(torch.equal(mine[n], torch.zeros_like(mine[n]) if given is None else part[n])
                           for mine, part in zip(state, s0))
                continue
            # alone and recurrent: no padding anywhere, m follows max(g_t + m_{t-1}, itilde_t) over real tokens only
            ref, ref_state = mlstm(q[:, a:b], k[:, a:b], v[:, a:b], i[:, a:b], g[:, a:b], initial_state=rows,
                                   output_final_state=True, mode="recurrent")
            assert max_rel(o[:, a:b], ref) < F64_ATOL
            for mine, theirs in zip(state, ref_state):
                assert max_rel(mine[n:n + 1], theirs) < F64_ATOL
        # m fell below 0, where a padded itilde = 0 would lift it: the comparisons above have teeth
        assert float(state[2][torch.tensor(lengths) > 0].max()) < 0


@pytest.mark.parametrize("mode", MODES)
def test_large_input_gates_stay_finite_in_float32(mode):
    """itilde in [80, 200]: exp(itilde) overflows float32 (beyond 88), the stabilized form does not."""
    q, k, v = make_qkv(B, T, H, D, DV, dtype=torch.float32)
    i = torch.rand(B, T, H, generator=torch.Generator().manual_seed(6)) * 120 + 80
    g = make_gate("scalar", B, T, H, dtype=torch.float32)
    assert not math.isfinite(float(torch.exp(i).max()))
    ref, ref_state = oracle.mlstm(q, k, v, i, g)
    o, state = mlstm(q, k, v, i, g, output_final_state=True, mode=mode, chunk_size=4)
    assert o.dtype == torch.float32 and state[0].dtype == torch.float32
    assert bool(torch.isfinite(o).all()) and all(bool(torch.isfinite(s).all()) for s in state)
    assert max_rel(o, ref) < 1e-4
    # the oracle's state is unstabilized (finite in float64); brought to our m, as C e^m overflows float32
    C, n, m = state
    ref_C, ref_n, _ = ref_state
    down = torch.exp(-m.double())
    assert max_rel(C, ref_C * down[..., None, None]) < 1e-4 and max_rel(n, ref_n * down[..., None]) < 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_a_strong_forget_gate_is_not_rounded_off_under_strong_input_gates(mode):
    """A forget gate below the shared floor (-100) still counts when input gates differ by more than that:
    itilde_0 = 120 then g = -120 leaves token 0 about the weight of a later itilde = 0 (e^20 times it, were g
    clamped at -100)."""
    q, k, v = make_qkv(1, 6, H, D, DV)
    i = torch.zeros(1, 6, H, dtype=torch.float64)
    i[:, 0] = 120.0
    g = torch.full((1, 6, H), -0.1, dtype=torch.float64)
    g[:, 2] = -120.0
    ref, _ = oracle.mlstm(q, k, v, i, g)
    o, _ = mlstm(q, k, v, i, g, mode=mode, chunk_size=4)
    assert max_rel(o, ref) < F64_ATOL


def test_bad_inputs_raise_one_line_value_errors():
    q, k, v = make_qkv(B, T, H, D, DV)
    i, g = _input_gate(), make_gate("scalar", B, T, H)
    nan_i = i.clone()
    nan_i[0, 3, 1] = math.nan
    cases = {
        "q": dict(q=q[..., :-1]),
        "i must be": dict(i=i[:, :-1]),
        "i has non-finite": dict(i=nan_i),
        "i must be a floating": dict(i=i.long()),
        "<= 0": dict(g=g + 1.0),
        "scalar log-gate": dict(g=g[..., None].expand(B, T, H, D)),
        "required": dict(g=None),
        "initial_state (C)": dict(initial_state=(torch.zeros(B, H, D, DV + 1), torch.zeros(B, H, D),
                                                 torch.zeros(B, H))),
        "initial_state (m)": dict(initial_state=(torch.zeros(B, H, D, DV), torch.zeros(B, H, D),
                                                 torch.zeros(B, H, 1))),
        "triple": dict(initial_state=torch.zeros(B, H, D, DV)),
        "mode": dict(mode="parallel"),
        "chunk_size": dict(chunk_size=6),
    }
    for needle, change in cases.items():
        args = dict(q=q, k=k, v=v, i=i, g=g) | change
        qq, kk, vv, ii, gg = (args.pop(name) for name in ("q", "k", "v", "i", "g"))
        with pytest.raises(ValueError, match=re.escape(needle)) as raised:
            mlstm(qq, kk, vv, ii, gg, **args)
        assert "\n" not in str(raised.value), needle


# mlstm_kernels (NXAI, the xLSTM authors' kernels) 2.0.6, its native PyTorch implementations, as read from its
# source: q, k, v are [B, H, T, D], the gates i, f [B, H, T]; f is the forget gate's pre-activation, passed through
# logsigmoid inside (so g = logsigmoid(f)); q is scaled by Dk^-1/2; the answer divides by max(|n^T q|, e^-m) + eps;
# the states are the stabilized (c [B, H, Dk, Dv], n [B, H, Dk], m [B, H, 1]), a fresh one zeros (m = 0), with
# m_t = max(logsigmoid(f_t) + m_{t-1}, i_t). The recurrent form keeps its states in dtype_state (float32 unless told);
# the chunkwise form needs T a multiple of its chunk size; the parallel one (stablef) takes no states.
def _peer():
    pytest.importorskip("mlstm_kernels", reason="the peer test compares with mlstm_kernels (pip install "
                                                "mlstm_kernels==2.0.6, part of the test extra)")
    from mlstm_kernels.torch.chunkwise.native import mlstm_chunkwise__native_autograd as chunkwise
    from mlstm_kernels.torch.parallel.native_stablef import mlstm_parallel__native_stablef_autograd as parallel
    from mlstm_kernels.torch.recurrent.native_sequence import mlstm_recurrent_sequence__native_fw as recurrent
    return recurrent, chunkwise, parallel


def _heads_first(x):
    """[B, T, H, ...] <-> [B, H, T, ...]"""
    return x.transpose(1, 2)


@pytest.mark.parametrize("with_state", [False, True])
def test_mlstm_equals_mlstm_kernels(with_state):
    recurrent, chunkwise, parallel = _peer()
    Tp = 16
    q, k, v = make_qkv(B, Tp, H, D, DV)
    i = _input_gate(B, Tp)
    f = torch.randn(B, Tp, H, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 2.0
    s0 = _state() if with_state else None
    theirs = dict(eps=0.0, return_last_states=True)
    if with_state:
        theirs |= dict(c_initial=s0[0], n_initial=s0[1], m_initial=s0[2][..., None])
    peer_in = [_heads_first(x) for x in (q, k, v, i, f)]
    o_rec, state_rec = recurrent(*peer_in, dtype_state=torch.float64, **theirs)
    o_chunk, state_chunk = chunkwise(*peer_in, chunk_size=4, **theirs)
    for mode in MODES:
        o, state = mlstm(q, k, v, i, F.logsigmoid(f), initial_state=s0, output_final_state=True, mode=mode,
                         chunk_size=4)
        for peer_o, (c, n, m) in ((o_rec, state_rec), (o_chunk, state_chunk)):
            assert max_rel(o, _heads_first(peer_o)) < F64_ATOL
            for mine, ref in zip(state, (c, n, m[..., 0])):  # the same stabilized states, m included
                assert max_rel(mine, ref) < F64_ATOL
    if not with_state:
        o, _ = mlstm(q, k, v, i, F.logsigmoid(f), chunk_size=4)
        assert max_rel(o, _heads_first(parallel(*peer_in, eps=0.0))) < F64_ATOL


def test_gradients_equal_mlstm_kernels():
    """Their parallel form differentiates through its stabilizer too: as h does not depend on it, the same gradients."""
    _, _, parallel = _peer()
    q, k, v = make_qkv(B, T, H, D, DV, requires_grad=True)
    i = _input_gate(requires_grad=True)
    f = (torch.randn(B, T, H, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 2.0).requires_grad_()
    w = torch.randn(B, T, H, DV, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    leaves = [q, k, v, i, f]
    o, _ = mlstm(q, k, v, i, F.logsigmoid(f), chunk_size=4)
    mine = torch.autograd.grad((o * w).sum(), leaves)
    peer = parallel(*(_heads_first(x) for x in leaves), eps=0.0)
    ref = torch.autograd.grad((_heads_first(peer) * w).sum(), leaves)
    for name, a, b in zip("q k v i f".split(), mine, ref):
        assert max_rel(a, b) < 1e-9, name
