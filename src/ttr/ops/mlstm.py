"""mLSTM's matrix memory (Beck et al. 2024, xLSTM): batch GD with an exponential input gate and a query-dependent step.

Objective   M_t = argmin_M 1/2 sum_{i<=t} gamma_i^(t) || v_i - M k_i ||^2,  answer y_t = eta_t M_t (s q_t)
Weights     gamma_i^(t) = exp(itilde_i) f_{i+1} ... f_t: an input weight (the exponential input gate, itilde any real)
            times a decay f = exp(g), g <= 0 the log forget gate (the layer passes logsigmoid(ftilde)); scalar per head
Function    linear: m(k) = M k
Optimizer   one step of batch GD from M = 0 with the step eta_t = 1 / max(|z_t^T s q_t|, 1), where
            z_t = sum_i gamma_i^(t) k_i is the weight mass the query sees: a query-dependent step, capped at 1.

Per head, the state is C_t = M_t^T and the normalizer n_t = z_t:
    C_t = f_t C_{t-1} + i_t k_t v_t^T,   n_t = f_t n_{t-1} + i_t k_t,   h_t = C_t^T (s q_t) / max(|n_t^T (s q_t)|, 1)
with i_t = exp(itilde_t), f_t = exp(g_t) and s = scale, Dk^-1/2 by default (as fla; xLSTM scales k by Dk^-1/2, the
same).

Max-stabilizer: exp(itilde) overflows (float32 beyond itilde = 88), so the states are kept as Ctilde = C e^-m,
ntilde = n e^-m with
    m_t = max(g_t + m_{t-1}, itilde_t),   h_t = Ctilde_t^T (s q_t) / max(|ntilde_t^T (s q_t)|, e^-m_t),
and every factor formed, e^(g_t + m_{t-1} - m_t) and e^(itilde_t - m_t), is <= 1. This is the unstabilized math
exactly wherever that is finite; h does not depend on m, so m carries no gradient (a given initial state's m does: it
scales that state's value). The state is the triple
(Ctilde [N, H, Dk, Dv], ntilde [N, H, Dk], m [N, H]), mlstm_kernels' (c, n, m); a fresh one is zeros (m = 0, as there).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import (LOG_GATE_FLOOR, check_log_gate, check_mode, check_qkv, check_state, check_tensor, checking,
                       compute_dtype, finite_answer, scale_or, vouch)
from ._chunk import causal_mask, check_chunk_size, from_chunks, masked_exp, to_chunks
from ._varlen import check_cu_seqlens, run_packed

State = tuple[Tensor, Tensor, Tensor]


def mlstm(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    i: Tensor,
    g: Tensor,
    *,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, State | None]:
    """The mLSTM memory. q, k: [B, T, H, Dk], v: [B, T, H, Dv]; i: [B, T, H] the log input gate itilde (finite, any
    sign); g: [B, T, H] the log forget gate (<= 0).

    Returns (o [B, T, H, Dv] in the input dtype, final state (C [B, H, Dk, Dv], n [B, H, Dk], m [B, H]) stabilized, in
    float32/64, or None). Modes: "chunk" (training), "recurrent" (token by token, the decoding path). cu_seqlens
    [N + 1] (with B = 1) packs N sequences: states start afresh at each boundary and are [N, ...].
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v, values=False)  # a non-finite value reaches the answer (finite_answer)
    given = {"q": q, "k": k, "v": v}
    cu = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T)
    check_mode(mode, ("chunk", "recurrent"))
    check_chunk_size(chunk_size)
    spread = _check_input_gate(i, B, T, H)
    if check_log_gate(g, B, T, H, Dk, scalar_for="mlstm") is None:
        raise ValueError("g, the log forget gate [B, T, H], is required by mlstm")
    scale = scale_or(scale, Dk ** -0.5)
    _check_state(initial_state, B if cu is None else cu.numel() - 1, H, Dk, Dv)
    out_dtype = q.dtype
    dt = compute_dtype(q.dtype)
    q, k, v, i = q.to(dt) * scale, k.to(dt), v.to(dt), i.to(dt)
    # Log forget gates are clamped at a floor, as in every op, to keep the cumulative gates finite; here it lies e^-100
    # below the input gates' span, so that what a gate at the floor decays weighs < e^-100 of any later association
    # however strong its input gate was (a fixed floor would let itilde = 150 outlive a gate of -120).
    g = g.to(dt).clamp_min((LOG_GATE_FLOOR - spread).to(dt))
    s0 = None
    if initial_state is not None:
        C0, n0, m0 = (x.to(dt) for x in initial_state)
        # The given state's value is (C, n) e^m: its m scales it (a real gradient, kept by this factor of 1); the
        # stabilizers computed from it are a choice that changes no value.
        lift = torch.exp(m0 - m0.detach())
        s0 = (C0 * lift[..., None, None], n0 * lift[..., None], m0.detach())
    core = _recurrent if mode == "recurrent" else functools.partial(_chunked, C=chunk_size)
    if cu is None:
        o, state = core(q, k, v, i, g, None, s0)
    else:
        # run_packed fills the frame with zeros: no key, no decay; `real` makes those positions' input gates -inf, so
        # they write nothing and leave m where it was
        real = torch.ones_like(i)
        o, state = run_packed(core, cu, [q, k, v, i, g, real], s0, None if mode == "recurrent" else chunk_size)
    if output_final_state:
        vouch(*state)
    return finite_answer("mlstm", o.to(out_dtype), **given), (state if output_final_state else None)


def _check_input_gate(i: Tensor, B: int, T: int, H: int) -> Tensor:
    """The log input gate: [B, T, H], finite, any sign. Returns the span (max - min) of its values, a tensor (no
    value is read back unless the checks run)."""
    check_tensor("i", i, 3, values=False)
    if tuple(i.shape) != (B, T, H):
        raise ValueError(f"i must be [B, T, H] = [{B}, {T}, {H}], got {list(i.shape)}")
    lo, hi = torch.aminmax(i.detach()) if i.numel() else (i.new_zeros(()), i.new_zeros(()))
    if checking() and not all(math.isfinite(x) for x in torch.stack([lo, hi]).tolist()):
        raise ValueError("i has non-finite values; the log input gate must be finite (any sign)")
    return hi - lo


def _check_state(state: State | None, rows: int, H: int, Dk: int, Dv: int) -> None:
    if state is None:
        return
    if not (isinstance(state, (tuple, list)) and len(state) == 3):
        raise ValueError(f"initial_state must be the triple (C [N, H, Dk, Dv], n [N, H, Dk], m [N, H]), got "
                         f"{type(state).__name__}" + (f" of {len(state)}" if isinstance(state, (tuple, list)) else ""))
    for name, s, shape in zip("Cnm", state, ((rows, H, Dk, Dv), (rows, H, Dk), (rows, H))):
        check_state(f"initial_state ({name})", s, shape)


def _answer(num: Tensor, den: Tensor, m: Tensor) -> Tensor:
    """h = num / max(|den|, e^-m). The floor stays a normal number where e^-m underflows (m > 87 in float32), so a
    zero query (a padded position) answers 0, not 0/0."""
    floor = torch.exp(-m).clamp_min(torch.finfo(m.dtype).tiny)
    return num / torch.maximum(den.abs(), floor)[..., None]


def _recurrent(q: Tensor, k: Tensor, v: Tensor, i: Tensor, g: Tensor, real: Tensor | None,
               s0: State | None) -> tuple[Tensor, State]:
    B, _, H, Dk = k.shape
    if real is not None:
        i = i.masked_fill(real == 0, -math.inf)
    if s0 is None:
        C, n, m = q.new_zeros(B, H, Dk, v.shape[-1]), q.new_zeros(B, H, Dk), q.new_zeros(B, H)
    else:
        C, n, m = s0
    outs = []
    # unbind once: indexing inside the loop would make backward build a full-size zero gradient per token
    for q_t, k_t, v_t, i_t, g_t in zip(*(x.unbind(1) for x in (q, k, v, i, g))):
        m_new = torch.maximum(g_t + m, i_t).detach()
        decay, write = torch.exp(g_t + m - m_new), torch.exp(i_t - m_new)  # both <= 1
        C = decay[..., None, None] * C + write[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        n = decay[..., None] * n + write[..., None] * k_t
        m = m_new
        outs.append(_answer((q_t[..., None, :] @ C)[..., 0, :], (q_t * n).sum(-1), m))
    return torch.stack(outs, dim=1), (C, n, m)


def _chunked(q: Tensor, k: Tensor, v: Tensor, i: Tensor, g: Tensor, real: Tensor | None, s0: State | None,
             C: int) -> tuple[Tensor, State]:
    """Chunkwise form: within a chunk a masked attention with log-weights, across chunks the state.

    With G the within-chunk cumulative log forget gate and m_s the stabilizer of the chunk's start state, row a of
    a chunk weighs token b <= a by e^(D_ab), D_ab = G_a - G_b + itilde_b, and the start state by e^(G_a + m_s); its
    stabilizer m_a = max(G_a + m_s, max_b D_ab) is the recurrent form's m at that token. The chunk's end state is
    row C's: its new associations are summed once at their own largest log-weight, then rescaled to m_C. Every
    exponent formed is <= 0.
    """
    T = q.shape[1]
    if real is not None:
        i = i.masked_fill(real == 0, -math.inf)
    # the tail that fills the last chunk writes nothing and leaves m where it was
    i = F.pad(i, (0, 0, 0, (-T) % C), value=-math.inf)
    qc, kc, vc = to_chunks(q, C), to_chunks(k, C), to_chunks(v, C)  # [B, H, N, C, D]
    ic, G = to_chunks(i, C), to_chunks(g, C).cumsum(-1)             # [B, H, N, C]
    B, H = qc.shape[:2]
    G_end = G[..., -1]
    A = G_end[..., None] - G + ic  # token b's log-weight at the chunk's end
    top = A.detach().amax(-1)      # -inf for a chunk of padding: nothing to add
    top_safe = torch.where(top > -math.inf, top, torch.zeros_like(top))
    kw = kc * torch.exp(A - top_safe[..., None])[..., None]
    add_C, add_n = kw.transpose(-1, -2) @ vc, kw.sum(-2)  # [B, H, N, Dk, Dv], [B, H, N, Dk]
    if s0 is None:
        state = (q.new_zeros(B, H, kc.shape[-1], vc.shape[-1]), q.new_zeros(B, H, kc.shape[-1]), q.new_zeros(B, H))
    else:
        state = s0
    starts = []
    # unbind once: indexing inside the loop would make backward build a full-size zero gradient per chunk
    for dC, dn, g_end, top_n, safe_n in zip(add_C.unbind(2), add_n.unbind(2), G_end.unbind(2), top.unbind(2),
                                            top_safe.unbind(2)):
        starts.append(state)
        C_s, n_s, m_s = state
        m_e = torch.maximum(g_end.detach() + m_s, top_n)
        carry, fresh = torch.exp(g_end + m_s - m_e), torch.exp(safe_n - m_e)  # both <= 1
        state = (carry[..., None, None] * C_s + fresh[..., None, None] * dC,
                 carry[..., None] * n_s + fresh[..., None] * dn, m_e)
    C_st, n_st, m_st = (torch.stack(parts, dim=2) for parts in zip(*starts))
    mask = causal_mask(C, q.device)
    D = G[..., :, None] - G[..., None, :] + ic[..., None, :]  # [B, H, N, C, C]
    m = torch.maximum(G.detach() + m_st[..., None], torch.where(mask, D.detach(), -math.inf).amax(-1))
    scores = (qc @ kc.transpose(-1, -2)) * masked_exp(D - m[..., None], mask)
    inter = torch.exp(G + m_st[..., None] - m)  # the start state's weight in each row, <= 1
    num = scores @ vc + inter[..., None] * (qc @ C_st)
    den = scores.sum(-1) + inter * (qc @ n_st[..., None])[..., 0]
    return from_chunks(_answer(num, den, m), T), state
