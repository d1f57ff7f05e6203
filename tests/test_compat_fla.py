"""ttr.compat.fla against plain-PyTorch references of fla-core 0.6.0's ops (fla needs Triton, so it is not
imported): token-by-token float64 recurrences that mirror fla's fused recurrent kernels and naive.py
references. Every op is checked on identical inputs for outputs and final states, with initial states, an odd
length (T = 37 over chunks of 16 and 64), default and explicit scales, in-kernel l2norm, and packed sequences
(cu_seqlens, one of them empty), which must equal the reference run on each sequence alone."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
import torch.nn.functional as F

from ttr.compat import fla

T, H, K, V = 37, 2, 8, 6
CU = torch.tensor([0, 5, 5, 21, 37])
TOL = dict(rtol=1e-10, atol=1e-10)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rows(packed: bool) -> tuple[int, int]:
    """(B, N): two rows, or one row packing len(CU) - 1 sequences."""
    return (1, len(CU) - 1) if packed else (2, 2)


def close(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, **TOL)


# ---------------------------------------------------------------------------------------------------------
# references (float64, token by token)


def ref_l2norm(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def ref_gla(q, k, v, gk, *, h0=None, scale=None, reverse=False):
    """fla's fused_recurrent kernel: S <- diag(exp(gk_t)) S + k_t v_t^T, o_t = S^T (scale q_t)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3]) if h0 is None else h0.clone()
    o = torch.zeros_like(v)
    steps = range(q.shape[1])
    for t in reversed(steps) if reverse else steps:
        if gk is not None:
            S = S * gk[:, t].exp()[..., None]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale)
    return o, S


def ref_rwkv6(q, k, v, w, u, *, h0=None, scale=None, reverse=False):
    """fla's fused_recurrent_rwkv6 kernel: each token reads the state before its own update, its own k_t v_t^T
    weighted per key channel by the bonus u [H, K]: o_t = (S + diag(u) k_t v_t^T)^T (scale q_t); then
    S <- diag(exp(w_t)) S + k_t v_t^T. reverse walks each sequence from its last token."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3]) if h0 is None else h0.clone()
    o = torch.zeros_like(v)
    steps = range(q.shape[1])
    for t in reversed(steps) if reverse else steps:
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]               # [B, H, K, V]
        o[:, t] = torch.einsum("bhkv,bhk->bhv", S + u[None, :, :, None] * kv, q[:, t] * scale)
        S = S * w[:, t].exp()[..., None] + kv
    return o, S


def ref_normalize(o, q, k, z0, scale, reverse=False):
    """fla's normalize_with_z_state: o / (scale q . z_t + 1e-10), z_t = z0 + the running key sum."""
    z0 = torch.zeros_like(k[:, :1]) if z0 is None else z0
    z = (k.flip(1).cumsum(1).flip(1) if reverse else k.cumsum(1)) + z0
    return o / ((q * scale * z).sum(-1, keepdim=True) + 1e-10), z0 + k.sum(1, keepdim=True)


def ref_delta(q, k, v, g, beta, *, h0=None, scale=None, l2norm=False):
    """fla's fused_recurrent gated delta rule kernel: S <- exp(g_t) S, u = beta_t (v_t - S^T k_t), S += k_t u^T,
    o_t = S^T (scale q_t); beta per head or per value channel; value head j reads q/k head j // (HV / H)."""
    if l2norm:
        q, k = ref_l2norm(q), ref_l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(group, 2), k.repeat_interleave(group, 2)
    beta = v.new_ones(v.shape[:3]) if beta is None else beta
    S = q.new_zeros(q.shape[0], v.shape[2], q.shape[3], v.shape[3]) if h0 is None else h0.clone()
    o = torch.zeros_like(v)
    for t in range(q.shape[1]):
        if g is not None:
            S = S * g[:, t].exp()[..., None, None]
        b = beta[:, t] if beta.dim() == 4 else beta[:, t, :, None]
        u = b * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        o[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale)
    return o, S


def ref_mesa(q, k, v, g, beta, lamb, *, h0=None, cg_steps=None):
    """fla's naive_mesa_net_exact (cg_steps None), or its chunk kernel's CG: cg_steps steps from x = 0 with
    1e-5 added to each step's denominators."""
    B, _, Hq, D = q.shape
    h_kk, h_kv = (q.new_zeros(B, Hq, D, D), q.new_zeros(B, Hq, D, v.shape[-1])) if h0 is None else h0
    A_lamb = torch.diag_embed(lamb)
    o = torch.zeros_like(v)
    for t in range(q.shape[1]):
        a, kb = g[:, t].exp()[..., None, None], k[:, t] * beta[:, t, :, None]
        h_kk = a * h_kk + kb[..., :, None] * k[:, t, :, None, :]
        h_kv = a * h_kv + kb[..., :, None] * v[:, t, :, None, :]
        A, b = h_kk + A_lamb, q[:, t]
        if cg_steps is None:
            x = torch.linalg.solve(A, b)
        else:
            x, r = torch.zeros_like(b), b.clone()
            p, d_old = r.clone(), (r * r).sum(-1, keepdim=True)
            for _ in range(cg_steps):
                Ap = (A @ p[..., None])[..., 0]
                step = d_old / ((p * Ap).sum(-1, keepdim=True) + 1e-5)
                x, r = x + step * p, r - step * Ap
                d_new = (r * r).sum(-1, keepdim=True)
                p, d_old = r + d_new / (d_old + 1e-5) * p, d_new
        o[:, t] = torch.einsum("bhkv,bhk->bhv", h_kv, x)
    return o, (h_kk, h_kv)


def reference(ref, args, h0, packed, **kw):
    """ref on whole rows, or (packed) on each sequence of CU alone: outputs joined in time, states stacked."""
    if not packed:
        return ref(*args, h0=h0, **kw)
    outs, states = [], []
    for n in range(len(CU) - 1):
        a, b = int(CU[n]), int(CU[n + 1])
        seq = [x if x is None or x.dim() < 3 else x[:, a:b] for x in args]  # lamb, u [H, K]: not per token
        s0 = None if h0 is None else (tuple(s[n:n + 1] for s in h0) if isinstance(h0, tuple) else h0[n:n + 1])
        o, s = ref(*seq, h0=s0, **kw)
        outs.append(o)
        states.append(s)
    final = tuple(torch.cat(x) for x in zip(*states)) if isinstance(states[0], tuple) else torch.cat(states)
    return torch.cat(outs, 1), final


def qkv(B: int, Hv: int = H, seed: int = 0):
    return rand(B, T, H, K, seed=seed), rand(B, T, H, K, seed=seed + 1), rand(B, T, Hv, V, seed=seed + 2)


def log_gate(*shape: int, seed: int):
    return F.logsigmoid(rand(*shape, seed=seed) + 2.0)


# ---------------------------------------------------------------------------------------------------------
# signatures


FLA_SIGNATURES = {  # fla-core 0.6.0, copied from its source
    "chunk_linear_attn": ["q", "k", "v", "scale=None", "initial_state=None", "output_final_state=False",
                          "normalize=True", "cu_seqlens=None"],
    "fused_recurrent_linear_attn": ["q", "k", "v", "scale=None", "initial_state=None", "output_final_state=False",
                                    "reverse=False", "normalize=False", "cu_seqlens=None"],
    "chunk_simple_gla": ["q", "k", "v", "g=None", "g_gamma=None", "scale=None", "initial_state=None",
                         "output_final_state=False", "state_v_first=False", "cu_seqlens=None",
                         "cu_seqlens_cpu=None", "**kwargs"],
    "fused_recurrent_simple_gla": ["q", "k", "v", "g=None", "g_gamma=None", "scale=None", "initial_state=None",
                                   "output_final_state=False", "reverse=False", "state_v_first=False",
                                   "cu_seqlens=None", "**kwargs"],
    "chunk_gla": ["q", "k", "v", "g", "scale=None", "initial_state=None", "output_final_state=False",
                  "state_v_first=False", "cu_seqlens=None", "cu_seqlens_cpu=None"],
    "fused_recurrent_gla": ["q", "k", "v", "gk=None", "gv=None", "scale=None", "initial_state=None",
                            "output_final_state=False", "reverse=False", "state_v_first=False", "cu_seqlens=None",
                            "**kwargs"],
    "chunk_retention": ["q", "k", "v", "scale=None", "initial_state=None", "output_final_state=False",
                        "cu_seqlens=None", "**kwargs"],
    "chunk_rwkv6": ["r", "k", "v", "w", "u", "scale=None", "initial_state=None", "output_final_state=False",
                    "cu_seqlens=None", "cu_seqlens_cpu=None", "**kwargs"],
    "fused_recurrent_rwkv6": ["r", "k", "v", "w", "u", "scale=None", "initial_state=None",
                              "output_final_state=False", "reverse=False", "cu_seqlens=None"],
    "fused_recurrent_retention": ["q", "k", "v", "scale=None", "initial_state=None", "output_final_state=False",
                                  "reverse=False", "state_v_first=False", "cu_seqlens=None", "**kwargs"],
    "chunk_delta_rule": ["q", "k", "v", "beta", "scale=None", "initial_state=None", "output_final_state=False",
                         "use_qk_l2norm_in_kernel=False", "cu_seqlens=None", "cu_seqlens_cpu=None", "**kwargs"],
    "fused_recurrent_delta_rule": ["q", "k", "v", "beta=None", "scale=None", "initial_state=None",
                                   "output_final_state=False", "use_qk_l2norm_in_kernel=False", "cu_seqlens=None"],
    "chunk_gated_delta_rule": ["q", "k", "v", "g", "beta", "scale=None", "initial_state=None",
                               "output_final_state=False", "use_qk_l2norm_in_kernel=False",
                               "use_beta_sigmoid_in_kernel=False", "allow_neg_eigval=False", "state_v_first=False",
                               "cu_seqlens=None", "cu_seqlens_cpu=None", "chunk_indices=None", "cp_context=None",
                               "**kwargs"],
    "fused_recurrent_gated_delta_rule": ["q", "k", "v", "g=None", "gk=None", "gv=None", "beta=None", "scale=None",
                                         "initial_state=None", "output_final_state=False",
                                         "use_qk_l2norm_in_kernel=False", "use_gate_in_kernel=False", "A_log=None",
                                         "dt_bias=None", "use_beta_sigmoid_in_kernel=False",
                                         "allow_neg_eigval=False", "state_v_first=False", "cu_seqlens=None",
                                         "**kwargs"],
    "chunk_mesa_net": ["q", "k", "v", "g", "beta", "lamb", "h_kk_init=None", "h_kv_init=None",
                       "output_final_state=False", "max_CG_iteration=30", "use_qk_l2norm_in_kernel=False",
                       "cu_seqlens=None", "cu_seqlens_cpu=None"],
}


def test_exports_every_op():
    assert sorted(fla.__all__) == sorted(FLA_SIGNATURES)


@pytest.mark.parametrize("name", sorted(FLA_SIGNATURES))
def test_signature(name):
    def spell(p: inspect.Parameter) -> str:
        if p.kind is p.VAR_KEYWORD:
            return f"**{p.name}"
        assert p.kind is p.POSITIONAL_OR_KEYWORD, p
        return p.name if p.default is p.empty else f"{p.name}={p.default!r}"

    assert [spell(p) for p in inspect.signature(getattr(fla, name)).parameters.values()] == FLA_SIGNATURES[name]


# ---------------------------------------------------------------------------------------------------------
# linear attention, simple GLA, GLA, retention


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("fused, reverse", [(False, False), (True, False), (True, True)])
def test_linear_attn(fused, reverse, normalize, packed):
    B, N = rows(packed)
    q, k, v = qkv(B)
    if normalize:  # fla's normalizer is meant for positive features; it keeps the denominators away from 0
        q, k = q.sigmoid(), k.sigmoid()
    kv0, z0 = rand(N, H, K, V, seed=5), rand(N, 1, H, K, seed=6).abs()
    cu = CU if packed else None
    if fused:
        o, state = fla.fused_recurrent_linear_attn(q, k, v, initial_state=(kv0, z0) if normalize else kv0,
                                                   output_final_state=True, reverse=reverse, normalize=normalize,
                                                   cu_seqlens=cu)
    else:
        o, state = fla.chunk_linear_attn(q, k, v, initial_state=(kv0, z0) if normalize else kv0,
                                         output_final_state=True, normalize=normalize, cu_seqlens=cu)
    ref_o, ref_kv = reference(ref_gla, (q, k, v, None), kv0, packed, reverse=reverse)
    if not normalize:
        close(o, ref_o)
        close(state, ref_kv)
        return
    z_ref = reference(lambda q, k, o, h0: ref_normalize(o, q, k, h0, K ** -0.5, reverse), (q, k, ref_o), z0, packed)
    close(o, z_ref[0])
    close(state[0], ref_kv)
    close(state[1], z_ref[1])


def test_linear_attn_normalize_returns_z_state_always():
    q, k, v = (x.sigmoid() for x in qkv(2))
    o, (kv, z) = fla.chunk_linear_attn(q, k, v)                 # normalize=True by default, no state asked for
    assert kv is None and z.shape == (2, 1, H, K) and z.dtype == k.dtype
    close(z, k.sum(1, keepdim=True))
    o2, (_, z2) = fla.chunk_linear_attn(q, k, v, initial_state=o.new_zeros(2, H, K, V))  # a bare kv state: z0 = 0
    close(o2, o)
    close(z2, z)
    o, none = fla.fused_recurrent_linear_attn(q, k, v)            # normalize=False by default there
    close(o, ref_gla(q, k, v, None)[0])
    assert none is None


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("gates", ["g", "g_gamma", "both"])
@pytest.mark.parametrize("fused, reverse", [(False, False), (True, False), (True, True)])
def test_simple_gla(fused, reverse, gates, packed):
    B, N = rows(packed)
    q, k, v = qkv(B)
    g = log_gate(B, T, H, seed=7) if gates != "g_gamma" else None
    g_gamma = -torch.rand(H, generator=torch.Generator().manual_seed(8), dtype=torch.float64) if gates != "g" else None
    h0 = rand(N, H, K, V, seed=9)
    kw = dict(g=g, g_gamma=g_gamma, initial_state=h0, output_final_state=True, cu_seqlens=CU if packed else None)
    if fused:
        o, ht = fla.fused_recurrent_simple_gla(q, k, v, reverse=reverse, **kw)
    else:
        o, ht = fla.chunk_simple_gla(q, k, v, chunk_size=16, **kw)
    total = sum(x for x in (g, None if g_gamma is None else g_gamma.expand(B, T, H)) if x is not None)
    ref_o, ref_ht = reference(ref_gla, (q, k, v, total[..., None].expand(B, T, H, K)), h0, packed, reverse=reverse)
    close(o, ref_o)
    close(ht, ref_ht)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fused, reverse", [(False, False), (True, False), (True, True)])
def test_gla(fused, reverse, packed):
    B, N = rows(packed)
    q, k, v = qkv(B)
    gk, h0 = log_gate(B, T, H, K, seed=7), rand(N, H, K, V, seed=9)
    kw = dict(scale=0.3, initial_state=h0, output_final_state=True, cu_seqlens=CU if packed else None)
    if fused:
        o, ht = fla.fused_recurrent_gla(q, k, v, gk=gk, reverse=reverse, **kw)
    else:
        o, ht = fla.chunk_gla(q, k, v, gk, **kw)
    ref_o, ref_ht = reference(ref_gla, (q, k, v, gk), h0, packed, scale=0.3, reverse=reverse)
    close(o, ref_o)
    close(ht, ref_ht)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fused, reverse, chunk_size", [(False, False, 16), (False, False, 64), (True, False, None),
                                                        (True, True, None)])
def test_retention(fused, reverse, chunk_size, packed):
    B, N = rows(packed)
    q, k, v = qkv(B)
    h0 = rand(N, H, K, V, seed=9)
    kw = dict(initial_state=h0, output_final_state=True, cu_seqlens=CU if packed else None)
    if fused:
        o, ht = fla.fused_recurrent_retention(q, k, v, reverse=reverse, **kw)
    else:
        o, ht = fla.chunk_retention(q, k, v, chunk_size=chunk_size, **kw)
    decay = (1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32))).log().double()  # fla: float32
    ref_o, ref_ht = reference(ref_gla, (q, k, v, decay[:, None].expand(B, T, H, K)), h0, packed, reverse=reverse)
    close(o, ref_o)
    close(ht, ref_ht)


# ---------------------------------------------------------------------------------------------------------
# RWKV-6


def rwkv6_inputs(B: int):
    """r, k, v, the log decay w [B, T, H, K] and the bonus u [H, K] (either sign, as RWKV-6's learned u)."""
    return (*qkv(B), log_gate(B, T, H, K, seed=7), rand(H, K, seed=3))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("fused, reverse, chunk_size", [(False, False, 16), (False, False, 64), (False, False, None),
                                                        (True, False, None), (True, True, None)])
def test_rwkv6(fused, reverse, chunk_size, scale, packed):
    B, N = rows(packed)
    args, h0 = rwkv6_inputs(B), rand(N, H, K, V, seed=9)
    kw = dict(scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=CU if packed else None)
    if fused:
        o, ht = fla.fused_recurrent_rwkv6(*args, reverse=reverse, **kw)
    else:
        o, ht = fla.chunk_rwkv6(*args, **kw, **({} if chunk_size is None else dict(chunk_size=chunk_size)))
    ref_o, ref_ht = reference(ref_rwkv6, args, h0, packed, scale=scale, reverse=reverse)
    close(o, ref_o)
    close(ht, ref_ht)


@pytest.mark.parametrize("op", ["chunk_rwkv6", "fused_recurrent_rwkv6"])
def test_rwkv6_without_initial_or_final_state(op):
    """No initial state: a zero one; no state asked for: None. And the bonus is honored: the output is not
    GLA's, which reads the state after the token's gate and write."""
    args = rwkv6_inputs(2)
    o, none = getattr(fla, op)(*args)
    assert none is None
    close(o, ref_rwkv6(*args)[0])
    q, k, v, w, _ = args
    assert not torch.allclose(o, ref_gla(q, k, v, w)[0])


# ---------------------------------------------------------------------------------------------------------
# delta rule, gated delta rule


def delta_keys(B: int, l2norm: bool, seed: int = 1):
    """Raw keys for the in-kernel l2norm; else keys of norm 0.9 (ttr refuses beta ||k||^2 > 2)."""
    k = rand(B, T, H, K, seed=seed)
    return k if l2norm else 0.9 * F.normalize(k, dim=-1)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("l2norm", [False, True])
@pytest.mark.parametrize("fused, beta_per_channel", [(False, False), (True, False), (True, True)])
def test_delta_rule(fused, beta_per_channel, l2norm, packed):
    B, N = rows(packed)
    q, _, v = qkv(B)
    k = delta_keys(B, l2norm)
    beta = rand(B, T, H, *((V,) if beta_per_channel else ()), seed=4).sigmoid()
    h0 = rand(N, H, K, V, seed=9)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=l2norm,
              cu_seqlens=CU if packed else None)
    if fused:
        o, ht = fla.fused_recurrent_delta_rule(q, k, v, beta, **kw)
    else:
        o, ht = fla.chunk_delta_rule(q, k, v, beta, chunk_size=16, **kw)
    ref_o, ref_ht = reference(ref_delta, (q, k, v, None, beta), h0, packed, l2norm=l2norm)
    close(o, ref_o)
    close(ht, ref_ht)


def test_fused_recurrent_delta_rule_beta_defaults_to_one():
    q, _, v = qkv(2)
    k = delta_keys(2, l2norm=False)
    o, ht = fla.fused_recurrent_delta_rule(q, k, v, scale=0.5, output_final_state=True)
    ref_o, ref_ht = ref_delta(q, k, v, None, None, scale=0.5)
    close(o, ref_o)
    close(ht, ref_ht)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("l2norm", [False, True])
@pytest.mark.parametrize("value_heads", [H, 2 * H])
@pytest.mark.parametrize("fused", [False, True])
def test_gated_delta_rule(fused, value_heads, l2norm, packed):
    B, N = rows(packed)
    q, _, v = qkv(B, Hv=value_heads)
    k = delta_keys(B, l2norm)
    g, beta = log_gate(B, T, value_heads, seed=7), rand(B, T, value_heads, seed=4).sigmoid()
    h0 = rand(N, value_heads, K, V, seed=9)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=l2norm,
              cu_seqlens=CU if packed else None)
    if fused:
        o, ht = fla.fused_recurrent_gated_delta_rule(q, k, v, g, beta=beta, **kw)
    else:
        o, ht = fla.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, **kw)
    ref_o, ref_ht = reference(ref_delta, (q, k, v, g, beta), h0, packed, l2norm=l2norm)
    close(o, ref_o)
    close(ht, ref_ht)


@pytest.mark.parametrize("fused", [False, True])
def test_gated_delta_rule_in_kernel_activations(fused):
    """use_gate_in_kernel: g = -exp(A_log) softplus(g + dt_bias); beta logits: 2 sigmoid(beta) (allow_neg_eigval)."""
    q, k, v = qkv(2)
    g_raw, b_raw = rand(2, T, H, seed=7), rand(2, T, H, seed=4)
    A_log, dt_bias = rand(H, seed=10) * 0.3, rand(H, seed=11)
    kw = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
              use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True, output_final_state=True)
    if fused:
        o, ht = fla.fused_recurrent_gated_delta_rule(q, k, v, g_raw, beta=b_raw, **kw)
    else:
        o, ht = fla.chunk_gated_delta_rule(q, k, v, g_raw, b_raw, **kw)
    g = -A_log.exp() * F.softplus(g_raw + dt_bias)
    ref_o, ref_ht = ref_delta(q, k, v, g, 2 * b_raw.sigmoid(), l2norm=True)
    close(o, ref_o)
    close(ht, ref_ht)


# ---------------------------------------------------------------------------------------------------------
# MesaNet


def mesa_inputs(B: int, N: int, l2norm: bool):
    q, k, v = rand(B, T, H, K, seed=0), rand(B, T, H, K, seed=1), rand(B, T, H, K, seed=2)  # fla: V == K
    k = k if l2norm else F.normalize(k, dim=-1)
    g, beta = log_gate(B, T, H, seed=3), rand(B, T, H, seed=4).sigmoid()
    lamb = rand(H, K, seed=5).sigmoid() * 0.75 + 0.25                            # fla's test range
    unit = F.normalize(rand(N, H, K, seed=6), dim=-1)
    return (q, k, v, g, beta, lamb), (unit[..., :, None] * unit[..., None, :], rand(N, H, K, K, seed=7))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("l2norm", [False, True])
def test_mesa_net(l2norm, packed):
    B, N = rows(packed)
    args, (h_kk, h_kv) = mesa_inputs(B, N, l2norm)
    o, kk, kv = fla.chunk_mesa_net(*args, h_kk_init=h_kk, h_kv_init=h_kv, output_final_state=True,
                                   use_qk_l2norm_in_kernel=l2norm, cu_seqlens=CU if packed else None)
    q, k, *rest = args
    if l2norm:
        q, k = ref_l2norm(q), ref_l2norm(k)
    ref_o, (ref_kk, ref_kv) = reference(ref_mesa, (q, k, *rest), (h_kk, h_kv), packed)
    close(o, ref_o)
    close(kk, ref_kk)
    close(kv, ref_kv)


def test_mesa_net_solves_exactly_the_system_fla_iterates_on():
    """fla's CG (30 steps, its test's budget) lands near the exact solve; the compat is the exact solve, so
    max_CG_iteration has no effect, and a missing initial half starts from zero (as fla)."""
    args, (h_kk, _) = mesa_inputs(2, 2, l2norm=False)
    o, none_kk, none_kv = fla.chunk_mesa_net(*args, h_kk_init=h_kk, max_CG_iteration=1)
    assert none_kk is None and none_kv is None
    close(fla.chunk_mesa_net(*args, h_kk_init=h_kk, max_CG_iteration=30)[0], o)
    close(o, ref_mesa(*args, h0=(h_kk, torch.zeros_like(h_kk)))[0])
    cg = ref_mesa(*args, h0=(h_kk, torch.zeros_like(h_kk)), cg_steps=30)[0]
    assert (cg - o).abs().max() < 1e-3 * o.abs().max()


# ---------------------------------------------------------------------------------------------------------
# state layout, dtypes, scale defaults


STATE_V_FIRST_OPS = {
    "chunk_simple_gla": lambda q, k, v, **kw: fla.chunk_simple_gla(q, k, v, log_gate(2, T, H, seed=7), **kw),
    "fused_recurrent_simple_gla": lambda q, k, v, **kw: fla.fused_recurrent_simple_gla(q, k, v, reverse=True, **kw),
    "chunk_gla": lambda q, k, v, **kw: fla.chunk_gla(q, k, v, log_gate(2, T, H, K, seed=7), **kw),
    "fused_recurrent_gla": lambda q, k, v, **kw: fla.fused_recurrent_gla(q, k, v, log_gate(2, T, H, K, seed=7), **kw),
    "fused_recurrent_retention": fla.fused_recurrent_retention,
    "chunk_gated_delta_rule": lambda q, k, v, **kw: fla.chunk_gated_delta_rule(
        q, k, v, log_gate(2, T, H, seed=7), rand(2, T, H, seed=4).sigmoid(), use_qk_l2norm_in_kernel=True, **kw),
    "fused_recurrent_gated_delta_rule": lambda q, k, v, **kw: fla.fused_recurrent_gated_delta_rule(
        q, k, v, beta=rand(2, T, H, V, seed=4).sigmoid(), use_qk_l2norm_in_kernel=True, **kw),
}


@pytest.mark.parametrize("name", sorted(STATE_V_FIRST_OPS))
def test_state_v_first(name):
    call, (q, k, v), h0 = STATE_V_FIRST_OPS[name], qkv(2), rand(2, H, K, V, seed=9)
    o, ht = call(q, k, v, initial_state=h0, output_final_state=True)
    o_vk, ht_vk = call(q, k, v, initial_state=h0.transpose(-1, -2), output_final_state=True, state_v_first=True)
    close(o_vk, o)
    close(ht_vk, ht.transpose(-1, -2))
    if name.startswith("fused") or name == "chunk_gated_delta_rule":  # fla's deprecated alias
        with pytest.warns(DeprecationWarning, match="transpose_state_layout"):
            o_old, _ = call(q, k, v, initial_state=h0.transpose(-1, -2), transpose_state_layout=True)
        close(o_old, o)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_as_fla(dtype):
    """o in the input dtype, states in float32."""
    q, k, v = (x.to(dtype) for x in qkv(2))
    g, beta = log_gate(2, T, H, seed=7), rand(2, T, H, seed=4).sigmoid()
    outs = [fla.chunk_simple_gla(q, k, v, g.to(dtype), output_final_state=True),
            fla.fused_recurrent_delta_rule(q, k, v, beta.to(dtype), output_final_state=True,
                                           use_qk_l2norm_in_kernel=True)]
    for o, ht in outs:
        assert o.dtype == dtype and ht.dtype == torch.float32
    _, (_, z) = fla.chunk_linear_attn(q.sigmoid(), k.sigmoid(), v)
    assert z.dtype == dtype
    q2, k2, v2, w, u = (x.to(dtype) for x in rwkv6_inputs(2))
    for op in (fla.chunk_rwkv6, fla.fused_recurrent_rwkv6):
        o, ht = op(q2, k2, v2, w, u, initial_state=torch.zeros(2, H, K, V), output_final_state=True)
        assert o.dtype == dtype and ht.dtype == torch.float32
    q, k = (x.to(dtype) for x in mesa_inputs(2, 2, False)[0][:2])
    o, kk, kv = fla.chunk_mesa_net(q, k, q, g, beta, torch.ones(H, K), output_final_state=True)
    assert o.dtype == dtype and kk.dtype == kv.dtype == torch.float32


_W, _U = log_gate(2, T, H, K, seed=7), rand(H, K, seed=3)


@pytest.mark.parametrize("op", [fla.chunk_linear_attn, fla.fused_recurrent_retention, fla.fused_recurrent_delta_rule,
                                functools.partial(fla.chunk_rwkv6, w=_W, u=_U),
                                functools.partial(fla.fused_recurrent_rwkv6, w=_W, u=_U)],
                         ids=["chunk_linear_attn", "fused_recurrent_retention", "fused_recurrent_delta_rule",
                              "chunk_rwkv6", "fused_recurrent_rwkv6"])
def test_default_scale_is_inverse_sqrt_key_dim(op):
    (q, _, v), k = qkv(2), delta_keys(2, l2norm=False)
    kw = dict(normalize=False) if op is fla.chunk_linear_attn else {}
    close(op(q, k, v, **kw)[0], op(q, k, v, scale=K ** -0.5, **kw)[0])
    assert not torch.allclose(op(q, k, v, **kw)[0], op(q, k, v, scale=1.0, **kw)[0])


# ---------------------------------------------------------------------------------------------------------
# what ttr cannot honor


def _bad_calls():
    q, k, v = qkv(2)
    beta, g = rand(2, T, H, seed=4).sigmoid(), log_gate(2, T, H, seed=7)
    w, u = log_gate(2, T, H, K, seed=7), rand(H, K, seed=3)
    unit = F.normalize(k, dim=-1)
    return [
        ("head_first", lambda: fla.chunk_simple_gla(q, k, v, head_first=True)),
        ("unsupported keyword", lambda: fla.fused_recurrent_retention(q, k, v, use_cache=True)),
        ("state_v_first and the deprecated", lambda: fla.fused_recurrent_gla(
            q, k, v, state_v_first=True, transpose_state_layout=True)),
        ("gv", lambda: fla.fused_recurrent_gla(q, k, v, gv=log_gate(2, T, H, V, seed=7))),
        ("gk", lambda: fla.fused_recurrent_gated_delta_rule(q, unit, v, gk=log_gate(2, T, H, K, seed=7))),
        ("per-channel log-gate", lambda: fla.chunk_gla(q, k, v, g)),
        ("only with normalize=True", lambda: fla.chunk_linear_attn(
            q, k, v, initial_state=(None, None), normalize=False)),
        ("z_state", lambda: fla.chunk_linear_attn(q, k, v, initial_state=(None, torch.zeros(2, H, K)))),
        ("beta must be", lambda: fla.chunk_delta_rule(q, unit, v, beta[..., None].expand(2, T, H, V))),
        ("beta", lambda: fla.fused_recurrent_delta_rule(q, unit, v, beta[..., None].expand(2, T, H, 3))),
        ("beta \\* \\|\\|k\\|\\|", lambda: fla.chunk_delta_rule(q, 3 * unit, v, beta)),
        ("chunk_size", lambda: fla.chunk_gated_delta_rule(q, unit, v, g, beta, chunk_size=128)),
        ("chunk_size", lambda: fla.chunk_simple_gla(q, k, v, chunk_size=24)),
        ("cp_context", lambda: fla.chunk_gated_delta_rule(q, unit, v, g, beta, cp_context=object())),
        ("allow_neg_eigval", lambda: fla.fused_recurrent_gated_delta_rule(q, unit, v, g, beta=beta,
                                                                          allow_neg_eigval=True)),
        ("A_log", lambda: fla.chunk_gated_delta_rule(q, unit, v, g, beta, use_gate_in_kernel=True)),
        ("multiple", lambda: fla.fused_recurrent_gated_delta_rule(q, unit, rand(2, T, 3, V, seed=2), g)),
        ("log-gate", lambda: fla.fused_recurrent_simple_gla(q, k, v, g=-g)),
        ("max_CG_iteration", lambda: fla.chunk_mesa_net(q, unit, q, g, beta, torch.ones(H, K), max_CG_iteration=-1)),
        ("batch size must be 1", lambda: fla.chunk_retention(q, k, v, cu_seqlens=torch.tensor([0, 10, T]))),
        ("initial_state", lambda: fla.fused_recurrent_simple_gla(
            q[:1], k[:1], v[:1], initial_state=torch.zeros(2, H, K, V, dtype=q.dtype), cu_seqlens=CU)),
        ("head_first", lambda: fla.chunk_rwkv6(q, k, v, w, u, head_first=False)),
        ("unsupported keyword", lambda: fla.chunk_rwkv6(q, k, v, w, u, reverse=True)),  # fla: chunk form has none
        ("chunk_size", lambda: fla.chunk_rwkv6(q, k, v, w, u, chunk_size=24)),
        ("w must be", lambda: fla.fused_recurrent_rwkv6(q, k, v, g, u)),               # a per-head gate
        ("w must be", lambda: fla.chunk_rwkv6(q, k, v, None, u)),
        ("u must have shape", lambda: fla.chunk_rwkv6(q, k, v, w, u[0])),
        ("u must have shape", lambda: fla.fused_recurrent_rwkv6(q, k, v, w, rand(H, V, seed=3))),
        ("u must be", lambda: fla.fused_recurrent_rwkv6(q, k, v, w, None)),
        ("log-gate", lambda: fla.fused_recurrent_rwkv6(q, k, v, -w, u)),
        ("batch size must be 1", lambda: fla.chunk_rwkv6(q, k, v, w, u, cu_seqlens=torch.tensor([0, 10, T]))),
        ("initial_state", lambda: fla.fused_recurrent_rwkv6(
            q[:1], k[:1], v[:1], w[:1], u, initial_state=torch.zeros(2, H, K, V, dtype=q.dtype), cu_seqlens=CU,
            reverse=True)),
    ]


@pytest.mark.parametrize("what, call", _bad_calls(), ids=[what for what, _ in _bad_calls()])
def test_bad_input_raises_value_error(what, call):
    with pytest.raises(ValueError, match=what):
        call()
