"""Two weight structures of ops.linear_attention beyond scalar and vector gates:

- a complex gate per key channel (GateLoop, LRU): alpha_t = exp(g_t + i theta_t), the state complex, the answer its
  real part; the chunk form absorbs the rotation into q and k (cumulative angles within a chunk) and turns the
  carried state between chunks;
- a per-entry gate (Mamba): a log-gate g [B, T, H, Dk, Dv] decaying each entry of the state at its own rate.

Chunk form == recurrent form == the literal weighted regression (oracle), outputs, final states and gradients, on
lengths that are not multiples of the chunk, with initial states and packed sequences; each equal to its system's
recurrence as its paper writes it."""

import pytest
import torch

from ttr import oracle
from ttr.ops import linear_attention

from conftest import F64_ATOL, make_gate, make_qkv, max_rel

B, T, H, D, DV = 2, 13, 2, 4, 3
GATES = [None, "scalar", "vector"]


def _randn(*shape, seed, requires_grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.requires_grad_(requires_grad)


def _entry_gate(B=B, T=T, seed=4, requires_grad=False):
    g = -torch.rand(B, T, H, D, DV, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g.requires_grad_(requires_grad)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_complex_gate_equals_the_literal_regression(gate, mode):
    q, k, v = make_qkv(B, T, H, D, DV)
    g, angle, s0 = make_gate(gate, B, T, H, D), _randn(B, T, H, D, seed=2), _randn(B, H, 2 * D, DV, seed=3)
    ref, ref_state = oracle.parametric(q, k, v, g, optimizer=oracle.BatchGD(), angle=angle, initial_state=s0)
    o, state = linear_attention(q, k, v, g, angle=angle, initial_state=s0, output_final_state=True, mode=mode,
                                chunk_size=4)
    assert state.shape == (B, H, 2 * D, DV)
    assert max_rel(o, ref) < F64_ATOL and max_rel(state, ref_state) < F64_ATOL


@pytest.mark.parametrize("gate", GATES)
def test_complex_gate_equals_gateloop_as_written(gate):
    """GateLoop (Katsch, 2023): S_t = diag(a_t) S_{t-1} + k_t v_t^T with complex a_t = exp(g_t + i theta_t) per key
    channel, y_t = Re(q_t^T S_t); computed here with torch's complex numbers, scale 1."""
    q, k, v = make_qkv(B, T, H, D, DV, seed=7)
    g, angle = make_gate(gate, B, T, H, D, seed=8), _randn(B, T, H, D, seed=9)
    log_a = torch.complex(torch.zeros_like(angle) if g is None else (g if g.dim() == 4 else g[..., None]).expand_as(angle),
                          angle)
    S = torch.zeros(B, H, D, DV, dtype=torch.complex128)
    out = []
    for t in range(T):
        S = torch.exp(log_a[:, t])[..., None] * S + (k[:, t, :, :, None] * v[:, t, :, None, :]).to(S.dtype)
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(S.dtype), S).real)
    o, state = linear_attention(q, k, v, g, angle=angle, scale=1.0, chunk_size=4, output_final_state=True)
    assert max_rel(o, torch.stack(out, 1)) < F64_ATOL
    assert max_rel(state, torch.cat([S.real, S.imag], dim=2)) < F64_ATOL


def test_complex_gate_with_large_cumulative_angles_in_float32():
    """Angles of about 3 radians per token turn the state by hundreds of radians over the sequence; the chunk form
    only forms angles turned within a chunk, so float32 keeps its precision."""
    q, k, v = make_qkv(1, 300, H, D, DV, dtype=torch.float32, seed=11)
    g = make_gate("vector", 1, 300, H, D, dtype=torch.float32, seed=12)
    angle = 3.0 + 0.1 * torch.randn(1, 300, H, D, generator=torch.Generator().manual_seed(13))
    ref, ref_state = linear_attention(q.double(), k.double(), v.double(), g.double(), angle=angle.double(),
                                      output_final_state=True, mode="recurrent")
    o, state = linear_attention(q, k, v, g, angle=angle, output_final_state=True, chunk_size=16)
    assert max_rel(o, ref) < 1e-4 and max_rel(state, ref_state) < 1e-4


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_entry_gate_equals_the_literal_regression(mode):
    q, k, v = make_qkv(B, T, H, D, DV)
    g, s0 = _entry_gate(), _randn(B, H, D, DV, seed=3)
    ref, ref_state = oracle.parametric(q, k, v, g, optimizer=oracle.BatchGD(), initial_state=s0)
    o, state = linear_attention(q, k, v, g, initial_state=s0, output_final_state=True, mode=mode, chunk_size=4)
    assert max_rel(o, ref) < F64_ATOL and max_rel(state, ref_state) < F64_ATOL


def test_entry_gate_equals_mamba_as_written():
    """Mamba's selective scan (Gu & Dao, 2023) for one channel c of state n: h_t[n, c] = exp(Delta_t[c] A[n, c])
    h_{t-1}[n, c] + Delta_t[c] B_t[n] x_t[c], y_t[c] = sum_n C_t[n] h_t[n, c]: the per-entry gate g = Delta A, key B,
    value Delta x, query C, scale 1."""
    C_, B_, x = make_qkv(B, T, H, D, DV, seed=5)
    delta = torch.nn.functional.softplus(_randn(B, T, H, DV, seed=6))
    A = -torch.exp(_randn(H, D, DV, seed=7))
    h = torch.zeros(B, H, D, DV, dtype=torch.float64)
    ys = []
    for t in range(T):
        h = torch.exp(delta[:, t, :, None, :] * A) * h + B_[:, t, :, :, None] * (delta[:, t] * x[:, t])[:, :, None, :]
        ys.append((C_[:, t, :, :, None] * h).sum(2))
    g = delta[:, :, :, None, :] * A
    for mode in ("chunk", "recurrent"):
        y, _ = linear_attention(C_, B_, delta * x, g, scale=1.0, mode=mode, chunk_size=4)
        assert max_rel(y, torch.stack(ys, 1)) < F64_ATOL


def test_entry_gate_reduces_to_vector_and_scalar_gates():
    q, k, v = make_qkv(B, T, H, D, DV)
    for kind in ("vector", "scalar"):
        g = make_gate(kind, B, T, H, D)
        entry = (g if kind == "vector" else g[..., None]).unsqueeze(-1).expand(B, T, H, D, DV)
        for mode in ("chunk", "recurrent"):
            assert max_rel(linear_attention(q, k, v, entry, mode=mode, chunk_size=4)[0],
                           linear_attention(q, k, v, g, mode=mode, chunk_size=4)[0]) < F64_ATOL


@pytest.mark.parametrize("kind", ["complex", "entry"])
def test_gradients_chunk_recurrent_oracle(kind):
    Bg, Tg = 2, 9
    inputs = make_qkv(Bg, Tg, H, D, DV, requires_grad=True)
    if kind == "complex":
        g = make_gate("vector", Bg, Tg, H, D, requires_grad=True)
        extra = {"angle": _randn(Bg, Tg, H, D, seed=2, requires_grad=True)}
        s0 = _randn(Bg, H, 2 * D, DV, seed=3, requires_grad=True)
    else:
        g, extra, s0 = _entry_gate(Bg, Tg, requires_grad=True), {}, _randn(Bg, H, D, DV, seed=3, requires_grad=True)
    leaves = [*inputs, g, s0, *extra.values()]
    weights, state_weights = _randn(Bg, Tg, H, DV, seed=20), _randn(*s0.shape, seed=21)
    grads = []
    for run in ("chunk", "recurrent", "oracle"):
        if run == "oracle":
            o, s = oracle.parametric(*inputs, g, optimizer=oracle.BatchGD(), initial_state=s0, **extra)
        else:
            o, s = linear_attention(*inputs, g, initial_state=s0, output_final_state=True, mode=run, chunk_size=4,
                                    **extra)
        grads.append(torch.autograd.grad((o * weights).sum() + (s * state_weights).sum(), leaves))
    for chunk, recurrent, ref in zip(*grads):
        assert max_rel(chunk, ref) < 1e-9 and max_rel(recurrent, ref) < 1e-9


@pytest.mark.parametrize("kind", ["complex", "entry"])
def test_state_carried_across_calls_and_packed_sequences(kind):
    Tp = 21
    q, k, v = make_qkv(1, Tp, H, D, DV)
    if kind == "complex":
        g, extra = make_gate("scalar", 1, Tp, H, D), {"angle": _randn(1, Tp, H, D, seed=2)}
    else:
        g, extra = _entry_gate(1, Tp), {}

    def part(a, b, **kw):
        cut = {name: x[:, a:b] for name, x in extra.items()}
        return linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], output_final_state=True, chunk_size=4,
                                **cut, **kw)

    whole, s_whole = part(0, Tp)
    first, s = part(0, 8)
    second, s = part(8, Tp, initial_state=s, mode="recurrent")
    assert max_rel(torch.cat([first, second], 1), whole) < F64_ATOL and max_rel(s, s_whole) < F64_ATOL
    cu = torch.tensor([0, 8, 8, Tp])
    alone, s_alone = part(8, Tp)
    for mode in ("chunk", "recurrent"):
        packed, states = linear_attention(q, k, v, g, output_final_state=True, cu_seqlens=cu, mode=mode,
                                          chunk_size=4, **extra)
        assert max_rel(packed[:, :8], first) < F64_ATOL
        assert max_rel(packed[:, 8:], alone) < F64_ATOL and max_rel(states[2:], s_alone) < F64_ATOL
        assert not states[1].any()  # the empty sequence keeps a zero state


def test_entry_gate_with_strong_decay_stays_finite_in_float32():
    q, k, v = make_qkv(1, 64, H, D, DV, dtype=torch.float32)
    g = (_entry_gate(1, 64) * 80.0).float()
    o_chunk, _ = linear_attention(q, k, v, g, chunk_size=16)
    o_rec, _ = linear_attention(q, k, v, g, mode="recurrent")
    assert bool(torch.isfinite(o_chunk).all()) and max_rel(o_chunk, o_rec) < 1e-5


@pytest.mark.parametrize("kwargs, match", [
    ({"angle": torch.zeros(1, 5, H, D + 1)}, r"angle must be a floating-point tensor \[B, T, H, D_phi\] = \[1, 5, 2, 4\]"),
    ({"angle": torch.zeros(1, 5, H, D, dtype=torch.long)}, "angle must be a floating-point tensor"),
    ({"angle": torch.full((1, 5, H, D), float("inf"))}, "angle has non-finite values"),
    ({"angle": torch.zeros(1, 5, H, D), "bonus": torch.zeros(H, D)}, "pass bonus=None"),
    # turns past pi / 2 between a query and its keys: negative weights, so a negative weight mass for some query
    ({"angle": torch.full((1, 5, H, D), 1.2), "normalize": True, "feature_map": "elu1"},
     "summed to a negative weight mass"),
    ({"angle": torch.zeros(1, 5, H, D), "initial_state": torch.zeros(1, H, D, DV)},
     r"initial_state must have shape \[1, 2, 8, 3\]"),
    ({"g": torch.zeros(1, 5, H, D, DV + 1)}, r"or \[B, T, H, Dk, Dv\] = \[1, 5, 2, 4, 3\]"),
    ({"g": torch.full((1, 5, H, D, DV), 0.5)}, "must be <= 0"),
    ({"g": torch.zeros(1, 5, H, D, DV), "bonus": torch.zeros(H, D)}, "per-entry gate"),
    ({"g": torch.zeros(1, 5, H, D, DV), "angle": torch.zeros(1, 5, H, D)}, "per-entry gate"),
])
def test_bad_complex_or_entry_gate_is_a_clear_error(kwargs, match):
    q, k, v = make_qkv(1, 5, H, D, DV, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, **kwargs)
