"""Online SGD, one association at a time: the delta rule and its gated form.

Objective   the running regression loss L_t(M) = sum_{i<=t} 1/2 || v_i - M k_i ||^2, visited online
Weights     uniform (DeltaNet), or decayed by alpha_t = exp(g_t) (Gated DeltaNet: weight decay, see below)
Function    linear: m(k) = M k (qk_l2norm=True normalizes q and k first, so beta in [0, 2] is a contraction)
Optimizer   one SGD step per token on the newest term, step size beta_t:
                M_t = M_{t-1} - beta_t (M_{t-1} k_t - v_t) k_t^T = M_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T

With a gate, the field's form (Gated DeltaNet) is M_t = alpha_t M_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T:
decay, then the SGD step at the decayed weights. It is the slides' L2-regularized SGD,
M_t = M_{t-1} [(1 - eta lambda) I - eta k k^T] + eta v k^T, after the invertible map
    eta_t = alpha_t beta_t,  lambda_t = (1 - alpha_t) / (alpha_t beta_t),  on targets v_t / alpha_t
(check: alpha M (I - beta k k^T) = M [(1 - eta lambda) I - eta k k^T] and beta v = eta (v / alpha)).

The state is S_t = M_t^T [B, H, Dk, Dv]:  S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
o_t = S_t^T (scale q_t).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._checks import (blame, check_log_gate, check_mode, check_qkv, check_state, check_step, checking, compute_dtype,
                       finite_answer, log_gate_as, scale_or, vouch)
from ..features import FEATURE_MAPS, L2_FLOOR
from ._chunk import (check_chunk_size, decay_mask, dot, from_chunk_major, solved_pass, solved_pass_backward,
                     to_chunk_major, written_out)
from ._varlen import check_cu_seqlens, run_packed


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    qk_l2norm: bool = False,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The (gated) delta rule. q, k: [B, T, H, Dk], v: [B, T, H, Dv], beta: [B, T, H] in [0, 2],
    g: a log-gate [B, T, H] or None. Returns (o [B, T, H, Dv], final state [B, H, Dk, Dv] or None).

    As fla's chunk_gated_delta_rule: the op uses q and k as given (qk_l2norm=True normalizes them to unit
    length first, as DeltaNet's layer does, fla's use_qk_l2norm_in_kernel); beta_t ||k_t||^2 must lie in
    [0, 2] for the step to be a contraction (checked). scale defaults to Dk^-1/2. cu_seqlens [N + 1]
    (with B = 1) packs N sequences, with states [N, H, Dk, Dv].
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v, values=False)  # a non-finite value reaches the answer (finite_answer)
    given = {"q": q, "k": k, "v": v}
    cu = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T)
    check_mode(mode, ("chunk", "recurrent"))
    check_chunk_size(chunk_size)
    check_step("beta", beta, (B, T, H), upper=2.0 if qk_l2norm else None)
    if not qk_l2norm and checking():  # the step is a contraction while beta ||k||^2 <= 2
        reach = float((beta.detach() * (k.detach().to(beta.dtype) ** 2).sum(-1)).max()) if beta.numel() else 0.0
        if reach > 2.0 + 1e-6:
            raise ValueError(f"beta * ||k||^2 must lie in [0, 2] with raw keys (qk_l2norm=False), got max {reach:.4g}")
    check_log_gate(g, B, T, H, Dk, scalar_for="the delta rule")
    check_state("initial_state", initial_state, (B if cu is None else cu.numel() - 1, H, Dk, Dv))
    out_dtype = q.dtype
    dt = compute_dtype(q.dtype)
    q, k, v, beta = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
    scale = scale_or(scale, Dk ** -0.5)
    g = log_gate_as(g, dt)
    s0 = None if initial_state is None else initial_state.to(dt)
    if mode == "recurrent":
        q, k = _unit(q, k, qk_l2norm, scale)
        core = _recurrent
    else:  # the chunk form normalizes and scales q and k as it lays them out
        core = functools.partial(_chunked, C=chunk_size, normalize=qk_l2norm, scale=scale)
    if cu is None:
        o, state = core(q, k, v, beta, g, s0)
    else:  # zero beta and gates outside the sequences: no step, no decay
        o, state = run_packed(core, cu, [q, k, v, beta, g], s0, None if mode == "recurrent" else chunk_size)
    if output_final_state:
        vouch(state)
    return finite_answer("delta_rule", o.to(out_dtype), **given), (state if output_final_state else None)


def _recurrent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None,
               s0: Tensor | None) -> tuple[Tensor, Tensor]:
    B, T, H, Dk = k.shape
    state = q.new_zeros(B, H, Dk, v.shape[-1]) if s0 is None else s0
    outs = []
    for t in range(T):
        if g is not None:
            state = state * torch.exp(g[:, t])[..., None, None]
        k_t = k[:, t]
        error = (k_t[..., None, :] @ state)[..., 0, :] - v[:, t]  # M k - v, the gradient's residual
        state = state - beta[:, t, :, None, None] * k_t[..., :, None] * error[..., None, :]
        outs.append((q[:, t, :, None, :] @ state)[..., 0, :])
    return torch.stack(outs, dim=1), state


def _unit(q: Tensor, k: Tensor, normalize: bool, scale: float) -> tuple[Tensor, Tensor]:
    """q and k as the delta rule reads them: unit length where normalize (qk_l2norm), q scaled."""
    if normalize:
        q, k = FEATURE_MAPS["l2"](q), FEATURE_MAPS["l2"](k)
    return q * scale, k


def _chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, s0: Tensor | None,
             C: int, normalize: bool = False, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """WY / UT form. Within a chunk starting from state S_0, write S_t = e^{G_t} S_0 + sum_{i<=t}
    e^{G_t - G_i} k_i u_i^T with u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t). The u's solve one unit
    lower-triangular system per chunk,
        (I + diag(beta) (tril_{-1}(K K^T) * Gamma)) U = diag(beta) (V - diag(e^G) K S_0),  Gamma_ti = e^{G_t - G_i},
    so U = U' - W' S_0 with U', W' from one batched triangular solve for all chunks; only the chunk-to-chunk
    pass of the state is sequential (state_pass). Chunk-major layout (to_chunk_major): [N * B * H, C, D].
    The backward is written out (_DeltaChunks). q and k as given, unit length where normalize; q scaled."""
    return _DeltaChunks.apply(q, k, v, beta, g, s0, C, normalize, scale)


def _chunked_reference(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, s0: Tensor | None,
                       C: int, normalize: bool, scale: float) -> tuple[Tensor, Tensor]:
    """_chunked in autograd ops (for gradients of gradients: written_out)."""
    q, k = _unit(q, k, normalize, scale)
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    qc, kc, vc = (to_chunk_major(x, C) for x in (q, k, v))
    bc = to_chunk_major(beta[..., None], C)                          # [NBH, C, 1]; padding: beta = 0
    G = to_chunk_major(g[..., None], C).cumsum(-2) if g is not None else bc.new_zeros(bc.shape)
    gamma = decay_mask(G[..., 0])                                    # [NBH, C, C], e^{G_t - G_i}, i <= t
    decay_in = torch.exp(G)                                          # e^{G_t}: start state -> token t
    k_out = kc * torch.exp(G[:, -1:] - G)                            # token i -> end of chunk
    chunk_decay = None if g is None else torch.exp(G[:, -1:])        # [NBH, 1, 1]
    state = q.new_zeros(B * H, Dk, Dv) if s0 is None else s0.reshape(B * H, Dk, Dv)
    o, _, _, final, _ = solved_pass((kc @ kc.transpose(-1, -2) * gamma).tril(-1), bc,
                                    torch.cat([bc * vc, bc * decay_in * kc], -1), qc @ kc.transpose(-1, -2) * gamma,
                                    qc * decay_in, k_out, chunk_decay, state)
    return from_chunk_major(o, B, T, H), final.view(B, H, Dk, Dv)


class _DeltaChunks(torch.autograd.Function):
    """_chunked with its backward written out. Per chunk (M = tril_{-1}(K K^T) * Gamma, P = tril(Q K^T) * Gamma,
    T = (I + diag(beta) M)^{-1}, [U' | W'] = T [beta V | beta e^G K], u and X_n from the state pass,
    o = P u + (e^G Q) X_n):
        du = P^T do (then the pass's backward: dU', dW', dKo, dd, dS_0),   dP = do u^T,   d(e^G Q) = do X_n^T,
        dT = dU' (beta V)^T + dW' (beta e^G K)^T,   dA = -T^T dT T^T below the diagonal,   dM = diag(beta) dA,
        dK = (dM + dM^T) * Gamma K + (dP * Gamma)^T Q + ...,   dG from Gamma by dM * M + dP * P (rows minus columns),
    and the log-gates' gradient is the reverse running sum of dG over the chunk. Every product of the autograd form
    stays; what goes is its elementwise passes over fresh buffers, the triangular solve's backward (two products
    with T in its place) and the copies of the state pass's gradients."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, s0: Tensor | None,
                C: int, normalize: bool, scale: float) -> tuple[Tensor, Tensor]:
        B, T, H, Dk = k.shape
        Dv = v.shape[-1]
        norms = [None, None]
        if normalize:  # laid out unit length (and q scaled) in one pass each
            norms = [x.norm(dim=-1, keepdim=True) for x in (q, k)]
            qc, kc = (to_chunk_major(x, C, s / n.clamp_min(L2_FLOOR)) for x, n, s in zip((q, k), norms, (scale, 1.0)))
            norms = [to_chunk_major(n, C) for n in norms]
        else:
            qc, kc = to_chunk_major(q, C, scale), to_chunk_major(k, C)
        vc = to_chunk_major(v, C)
        bc = to_chunk_major(beta[..., None], C)                      # [NBH, C, 1]; padding: beta = 0
        M, P = kc @ kc.transpose(-1, -2), qc @ kc.transpose(-1, -2)
        G = gamma = chunk_decay = None
        if g is None:
            M.tril_(-1)
            P.tril_()
            qe, bk, k_out = qc, bc, kc
        else:
            G = to_chunk_major(g[..., None], C).cumsum(-2)
            gamma = decay_mask(G[..., 0])                            # 0 above the diagonal
            M.mul_(gamma).tril_(-1)
            P.mul_(gamma)
            decay_in = torch.exp(G)
            qe, bk = qc * decay_in, bc * decay_in
            k_out = kc * torch.exp(G[:, -1:] - G)
            chunk_decay = torch.exp(G[:, -1:])
        rhs = torch.cat([vc * bc, kc * bk], -1)                      # [beta V | beta e^G K]
        state = q.new_zeros(B * H, Dk, Dv) if s0 is None else s0.reshape(B * H, Dk, Dv)
        o, u, _, _, (inverse, w, states) = solved_pass(M, bc, rhs, P, qe, k_out, chunk_decay, state)
        ctx.save_for_backward(qc, qe, kc, vc, bc, G, gamma, M, P, inverse, rhs, w, k_out, chunk_decay, u, states,
                              *norms)
        ctx.inputs = q, k, v, beta, g, s0, C, normalize, scale
        return from_chunk_major(o, B, T, H), states[-1].view(B, H, Dk, Dv).clone()

    @staticmethod
    @written_out(_chunked_reference)
    def backward(ctx, do: Tensor, dfinal: Tensor) -> tuple[Tensor | None, ...]:
        qc, qe, kc, vc, bc, G, gamma, M, P, inverse, rhs, w, k_out, chunk_decay, u, states, *norms = ctx.saved_tensors
        q, _, _, _, g, s0, C, normalize, scale = ctx.inputs
        B, T, H = q.shape[:3]
        dP, dqe, d_v_side, d_k_side, dM, dk_out, dd, ds0 = solved_pass_backward(
            to_chunk_major(do, C), P, qe, inverse, rhs, w, k_out, chunk_decay, u, states, dfinal)
        from_k_side = dot(d_k_side, kc)                               # [NBH, C]: beta_t's and e^{G_t}'s share
        dbeta = dot(dM, M) + dot(d_v_side, vc)
        dM.mul_(bc)
        dv = d_v_side.mul_(bc)
        dG = None
        if G is None:
            dbeta += from_k_side
            dP.tril_()
            dk = d_k_side.mul_(bc).add_(dk_out)
            dq = dqe
        else:
            decay_in = torch.exp(G)
            dbeta += from_k_side * decay_in[..., 0]
            through = torch.mul(dM, M).addcmul_(dP, P)               # d Gamma * Gamma
            dG = through.sum(-1) - through.sum(-2) + dot(dqe, qe) + from_k_side * (bc * decay_in)[..., 0]
            reach = dot(dk_out, k_out)                                # k_out_i = k_i e^{G_C - G_i}
            dG -= reach
            dG[:, -1] += reach.sum(-1) + (dd * chunk_decay).view(-1)
            dM.mul_(gamma)
            dP.mul_(gamma)
            dk = d_k_side.mul_(bc * decay_in).addcmul_(dk_out, torch.exp(G[:, -1:] - G))
            dq = dqe.mul_(decay_in)
        dk.baddbmm_(dM + dM.transpose(-1, -2), kc).baddbmm_(dP.transpose(-1, -2), qc)
        dq.baddbmm_(dP, kc)
        if normalize:
            dq, dk = (_unit_backward(d, x, n, s) for d, x, n, s in zip((dq, dk), (qc, kc), norms, (scale, 1.0)))
        else:
            dq.mul_(scale)
        grads = [from_chunk_major(x, B, T, H) for x in (dq, dk, dv, dbeta[..., None])]
        dg = None if dG is None else from_chunk_major(dG.flip(-1).cumsum(-1).flip(-1)[..., None], B, T, H)[..., 0]
        return (*grads[:3], grads[3][..., 0], dg, None if s0 is None else ds0.view_as(s0), None, None, None)


def _unit_backward(du: Tensor, u: Tensor, norm: Tensor, scale: float) -> Tensor:
    """In place, du -> dx for u = scale x / max(||x||, L2_FLOOR) (norm = ||x||; chunk-major): scale / ||x|| times du
    less its part along u, which a clamped norm does not take out."""
    along = dot(du, u)[..., None] * ((norm > L2_FLOOR).to(du.dtype) / scale ** 2)  # not bool / float: float32
    return du.addcmul_(u, along, value=-1).mul_(scale / norm.clamp_min(L2_FLOOR))


def delta_product(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    qk_l2norm: bool = False,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """DeltaProduct: n online SGD steps per token, each with its own key, value and step size.

    k [B, T, H, n, Dk], v [B, T, H, n, Dv], beta [B, T, H, n]; q [B, T, H, Dk] reads the memory after the
    token's n-th step, and g (a log-gate [B, T, H]) decays it once, before the first. The state moves
    through a product of n generalized Householder factors per token (Siems et al., 2025). It is the
    delta rule on the sequence of T n sub-steps, read every n-th (q, k as given unless qk_l2norm; scale defaults
    to Dk^-1/2; cu_seqlens as the delta rule's).
    """
    if k.dim() != 5 or v.dim() != 5:
        raise ValueError(f"k and v must be [B, T, H, n, D] for delta_product, got {list(k.shape)} and {list(v.shape)}")
    B, T, H, n, Dk = k.shape
    check_qkv(q, k[:, :, :, 0], v[:, :, :, 0], values=False)  # ranks, dtypes, T > 0 (delta_rule checks values)
    if q.shape != (B, T, H, Dk) or v.shape[:4] != (B, T, H, n):
        raise ValueError(f"q must be [B, T, H, Dk] = {[B, T, H, Dk]} and v [B, T, H, n, Dv] matching k, got "
                         f"q {list(q.shape)}, v {list(v.shape)}")
    check_step("beta", beta, (B, T, H, n))
    check_log_gate(g, B, T, H, Dk, scalar_for="delta_product")
    q_sub = torch.zeros(B, T, n, H, Dk, dtype=q.dtype, device=q.device)
    q_sub[:, :, -1] = q
    g_sub = None
    if g is not None:
        g_sub = torch.zeros(B, T, n, H, dtype=g.dtype, device=g.device)
        g_sub[:, :, 0] = g
        g_sub = g_sub.reshape(B, T * n, H)
    o, state = delta_rule(q_sub.reshape(B, T * n, H, Dk), k.transpose(2, 3).reshape(B, T * n, H, Dk),
                          v.transpose(2, 3).reshape(B, T * n, H, -1), beta.transpose(2, 3).reshape(B, T * n, H),
                          g_sub, qk_l2norm=qk_l2norm, scale=scale,
                          initial_state=initial_state, output_final_state=output_final_state, mode=mode,
                          chunk_size=chunk_size, cu_seqlens=None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, B, T) * n)
    return o.reshape(B, T, n, H, -1)[:, :, -1], state


def longhorn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    delta: Tensor,
    *,
    qk_l2norm: bool = False,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Longhorn: the implicit (proximal) online step, delta [B, T, H] >= 0 its strength.

        M_t = argmin_M 1/2 ||M - M_{t-1}||_F^2 + delta_t / 2 ||v_t - M k_t||^2.
    Setting the gradient to zero, M (I + delta k k^T) = M_{t-1} + delta v k^T, and Sherman-Morrison,
    (I + delta k k^T)^-1 = I - delta k k^T / (1 + delta ||k||^2), give
        M_t = M_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,   beta_t = delta_t / (1 + delta_t ||k_t||^2):
    the delta rule with that step (the slides print 1 / (1 + delta ||k||^2), which drops the numerator).
    beta_t ||k_t||^2 < 1 for every delta_t, so the step never overshoots. q, k as given unless qk_l2norm;
    scale defaults to Dk^-1/2; cu_seqlens as the delta rule's.
    """
    B, T, H, _, _ = check_qkv(q, k, v, values=False)  # delta_rule checks the values
    check_step("delta", delta, (B, T, H))
    if not qk_l2norm and checking():  # raw keys make the step size: a non-finite key is named as the key
        blame(k=k)
    k_sq = torch.ones_like(delta) if qk_l2norm else (k.to(delta.dtype) ** 2).sum(-1)
    beta = delta / (1.0 + delta * k_sq)
    return delta_rule(q, k, v, beta, qk_l2norm=qk_l2norm, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, mode=mode, chunk_size=chunk_size, cu_seqlens=cu_seqlens)
