"""The gated family's presets against their papers: RWKV-6 (Peng et al., 2024; BlinkDL's x060 time mixing), Mamba
(Gu & Dao, 2023; mamba_ssm's selective_scan_ref), LRU (Orvieto et al., 2023), GateLoop (Katsch, 2023) and mLSTM
(Beck et al., 2024). Each layer's output is recomputed here in float64 from the layer's own parameters, with the
published equations written out independently (never through the layer's gate modules or the ops), and the
initializations are checked against the papers' formulas. Then, for all five: padded and packed batches equal the
rows alone, and GQA runs with a state that survives select and a dtype move."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ttr import ops
from ttr.layers import TTRLayer
from ttr.layers.gates import GateLoopGate, LRUGate, MambaGate, MLSTMGate, RWKV6Gate

D_MODEL, HEADS = 16, 2
NEW = ("rwkv6", "gateloop", "lru", "mamba", "mlstm")
ATOL = 1e-10
EPS = 1e-5  # the layer's RMSNorm eps


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors of a few hundred entries: a second intra-op thread only adds waits, and on a shared 2-core machine
    with the other core busy one float64 conv1d call took 0.5 s with 2 threads against 0.5 ms with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_layer(name: str, *, num_kv_heads: int | None = None, conv_size: int = 0, **kw) -> TTRLayer:
    """A float64 layer whose gates are away from their near-zero initialization (so every term of the equations
    matters): LoRAs and zero-initialized gate weights drawn at a visible scale, the norm's weight not all ones."""
    torch.manual_seed(0)
    layer = TTRLayer(D_MODEL, HEADS, name, num_kv_heads=num_kv_heads, conv_size=conv_size, chunk_size=4, **kw).double()
    gen = torch.Generator().manual_seed(1)

    def draw(p: torch.Tensor, scale: float, add: bool = False) -> None:
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
        p.copy_(p + noise if add else noise)

    with torch.no_grad():
        layer.norm.weight.copy_(0.5 + torch.rand(layer.norm.weight.shape, generator=gen, dtype=torch.float64))
        gate = layer.inputs[layer.joint[0]]
        if name == "rwkv6":
            for p in (gate.mix_down, gate.mix_up, gate.decay_down, gate.decay_up):
                draw(p, 0.3)
            for p in (gate.mu_x, gate.mu, gate.bonus):
                draw(p, 0.1, add=True)
        elif name == "mlstm":
            draw(gate.input_gate.weight, 0.3)
            draw(gate.forget_gate.weight, 0.3)
        elif name == "lru":  # a fixed gate: move it off its initial values (still a decay)
            draw(gate.nu_log, 0.2, add=True)
            draw(gate.theta_log, 0.2, add=True)
            draw(gate.gamma_log, 0.2, add=True)
    return layer


def capture_op_output(layer: TTRLayer) -> dict:
    """Replace the layer's op by one that records its answer (before the norm)."""
    seen, op = {}, layer.op

    def spy(q, k, v, **kw):
        o, state = op(q, k, v, **kw)
        seen["o"] = o
        return o, state
    spy.func = op.func
    layer.op = spy
    return seen


# ---- what every reference shares: the projections, the head groups, the norm, the output gate

def project(layer: TTRLayer, x_q, x_k, x_v):
    """q [B, T, H, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] from the layer's split qkv weight."""
    W_q, W_k, W_v = layer.qkv.weight.split(layer.widths)
    B, T, _ = x_q.shape
    Hkv, Dk, Dv = layer.num_kv_heads, layer.head_dim, layer.value_dim
    return ((x_q @ W_q.T).view(B, T, HEADS, Dk), (x_k @ W_k.T).view(B, T, Hkv, Dk), (x_v @ W_v.T).view(B, T, Hkv, Dv))


def shared(layer: TTRLayer, t: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """A key head's tensor for each query head that reads it (GQA: query head h reads key head h // group)."""
    return t.repeat_interleave(HEADS // layer.num_kv_heads, dim=dim)


def finish(layer: TTRLayer, o: torch.Tensor, x_g: torch.Tensor) -> torch.Tensor:
    """Per-head RMSNorm, times silu(out_gate(x_g)), then the output projection."""
    B, T = o.shape[:2]
    o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + EPS) * layer.norm.weight
    return (o.reshape(B, T, -1) * F.silu(x_g @ layer.out_gate.weight.T)) @ layer.out.weight.T


# ---- the papers' equations

def rwkv6_reference(layer: TTRLayer, x: torch.Tensor):
    """BlinkDL's RWKV-6 x060 time mixing, from a fresh state."""
    gate = layer.inputs["g"]
    B, T, d = x.shape
    Hkv, Dk, Dv = layer.num_kv_heads, layer.head_dim, layer.value_dim
    x_prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    xx = x_prev - x
    xxx = x + xx * gate.mu_x
    # tanh(xxx @ W1) read as 5 x rank, each part times its own W2 [rank, d]
    low = torch.tanh(xxx @ gate.mix_down).view(B, T, 5, -1)
    m = [low[:, :, j] @ gate.mix_up[j] for j in range(5)]
    x_r, x_k, x_v, x_w, x_g = (x + xx * (gate.mu[j] + m[j]) for j in range(5))
    r, k, v = project(layer, x_r, x_k, x_v)
    w = gate.decay + torch.tanh(x_w @ gate.decay_down) @ gate.decay_up
    log_decay = -torch.exp(w).view(B, T, Hkv, Dk)
    r = r * Dk ** -0.5
    k, v, log_decay, u = shared(layer, k), shared(layer, v), shared(layer, log_decay), shared(layer, gate.bonus, 0)
    S = x.new_zeros(B, HEADS, Dk, Dv)
    outs = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhd,bhdv->bhv", r[:, t], S + u[..., None] * kv))
        S = torch.exp(log_decay[:, t])[..., None] * S + kv
    o = torch.stack(outs, dim=1)
    return finish(layer, o, x_g), o


def selective_scan_ref(u, delta, A, B, C):
    """mamba_ssm's selective_scan_ref without D, z, delta_bias and delta_softplus: u, delta [b, d, l], A [d, n],
    B, C [b, n, l] (the variable B and C) -> y [b, d, l]."""
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    return torch.stack(ys, dim=2)


def mamba_reference(layer: TTRLayer, x: torch.Tensor):
    """C = the query, B = the key, u = the value, Delta = softplus(W_up W_down x + dt_bias); one selective scan
    per head (value channels d, state channels n), read with the op's scale Dk^-1/2."""
    gate = layer.inputs["g"]
    Bsz, T, _ = x.shape
    Dk, Dv, group = layer.head_dim, layer.value_dim, HEADS // layer.num_kv_heads
    C, Bm, u = project(layer, x, x, x)
    delta = F.softplus(x @ gate.down.weight.T @ gate.up.weight.T + gate.dt_bias).view(Bsz, T, -1, Dv)
    A = -torch.exp(gate.A_log)  # [Hkv, Dk (n), Dv (d)]
    ys = []
    for h in range(HEADS):
        j = h // group
        y = selective_scan_ref(u[:, :, j].transpose(1, 2), delta[:, :, j].transpose(1, 2), A[j].T,
                               Bm[:, :, j].transpose(1, 2), C[:, :, h].transpose(1, 2) * Dk ** -0.5)
        ys.append(y.transpose(1, 2))
    o = torch.stack(ys, dim=2)
    return finish(layer, o, x), o


def complex_recurrence(q, k, v, a):
    """s_t = a_t s_{t-1} + k_t v_t^T (a_t complex per key channel), y_t = Re(q_t^T s_t)."""
    B, T, H, Dk = k.shape
    s = torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.complex128)
    outs = []
    for t in range(T):
        s = a[:, t, :, :, None] * s + k[:, t, :, :, None].to(s.dtype) * v[:, t, :, None, :].to(s.dtype)
        outs.append(torch.einsum("bhd,bhdv->bhv", q[:, t].to(s.dtype), s).real)
    return torch.stack(outs, dim=1)


def lru_reference(layer: TTRLayer, x: torch.Tensor):
    gate = layer.inputs["g"]
    B, T, _ = x.shape
    q, k, v = project(layer, x, x, x)
    lam = torch.exp(torch.complex(-torch.exp(gate.nu_log), torch.exp(gate.theta_log)))  # [Hkv, Dk]
    gamma = torch.exp(gate.gamma_log)
    k = k * gamma
    a = lam.expand(B, T, *lam.shape)
    o = complex_recurrence(q * layer.head_dim ** -0.5, shared(layer, k), shared(layer, v), shared(layer, a))
    return finish(layer, o, x), o


def gateloop_reference(layer: TTRLayer, x: torch.Tensor):
    gate = layer.inputs["g"]
    B, T, _ = x.shape
    q, k, v = project(layer, x, x, x)
    z = torch.view_as_complex((x @ gate.proj.weight.T + gate.proj.bias).view(B, T, layer.num_kv_heads, -1, 2))
    a = torch.sigmoid(z.abs()) * torch.exp(1j * torch.angle(z))
    o = complex_recurrence(q * layer.head_dim ** -0.5, shared(layer, k), shared(layer, v), shared(layer, a))
    return finish(layer, o, x), o


def mlstm_reference(layer: TTRLayer, x: torch.Tensor):
    """C_t = f C + i k v^T, n_t = f n + i k, h = C^T q / max(|n^T q|, 1), i = exp(itilde), f = sigmoid(ftilde),
    unstabilized, q scaled by Dk^-1/2."""
    gate = layer.inputs["i"]
    B, T, _ = x.shape
    Dk, Dv = layer.head_dim, layer.value_dim
    q, k, v = project(layer, x, x, x)
    q = q * Dk ** -0.5
    i_gate = torch.exp(x @ gate.input_gate.weight.T + gate.input_gate.bias)
    f_gate = torch.sigmoid(x @ gate.forget_gate.weight.T + gate.forget_gate.bias)
    k, v, i_gate, f_gate = (shared(layer, t) for t in (k, v, i_gate, f_gate))
    C, n = x.new_zeros(B, HEADS, Dk, Dv), x.new_zeros(B, HEADS, Dk)
    outs = []
    for t in range(T):
        f, i = f_gate[:, t, :, None], i_gate[:, t, :, None]
        C = f[..., None] * C + i[..., None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        n = f * n + i * k[:, t]
        num = torch.einsum("bhdv,bhd->bhv", C, q[:, t])
        den = torch.einsum("bhd,bhd->bh", n, q[:, t]).abs().clamp_min(1.0)
        outs.append(num / den[..., None])
    o = torch.stack(outs, dim=1)
    return finish(layer, o, x), o


REFERENCES = {"rwkv6": rwkv6_reference, "mamba": mamba_reference, "lru": lru_reference,
              "gateloop": gateloop_reference, "mlstm": mlstm_reference}


# ---- 1-5: each layer equals its paper's equations

@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("num_kv_heads", [None, 1])
@pytest.mark.parametrize("name", NEW)
@torch.no_grad()
def test_layer_equals_the_papers_equations(name, num_kv_heads, mode):
    """The op's answer (before the norm) and the layer's output, against the equations in float64; chunks of 4
    over 13 tokens (a partial last chunk), and GQA (one key head shared by both query heads)."""
    layer = make_layer(name, num_kv_heads=num_kv_heads, mode=mode)
    seen = capture_op_output(layer)
    x = torch.randn(2, 13, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y, _ = layer(x)
    y_ref, o_ref = REFERENCES[name](layer, x)
    assert (seen["o"] - o_ref).abs().max() < ATOL
    assert (y - y_ref).abs().max() < ATOL
    assert y_ref.abs().max() > 1e-2 and o_ref.abs().max() > 1e-2  # not vacuous


def test_reference_sees_what_it_checks():
    """The references are sensitive: change one gate parameter of the layer and its output moves."""
    x = torch.randn(1, 9, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for name, param in (("rwkv6", "bonus"), ("mamba", "A_log"), ("lru", "theta_log"), ("gateloop", "proj.bias"),
                        ("mlstm", "forget_gate.bias")):
        layer = make_layer(name)
        gate = layer.inputs[layer.joint[0]]
        before = layer(x)[0]
        with torch.no_grad():
            gate.get_parameter(param).add_(0.05)
        assert (layer(x)[0] - before).abs().max() > 1e-6, name
        assert (layer(x)[0] - REFERENCES[name](layer, x)[0]).abs().max() < ATOL


# ---- RWKV-6: BlinkDL's initialization and the token shift

def test_rwkv6_initialization_is_blinkdls_for_a_middle_layer():
    d, H, Dk, layer_id, n_layer = 16, 2, 8, 1, 4
    gate = TTRLayer(d, H, "rwkv6", layer_idx=layer_id, n_layers=n_layer).inputs["g"]
    assert isinstance(gate, RWKV6Gate)
    ratio_0_to_1 = layer_id / (n_layer - 1)        # 1/3
    ratio_1_to_almost0 = 1.0 - layer_id / n_layer  # 3/4
    ddd = torch.arange(d, dtype=torch.float64) / d
    mu = gate.mu.detach().double()
    close = lambda a, b: torch.testing.assert_close(a.detach().double(), b, rtol=0, atol=1e-6)  # noqa: E731
    close(gate.mu_x, 1.0 - ddd ** ratio_1_to_almost0)
    close(mu[0], 1.0 - ddd ** (0.5 * ratio_1_to_almost0))                          # r
    close(mu[1], 1.0 - ddd ** ratio_1_to_almost0)                                  # k
    close(mu[2], 1.0 - (ddd ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1))           # v
    close(mu[3], 1.0 - ddd ** ratio_1_to_almost0)                                  # w
    close(mu[4], 1.0 - ddd ** (0.5 * ratio_1_to_almost0))                          # g
    assert gate.mu_x[0] == 1.0 and abs(float(mu[2, 0]) - (1.0 - 0.1)) < 1e-7       # mu_v(0) = 1 - 0.3 / 3
    D = H * Dk
    n = torch.arange(D, dtype=torch.float64)
    decay = gate.decay.detach().double()
    close(decay, -6.0 + 5.0 * (n / (D - 1)) ** (0.7 + 1.3 * ratio_0_to_1))
    assert float(decay[0]) == -6.0 and abs(float(decay[-1]) + 1.0) < 1e-6          # the decay speed's endpoints
    assert bool((decay[1:] > decay[:-1]).all())
    zigzag = ((n + 1) % 3 - 1) * 0.1
    assert zigzag[:4].tolist() == pytest.approx([0.0, 0.1, -0.1, 0.0])
    bonus = gate.bonus.detach().double()
    assert bonus.shape == (H, Dk)
    close(bonus.flatten(), ratio_0_to_1 * (1.0 - n / (D - 1)) + zigzag)
    for down, up in ((gate.mix_down, gate.mix_up), (gate.decay_down, gate.decay_up)):  # RWKV-LM's latest x060
        assert not down.detach().any() and 0 < float(up.detach().abs().max()) <= 0.01
    # ranks d_model / 16 and / 8 below d_model 512 (at least 4 and 8), RWKV-6's 32 and 64 from there up
    assert gate.mix_down.shape == (d, 5 * 4) and gate.mix_up.shape == (5, 4, d)
    assert gate.decay_down.shape == (d, 8) and gate.decay_up.shape == (8, D)
    for width, ranks in ((128, (8, 16)), (512, (32, 64)), (1024, (32, 64))):
        wide = RWKV6Gate(width, 2, 8)
        assert (wide.mix_up.shape[1], wide.decay_down.shape[1]) == ranks
    # the first layer: no bonus slope, decays -6 + 5 (n / (D - 1))^0.7, mu = 1 - (i / d)
    first = RWKV6Gate(d, H, Dk, 0, n_layer)
    close(first.decay, -6.0 + 5.0 * (n / (D - 1)) ** 0.7)
    close(first.bonus.flatten(), zigzag)
    close(first.mu_x, 1.0 - ddd)


@torch.no_grad()
def test_rwkv6_token_shift_across_calls_padding_and_decoding():
    layer = make_layer("rwkv6")
    gen = torch.Generator().manual_seed(3)
    B, T = 4, 13
    x = torch.randn(B, T, D_MODEL, dtype=torch.float64, generator=gen)
    whole, state = layer(x)
    assert torch.equal(state.shift, x[:, -1])                                  # the last token, for the next call
    # in pieces, the state carried (the shift crosses each cut)
    pieces, s = [], None
    for a, b in ((0, 5), (5, 6), (6, 13)):
        y, s = layer(x[:, a:b], s)
        pieces.append(y)
    assert (torch.cat(pieces, 1) - whole).abs().max() < ATOL
    # token by token (the recurrent form)
    steps, s = [], None
    for t in range(T):
        y, s = layer(x[:, t:t + 1], s)
        steps.append(y)
    assert (torch.cat(steps, 1) - whole).abs().max() < ATOL
    assert torch.equal(s.shift, x[:, -1])
    # a left-padded batch (row 3 all padding) equals each row alone; garbage at the padding is never read
    pads = [0, 3, 6, T]
    mask = torch.arange(T)[None] >= torch.tensor(pads)[:, None]
    x_pad = x.masked_fill(~mask[..., None], 1e3)
    y, s = layer(x_pad, attention_mask=mask.long())
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    last = torch.stack([x[b, -1] if pads[b] < T else torch.zeros(D_MODEL, dtype=x.dtype) for b in range(B)])
    assert torch.equal(s.shift, last)                                          # each row's last real token, or zeros
    nxt = torch.randn(B, 3, D_MODEL, dtype=torch.float64, generator=gen)
    dec, s_dec = [], s
    for t in range(3):
        yt, s_dec = layer(nxt[:, t:t + 1], s_dec)
        dec.append(yt)
    dec = torch.cat(dec, 1)
    for b in range(B):
        if pads[b] < T:
            alone, s_alone = layer(x[b:b + 1, pads[b]:])
            assert (y[b, pads[b]:] - alone[0]).abs().max() < ATOL
            after, _ = layer(nxt[b:b + 1], s_alone)
        else:
            after, _ = layer(nxt[b:b + 1])                                     # nothing seen: a fresh start
        assert (dec[b] - after[0]).abs().max() < ATOL
    # a hole while decoding (a finished row's step is padding): that row's shift and memory wait
    step_mask = torch.tensor([[1], [0], [1], [1]])
    y_h, s_h = layer(nxt[:, :1], s, attention_mask=step_mask)
    assert torch.equal(s_h.shift[1], s.shift[1]) and torch.equal(y_h[1], torch.zeros_like(y_h[1]))
    y_next, _ = layer(nxt[:, 1:2], s_h)
    y_skip, _ = layer(nxt[1:2, 1:2], s.select([1]))
    assert (y_next[1] - y_skip[0]).abs().max() < ATOL


# ---- Mamba: the selective scan's initialization

def test_mamba_initialization():
    torch.manual_seed(0)
    d, H, Dk, Dv = 16, 4, 8, 64
    gate = MambaGate(d, H, Dk, Dv)
    A = -torch.exp(gate.A_log.detach())
    assert A.shape == (H, Dk, Dv)
    n = torch.arange(Dk, dtype=A.dtype)
    # S4D-real: A = -(n + 1) per state channel n (exp(log(n + 1)) to float32 rounding)
    torch.testing.assert_close(A, -(n + 1)[None, :, None].expand(H, Dk, Dv), rtol=1e-6, atol=0)
    assert gate.down.out_features == math.ceil(d / 16)
    with torch.no_grad():  # at the bias (zero projection) Delta = softplus(dt_bias), log-uniform in [1e-3, 0.1]
        gate.up.weight.zero_()
        x = torch.randn(2, 3, d)
        ones = torch.ones(2, 3, H, Dk)
        _, _, delta, made = gate(x, ones, ones, torch.ones(2, 3, H, Dv))
    assert bool((delta >= 1e-3 * (1 - 1e-5)).all()) and bool((delta <= 0.1 * (1 + 1e-5)).all())
    assert float(delta.min()) < 2e-3 and float(delta.max()) > 0.05              # spread over the range
    torch.testing.assert_close(delta[0, 0].flatten(), F.softplus(gate.dt_bias.detach()))
    torch.testing.assert_close(made["g"], A * delta[..., None, :])               # g[n, c] = Delta[c] A[n, c]
    assert TTRLayer(d, 2, "mamba").inputs["g"].A_log.shape == (2, 8, 8)


# ---- LRU: the ring initialization and gamma

def test_lru_initialization_on_the_ring():
    torch.manual_seed(0)
    gate = LRUGate(4, 64)
    with torch.no_grad():
        lam = torch.exp(torch.complex(-torch.exp(gate.nu_log.double()), torch.exp(gate.theta_log.double())))
        modulus, phase, gamma = lam.abs(), torch.angle(lam), torch.exp(gate.gamma_log.double())
    assert bool((modulus >= 0.9 - 1e-6).all()) and bool((modulus <= 0.999 + 1e-6).all())
    assert bool((phase >= 0).all()) and bool((phase <= math.pi / 10 + 1e-6).all())
    torch.testing.assert_close(gamma, torch.sqrt(1 - modulus ** 2), rtol=1e-5, atol=0)
    # uniform on the ring: |lambda|^2 uniform in [0.81, 0.998], the phase uniform in [0, pi / 10]
    assert abs(float(modulus.square().mean()) - (0.81 + 0.999 ** 2) / 2) < 0.015
    assert abs(float(phase.mean()) - math.pi / 20) < 0.02
    # the gate: g = log |lambda|, angle = arg lambda, k scaled by gamma, the same at every token
    k = torch.randn(2, 5, 4, 64)
    _, k_out, _, made = gate(None, None, k, None)
    torch.testing.assert_close(made["g"].double(), modulus.log().expand(2, 5, 4, 64), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(made["angle"].double(), phase.expand(2, 5, 4, 64), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(k_out.double(), k.double() * gamma, rtol=1e-5, atol=1e-7)


# ---- GateLoop: the polar gate

def test_gateloop_gate_is_sigmoid_modulus_and_identity_phase():
    torch.manual_seed(0)
    gate = GateLoopGate(16, 2, 8).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        _, _, _, made = gate(x, None, None, None)
        z = torch.view_as_complex((x @ gate.proj.weight.T + gate.proj.bias).view(3, 5, 2, 8, 2))
    alpha = torch.exp(torch.complex(made["g"], made["angle"]))
    expected = torch.sigmoid(z.abs()) * z / z.abs()
    assert (alpha - expected).abs().max() < 1e-12
    assert (made["g"] - F.logsigmoid(z.abs())).abs().max() < 1e-12
    assert (made["angle"] - torch.angle(z)).abs().max() < 1e-12


# ---- mLSTM: xLSTM's initialization

def test_mlstm_initialization():
    torch.manual_seed(0)
    gate = TTRLayer(16, 4, "mlstm").inputs["i"]
    assert isinstance(gate, MLSTMGate)
    assert torch.equal(gate.forget_gate.bias.detach(), torch.linspace(3.0, 6.0, 4))
    assert torch.equal(gate.forget_gate.weight.detach(), torch.zeros(4, 16))
    assert torch.equal(gate.input_gate.weight.detach(), torch.zeros(4, 16))
    wide = MLSTMGate(16, 4000)
    b_i = wide.input_gate.bias.detach()
    assert abs(float(b_i.mean())) < 0.01 and abs(float(b_i.std()) - 0.1) < 0.01      # N(0, 0.1)
    # at initialization every token gets the same gates: f = sigmoid(linspace(3, 6)), i = exp(b_i)
    x = torch.randn(2, 3, 16)
    _, _, _, made = gate(x, None, None, None)
    torch.testing.assert_close(made["g"], F.logsigmoid(torch.linspace(3.0, 6.0, 4)).expand(2, 3, 4))
    torch.testing.assert_close(made["i"], gate.input_gate.bias.detach().expand(2, 3, 4))


# ---- 6: every new preset in real batches

@pytest.mark.parametrize("name", NEW)
@torch.no_grad()
def test_padded_and_packed_batches_equal_rows_alone(name):
    """The default short convolution on; padding left, right and in holes; then packed sequences (cu_seqlens). Each
    row's outputs, and one decoded token after, equal the row run alone."""
    layer = make_layer(name, conv_size=4)
    gen = torch.Generator().manual_seed(4)
    B, T = 3, 11
    x = torch.randn(B, T, D_MODEL, dtype=torch.float64, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:6] = False   # holes
    mask[1, :5] = False    # left padding
    mask[2, 8:] = False    # right padding
    y, state = layer(x.masked_fill(~mask[..., None], 1e3), attention_mask=mask)
    nxt = torch.randn(B, 1, D_MODEL, dtype=torch.float64, generator=gen)
    y2, _ = layer(nxt, state)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    for b in range(B):
        alone, s_alone = layer(x[b:b + 1, mask[b]])
        assert (y[b, mask[b]] - alone[0]).abs().max() < ATOL
        assert (y2[b] - layer(nxt[b:b + 1], s_alone)[0][0]).abs().max() < ATOL
    # packed: sequences of 5, 1 and 7 tokens in one row
    cu = torch.tensor([0, 5, 6, 13])
    xp = torch.randn(1, 13, D_MODEL, dtype=torch.float64, generator=gen)
    yp, sp = layer(xp, cu_seqlens=cu)
    assert sp.batch_size == 3 and sp.lengths.tolist() == [5, 1, 7]
    nxt = torch.randn(3, 1, D_MODEL, dtype=torch.float64, generator=gen)
    yp2, _ = layer(nxt, sp)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone, s_alone = layer(xp[:, a:b])
        assert (yp[:, a:b] - alone).abs().max() < ATOL
        assert (yp2[n] - layer(nxt[n:n + 1], s_alone)[0][0]).abs().max() < ATOL


@pytest.mark.parametrize("name", NEW)
@torch.no_grad()
def test_gqa_state_survives_select_and_dtype_moves(name):
    """num_kv_heads = 1 for 2 query heads: the state's rows picked (reordered) continue as the whole batch does, and
    the state moved to float32 continues a float32 copy of the layer as the float64 one does (to float32 rounding),
    and back to float64."""
    layer = make_layer(name, num_kv_heads=1, conv_size=4)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 9, D_MODEL, dtype=torch.float64, generator=gen)
    nxt = torch.randn(3, 2, D_MODEL, dtype=torch.float64, generator=gen)
    _, state = layer(x)
    whole, _ = layer(nxt, state)
    picked = state.select([2, 0])
    y_pick, _ = layer(nxt[[2, 0]], picked)
    assert (y_pick - whole[[2, 0]]).abs().max() < ATOL
    assert (layer(nxt[[1]], state.select(torch.tensor([False, True, False])))[0] - whole[[1]]).abs().max() < ATOL
    single = copy.deepcopy(layer).float()
    s32 = state.to(dtype=torch.float32)
    assert s32.dtype == "float32" and s32.conv.dtype == torch.float32
    assert (s32.shift is None) == (name != "rwkv6")                  # only RWKV-6 carries a token shift
    if s32.shift is not None:
        assert s32.shift.dtype == torch.float32 and torch.equal(s32.shift, x[:, -1].float())
    y32, s32_next = single(nxt.float(), s32)
    assert y32.dtype == torch.float32
    assert float((y32.double() - whole).abs().max() / whole.abs().max()) < 1e-4
    back = s32_next.to(dtype=torch.float64)
    assert back.dtype == "float64"
    y_back, _ = layer(nxt[:, :1], back)  # accepted by the float64 layer again
    assert y_back.dtype == torch.float64 and bool(torch.isfinite(y_back).all())


def test_the_new_presets_run_the_ops_they_document():
    for name in ("rwkv6", "gateloop", "lru", "mamba"):
        assert make_layer(name).op.func is ops.linear_attention, name
    assert make_layer("mlstm").op.func is ops.mlstm
